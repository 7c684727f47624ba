"""Cache-aware policies: ``cache_aware`` and ``remote_cache_aware``
(docs/fastdeploy.md#cache-aware-routing).

Decision, with ``loads`` = local ``R`` (``cache_aware``) or snapshot running + pending, local
``R`` when stale (``remote_cache_aware``):

1. imbalance fallback: with ≥ 2 candidates, if ``max − min > balance-abs-threshold`` and
   ``(max − min) / max > balance-rel-threshold``, pick the minimum ``T``;
2. otherwise score = ``(100 − hit)/100 × hit-ratio-weight + load/maxLoad × load-balance-weight``
   (load ratio 0 when ``maxLoad`` is 0), with ``hit = 100 × matched blocks / n_blocks``; the
   lowest score wins, exact ties → lower ``T``, then the earliest URL — except for a **cold
   prefix** (no candidate has any matched block): then exact ties → lower ``T``, then the
   instance this policy selected least recently (never selected first), then the earliest URL,
   so cold prefixes spread over idle instances instead of all landing on the first one;
3. the chosen instance is recorded for all block hashes in both cases.

Session-affinity statistics (docs/fastdeploy.md#session-affinity) are kept for the prefill and
mixed roles.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from kvrouter.policies.base import (
    STRATEGY_CACHE_AWARE,
    STRATEGY_IMBALANCE,
    VECTOR_MIN,
    CandidateCache,
    Policy,
    RequestView,
    Selection,
    load_terms,
    policy_config,
    register,
)
from kvrouter.prefix.index import PrefixIndex

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.registry import Instance

__all__ = [
    "SESSION_ROLES",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "RemoteCacheAwarePolicy",
    "SelectionRecency",
    "SessionAffinity",
]

log = logging.getLogger("kvrouter.policy")

SESSION_MEMORY = 100_000
#: Longer session ids are not remembered: the memory holds up to SESSION_MEMORY of them, in
#: every worker process and router replica, and each observation is sent to all of them.
MAX_SESSION_ID = 256
#: The roles whose policies keep session-affinity statistics.
SESSION_ROLES = frozenset({"prefill", "mixed"})


class SessionAffinity:
    """LRU memory of each session's previous instance (bounded to ``max_sessions`` ids of
    at most :data:`MAX_SESSION_ID` characters; a longer id is neither remembered nor counted).

    Listeners (:meth:`add_listener`) are told of every :meth:`observe`; :meth:`remember` is
    the same without them, for an observation made by another router (:mod:`kvrouter.shared`).
    """

    __slots__ = ("_last", "_listeners", "max_sessions")

    def __init__(self, max_sessions: int = SESSION_MEMORY) -> None:
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, str] = OrderedDict()
        self._listeners: tuple[Callable[[str, str], None], ...] = ()

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(session_id, identity)`` after each :meth:`observe`."""
        self._listeners = (*self._listeners, listener)

    def observe(self, session_id: str, identity: str) -> bool | None:
        """Record this session's new instance; ``True`` if it equals the previous one,
        ``None`` for an id too long to remember (the decision counts as session-less)."""
        hit = self.remember(session_id, identity)
        if hit is not None:
            for listener in self._listeners:
                listener(session_id, identity)
        return hit

    def remember(self, session_id: str, identity: str) -> bool | None:
        """:meth:`observe` without telling the listeners."""
        if len(session_id) > MAX_SESSION_ID:
            return None
        last = self._last
        prev = last.pop(session_id, None)
        last[session_id] = identity
        if len(last) > self.max_sessions:
            last.popitem(last=False)
        return prev == identity

    def __len__(self) -> int:
        return len(self._last)


