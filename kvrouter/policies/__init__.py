"""Scheduling policies (contract §6): one object per role, built by :func:`make_policy`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from kvrouter.config import POLICY_NAMES, SchedulerConfig
from kvrouter.policies.base import (
    STRATEGIES,
    STRATEGY_CACHE_AWARE,
    STRATEGY_COST,
    STRATEGY_EXPLORATION,
    STRATEGY_IMBALANCE,
    STRATEGY_POLICY,
    STRATEGY_STALE,
    Policy,
    RequestView,
    Selection,
)
from kvrouter.policies.cache_aware import CacheAwarePolicy, RemoteCacheAwarePolicy, SessionAffinity
from kvrouter.policies.kv_cost import KvCostPolicy
from kvrouter.policies.load import ProcessTokensPolicy, RequestNumPolicy
from kvrouter.policies.metrics_score import FdMetricsScorePolicy, FdRemoteMetricsScorePolicy
from kvrouter.policies.sglang import SglangCacheAwarePolicy
from kvrouter.policies.simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy
from kvrouter.prefix.index import PrefixIndex

__all__ = [
    "POLICY_NAMES",
    "POLICY_CLASSES",
    "make_policy",
    "Policy",
    "RequestView",
    "Selection",
    "SessionAffinity",
    "STRATEGIES",
    "STRATEGY_POLICY",
    "STRATEGY_CACHE_AWARE",
    "STRATEGY_IMBALANCE",
    "STRATEGY_STALE",
    "STRATEGY_COST",
    "STRATEGY_EXPLORATION",
]


POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RandomPolicy,
        RoundRobinPolicy,
        PowerOfTwoPolicy,
        ProcessTokensPolicy,
        RequestNumPolicy,
        FdMetricsScorePolicy,
        FdRemoteMetricsScorePolicy,
        CacheAwarePolicy,
        RemoteCacheAwarePolicy,
        SglangCacheAwarePolicy,
        KvCostPolicy,
    )
}


def make_policy(
    name: str,
    role: str,
    cfg: SchedulerConfig,
    index: PrefixIndex,
    rng: random.Random | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """A fresh policy object for one role.

    ``index`` is the router's shared prefix index (used by the cache-aware policies);
    ``clock`` must be the clock of ``MetricsSnapshot.taken_at`` and of ``index.sweep``.
    Raises ``ValueError`` for an unknown name.
    """
    if name == "random":
        return RandomPolicy(role, rng)
    if name == "round_robin":
        return RoundRobinPolicy(role)
    if name == "power_of_two":
        return PowerOfTwoPolicy(role, rng)
    if name == "process_tokens":
        return ProcessTokensPolicy(role)
    if name == "request_num":
        return RequestNumPolicy(role)
    if name == "fd_metrics_score":
        return FdMetricsScorePolicy(role, cfg.waiting_weight)
    if name == "fd_remote_metrics_score":
        return FdRemoteMetricsScorePolicy(role, cfg.waiting_weight, clock)
    if name in ("cache_aware", "remote_cache_aware"):
        cls = CacheAwarePolicy if name == "cache_aware" else RemoteCacheAwarePolicy
        return cls(
            role,
            index,
            balance_abs_threshold=cfg.balance_abs_threshold,
            balance_rel_threshold=cfg.balance_rel_threshold,
            hit_ratio_weight=cfg.hit_ratio_weight,
            load_balance_weight=cfg.load_balance_weight,
            clock=clock,
        )
    if name == "sglang_cache_aware":
        return SglangCacheAwarePolicy(
            role,
            index,
            cache_threshold=cfg.sglang_cache_threshold,
            balance_abs_threshold=cfg.sglang_balance_abs_threshold,
            balance_rel_threshold=cfg.sglang_balance_rel_threshold,
            miss_policy=cfg.sglang_miss_policy,
            clock=clock,
        )
    if name == "kv_cost":
        return KvCostPolicy(
            role,
            index,
            block_size=cfg.cache_block_size,
            prefill_tokens_per_sec=cfg.kv_cost_prefill_tokens_per_sec,
            decode_weight=cfg.kv_cost_decode_weight,
            exploration=cfg.kv_cost_exploration,
            miss_weight=cfg.kv_cost_miss_weight,
            itl_weight=cfg.kv_cost_itl_weight,
            transfer_tokens_per_sec=cfg.kv_cost_transfer_tokens_per_sec,
            chars_per_token=cfg.kv_cost_chars_per_token,
            rng=rng,
            clock=clock,
        )
    raise ValueError(f"unknown policy '{name}' (valid: {', '.join(POLICY_NAMES)})")
