"""The instance registry: who is registered, in which role and health state, and their load.

Instances are keyed by identity (normalised ``host:port``). In-flight counters
live in a separate map keyed by identity, so they survive re-registration and role moves, and
are dropped only once an instance is removed *and* idle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, overload

from kvrouter.backends.snapshot import MetricsSnapshot
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Load

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

#: FastDeploy answers a request for the model ``default`` with whatever it serves: unless some
#: instance lists a model of that name, a request for it goes to any instance
ANY_MODEL = "default"


@dataclass(eq=False)
class Instance:
    """One registered instance: its registration, health state, load and metrics snapshot."""

    info: InstanceInfo
    load: Load
    static: bool = False
    state: str = HEALTHY
    fail_streak: int = 0
    success_streak: int = 0
    unhealthy_since: float | None = None
    snapshot: MetricsSnapshot | None = None
    stale_after: float = math.inf            # seconds a snapshot stays fresh
    models: list[dict] = field(default_factory=list)              # /v1/models cards
    #: the ids of its last non-empty ``/v1/models`` answer; ``None``: none yet
    fetched_models: frozenset[str] | None = None

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def identity(self) -> str:
        return self.info.identity

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def paused(self) -> bool:
        return self.info.is_paused

    @property
    def served(self) -> frozenset[str] | None:
        """The models it serves: its registration's ``models`` and its ``/v1/models`` ids;
        ``None`` when neither is known (then it is a candidate for every model)."""
        fetched = self.fetched_models
        if not self.info.models:
            return fetched
        return frozenset(self.info.models) | (fetched or frozenset())

    @property
    def routable(self) -> bool:
        return self.state == HEALTHY and not self.info.is_paused

    def fresh_snapshot(self, now: float | None = None) -> MetricsSnapshot | None:
        """The latest metrics snapshot if it is fresh, else ``None``."""
        snap = self.snapshot
        if snap is None:
            return None
        if (now if now is not None else time.monotonic()) - snap.taken_at > self.stale_after:
            return None
        return snap


class Registry:
    """All known instances, by identity, with cached routable candidate lists per role."""

    def __init__(self, stale_after: float = math.inf) -> None:
        self._instances: dict[str, Instance] = {}
        self._loads: dict[str, Load] = {}
        self._candidates: dict[Role, list[Instance]] | None = None
        self._models: _ModelLists | None = None
        self.stale_after = stale_after
        self.on_added: list[Callable[[Instance], None]] = []
        self.on_removed: list[Callable[[Instance, str], None]] = []
        #: called with ``"info"`` after a heartbeat update, ``"health"`` after each observation
        self.on_changed: list[Callable[[Instance, str], None]] = []

    # -- lookups ----------------------------------------------------------------------------
    def get(self, identity: str) -> Instance | None:
        return self._instances.get(identity)

    def all(self) -> list[Instance]:
        """Every known instance (any role or state), sorted by URL."""
        return sorted(self._instances.values(), key=lambda i: i.url)

    def candidates(self, role: Role, model: str | None = None) -> list[Instance]:
        """Routable instances of ``role``, sorted by URL (cached until the registry changes).

        With ``model``: those that serve it or whose model list is unknown. Every instance when
        the known lists name at most one model (a single-model fleet routes as before: the
        engine judges the name), or for :data:`ANY_MODEL` when none lists it. Lists are cached
        for the models instances list only, so clients cannot grow the cache.
        """
        if self._candidates is None:
            by_role: dict[Role, list[Instance]] = {r: [] for r in Role}
            for inst in self.all():
                if inst.routable:
                    by_role[inst.role].append(inst)
            self._candidates = by_role
        if model is None:
            return self._candidates[role]
        return self._model_lists().candidates(role, model)

    def serves(self, model: str) -> bool:
        """False when every instance has a known model list, none lists ``model`` and they
        list two models or more (the request is a 404), else True."""
        return self._model_lists().serves(model)

    def _model_lists(self) -> _ModelLists:
        models = self._models
        if models is None:
            by_role = {r: self.candidates(r) for r in Role}
            models = self._models = _ModelLists(self.all(), by_role)
        return models

    def count_routable(self) -> dict[str, int]:
        return {r.value: len(self.candidates(r)) for r in Role}

    def loads(self) -> Mapping[str, Load]:
        """The in-flight counters by identity (also of removed instances still in flight)."""
        return self._loads

    @overload
    def load_for(self, identity: str, *, create: Literal[True]) -> Load: ...
    @overload
    def load_for(self, identity: str, *, create: bool = False) -> Load | None: ...

    def load_for(self, identity: str, *, create: bool = False) -> Load | None:
        """The counters of ``identity``; with ``create``, new ones if it has none yet (another
        router's legs on an instance this one has not registered yet: :mod:`kvrouter.shared`).
        """
        load = self._loads.get(identity)
        if load is None and create:
            load = self._loads[identity] = Load()
        return load

    # -- changes ----------------------------------------------------------------------------
    def changed(self) -> None:
        """Invalidate cached candidate lists after a state, role, pause or model change."""
        self._candidates = None
        self._models = None

    def add(self, info: InstanceInfo, *, static: bool = False, healthy: bool = True) -> Instance:
        """Store a new instance (or replace one with the same identity)."""
        load = self._loads.setdefault(info.identity, Load())
        inst = Instance(info=info, load=load, static=static, stale_after=self.stale_after)
        if not healthy:
            inst.state = UNHEALTHY
            inst.unhealthy_since = time.monotonic()
        self._instances[info.identity] = inst
        self.changed()
        for cb in self.on_added:
            cb(inst)
        return inst

    def update(self, inst: Instance, info: InstanceInfo) -> None:
        """Atomically replace the registration fields of a known instance (heartbeat)."""
        inst.info = info
        self.changed()
        for cb in self.on_changed:
            cb(inst, "info")

    def remove(self, inst: Instance, reason: str) -> None:
        if self._instances.get(inst.identity) is not inst:
            return
        del self._instances[inst.identity]
        if inst.load.idle:
            self._loads.pop(inst.identity, None)
        self.changed()
        for cb in self.on_removed:
            cb(inst, reason)

    def purge_idle_loads(self) -> int:
        """Drop counters of removed instances once they are idle; returns how many."""
        stale = [k for k, v in self._loads.items() if k not in self._instances and v.idle]
        for k in stale:
            del self._loads[k]
        return len(stale)

    # -- health state machine (docs/fastdeploy.md#health-checking) ---------------------------
    def observe_health(self, inst: Instance, ok: bool, *, failure_threshold: int,
                       success_threshold: int) -> str | None:
        """Count one probe round; returns ``"unhealthy"``/``"healthy"`` on a transition."""
        change = self._observe(inst, ok, failure_threshold, success_threshold)
        for cb in self.on_changed:
            cb(inst, "health")
        return change

    def _observe(self, inst: Instance, ok: bool, failure_threshold: int,
                 success_threshold: int) -> str | None:
        if ok:
            inst.fail_streak = 0
            inst.success_streak += 1
            if inst.state == UNHEALTHY and inst.success_streak >= success_threshold:
                inst.state = HEALTHY
                inst.unhealthy_since = None
                self.changed()
                return HEALTHY
        else:
            inst.success_streak = 0
            inst.fail_streak += 1
            if inst.state == HEALTHY and inst.fail_streak >= failure_threshold:
                inst.state = UNHEALTHY
                inst.unhealthy_since = time.monotonic()
                self.changed()
                return UNHEALTHY
        return None


class _ModelLists:
    """Which models the instances serve, and the candidate lists per (role, model), built once
    per registry change."""

    __slots__ = ("_by_role", "_lists", "_unlisted", "known", "unknown")

    def __init__(self, instances: list[Instance], by_role: dict[Role, list[Instance]]) -> None:
        known: set[str] = set()
        self.unknown = False            # some instance (any role or state) has no known list
        for inst in instances:
            served = inst.served
            if served is None:
                self.unknown = True
            else:
                known |= served
        self.known = frozenset(known)
        self._by_role = by_role
        #: routable instances of each role whose list is unknown: a model nobody lists
        self._unlisted = {r: [i for i in insts if i.served is None]
                          for r, insts in by_role.items()}
        self._lists: dict[tuple[Role, str], list[Instance]] = {}

    def candidates(self, role: Role, model: str) -> list[Instance]:
        if model not in self.known:
            if len(self.known) < 2 or model == ANY_MODEL:
                return self._by_role[role]
            return self._unlisted[role]
        key = (role, model)
        found = self._lists.get(key)
        if found is None:
            found = self._lists[key] = [
                i for i in self._by_role[role] if (s := i.served) is None or model in s]
        return found

    def serves(self, model: str) -> bool:
        return self.unknown or len(self.known) < 2 or model in self.known or model == ANY_MODEL
