"""Local-load policies: ``process_tokens`` (minimum ``T``) and ``request_num`` (minimum ``R``).

Ties go to the earliest URL (candidates arrive sorted by URL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING

from kvrouter.policies.base import Policy, RequestView, Selection, register

if TYPE_CHECKING:
    from kvrouter.load import Load
    from kvrouter.registry import Instance

__all__ = ["ProcessTokensPolicy", "RequestNumPolicy", "min_requests", "min_tokens"]


def _min_load(candidates: Sequence[Instance], counter: Callable[[Load], int]) -> Instance:
    """The candidate whose ``counter(inst.load)`` is smallest (earliest URL on ties)."""
    best = candidates[0]
    best_v = counter(best.load)
    for inst in candidates:
        v = counter(inst.load)
        if v < best_v:
            best, best_v = inst, v
    return best


_TOKENS: Callable[[Load], int] = attrgetter("tokens")
_REQUESTS: Callable[[Load], int] = attrgetter("requests")


def min_tokens(candidates: Sequence[Instance]) -> Instance:
    """The candidate with the fewest in-flight tokens ``T`` (earliest URL on ties)."""
    return _min_load(candidates, _TOKENS)


def min_requests(candidates: Sequence[Instance]) -> Instance:
    """The candidate with the fewest in-flight requests ``R`` (earliest URL on ties)."""
    return _min_load(candidates, _REQUESTS)


@register
class ProcessTokensPolicy(Policy):
    name = "process_tokens"
    select_is_pure = True

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(min_tokens(candidates))


@register
class RequestNumPolicy(Policy):
    name = "request_num"
    select_is_pure = True

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(min_requests(candidates))
