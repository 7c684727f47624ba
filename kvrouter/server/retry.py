"""Retry limits: which answers are worth another instance, and the router-wide budget."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvrouter.router import Router

RETRY_STATUSES = frozenset({500, 502, 503, 504})   # answers another instance may do better


class RetryRatio:
    """Router-wide cap on status retries: at most ``percent`` % of the requests of the last
    ``window`` seconds (at least ``floor`` retries: enough for the failures an instance makes
    before outlier ejection takes it out), so that a fleet that fails everywhere is not sent
    extra load (Envoy's retry budget). Counts over two half-windows, the older one
    fading out linearly."""

    __slots__ = ("_cur", "_prev", "_start", "clock", "floor", "fraction", "half")

    def __init__(self, percent: float, window: float = 10.0, floor: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction = percent / 100.0
        self.half = window / 2
        self.floor = floor
        self.clock = clock
        self._start = clock()
        self._cur = [0, 0]      # requests, retries in the current half-window
        self._prev = [0, 0]

    def _advance(self) -> float:
        now = self.clock()
        elapsed = now - self._start
        if elapsed >= self.half:
            self._prev = self._cur if elapsed < 2 * self.half else [0, 0]
            self._cur = [0, 0]
            self._start = now
            elapsed = 0.0
        return 1.0 - elapsed / self.half       # the weight of the previous half-window

    def request(self) -> None:
        if self.clock() - self._start >= self.half:     # the window moves: rarely, not per request
            self._advance()
        self._cur[0] += 1

    def take(self) -> bool:
        """Spend one retry if the budget allows it."""
        w = self._advance()
        requests = self._cur[0] + w * self._prev[0]
        retries = self._cur[1] + w * self._prev[1]
        if retries >= max(self.floor, self.fraction * requests):
            return False
        self._cur[1] += 1
        return True


class RetryBudget:
    """Retries left for one reason (``kvrouter_retries_total{reason}`` counts those taken)."""

    __slots__ = ("left", "reason", "router")

    def __init__(self, router: Router, reason: str, left: int) -> None:
        self.router = router
        self.reason = reason
        self.left = left

    def take(self, reason: str | None = None) -> bool:
        """Spend one retry (counted under ``reason``, by default the budget's own)."""
        if self.left <= 0:
            return False
        self.left -= 1
        self.router.metrics.retries.labels(reason or self.reason).inc()
        return True
