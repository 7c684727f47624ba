"""Load-blind policies: ``random``, ``round_robin``, ``power_of_two`` (contract §6.2)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.policies.base import Policy, RequestView, Selection

if TYPE_CHECKING:
    from kvrouter.registry import Instance

__all__ = ["RandomPolicy", "RoundRobinPolicy", "PowerOfTwoPolicy"]


class RandomPolicy(Policy):
    """Uniform over the candidates."""

    name = "random"

    def __init__(self, role: str, rng: random.Random | None = None) -> None:
        super().__init__(role)
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        return Selection(candidates[self._rng.randrange(len(candidates))])


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


class PowerOfTwoPolicy(Policy):
    """Two distinct random candidates; the lower ``R`` wins, a tie goes to the first draw."""

    name = "power_of_two"

    def __init__(self, role: str, rng: random.Random | None = None) -> None:
        super().__init__(role)
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        n = len(candidates)
        if n == 1:
            return Selection(candidates[0])
        i, j = self._rng.sample(range(n), 2)
        first, second = candidates[i], candidates[j]
        return Selection(second if second.load.requests < first.load.requests else first)
