"""Load-blind policies: ``random``, ``round_robin``, ``power_of_two``
(docs/fastdeploy.md#policies)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

from kvrouter.policies.base import Policy, RequestView, Selection, register

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.prefix.index import PrefixIndex
    from kvrouter.registry import Instance

__all__ = ["PowerOfTwoPolicy", "RandomPolicy", "RoundRobinPolicy"]


class _SeededPolicy(Policy):
    """A policy whose only setting is its source of randomness."""

    def __init__(self, role: str, rng: random.Random | None = None) -> None:
        super().__init__(role)
        self._rng = rng or random.Random()

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, rng)


@register
class RandomPolicy(_SeededPolicy):
    """Uniform over the candidates."""

    name = "random"

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(candidates[self._rng.randrange(len(candidates))])


@register
class RoundRobinPolicy(Policy):
    """Counter *c* of this role: pick ``c mod n`` in sorted URL order, then ``c += 1``."""

    name = "round_robin"

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self._counter = 0

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        chosen = candidates[self._counter % len(candidates)]
        self._counter += 1
        return Selection(chosen)


@register
class PowerOfTwoPolicy(_SeededPolicy):
    """Two distinct random candidates; the lower ``R`` wins, a tie goes to the first draw."""

    name = "power_of_two"

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        n = len(candidates)
        if n == 1:
            return Selection(candidates[0])
        i, j = self._rng.sample(range(n), 2)
        first, second = candidates[i], candidates[j]
        return Selection(second if second.load.requests < first.load.requests else first)