class SelectionRecency:
    """When this policy last selected each instance (a per-policy sequence number).

    ``last(identity)`` is -1 for an instance never selected, so "least recently selected"
    orders never-selected instances first. Bounded: when more than ``max_entries`` identities
    are remembered (instances come and go), the oldest half is forgotten.
    """

    __slots__ = ("_last", "_seq", "max_entries")

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._seq = 0
        self._last: dict[str, int] = {}

    def last(self, identity: str) -> int:
        return self._last.get(identity, -1)

    def forget(self, identity: str) -> None:
        """A removed instance: if it registers again, it is as if never selected."""
        self._last.pop(identity, None)

    def touch(self, identity: str) -> None:
        self._seq += 1
        last = self._last
        last.pop(identity, None)
        last[identity] = self._seq
        if len(last) > self.max_entries:
            for key in list(last)[: len(last) // 2]:
                del last[key]


@dataclass(frozen=True, slots=True)
class CacheAwareConfig:
    """The settings of ``cache_aware`` and ``remote_cache_aware``: the scheduler keys of the
    same names (``balance-abs-threshold`` …)."""

    balance_abs_threshold: float
    balance_rel_threshold: float
    hit_ratio_weight: float
    load_balance_weight: float


@register
class CacheAwarePolicy(Policy):
    """Prefix-hit vs load scoring with an imbalance fallback; load = local ``R``."""

    name = "cache_aware"
    needs_prefix = True

    def __init__(
        self,
        role: str,
        index: PrefixIndex,
        config: CacheAwareConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(role)
        self.index = index
        self.balance_abs_threshold = float(config.balance_abs_threshold)
        self.balance_rel_threshold = float(config.balance_rel_threshold)
        self.hit_ratio_weight = float(config.hit_ratio_weight)
        self.load_balance_weight = float(config.load_balance_weight)
        self._clock = clock
        self.sessions: SessionAffinity | None = (
            SessionAffinity() if self.role in SESSION_ROLES else None
        )
        self.recency = SelectionRecency()
        self._cands = CandidateCache(index)

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, index, policy_config(CacheAwareConfig, cfg), clock=clock)

    def forget(self, identity: str) -> None:
        self.recency.forget(identity)

    def loads(self, candidates: Sequence[Instance], now: float) -> list[float]:
        """The load each candidate is compared on."""
        cache = self._cands
        if cache._list is candidates:
            return [load.requests for load in cache.loads]
        return [inst.load.requests for inst in candidates]

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        now = self._clock()
        index = self.index
        hashes = request.hashes
        n_blocks = len(hashes)
        _, nums = self._cands.get(candidates)
        loads = self.loads(candidates, now)
        best, imbalanced, counts = self._decide(candidates, loads, hashes, nums)
        if imbalanced:
            strategy = STRATEGY_IMBALANCE
            hit_blocks = (int(index.match_counts(hashes, nums[best:best + 1])[0])
                          if n_blocks else 0)
        else:
            strategy = STRATEGY_CACHE_AWARE
            hit_blocks = int(counts[best]) if counts is not None else 0
        chosen = candidates[best]
        if log.isEnabledFor(logging.DEBUG):
            self._log_decision(candidates, loads, chosen, imbalanced, hashes, nums, counts)

        ident = self._cands.ids[best]
        self.recency.touch(ident)
        if n_blocks:
            index.record(hashes, ident, now)
        session_hit: bool | None = None
        if self.sessions is not None and request.session_id is not None:
            session_hit = self.sessions.observe(request.session_id, ident)
        return Selection(chosen, strategy, hit_blocks, n_blocks, session_hit)

    def _decide(self, candidates: Sequence[Instance], loads: list[float], hashes: list[int],
                nums: np.ndarray) -> tuple[int, bool, np.ndarray | None]:
        """``(chosen position, imbalanced, matched blocks per candidate)``: rules 1 and 2 of
        the module docstring, recording nothing. The matched blocks are ``None`` when the
        fallback decided (it does not look them up) or the prompt has no block."""
        max_load = max(loads)
        if len(candidates) >= 2:
            diff = max_load - min(loads)
            if (diff > self.balance_abs_threshold and max_load > 0
                    and diff / max_load > self.balance_rel_threshold):
                tokens = [load.tokens for load in self._cands.loads]
                return tokens.index(min(tokens)), True, None
        n_blocks = len(hashes)
        counts = self.index.match_counts(hashes, nums) if n_blocks else None
        if len(candidates) >= VECTOR_MIN:
            best = self._best_vector(candidates, loads, max_load, counts, n_blocks)
        else:
            matched = counts.tolist() if counts is not None else [0] * len(candidates)
            best = self._best_loop(candidates, loads, max_load, matched, n_blocks)
        return best, False, counts

    def explain(self, candidates: Sequence[Instance], request: RequestView) -> list[dict[str, Any]]:
        """Per candidate: matched blocks, the load compared, the score (lowest wins); the
        pick and whether the imbalance fallback made it."""
        hashes = request.hashes
        n_blocks = len(hashes)
        _, nums = self._cands.get(candidates)
        loads = self.loads(candidates, self._clock())
        best, imbalanced, counts = self._decide(candidates, loads, hashes, nums)
        if counts is None and n_blocks:
            counts = self.index.match_counts(hashes, nums)
        scores = self._scores(loads, max(loads), counts, n_blocks)
        rows = []
        for i, inst in enumerate(candidates):
            row = load_terms(inst)
            row.update(matched_blocks=int(counts[i]) if counts is not None else 0,
                       prompt_blocks=n_blocks, load=loads[i], score=float(scores[i]),
                       chosen=i == best)
            rows.append(row)
        rows[best]["strategy"] = STRATEGY_IMBALANCE if imbalanced else STRATEGY_CACHE_AWARE
        return rows

    def _best_loop(self, candidates: Sequence[Instance], loads: list[float], max_load: float,
                   matched: list[int], n_blocks: int) -> int:
        """The scoring rule, one candidate at a time (few candidates)."""
        hw = self.hit_ratio_weight
        lw = self.load_balance_weight
        cold = not any(matched)
        recency = self.recency
        best = 0
        best_key: tuple[float, int, int] | None = None
        for i, inst in enumerate(candidates):
            m = matched[i]
            miss = (1.0 - m / n_blocks) if n_blocks else 1.0   # (100 − hit) / 100
            ratio = loads[i] / max_load if max_load > 0 else 0.0
            key = (miss * hw + ratio * lw, inst.load.tokens,
                   recency.last(inst.identity) if cold else 0)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def _best_vector(self, candidates: Sequence[Instance], loads: list[float], max_load: float,
                     counts: np.ndarray | None, n_blocks: int) -> int:
        """The same rule with numpy (many candidates): identical floats, identical ties."""
        score = self._scores(loads, max_load, counts, n_blocks)
        tied = np.flatnonzero(score == score.min())
        if len(tied) == 1:
            return int(tied[0])
        cold = counts is None or not counts.any()
        return _tie_break([candidates[i] for i in tied.tolist()], tied.tolist(),
                          self.recency if cold else None)

    def _scores(self, loads: list[float], max_load: float, counts: np.ndarray | None,
                n_blocks: int) -> np.ndarray:
        """Every candidate's score (rule 2), as an array."""
        k = len(loads)
        miss = 1.0 - counts / n_blocks if counts is not None else np.ones(k)
        ratio = np.array(loads, dtype=np.float64) / max_load if max_load > 0 else np.zeros(k)
        return miss * self.hit_ratio_weight + ratio * self.load_balance_weight

    def _log_decision(self, candidates, loads, chosen, imbalanced, hashes, nums, counts) -> None:
        if imbalanced:
            log.debug("[%s] load imbalanced, loads=%s", self.role, _fmt_loads(candidates, loads))
            log.debug(
                "final strategy: process_tokens, selected=%s, loads=%s, hitRatios=-",
                chosen.url, _fmt_loads(candidates, loads),
            )
            return
        n_blocks = len(hashes)
        matched = counts.tolist() if counts is not None else [0] * len(candidates)
        ratios = ", ".join(
            f"{inst.url}: {100.0 * m / n_blocks if n_blocks else 0.0:.2f}"
            for inst, m in zip(candidates, matched, strict=True)
        )
        log.debug(
            "final strategy: cache_aware_scoring, selected=%s, loads=%s, hitRatios={%s}",
            chosen.url, _fmt_loads(candidates, loads), ratios,
        )


def _tie_break(tied: list[Instance], positions: list[int],
               recency: SelectionRecency | None) -> int:
    """Among equally scored candidates: fewer ``T``, then (``recency`` given) the least
    recently selected, then the earliest position."""
    tokens = [inst.load.tokens for inst in tied]
    low = min(tokens)
    rest = [(recency.last(inst.identity) if recency is not None else 0, pos)
            for inst, pos, t in zip(tied, positions, tokens, strict=True) if t == low]
    return min(rest)[1]


@register
class RemoteCacheAwarePolicy(CacheAwarePolicy):
    """As ``cache_aware``, with load = snapshot ``num_requests_running`` + pending
    (local ``R`` when the snapshot is stale)."""

    name = "remote_cache_aware"
    needs_remote_metrics = True

    def loads(self, candidates: Sequence[Instance], now: float) -> list[float]:
        out: list[float] = []
        for inst in candidates:
            snap = inst.fresh_snapshot(now)
            out.append(inst.load.requests if snap is None else snap.running + inst.load.pending)
        return out


def _fmt_loads(candidates: Sequence[Instance], loads: Sequence[float]) -> str:
    pairs = zip(candidates, loads, strict=True)
    return "{" + ", ".join(f"{inst.url}: {load:g}" for inst, load in pairs) + "}"
