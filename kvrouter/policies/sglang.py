"""``sglang_cache_aware``: SGLang's two-state cache-aware rule over kvrouter's prefix index.

A re-implementation of the SGLang router's ``cache_aware`` policy (sglang-router 0.3.2,
``src/policies/cache_aware.rs``), used as the
"approximate prefix + load" baseline. SGLang's per-worker approximate
radix tree is replaced by the router's block index (the tree's "match" = the number of leading
prompt blocks recorded for a worker); everything else follows SGLang:

* ``load`` = in-flight requests counted by this router (local ``R``: +1 at dispatch, −1 at the
  end of the response, as SGLang's ``WorkerLoadGuard``);
* **imbalanced** iff ``max_load − min_load > sglang-balance-abs-threshold`` **and**
  ``max_load > min_load × sglang-balance-rel-threshold`` (SGLang's defaults 64 and 1.5; note
  the relative threshold is a ratio ≥ 1 here, unlike fd-router's ``balance-rel-threshold``)
  → the least-loaded candidate (shortest queue);
* **balanced**: ``match_rate = max over candidates of matched blocks / prompt blocks``;
  ``match_rate > sglang-cache-threshold`` (0.3) → the candidate with that longest match (ties →
  lower load, then the earliest URL; SGLang takes "a tenant of the deepest matched node");
  otherwise, with ``sglang-miss-policy: min_load`` (default, SGLang ≥ PR #14650) the
  least-loaded candidate, with ``smallest_tree`` (SGLang's original, documented rule) the
  candidate whose tree is smallest — approximated by the prompt blocks newly recorded for it
  by this policy (growth of its part of the index, evictions not subtracted);
* ties on load → the earliest URL (SGLang: first worker in list order, sglang#32983);
* the chosen worker is recorded for every prompt block in both states (``tree.insert``).

A prompt shorter than one block has ``match_rate`` 0 (SGLang matches characters, so its short
prompts can match; with ``cache-block-size`` 1 and no tokenizer the index is character-exact).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import numpy as np

from kvrouter.policies.base import (
    STRATEGY_CACHE_AWARE,
    STRATEGY_IMBALANCE,
    CandidateCache,
    Policy,
    RequestView,
    Selection,
    argmin,
    policy_config,
    register,
)
from kvrouter.policies.cache_aware import SESSION_ROLES, SessionAffinity
from kvrouter.prefix.index import PrefixIndex

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.registry import Instance

__all__ = ["MISS_POLICIES", "SglangCacheAwarePolicy", "SglangConfig"]

MISS_POLICIES = ("min_load", "smallest_tree")


@dataclass(frozen=True, slots=True)
class SglangConfig:
    """The settings of ``sglang_cache_aware``: the ``sglang-*`` scheduler keys."""

    cache_threshold: float
    balance_abs_threshold: float
    balance_rel_threshold: float
    miss_policy: str


@register
class SglangCacheAwarePolicy(Policy):
    """SGLang's two-state rule: cache affinity when balanced, shortest queue when not."""

    name = "sglang_cache_aware"
    needs_prefix = True

    def __init__(
        self,
        role: str,
        index: PrefixIndex,
        config: SglangConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(role)
        if config.miss_policy not in MISS_POLICIES:
            raise ValueError(f"unknown miss policy {config.miss_policy!r}")
        self.index = index
        self.cache_threshold = float(config.cache_threshold)
        self.balance_abs_threshold = float(config.balance_abs_threshold)
        self.balance_rel_threshold = float(config.balance_rel_threshold)
        self.miss_policy = config.miss_policy
        self._clock = clock
        self.tree_blocks: dict[str, int] = {}
        self._cands = CandidateCache(index)
        self.sessions: SessionAffinity | None = (
            SessionAffinity() if self.role in SESSION_ROLES else None
        )

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, index, policy_config(SglangConfig, cfg, "sglang_"), clock=clock)

    def forget(self, identity: str) -> None:
        """A removed instance's tree is gone: if it registers again, it starts empty."""
        self.tree_blocks.pop(identity, None)

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        now = self._clock()
        hashes = request.hashes
        n_blocks = len(hashes)
        ids, nums = self._cands.get(candidates)
        loads = [load.requests for load in self._cands.loads]
        max_load, min_load = max(loads), min(loads)
        imbalanced = (
            len(candidates) >= 2
            and max_load - min_load > self.balance_abs_threshold
            and max_load > min_load * self.balance_rel_threshold
        )
        if imbalanced:
            best = loads.index(min_load)
            strategy = STRATEGY_IMBALANCE
            hit_blocks = (int(self.index.match_counts(hashes, nums[best:best + 1])[0])
                          if n_blocks else 0)
        else:
            strategy = STRATEGY_CACHE_AWARE
            counts = self.index.match_counts(hashes, nums) if n_blocks else None
            best_m = int(counts.max()) if counts is not None else 0
            if n_blocks and best_m / n_blocks > self.cache_threshold:
                # the longest match; ties → lower load, then the earliest URL
                holders = np.flatnonzero(counts == best_m).tolist()
                best = min((loads[i], i) for i in holders)[1]
            elif self.miss_policy == "smallest_tree":
                sizes = [self.tree_blocks.get(ident, 0) for ident in ids]
                best = argmin(list(zip(sizes, loads, strict=True)))
            else:
                best = loads.index(min_load)
            hit_blocks = int(counts[best]) if counts is not None else 0
        chosen = candidates[best]
        ident = ids[best]
        if n_blocks:
            self.index.record(hashes, ident, now)
            self.tree_blocks[ident] = self.tree_blocks.get(ident, 0) + n_blocks - hit_blocks
        session_hit: bool | None = None
        if self.sessions is not None and request.session_id is not None:
            session_hit = self.sessions.observe(request.session_id, ident)
        return Selection(chosen, strategy, hit_blocks, n_blocks, session_hit)
