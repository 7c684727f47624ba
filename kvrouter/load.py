"""Router-side in-flight accounting per instance (docs/fastdeploy.md#in-flight-accounting).

Each dispatched leg takes a :class:`Lease`; the lease releases its tokens and its request once
each (idempotent, never below zero). ``pending`` counts in-flight legs dispatched after the
instance's latest metrics snapshot was taken, so snapshot-based policies do not herd between
scrapes.

Besides ``T`` (the token estimate), a lease carries its estimated **uncached prefill work**
(``prefill``: prompt tokens the instance is expected to compute, i.e. not served from its
prefix cache). It is held from dispatch until the same point as ``T`` (the first response byte
of a mixed leg, the prefill's first byte in PD) and summed per instance in
``Load.prefill_tokens`` (with ``prefill_leases`` legs holding it; ``pending_prefill`` and
``pending_prefill_leases`` are the part dispatched after the latest snapshot); the ``kv_cost``
policy reads it as the queued prefill work. The dispatcher passes the estimate to
:meth:`Load.acquire` (``prefill=``, the policy's ``Selection.prefill_estimate``); a lease
acquired without one carries ``prefill = tokens``.

When routing state is shared (:mod:`kvrouter.shared`), the counters also include the other
routers' in-flight legs: :meth:`Load.share` is this process's own part, and
:meth:`Load.set_remote` adds the sum of the others' (a :class:`LoadShare`) into the same fields
the policies read, so a decision costs nothing more. A watched load (:meth:`Load.watch`) adds
its identity to a set whenever its own part may have moved, so the sharing side rebuilds and
sends only those shares, not the whole fleet's every few milliseconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from operator import attrgetter

from kvrouter.tally import Tally

log = logging.getLogger("kvrouter.load")


@dataclass(slots=True)
class LoadShare(Tally):
    """One router's part of an instance's in-flight counters (the :class:`Load` fields of the
    same names), or the sum of several routers' parts. A value: never changed once made."""

    requests: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    prefill_leases: int = 0
    pending: int = 0
    pending_prefill: int = 0
    pending_prefill_leases: int = 0


#: the :class:`Load` counters a :class:`LoadShare` holds a part of
SHARED = LoadShare.names()
_counters = attrgetter(*SHARED)      # a Load's or a LoadShare's values of SHARED, in order


