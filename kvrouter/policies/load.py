"""Local-load policies: ``process_tokens`` (minimum ``T``) and ``request_num`` (minimum ``R``).

Ties go to the earliest URL (candidates arrive sorted by URL). The minimum is a plain loop in
each ``select``: a helper with a key function, or ``min(key=...)``, costs two to three times as
many instructions per decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.policies.base import Policy, RequestView, Selection, register

if TYPE_CHECKING:
    from kvrouter.registry import Instance

__all__ = ["ProcessTokensPolicy", "RequestNumPolicy"]


@register
class ProcessTokensPolicy(Policy):
    name = "process_tokens"
    select_is_pure = True

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        best = candidates[0]
        for inst in candidates:
            if inst.load.tokens < best.load.tokens:
                best = inst
        return Selection(best)


@register
class RequestNumPolicy(Policy):
    name = "request_num"
    select_is_pure = True

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        best = candidates[0]
        for inst in candidates:
            if inst.load.requests < best.load.requests:
                best = inst
        return Selection(best)
