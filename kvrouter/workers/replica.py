"""A worker's copy of the shared registry and prefix index: local changes become events, the
siblings' events are applied (:mod:`kvrouter.workers.events` describes the shapes).

Registry records are versioned (``v`` = ``(wall-clock seconds, worker number)``) per part
(registration, health) and the last writer wins; a removal leaves a tombstone for
:data:`TOMBSTONE_SECS`, so a late, older registration cannot bring the instance back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from kvrouter.prefix.index import PrefixIndex
from kvrouter.registry import Instance, Registry
from kvrouter.workers import events as ev

log = logging.getLogger("kvrouter.workers")

TOMBSTONE_SECS = 300.0   # removals remembered this long (a late, older record cannot revive)

Version = tuple[float, int]
_NO_VERSION: Version = (0.0, -1)


class RegistryReplica:
    """Versioned registry records with tombstones, for worker ``me``: ``emit`` is handed the
    events of local changes; ``apply_*`` apply a sibling's without emitting them again."""

    def __init__(self, registry: Registry, me: int, emit: Callable[[dict], None]) -> None:
        self.registry = registry
        self.me = me
        self._emit = emit
        self.applying = False           # a sibling's change is being applied: do not emit it
        self._versions: dict[str, list[Version]] = {}   # id → [info version, health version]
        self._tombstones: dict[str, Version] = {}
        self._last_stamp = 0.0

    def stamp(self) -> Version:
        """A new version: wall-clock seconds (strictly increasing here) and our number."""
        now = time.time()
        if now <= self._last_stamp:
            now = self._last_stamp + 1e-6
        self._last_stamp = now
        return (now, self.me)

    def _versions_of(self, ident: str) -> list[Version]:
        """The versions of a known instance (new ones for an instance added before us)."""
        vers = self._versions.get(ident)
        if vers is None:
            vers = self._versions[ident] = [self.stamp(), self.stamp()]
        return vers

    def seed(self) -> None:
        """Version the instances registered before the links existed."""
        for inst in self.registry.all():
            self._versions_of(inst.identity)

    # -- local changes → events ----------------------------------------------------------------
    def _reg_event(self, inst: Instance, v: Version) -> dict:
        return {"t": "reg", "id": inst.identity, "v": v, "i": ev.info_to_json(inst.info),
                "st": inst.static}

    def _health_event(self, inst: Instance, v: Version) -> dict:
        since = inst.unhealthy_since
        return {"t": "hl", "id": inst.identity, "v": v, "s": inst.state, "f": inst.fail_streak,
                "ok": inst.success_streak, "since": None if since is None else ev.wall(since)}

    @staticmethod
    def snapshot_event(inst: Instance) -> dict:
        assert inst.snapshot is not None
        return {"t": "snap", "id": inst.identity, "s": ev.snapshot_to_json(inst.snapshot)}

    def added(self, inst: Instance) -> None:
        if self.applying:
            return
        v = self.stamp()
        self._versions[inst.identity] = [v, v]
        self._tombstones.pop(inst.identity, None)
        self._emit(self._reg_event(inst, v))
        self._emit(self._health_event(inst, v))

    def changed(self, inst: Instance, what: str) -> None:
        if self.applying:
            return
        v = self.stamp()
        vers = self._versions.setdefault(inst.identity, [v, v])
        if what == "info":
            vers[0] = v
            self._emit(self._reg_event(inst, v))
        else:
            vers[1] = v
            self._emit(self._health_event(inst, v))

    def removed(self, inst: Instance, reason: str) -> None:
        if self.applying:
            return
        v = self.stamp()
        self._versions.pop(inst.identity, None)
        self._tombstones[inst.identity] = v
        self._emit({"t": "del", "id": inst.identity, "v": v, "r": reason})

    def state(self, snapshots: bool) -> list[dict]:
        """The registry as events (with the metrics snapshots if ``snapshots``), for a
        (re)started sibling or a periodic refresh."""
        out: list[dict] = []
        for inst in self.registry.all():
            vers = self._versions_of(inst.identity)
            out.append(self._reg_event(inst, vers[0]))
            out.append(self._health_event(inst, vers[1]))
            if snapshots and inst.snapshot is not None:
                out.append(self.snapshot_event(inst))
        return out

    def expire_tombstones(self) -> None:
        cutoff = time.time() - TOMBSTONE_SECS
        for ident in [i for i, v in self._tombstones.items() if v[0] < cutoff]:
            del self._tombstones[ident]

    # -- a sibling's events → local state ------------------------------------------------------
    def apply_reg(self, e: dict) -> None:
        ident, v = e["id"], tuple(e["v"])
        if v <= self._tombstones.get(ident, _NO_VERSION):
            return                                  # removed after this registration
        vers = self._versions.get(ident)
        if vers is not None and v <= vers[0]:
            return
        info = ev.info_from_json(e["i"])
        reg = self.registry
        inst = reg.get(ident)
        self.applying = True
        try:
            if inst is None:
                reg.add(info, static=bool(e.get("st")))
                self._versions[ident] = [v, _NO_VERSION]
            else:
                inst.static = bool(e.get("st"))
                if info != inst.info:
                    reg.update(inst, info)
                self._versions.setdefault(ident, [v, _NO_VERSION])[0] = v
        finally:
            self.applying = False

    def apply_health(self, e: dict, peer: int) -> None:
        ident, v = e["id"], tuple(e["v"])
        inst = self.registry.get(ident)
        vers = self._versions.get(ident)
        if inst is None or vers is None or v <= vers[1]:
            return
        vers[1] = v
        old = inst.state
        inst.state = e["s"]
        inst.fail_streak = e["f"]
        inst.success_streak = e["ok"]
        inst.unhealthy_since = None if e["since"] is None else ev.mono(e["since"])
        if inst.state != old:
            self.registry.changed()
            log.debug("worker %d: %s is %s (from worker %d)", self.me, inst.url, inst.state,
                      peer)

    def apply_del(self, e: dict) -> None:
        ident, v = e["id"], tuple(e["v"])
        vers = self._versions.get(ident)
        if vers is not None and max(vers) > v:
            return                                  # registered again since
        if v > self._tombstones.get(ident, _NO_VERSION):
            self._tombstones[ident] = v
        self._versions.pop(ident, None)
        inst = self.registry.get(ident)
        if inst is not None:
            self.applying = True
            try:
                self.registry.remove(inst, e["r"])
            finally:
                self.applying = False

    def apply_snap(self, e: dict) -> None:
        inst = self.registry.get(e["id"])
        if inst is None:
            return
        snap = ev.snapshot_from_json(e["s"])
        inst.snapshot = snap
        inst.load.on_snapshot(snap.taken_at)


class SharedPrefixIndex(PrefixIndex):
    """A worker's prefix index: a :class:`PrefixIndex` that can list its entries in order
    (:meth:`runs`), so a restarted sibling gets a copy."""

    __slots__ = ()

    def runs(self) -> list[list]:
        """The whole index as ``[[identity, [hash, …]], …]``, oldest entry first, consecutive
        entries of one instance in one run. Replaying each run with ``record(run[::-1], …)``
        rebuilds the same entries in the same eviction order.

        PrefixIndex has no public iteration; this reads its internals (the numpy table
        layout) and raises AttributeError if they change."""
        if not self.size:
            return []
        names = {num: ident for ident, num in self._ids.items()}
        stamps, slots = self._live_positions()
        nums: np.ndarray = self._instances_of(stamps)
        hashes: np.ndarray = self._tk[slots] ^ self._salts[nums]
        out: list[list] = []
        cur_num: int | None = None
        cur: list[int] = []
        for num, h in zip(nums.tolist(), hashes.tolist(), strict=True):
            if num != cur_num:
                cur_num, cur = num, []
                out.append([names[num], cur])
            cur.append(h)
        return out