@dataclass(eq=False)
class Load:
    """In-flight requests ``R`` and tokens ``T`` of one instance, keyed by identity."""

    requests: int = 0
    tokens: int = 0
    pending: int = 0
    snapshot_taken_at: float = 0.0
    prefill_tokens: int = 0        # Σ uncached prefill estimate of legs before their first byte
    prefill_leases: int = 0        # legs holding a prefill estimate
    pending_prefill: int = 0       # the part of prefill_tokens dispatched after the snapshot
    pending_prefill_leases: int = 0  # legs holding it
    #: the other routers' part of the counters above (already included in them), or ``None``
    remote: LoadShare | None = field(default=None, repr=False)
    _leases: set[Lease] = field(default_factory=set, repr=False)
    #: :meth:`watch`: the set our identity is added to when our own part may have moved
    _dirty: set[str] | None = field(default=None, repr=False)
    _ident: str = field(default="", repr=False)

    def watch(self, identity: str, dirty: set[str]) -> None:
        """From now on, add ``identity`` to ``dirty`` at every acquire, release and snapshot
        recount (:class:`~kvrouter.shared.loads.LoadShares` sends only those shares)."""
        self._ident, self._dirty = identity, dirty

    def acquire(self, tokens: int, now: float | None = None,
                prefill: int | None = None) -> Lease:
        """Count one dispatched leg; ``now`` is the clock of the metrics snapshots
        (``time.monotonic()`` by default; the virtual clock in a simulation). ``prefill`` is
        the leg's uncached prefill estimate (``None``: ``tokens``)."""
        prefill = int(tokens if prefill is None else prefill)
        if prefill < 0:
            prefill = 0
        lease = Lease(self, tokens, time.monotonic() if now is None else now, prefill)
        self.requests += 1
        self.tokens += tokens
        self.prefill_tokens += prefill
        self.prefill_leases += 1
        self._leases.add(lease)
        if lease.dispatched_at >= self.snapshot_taken_at:
            self.pending += 1
            self.pending_prefill += prefill
            self.pending_prefill_leases += 1
        if self._dirty is not None:
            self._dirty.add(self._ident)
        return lease

    def on_snapshot(self, taken_at: float) -> None:
        """Recount ``pending`` against a new snapshot taken at ``taken_at`` (monotonic)."""
        self.snapshot_taken_at = taken_at
        pending = pending_prefill = pending_prefill_leases = 0
        for lease in self._leases:
            if lease.dispatched_at >= taken_at:
                pending += 1
                if lease._tokens_held:
                    pending_prefill += lease.prefill
                    pending_prefill_leases += 1
        remote = self.remote
        if remote is not None:          # the other routers' pending legs stay counted
            pending += remote.pending
            pending_prefill += remote.pending_prefill
            pending_prefill_leases += remote.pending_prefill_leases
        self.pending = pending
        self.pending_prefill = pending_prefill
        self.pending_prefill_leases = pending_prefill_leases
        if self._dirty is not None:
            self._dirty.add(self._ident)

    def share(self) -> LoadShare | None:
        """This process's own part of the counters (the others' :attr:`remote` part taken
        out), ``None`` when it is all zero."""
        mine: tuple[int, ...] = _counters(self)
        r = self.remote
        if r is not None:
            mine = tuple(a - b if a > b else 0 for a, b in zip(mine, _counters(r), strict=True))
        return LoadShare(*mine) if any(mine) else None

    def set_remote(self, remote: LoadShare | None) -> None:
        """Replace the other routers' part of the counters with ``remote`` (their new sum):
        each counter moves by the difference, never below zero."""
        old = self.remote or _ZERO
        new = remote or _ZERO
        if new == old:
            return
        for name, moved in zip(SHARED, (new - old).as_list(), strict=True):
            setattr(self, name, max(0, getattr(self, name) + moved))
        self.remote = new if new else None

    @property
    def decoding(self) -> int:
        """In-flight legs past their first byte (``R`` minus the legs still prefilling)."""
        return max(0, self.requests - self.prefill_leases)

    @property
    def idle(self) -> bool:
        return self.requests == 0 and self.tokens == 0


class Lease:
    """One leg's share of an instance's load; each part is released at most once."""

    __slots__ = ("_request_held", "_tokens_held", "dispatched_at", "load", "prefill", "tokens")

    def __init__(self, load: Load, tokens: int, dispatched_at: float, prefill: int = 0) -> None:
        self.load = load
        self.tokens = tokens
        self.prefill = prefill
        self.dispatched_at = dispatched_at
        self._tokens_held = True
        self._request_held = True

    def release_tokens(self) -> None:
        """Release ``T`` and the prefill estimate (first response byte)."""
        if not self._tokens_held:
            return
        self._tokens_held = False
        load = self.load
        if load._dirty is not None:
            load._dirty.add(load._ident)
        if load.tokens < self.tokens:
            log.warning("counter already zero (possible double-release)")
            load.tokens = 0
        else:
            load.tokens -= self.tokens
        # never below zero (conditionals, not max(): this runs for every leg)
        left = load.prefill_tokens - self.prefill
        load.prefill_tokens = left if left > 0 else 0
        left = load.prefill_leases - 1
        load.prefill_leases = left if left > 0 else 0
        if self.dispatched_at >= load.snapshot_taken_at:
            left = load.pending_prefill - self.prefill
            load.pending_prefill = left if left > 0 else 0
            left = load.pending_prefill_leases - 1
            load.pending_prefill_leases = left if left > 0 else 0

    def release_request(self) -> None:
        if not self._request_held:
            return
        self._request_held = False
        load = self.load
        if load._dirty is not None:
            load._dirty.add(load._ident)
        load._leases.discard(self)
        if self.dispatched_at >= load.snapshot_taken_at and load.pending > 0:
            load.pending -= 1
        if load.requests <= 0:
            log.warning("counter already zero (possible double-release)")
            load.requests = 0
        else:
            load.requests -= 1

    def release(self) -> None:
        self.release_tokens()
        self.release_request()


_ZERO = LoadShare()
