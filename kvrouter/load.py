"""Router-side in-flight accounting per instance (contract §6.1).

Each dispatched leg takes a :class:`Lease`; the lease releases its tokens and its request once
each (idempotent, never below zero). ``pending`` counts in-flight legs dispatched after the
instance's latest metrics snapshot was taken, so snapshot-based policies do not herd between
scrapes (§6.2).
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
    _leases: set["Lease"] = field(default_factory=set, repr=False)

    def acquire(self, tokens: int, now: float | None = None) -> "Lease":
        """Count one dispatched leg; ``now`` is the clock of the metrics snapshots
        (``time.monotonic()`` by default; the virtual clock in a simulation)."""
        lease = Lease(self, tokens, time.monotonic() if now is None else now)
        self.requests += 1
        self.tokens += tokens
        self._leases.add(lease)
        if lease.dispatched_at >= self.snapshot_taken_at:
            self.pending += 1
        return lease

    def on_snapshot(self, taken_at: float) -> None:
        """Recount ``pending`` against a new snapshot taken at ``taken_at`` (monotonic)."""
        self.snapshot_taken_at = taken_at
        self.pending = sum(1 for lease in self._leases if lease.dispatched_at >= taken_at)

    @property
    def idle(self) -> bool:
        return self.requests == 0 and self.tokens == 0


class Lease:
    """One leg's share of an instance's load; each part is released at most once."""

    __slots__ = ("load", "tokens", "dispatched_at", "_tokens_held", "_request_held")

    def __init__(self, load: Load, tokens: int, dispatched_at: float) -> None:
        self.load = load
        self.tokens = tokens
        self.dispatched_at = dispatched_at
        self._tokens_held = True
        self._request_held = True

    def release_tokens(self) -> None:
        if not self._tokens_held:
            return
        self._tokens_held = False
        if self.load.tokens < self.tokens:
            log.warning("counter already zero (possible double-release)")
            self.load.tokens = 0
        else:
            self.load.tokens -= self.tokens

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
