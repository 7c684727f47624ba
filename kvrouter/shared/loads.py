"""In-flight load shared between routers: per-sender snapshots, summed on read.

Each router publishes its own part of every instance's counters (a
:class:`~kvrouter.load.LoadShare` per instance, all-zero ones left out): now and then as a
whole snapshot that replaces its previous one (:meth:`LoadShares.own`), and in between only
the shares that changed (:meth:`LoadShares.changes`, an all-zero share for one that went to
zero). The loads mark themselves as they move (``Load.watch``), so a tick with few changes
costs little however many instances there are. The receiver keeps the latest snapshot of each
sender, patched by its changes, and adds their sum into the instance's
:class:`~kvrouter.load.Load` (``Load.set_remote``), so the policies read one set of counters.
A sender that leaves takes its share with it (:meth:`drop`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from kvrouter.load import LoadShare
from kvrouter.registry import Instance, Registry

__all__ = ["LoadShares"]


class LoadShares:
    """The other routers' latest load snapshots, applied to ``registry``'s counters."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._snapshots: dict[Hashable, dict[str, LoadShare]] = {}
        self._seq: dict[Hashable, int] = {}
        self._dirty: set[str] = set()             # instances whose own share may have moved
        self._own: dict[str, LoadShare] = {}      # our shares as last published
        self._unsent: dict[str, LoadShare] = {}   # changes collected, not yet reported
        #: bumped whenever our published shares change (a writer compares it, not the dicts)
        self.version = 0
        for ident, load in registry.loads().items():     # legs already in flight count
            load.watch(ident, self._dirty)
            self._dirty.add(ident)
        registry.on_added.append(self._watch)

    def _watch(self, inst: Instance) -> None:
        inst.load.watch(inst.identity, self._dirty)

    @property
    def busy(self) -> bool:
        """Whether this router has legs in flight (its published share is not empty)."""
        return bool(self._own)

    def _collect(self) -> None:
        """Recompute the shares of the instances marked since the last call."""
        dirty = self._dirty
        if not dirty:
            return
        loads, own, unsent = self._registry.loads(), self._own, self._unsent
        for ident in dirty:
            load = loads.get(ident)
            share = load.share() if load is not None else None
            if share != own.get(ident):
                if share is None:
                    del own[ident]
                    unsent[ident] = _GONE
                else:
                    own[ident] = unsent[ident] = share
                self.version += 1
        dirty.clear()

    def changes(self) -> dict[str, LoadShare]:
        """Our shares that changed since the last call (an all-zero one: now zero), to publish
        as a change (``update(..., partial=True)`` at the others)."""
        self._collect()
        out, self._unsent = self._unsent, {}
        return out

    def own(self, rebuild: bool = False) -> dict[str, LoadShare]:
        """This router's part of each instance's counters (to publish whole). ``rebuild``:
        recomputed from every instance (the periodic self-healing snapshot; any difference is
        also reported by the next :meth:`changes`), else the shares as last collected."""
        self._collect()
        if rebuild:
            fresh: dict[str, LoadShare] = {}
            for ident, load in self._registry.loads().items():
                share = load.share()
                if share is not None:
                    fresh[ident] = share
            old, unsent = self._own, self._unsent
            for ident in old.keys() | fresh.keys():
                share = fresh.get(ident)
                if share != old.get(ident):
                    unsent[ident] = share or _GONE
                    self.version += 1
            self._own = fresh
        return dict(self._own)

    def update(self, sender: Hashable, seq: int, shares: Mapping[str, LoadShare], *,
               partial: bool = False) -> None:
        """``sender``'s snapshot number ``seq``, or with ``partial`` its changes (an all-zero
        share: gone); an older or repeated number is ignored."""
        if seq <= self._seq.get(sender, -1):
            return
        self._seq[sender] = seq
        if partial:
            snap = self._snapshots.setdefault(sender, {})
            for ident, share in shares.items():
                if share:
                    if snap.get(ident) != share:
                        snap[ident] = share
                        self._refresh(ident)
                elif snap.pop(ident, None) is not None:
                    self._refresh(ident)
            return
        old = self._snapshots.get(sender, {})
        new = self._snapshots[sender] = {i: share for i, share in shares.items() if share}
        for ident in old.keys() | new.keys():
            if old.get(ident) != new.get(ident):
                self._refresh(ident)

    def drop(self, sender: Hashable) -> None:
        """``sender`` left: its share no longer counts."""
        self._seq.pop(sender, None)
        for ident in self._snapshots.pop(sender, {}):
            self._refresh(ident)

    def _refresh(self, ident: str) -> None:
        """Re-sum the senders' shares of one instance into its counters."""
        total: LoadShare | None = None
        for shares in self._snapshots.values():
            share = shares.get(ident)
            if share:
                total = share if total is None else total + share
        load = self._registry.load_for(ident, create=total is not None)
        if load is not None:
            load.set_remote(total)


_GONE = LoadShare()     # in a change: this share is now zero
