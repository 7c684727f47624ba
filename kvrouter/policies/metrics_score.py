"""Metrics-scored policies: ``fd_metrics_score`` and ``fd_remote_metrics_score``
(docs/fastdeploy.md#policies).

Both read only stored snapshots (docs/fastdeploy.md#remote-metrics-snapshots); the background
scraper keeps them current.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

from kvrouter.policies.base import (
    STRATEGY_POLICY,
    STRATEGY_STALE,
    Policy,
    RequestView,
    Selection,
    argmin,
    register,
)

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.prefix.index import PrefixIndex
    from kvrouter.registry import Instance

__all__ = ["FdMetricsScorePolicy", "FdRemoteMetricsScorePolicy"]


@register
class FdMetricsScorePolicy(Policy):
    """Local ``R`` split at the instance's ``max_batch_size`` into running and waiting.

    ``cap`` = ``fastdeploy:max_batch_size`` of the latest snapshot (a static engine setting, so
    a stale snapshot still provides it), else ∞; running = min(R, cap); waiting = R − running;
    score = running + waiting × ``waiting-weight``. Without snapshots this is ``request_num``.
    """

    name = "fd_metrics_score"
    needs_remote_metrics = True
    select_is_pure = True

    def __init__(self, role: str, waiting_weight: float) -> None:
        super().__init__(role)
        self.waiting_weight = float(waiting_weight)

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, cfg.waiting_weight)

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        w = self.waiting_weight
        scores: list[float] = []
        for inst in candidates:
            r = inst.load.requests
            snap = inst.snapshot
            cap = snap.max_batch_size if snap is not None else None
            running = r if cap is None else min(r, cap)
            scores.append(running + (r - running) * w)
        return Selection(candidates[argmin(scores)])


@register
class FdRemoteMetricsScorePolicy(Policy):
    """score = snapshot running + snapshot waiting × ``waiting-weight`` + pending.

    *Pending* = legs this router dispatched since the snapshot was taken and still in flight.
    A candidate without a fresh snapshot is scored by its local ``R``; the decision is then
    labelled ``stale_metrics_fallback``.
    """

    name = "fd_remote_metrics_score"
    needs_remote_metrics = True
    select_is_pure = True

    def __init__(
        self, role: str, waiting_weight: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(role)
        self.waiting_weight = float(waiting_weight)
        self._clock = clock

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, cfg.waiting_weight, clock)

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        now = self._clock()
        w = self.waiting_weight
        stale = False
        scores: list[float] = []
        for inst in candidates:
            snap = inst.fresh_snapshot(now)
            if snap is None:
                stale = True
                scores.append(inst.load.requests)
            else:
                scores.append(snap.running + snap.waiting * w + inst.load.pending)
        chosen = candidates[argmin(scores)]
        return Selection(chosen, STRATEGY_STALE if stale else STRATEGY_POLICY)
