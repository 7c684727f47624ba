"""The scheduling-policy interface (contract §6).

A policy picks one instance among non-empty candidates (the routable instances of a role,
sorted by URL). Decisions are synchronous and pure apart from the policy's own state (a
round-robin counter, the shared prefix index): no I/O, no awaiting. Everything a decision needs
about the request is precomputed in a :class:`RequestView`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from kvrouter.registry import Instance

__all__ = [
    "RequestView",
    "Selection",
    "Policy",
    "STRATEGY_POLICY",
    "STRATEGY_CACHE_AWARE",
    "STRATEGY_IMBALANCE",
    "STRATEGY_STALE",
    "STRATEGY_COST",
    "STRATEGY_EXPLORATION",
    "STRATEGIES",
]

STRATEGY_POLICY = "policy"
STRATEGY_CACHE_AWARE = "cache_aware_scoring"
STRATEGY_IMBALANCE = "imbalance_fallback"
STRATEGY_STALE = "stale_metrics_fallback"
STRATEGY_COST = "cost_estimate"          # kv_cost: minimum estimated TTFT
STRATEGY_EXPLORATION = "exploration"     # kv_cost: a near-best candidate drawn at random
STRATEGIES = (STRATEGY_POLICY, STRATEGY_CACHE_AWARE, STRATEGY_IMBALANCE, STRATEGY_STALE,
              STRATEGY_COST, STRATEGY_EXPLORATION)


@dataclass(slots=True)
class RequestView:
    """What the policies see of a request.

    ``tokens`` holds model tokens when the prompt was tokenized (or was a token-id prompt),
    else ``None``. ``token_estimate`` is the token count when tokenized, else 2 × the code
    points of the rendered prompt (§6.1). ``hashes`` are the prefix block hashes, computed only
    when some policy needs them.
    """

    prompt: str | list[int]
    tokens: list[int] | None = None
    token_estimate: int = 0
    hashes: list[int] = field(default_factory=list)
    session_id: str | None = None


@dataclass(slots=True)
class Selection:
    """A decision: the instance, how it was reached, and prefix-prediction data.

    ``lookup_blocks``/``hit_blocks`` feed ``kvrouter_prefix_lookup_blocks_total`` /
    ``_hit_blocks_total`` (cache-aware policies only). ``session_hit`` is ``None`` when the
    decision does not count for session-affinity statistics (§6.5), else whether the request
    went to the same instance as its session's previous one.
    """

    instance: Instance
    strategy: str = STRATEGY_POLICY
    hit_blocks: int = 0
    lookup_blocks: int = 0
    session_hit: bool | None = None


class Policy(ABC):
    """One policy object per role (its state, e.g. a round-robin counter, is per role)."""

    name: ClassVar[str]
    needs_prefix: ClassVar[bool] = False          # wants ``RequestView.hashes``
    needs_remote_metrics: ClassVar[bool] = False  # wants background ``/metrics`` scrapes

    def __init__(self, role: str) -> None:
        self.role = str(getattr(role, "value", role))

    @abstractmethod
    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        """Pick one of ``candidates`` (non-empty, sorted by URL)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(role={self.role!r})"


def argmin(values: Sequence[float]) -> int:
    """Index of the smallest value; ties → the earliest index (the earliest URL)."""
    best = 0
    best_v = values[0]
    for i in range(1, len(values)):
        v = values[i]
        if v < best_v:
            best, best_v = i, v
    return best
