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
the policies read, so a decision costs nothing more.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("kvrouter.load")


@dataclass(slots=True)
class LoadShare:
    """One router's part of an instance's in-flight counters (the :class:`Load` fields of the
    same names), or the sum of several routers' parts. A value: never changed once made."""

    requests: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    prefill_leases: int = 0
    pending: int = 0
    pending_prefill: int = 0
    pending_prefill_leases: int = 0

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.prefill_tokens or self.prefill_leases
                    or self.pending or self.pending_prefill or self.pending_prefill_leases)

    def __add__(self, other: LoadShare) -> LoadShare:
        return LoadShare(
            self.requests + other.requests, self.tokens + other.tokens,
            self.prefill_tokens + other.prefill_tokens,
            self.prefill_leases + other.prefill_leases, self.pending + other.pending,
            self.pending_prefill + other.pending_prefill,
            self.pending_prefill_leases + other.pending_prefill_leases)


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

    def acquire(self, tokens: int, now: float | None = None,
                prefill: int | None = None) -> Lease:
        """Count one dispatched leg; ``now`` is the clock of the metrics snapshots
        (``time.monotonic()`` by default; the virtual clock in a simulation). ``prefill`` is
        the leg's uncached prefill estimate (``None``: ``tokens``)."""
        prefill = max(0, int(tokens if prefill is None else prefill))
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

    def share(self) -> LoadShare | None:
        """This process's own part of the counters (the others' :attr:`remote` part taken
        out), ``None`` when it is all zero."""
        r = self.remote
        if r is None:
            if not (self.requests or self.tokens or self.prefill_tokens or self.prefill_leases
                    or self.pending or self.pending_prefill or self.pending_prefill_leases):
                return None
            return LoadShare(self.requests, self.tokens, self.prefill_tokens,
                             self.prefill_leases, self.pending, self.pending_prefill,
                             self.pending_prefill_leases)
        own = LoadShare(
            max(0, self.requests - r.requests), max(0, self.tokens - r.tokens),
            max(0, self.prefill_tokens - r.prefill_tokens),
            max(0, self.prefill_leases - r.prefill_leases), max(0, self.pending - r.pending),
            max(0, self.pending_prefill - r.pending_prefill),
            max(0, self.pending_prefill_leases - r.pending_prefill_leases))
        return own if own else None

    def set_remote(self, remote: LoadShare | None) -> None:
        """Replace the other routers' part of the counters with ``remote`` (their new sum):
        each counter moves by the difference, never below zero."""
        old = self.remote or _ZERO
        new = remote or _ZERO
        if new == old:
            return
        self.requests = max(0, self.requests + new.requests - old.requests)
        self.tokens = max(0, self.tokens + new.tokens - old.tokens)
        self.prefill_tokens = max(0, self.prefill_tokens + new.prefill_tokens
                                  - old.prefill_tokens)
        self.prefill_leases = max(0, self.prefill_leases + new.prefill_leases
                                  - old.prefill_leases)
        self.pending = max(0, self.pending + new.pending - old.pending)
        self.pending_prefill = max(0, self.pending_prefill + new.pending_prefill
                                   - old.pending_prefill)
        self.pending_prefill_leases = max(0, self.pending_prefill_leases
                                          + new.pending_prefill_leases
                                          - old.pending_prefill_leases)
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
        if load.tokens < self.tokens:
            log.warning("counter already zero (possible double-release)")
            load.tokens = 0
        else:
            load.tokens -= self.tokens
        load.prefill_tokens = max(0, load.prefill_tokens - self.prefill)
        load.prefill_leases = max(0, load.prefill_leases - 1)
        if self.dispatched_at >= load.snapshot_taken_at:
            load.pending_prefill = max(0, load.pending_prefill - self.prefill)
            load.pending_prefill_leases = max(0, load.pending_prefill_leases - 1)

    def release_request(self) -> None:
        if not self._request_held:
            return
        self._request_held = False
        load = self.load
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
