"""Local-load policies: ``process_tokens`` (minimum ``T``) and ``request_num`` (minimum ``R``).

Ties go to the earliest URL (candidates arrive sorted by URL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.policies.base import Policy, RequestView, Selection

if TYPE_CHECKING:
    from kvrouter.registry import Instance

__all__ = ["ProcessTokensPolicy", "RequestNumPolicy", "min_tokens", "min_requests"]


def min_tokens(candidates: Sequence[Instance]) -> Instance:
    """The candidate with the fewest in-flight tokens ``T`` (earliest URL on ties)."""
    best = candidates[0]
    best_t = best.load.tokens
    for inst in candidates:
        t = inst.load.tokens
        if t < best_t:
            best, best_t = inst, t
    return best


def min_requests(candidates: Sequence[Instance]) -> Instance:
    """The candidate with the fewest in-flight requests ``R`` (earliest URL on ties)."""
    best = candidates[0]
    best_r = best.load.requests
    for inst in candidates:
        r = inst.load.requests
        if r < best_r:
            best, best_r = inst, r
    return best


class ProcessTokensPolicy(Policy):
    name = "process_tokens"

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(min_tokens(candidates))


class RequestNumPolicy(Policy):
    name = "request_num"

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(min_requests(candidates))
