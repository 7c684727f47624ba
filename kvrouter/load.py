"""Router-side in-flight accounting per instance (contract §6.1).

Each dispatched leg takes a :class:`Lease`; the lease releases its tokens and its request once
each (idempotent, never below zero). ``pending`` counts in-flight legs dispatched after the
instance's latest metrics snapshot was taken, so snapshot-based policies do not herd between
scrapes (§6.2).

Besides ``T`` (the token estimate), a lease carries its estimated **uncached prefill work**
(``prefill``: prompt tokens the instance is expected to compute, i.e. not served from its
prefix cache). It is held from dispatch until the same point as ``T`` (the first response byte
of a mixed leg, the prefill's first byte in PD) and summed per instance in
``Load.prefill_tokens`` (with ``prefill_leases`` legs holding it; ``pending_prefill`` and
``pending_prefill_leases`` are the part dispatched after the latest snapshot); the ``kv_cost`` policy reads it as the queued
prefill work. The dispatching code does not know the estimate: the policy that chose the
instance *stages* it with :meth:`Load.stage_prefill` and the next :meth:`Load.acquire` on that
instance takes it (a lease acquired with nothing staged carries ``prefill = tokens``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("kvrouter.load")


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
    #: kvrouter.workers: the other worker processes' share of the seven counters above
    #: (``requests`` … ``pending_prefill_leases``), already included in them
    remote: list[int] | None = field(default=None, repr=False)
    _staged_prefill: int | None = field(default=None, repr=False)
    _leases: set["Lease"] = field(default_factory=set, repr=False)

    def stage_prefill(self, prefill: int) -> None:
        """Announce the uncached prefill work of the leg about to be acquired on this
        instance (a policy calls this for the instance it chose; the next ``acquire`` takes
        it, a later ``stage_prefill`` replaces it)."""
        self._staged_prefill = max(0, int(prefill))

    def acquire(self, tokens: int, now: float | None = None,
                prefill: int | None = None) -> "Lease":
        """Count one dispatched leg; ``now`` is the clock of the metrics snapshots
        (``time.monotonic()`` by default; the virtual clock in a simulation). ``prefill`` is
        the leg's uncached prefill estimate: the given value, else the staged one, else
        ``tokens``."""
        if prefill is None:
            prefill = self._staged_prefill if self._staged_prefill is not None else tokens
        self._staged_prefill = None
        prefill = max(0, int(prefill))
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
        if self.remote is not None:     # the other worker processes' pending legs stay counted
            pending += self.remote[4]
            pending_prefill += self.remote[5]
            pending_prefill_leases += self.remote[6]
        self.pending = pending
        self.pending_prefill = pending_prefill
        self.pending_prefill_leases = pending_prefill_leases

    @property
    def decoding(self) -> int:
        """In-flight legs past their first byte (``R`` minus the legs still prefilling)."""
        return max(0, self.requests - self.prefill_leases)

    @property
    def idle(self) -> bool:
        return self.requests == 0 and self.tokens == 0


class Lease:
    """One leg's share of an instance's load; each part is released at most once."""

    __slots__ = ("load", "tokens", "prefill", "dispatched_at", "_tokens_held", "_request_held")

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
