"""In-flight load shared between routers: per-sender snapshots, summed on read.

Each router publishes its own part of every instance's counters (:meth:`LoadShares.own`, a
:class:`~kvrouter.load.LoadShare` per instance, all-zero ones left out) as one snapshot that
replaces its previous one. The receiver keeps the latest snapshot of each sender and adds
their sum into the instance's :class:`~kvrouter.load.Load` (``Load.set_remote``), so the
policies read one set of counters. A sender that leaves takes its share with it (:meth:`drop`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from kvrouter.load import LoadShare
from kvrouter.registry import Registry

__all__ = ["LoadShares"]


class LoadShares:
    """The other routers' latest load snapshots, applied to ``registry``'s counters."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._snapshots: dict[Hashable, Mapping[str, LoadShare]] = {}
        self._seq: dict[Hashable, int] = {}

    def own(self) -> dict[str, LoadShare]:
        """This router's part of each instance's counters (to publish)."""
        out: dict[str, LoadShare] = {}
        for ident, load in self._registry.loads().items():
            share = load.share()
            if share is not None:
                out[ident] = share
        return out

    def update(self, sender: Hashable, seq: int, shares: Mapping[str, LoadShare]) -> None:
        """``sender``'s snapshot number ``seq`` (an older or repeated number is ignored)."""
        if seq <= self._seq.get(sender, -1):
            return
        self._seq[sender] = seq
        old = self._snapshots.get(sender, {})
        self._snapshots[sender] = shares
        for ident in old.keys() | shares.keys():
            if old.get(ident) != shares.get(ident):
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
