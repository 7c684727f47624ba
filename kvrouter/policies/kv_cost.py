"""``kv_cost``: pick the instance with the lowest estimated time to first token (TTFT).

For every candidate *i* the policy estimates the TTFT this request would see there, from the
router's prefix index and its own in-flight accounting (corrected by the background metrics
snapshot), adds the price of the cache miss it would cause, and takes the minimum::

    TTFT_i = (Q_i + U_i) / P  +  w_d × D_i  +  X
    cost_i = TTFT_i  +  α × (U_i − min_j U_j) / P  +  w_itl × D_i × U_i / P

* ``U_i`` — **uncached prefill** of this request on *i*: ``L − m_i × B`` prompt tokens, at least
  1 (the engine always computes the last prompt token), where ``L`` = the prompt length,
  ``m_i`` = the leading prompt blocks the prefix index holds for *i*, ``B`` =
  ``cache-block-size``. Without a tokenizer the index works on code points; lengths are then
  divided by ``kv-cost-chars-per-token`` to be counted in tokens.
* ``Q_i`` — **queued prefill work** on *i*: ``Load.prefill_tokens``, the sum of the ``U`` of
  every leg this router dispatched to *i* that has not produced its first byte yet (each lease
  carries its estimate and releases it together with ``T``). With a fresh metrics snapshot,
  ``Q_i = max(Q_i, waiting × ū_i + pending_prefill_i)``: the instance's own waiting queue
  (``num_requests_waiting``) times ``ū_i``, the mean estimate of the legs dispatched there
  before the snapshot and still before their first byte (this request's ``U_i`` when there are
  none), plus the work of the legs dispatched since the snapshot. This
  corrects for work the router does not know about (other routers, direct clients) without
  counting its own legs twice.
* ``P`` — ``kv-cost-prefill-tokens-per-sec``, an instance's prefill throughput.
* ``D_i`` — in-flight legs on *i* past their first byte (decoding); ``w_d`` —
  ``kv-cost-decode-weight``, seconds of prefill slowdown per decoding request (their KV reads
  and batch slots make every step longer).
* ``X`` — PD only: the KV transfer of the prompt to the decode instance,
  ``L / kv-cost-transfer-tokens-per-sec`` (0 disables it). The decode instance holds no prefix,
  so ``X`` is the same for every prefill candidate: it makes ``TTFT_i`` an estimate of the
  client's TTFT, it does not change the choice.
* ``α`` — ``kv-cost-miss-weight``: recomputing a prefix that another candidate holds costs the
  cluster more than this request's wait. It is work every later request on that instance
  queues behind, and the copy evicts other prefixes from a finite cache. With ``α = 0`` the
  policy is the greedy TTFT minimiser (like the simulator's oracle), which replicates prefixes
  on every burst and loses hit rate exactly when load is high. With ``α > 0`` a request leaves
  the instance *h* holding its prefix for *j* only when
  ``Q_h − Q_j > (1 + α) × (U_j − U_h)`` (decode terms aside), so a hot prefix spreads over more
  instances only while its holders stay overloaded. The new instance then holds the prefix
  too, and later requests for it split between the copies by their queues.
* ``w_itl`` — ``kv-cost-itl-weight``: while this request's ``U_i`` tokens are prefilled, each of
  the ``D_i`` requests decoding on *i* waits about ``U_i / P`` longer for its next tokens. The
  term charges that fraction of the delay, so long prefills (cold prefixes) go preferably
  where few requests are decoding, which protects the inter-token latency of the others.

Decisions: the minimum cost wins. Exact ties go to the instance this policy selected least
recently (never selected first), then to the earliest URL, so cold prefixes on an idle cluster
spread. With probability ``kv-cost-exploration`` (seeded ``rng``) the choice is instead drawn
uniformly among the other **near-best** candidates, those whose cost is within
``max(50 % of the best, 50 ms)`` of the best (if there are none, nothing is explored). Such a
choice has the strategy label ``exploration`` (else ``cost_estimate``). The chosen instance is
recorded in the prefix index for all prompt blocks, since it will hold the prefix. Its ``U`` is
the selection's ``prefill_estimate``, which the dispatcher gives to the lease it acquires there
(``Load.acquire(prefill=...)``).

Decode role (PD): no prefill happens there, so ``cost_i = w_d × R_i + X``. This is load
only; ties go to fewer in-flight tokens ``T``, then to the least recently selected. Nothing is
recorded in the index.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from kvrouter.policies.base import (
    STRATEGY_COST,
    STRATEGY_EXPLORATION,
    VECTOR_MIN,
    CandidateCache,
    Policy,
    RequestView,
    Selection,
    load_terms,
    policy_config,
    register,
)
from kvrouter.policies.cache_aware import (
    SESSION_ROLES,
    SelectionRecency,
    SessionAffinity,
)
from kvrouter.prefix.index import PrefixIndex

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.registry import Instance

__all__ = ["EXPLORE_ABS", "EXPLORE_REL", "KvCostConfig", "KvCostPolicy"]

EXPLORE_REL = 0.5     # near-best: within 50 % of the best estimate …
EXPLORE_ABS = 0.05    # … or within 50 ms of it, whichever is larger


@dataclass(frozen=True, slots=True)
class KvCostConfig:
    """The settings of ``kv_cost``: the ``kv-cost-*`` scheduler keys (the block size *B* is
    ``cache-block-size``, shared with the prefix index)."""

    prefill_tokens_per_sec: float
    decode_weight: float
    exploration: float
    miss_weight: float
    itl_weight: float
    transfer_tokens_per_sec: float
    chars_per_token: float


def _floats(values: list, k: int) -> np.ndarray:
    # (list comprehensions with 3.11's specialised attribute loads beat attrgetter maps)
    return np.fromiter(values, dtype=np.float64, count=k)


@register
class KvCostPolicy(Policy):
    """Minimum estimated TTFT (see the module docstring for the formula)."""

    name = "kv_cost"
    needs_prefix = True
    needs_remote_metrics = True   # the snapshot corrects the queued-work estimate

    def __init__(
        self,
        role: str,
        index: PrefixIndex,
        config: KvCostConfig,
        *,
        block_size: int,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(role)
        if config.prefill_tokens_per_sec <= 0:
            raise ValueError("prefill_tokens_per_sec must be > 0")
        self.index = index
        self.block_size = int(block_size)
        self.prefill_tokens_per_sec = float(config.prefill_tokens_per_sec)
        self.decode_weight = float(config.decode_weight)
        self.exploration = float(config.exploration)
        self.miss_weight = float(config.miss_weight)
        self.itl_weight = float(config.itl_weight)
        self.transfer_tokens_per_sec = float(config.transfer_tokens_per_sec)
        chars_per_token = config.chars_per_token
        self.chars_per_token = float(chars_per_token) if chars_per_token > 0 else 1.0
        self._rng = rng or random.Random()
        self._clock = clock
        self.recency = SelectionRecency()
        self._cands = CandidateCache(index)
        self.sessions: SessionAffinity | None = (
            SessionAffinity() if self.role in SESSION_ROLES else None
        )

    @classmethod
    def from_config(cls, role: str, cfg: SchedulerConfig, index: PrefixIndex, *,
                    rng: random.Random | None, clock: Callable[[], float]) -> Self:
        return cls(role, index, policy_config(KvCostConfig, cfg, "kv_cost_"),
                   block_size=cfg.cache_block_size, rng=rng, clock=clock)

    def forget(self, identity: str) -> None:
        self.recency.forget(identity)

    # ------------------------------------------------------------------ estimates
    def _lengths(self, request: RequestView) -> tuple[int, float]:
        """(prompt length in index units, tokens per unit)."""
        if request.tokens is not None:
            return len(request.tokens), 1.0
        prompt = request.prompt
        if isinstance(prompt, str):
            return len(prompt), 1.0 / self.chars_per_token
        return len(prompt), 1.0

    def estimates(
        self, candidates: Sequence[Instance], request: RequestView,
        matched: dict[str, int] | None = None, now: float | None = None,
    ) -> tuple[list[float], list[int]]:
        """The cost (seconds: the estimated TTFT plus the miss and ITL prices) and the
        uncached prefill tokens ``U`` of every candidate.

        Pure: no index record, no randomness. ``matched`` (identity → matched
        blocks) defaults to the index's match of the request's hashes.
        """
        if now is None:
            now = self._clock()
        counts = ([matched.get(inst.identity, 0) for inst in candidates]
                  if matched is not None else self._counts(candidates, request))
        ests, uncached = self._estimate(candidates, request, counts, now)
        return [float(e) for e in ests], [round(float(u)) for u in uncached]

    def _counts(self, candidates: Sequence[Instance], request: RequestView):
        """Leading matched blocks per candidate (an int array), ``None`` without blocks or
        in the decode role."""
        if self.role == "decode" or not request.hashes:
            return None
        _, nums = self._cands.get(candidates)
        return self.index.match_counts(request.hashes, nums)

    def _estimate(self, candidates: Sequence[Instance], request: RequestView, counts,
                  now: float):
        """``(costs, uncached)``: lists for few candidates, float arrays for many (same
        arithmetic in the same order, so the same floats)."""
        units, scale = self._lengths(request)
        prompt_tokens = units * scale
        xfer = 0.0
        if self.transfer_tokens_per_sec > 0 and self.role in ("prefill", "decode"):
            xfer = prompt_tokens / self.transfer_tokens_per_sec
        wd = self.decode_weight
        k = len(candidates)
        if k >= VECTOR_MIN:
            return self._estimate_vector(candidates, counts, units, scale, xfer, now)
        if self.role == "decode":
            return [wd * inst.load.requests + xfer for inst in candidates], [0] * k
        matched = counts.tolist() if isinstance(counts, np.ndarray) else counts
        rate = self.prefill_tokens_per_sec
        wi = self.itl_weight
        bs = self.block_size
        ests: list[float] = []
        uncached: list[float] = []
        for i, inst in enumerate(candidates):
            load = inst.load
            m = matched[i] if matched is not None else 0
            u_units = units - m * bs
            u = max(1.0, u_units * scale) if units else 0.0
            q = self._queued(load, inst.fresh_snapshot(now), u)
            d = load.decoding
            ests.append((q + u) / rate + wd * d + xfer + wi * d * u / rate)
            uncached.append(u)
        if self.miss_weight > 0 and uncached:
            u_min = min(uncached)
            c = self.miss_weight / rate
            ests = [e + c * (u - u_min) for e, u in zip(ests, uncached, strict=True)]
        return ests, uncached

    @classmethod
    def _queued(cls, load, snap, u: float) -> float:
        """``Q_i``: the router's queued prefill work, corrected by a fresh snapshot (``snap``,
        or ``None``) that shows a waiting queue."""
        q = float(load.prefill_tokens)
        if snap is not None and snap.waiting > 0:
            return cls._queued_from_snapshot(load, snap, u, q)
        return q

    @staticmethod
    def _queued_from_snapshot(load, snap, u: float, q: float) -> float:
        """``Q_i`` corrected by a fresh snapshot with a waiting queue (see the docstring)."""
        old_legs = load.prefill_leases - load.pending_prefill_leases
        ubar = ((load.prefill_tokens - load.pending_prefill) / old_legs
                if old_legs > 0 else u)
        return max(q, snap.waiting * ubar + load.pending_prefill)

    def _estimate_vector(self, candidates, counts, units, scale, xfer, now):
        k = len(candidates)
        wd = self.decode_weight
        loads = self._cands.loads if self._cands._list is candidates else \
            [inst.load for inst in candidates]
        if self.role == "decode":
            return wd * _floats([ld.requests for ld in loads], k) + xfer, np.zeros(k)
        rate = self.prefill_tokens_per_sec
        if counts is None:
            counts = np.zeros(k, dtype=np.int64)
        elif not isinstance(counts, np.ndarray):
            counts = np.array(counts, dtype=np.int64)
        u_units = units - counts * self.block_size
        u = np.maximum(1.0, u_units * scale) if units else np.zeros(k)
        q = _floats([ld.prefill_tokens for ld in loads], k)
        snaps = [inst.snapshot for inst in candidates]
        if snaps.count(None) < k:
            for i, snap in enumerate(snaps):
                if snap is None:
                    continue
                snap = candidates[i].fresh_snapshot(now)
                if snap is not None and snap.waiting > 0:
                    q[i] = self._queued_from_snapshot(loads[i], snap, float(u[i]), float(q[i]))
        # Load.decoding = max(0, requests − prefill_leases)
        d = np.maximum(_floats([ld.requests - ld.prefill_leases for ld in loads], k), 0.0)
        ests = (q + u) / rate + wd * d + xfer + self.itl_weight * d * u / rate
        if self.miss_weight > 0:
            ests = ests + (self.miss_weight / rate) * (u - u.min())
        return ests, u

    # ------------------------------------------------------------------ decision
    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        now = self._clock()
        hashes = request.hashes
        n_blocks = len(hashes)
        decode = self.role == "decode"
        ids, nums = self._cands.get(candidates)
        counts = None if decode or not n_blocks else self.index.match_counts(hashes, nums)
        ests, uncached = self._estimate(candidates, request, counts, now)
        best = self._best(candidates, ids, ests, decode)
        strategy = STRATEGY_COST
        if self.exploration > 0 and len(candidates) > 1 and self._rng.random() < self.exploration:
            near = self._near_best(ests, best)
            if near:
                best = near[self._rng.randrange(len(near))]
                strategy = STRATEGY_EXPLORATION
        self.recency.touch(ids[best])
        hit_blocks = int(counts[best]) if counts is not None else 0
        if n_blocks and not decode:
            self.index.record(hashes, ids[best], now)
        session_hit: bool | None = None
        if self.sessions is not None and request.session_id is not None:
            session_hit = self.sessions.observe(request.session_id, ids[best])
        return Selection(candidates[best], strategy, hit_blocks, 0 if decode else n_blocks,
                         session_hit, prefill_estimate=round(float(uncached[best])))

    def _best(self, candidates: Sequence[Instance], ids: list[str], ests, decode: bool) -> int:
        """The position of the lowest cost; ties as the module docstring says."""
        recency = self.recency
        if isinstance(ests, np.ndarray):
            tied = np.flatnonzero(ests == ests.min()).tolist()
            if decode and len(tied) > 1:
                toks = [candidates[i].load.tokens for i in tied]
                low = min(toks)
                tied = [i for i, t in zip(tied, toks, strict=True) if t == low]
            return tied[0] if len(tied) == 1 else min((recency.last(ids[i]), i) for i in tied)[1]
        best = 0
        best_key: tuple[float, int, int] | None = None
        for i, inst in enumerate(candidates):
            key = (ests[i], inst.load.tokens if decode else 0, recency.last(ids[i]))
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    @staticmethod
    def _near_best(ests, best: int) -> list[int]:
        """The other candidates exploration may draw: cost within ``max(EXPLORE_REL × best,
        EXPLORE_ABS)`` of the best."""
        limit = ests[best] + max(EXPLORE_REL * ests[best], EXPLORE_ABS)
        if isinstance(ests, np.ndarray):
            return [i for i in np.flatnonzero(ests <= limit).tolist() if i != best]
        return [i for i in range(len(ests)) if i != best and ests[i] <= limit]

    def explain(self, candidates: Sequence[Instance], request: RequestView) -> list[dict[str, Any]]:
        """Per candidate: matched blocks, the terms of the cost (``U``, ``Q``, ``D``) and the
        cost itself in seconds (lowest wins); the pick, and with ``kv-cost-exploration`` the
        near-best candidates a draw may send the request to instead."""
        now = self._clock()
        decode = self.role == "decode"
        ids, _ = self._cands.get(candidates)
        counts = self._counts(candidates, request)
        ests, uncached = self._estimate(candidates, request, counts, now)
        best = self._best(candidates, ids, ests, decode)
        near = set(self._near_best(ests, best)) if self.exploration > 0 else set()
        rows = []
        for i, inst in enumerate(candidates):
            row = load_terms(inst)
            u = float(uncached[i])
            row.update(matched_blocks=int(counts[i]) if counts is not None else 0,
                       prompt_blocks=len(request.hashes), uncached_tokens=round(u),
                       decoding=inst.load.decoding, cost_seconds=float(ests[i]),
                       chosen=i == best)
            if not decode:      # Q_i as the cost read it (the snapshot correction included)
                row["queued_prefill_tokens"] = round(
                    self._queued(inst.load, inst.fresh_snapshot(now), u))
            if self.exploration > 0:
                row["near_best"] = i in near
            rows.append(row)
        rows[best]["strategy"] = STRATEGY_COST
        return rows
