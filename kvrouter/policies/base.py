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

import numpy as np

if TYPE_CHECKING:
    from kvrouter.prefix.index import PrefixIndex
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
    "VECTOR_MIN",
    "CandidateCache",
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
    when some policy needs them (a :class:`~kvrouter.prefix.hashing.HashList` when built by
    :func:`~kvrouter.prefix.view.build_request_view`; any list of ints works).
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


#: Candidate count from which the ranked policies score with numpy arrays instead of a Python
#: loop (same arithmetic, same ties; a few numpy calls cost more than a short loop).
VECTOR_MIN = 33


class CandidateCache:
    """The identities and prefix-index numbers of the last candidate list a policy saw.

    The registry hands out one list per role until something changes, so with 1,000
    instances the per-candidate ``identity`` properties are read once per registry change, not
    on every decision. A list is recognised by identity (and length): candidate lists must not
    be mutated in place once passed to a policy.
    """

    __slots__ = ("index", "_list", "_len", "ids", "nums", "loads")

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._list: object = None
        self._len = -1
        self.ids: list[str] = []
        self.nums: np.ndarray = np.zeros(0, dtype=np.int64)
        self.loads: list = []          # the candidates' Load objects (never replaced)

    def get(self, candidates: Sequence[Instance]) -> tuple[list[str], np.ndarray]:
        if candidates is not self._list or len(candidates) != self._len:
            self.ids = [inst.identity for inst in candidates]
            self.nums = self.index.instance_numbers(self.ids)
            self.loads = [inst.load for inst in candidates]
            self._list, self._len = candidates, len(candidates)
        return self.ids, self.nums
