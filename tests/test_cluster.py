"""Fidelity tests of the virtual-time cluster (fidelity gates 3, 4 and 6).

They run against the real engine core (``kvrouter.sim.core.make_engine_core``) when it is
importable, else against the small FIFO stand-in core below.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import pytest

from kvrouter.prefix.hashing import block_hashes
from kvrouter.sim.cluster import (
    ClusterResult,
    percentile,
    run_cluster,
    summarize,
)
from kvrouter.sim.core.api import (
    PHASE_DECODE,
    PHASE_FULL,
    PHASE_PREFILL,
    CoreRequest,
    Step,
    TokenEvent,
)
from kvrouter.sim.workloads import make_workload


# ----------------------------------------------------------------------------- stand-in core
class StandInCore:
    """A tiny FIFO engine implementing ``EngineCoreAPI`` (used until the real core exists).

    ``max_num_seqs`` running slots, FIFO admission; each step decodes one token for every
    decoding request and prefills FIFO chunks up to ``max_batched_tokens``; duration =
    ``overhead + per_prefill_token × prefill + per_decode_seq × decodes``. Prefix cache: an
    LRU set of ``cache_blocks`` chained full-block hashes, filled at prefill completion.
    PD: a prefill request emits one token then holds its slot until ``release_prefill``; a
    decode request waits ``transfer_time`` after admission, then decodes.
    """

    def __init__(self, *, max_num_seqs: int = 32, max_batched_tokens: int = 2048,
                 block_size: int = 16, cache_blocks: int = 4096, overhead: float = 0.004,
                 per_prefill_token: float = 5e-5, per_decode_seq: float = 1e-4) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        self.overhead = overhead
        self.per_prefill_token = per_prefill_token
        self.per_decode_seq = per_decode_seq
        self.waiting: deque[CoreRequest] = deque()
        self.running: list[CoreRequest] = []
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.done_prefill: dict[str, int] = {}      # request id → prompt tokens computed
        self.ready_at: dict[str, float] = {}        # decode: KV arrival time
        self.held: set[str] = set()                 # prefill: waiting for release

    # -- helpers
    def cached_prefix_tokens(self, tokens: list[int]) -> int:
        n = 0
        for h in block_hashes(tokens, self.block_size):
            if h not in self.cache:
                break
            n += 1
        return n * self.block_size

    def _insert(self, tokens: list[int]) -> None:
        for h in reversed(block_hashes(tokens, self.block_size)):
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = None
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)

    # -- EngineCoreAPI
    def add_request(self, req: CoreRequest, now: float) -> None:
        req.arrival = now
        self.waiting.append(req)

    def abort(self, request_id: str, now: float) -> bool:
        for q in (self.waiting, self.running):
            for r in list(q):
                if r.request_id == request_id:
                    q.remove(r)
                    r.finish_reason = "abort"
                    r.finished_at = now
                    self.held.discard(request_id)
                    return True
        return False

    def release_prefill(self, request_id: str) -> None:
        if request_id in self.held:
            self.held.discard(request_id)
            self.running = [r for r in self.running if r.request_id != request_id]

    def _admit(self, now: float) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.popleft()
            r.first_scheduled_at = now
            if r.phase == PHASE_DECODE:
                self.ready_at[r.request_id] = now + r.transfer_time
                self.done_prefill[r.request_id] = len(r.prompt_tokens)
            else:
                r.cached_tokens = min(self.cached_prefix_tokens(r.prompt_tokens),
                                      len(r.prompt_tokens) - 1)
                self.done_prefill[r.request_id] = r.cached_tokens
            self.running.append(r)

    def next_step(self, now: float) -> Step | None:
        self._admit(now)
        budget = self.max_batched_tokens
        prefill = 0
        decodes = 0
        ids: list[str] = []
        plan: dict[str, int] = {}
        for r in self.running:
            rid = r.request_id
            if rid in self.held:
                continue
            done = self.done_prefill[rid]
            if done < len(r.prompt_tokens):
                if budget <= 0:
                    continue
                chunk = min(budget, len(r.prompt_tokens) - done)
                budget -= chunk
                prefill += chunk
                plan[rid] = chunk
                ids.append(rid)
            elif r.phase != PHASE_DECODE or self.ready_at.get(rid, 0.0) <= now:
                decodes += 1
                plan[rid] = 0
                ids.append(rid)
        if not ids:
            return None
        step = Step(self.overhead + self.per_prefill_token * prefill
                    + self.per_decode_seq * decodes, prefill, decodes, ids)
        self._plan = plan
        return step

    def next_wakeup(self) -> float | None:
        waits = [self.ready_at[r.request_id] for r in self.running
                 if r.phase == PHASE_DECODE and r.request_id in self.ready_at]
        return min(waits) if waits else None

    def finish_step(self, step: Step, now: float) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        by_id = {r.request_id: r for r in self.running}
        for rid, chunk in self._plan.items():
            r = by_id.get(rid)
            if r is None:
                continue
            if chunk:
                self.done_prefill[rid] += chunk
                if self.done_prefill[rid] < len(r.prompt_tokens):
                    continue
                self._insert(r.prompt_tokens)
            self.ready_at.pop(rid, None)
            idx = r.output_tokens
            r.output_tokens += 1
            if r.first_token_at is None:
                r.first_token_at = now
            if r.phase == PHASE_PREFILL:
                self.held.add(rid)
                events.append(TokenEvent(rid, idx, 1000 + idx, True, "length"))
                r.finished_at = now
                r.finish_reason = "length"
                continue
            fin = r.output_tokens >= r.max_tokens
            events.append(TokenEvent(rid, idx, 1000 + idx, fin, "length" if fin else None))
            if fin:
                r.finished_at = now
                r.finish_reason = "length"
                self.running.remove(r)
                self.done_prefill.pop(rid, None)
        self._plan = {}
        return events

    def gauges(self) -> dict[str, float]:
        return {
            "fastdeploy:num_requests_running": float(len(self.running)),
            "fastdeploy:num_requests_waiting": float(len(self.waiting)),
            "fastdeploy:max_batch_size": float(self.max_num_seqs),
        }


assert PHASE_FULL == "full"


# ------------------------------------------------------------------------------- the core used
try:  # the real engine core, when the other half of the simulator is in place
    from kvrouter.sim.core import make_engine_core  # noqa: F401

    REAL_CORE = True
except ImportError:
    REAL_CORE = False


def small_core(i: int) -> StandInCore:
    return StandInCore()


CORE_KIND = "real" if REAL_CORE else "stand-in"
# request rates (req/s on 4 instances) for the load-dependent gates
SKEW_RATE, FIT_RATE, B2B_RATE = (60.0, 20.0, 10.0) if REAL_CORE else (45.0, 20.0, 10.0)


def run(workload, **kw) -> ClusterResult:
    kw.setdefault("instances", 4)
    kw.setdefault("seed", 1)
    kw.setdefault("preset", "llama3-8b-h100")
    if not REAL_CORE:
        kw.setdefault("core_factory", small_core)
    return run_cluster(workload, **kw)


# ------------------------------------------------------------------------------------ tests
def test_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_identical_seeds_identical_results() -> None:
    wl = make_workload("multigroup", rate=30, n=300, seed=3)
    a = run(wl, policy="power_of_two", seed=7)
    b = run(wl, policy="power_of_two", seed=7)
    assert [(r.instance, r.ttft, r.end, r.cached_tokens, tuple(r.itls)) for r in a.results] == \
           [(r.instance, r.ttft, r.end, r.cached_tokens, tuple(r.itls)) for r in b.results]
    assert summarize(a.results) == summarize(b.results)
    c = run(wl, policy="power_of_two", seed=8)
    assert [r.instance for r in a.results] != [r.instance for r in c.results]


def test_littles_law_and_accounting() -> None:
    wl = make_workload("nosharing", rate=20, n=800, seed=2, prompt_min=256, prompt_max=2048,
                       output=64)
    res = run(wl, policy="request_num", sample_interval=0.02)
    s = res.summary()
    assert s["completed"] == 800 and s["failed"] == 0
    T = res.span
    lam = len(res.results) / T
    W = sum(r.e2e for r in res.results) / len(res.results)
    # router counters (leases) integrate to the same in-system time as the request latencies
    assert res.in_system_integral == pytest.approx(lam * W * T, rel=1e-9)
    assert res.router_inflight_integral == pytest.approx(res.in_system_integral, rel=1e-9)
    assert all(v == (0, 0) for v in res.final_load.values())   # every lease released
    # independent check: mean of the cores' running + waiting gauges, sampled in time
    L = sum(x[2] for x in res.samples) / len(res.samples)
    err = abs(L - lam * W) / (lam * W)
    print(f"[{CORE_KIND}] Little: L={L:.3f} lambda*W={lam * W:.3f} error={err:.2%}")
    assert err < 0.03


def test_utilisation_identities() -> None:
    wl = make_workload("multigroup", rate=4, n=400, seed=5, groups=4, question=256, output=64)
    res = run(wl, policy="round_robin", instances=3)
    assert all(r.ok for r in res.results)
    for st in res.core_stats:
        mine = [r for r in res.results if r.instance == st.url]
        assert st.requests == len(mine)
        # busy time is at most the run's span and its share is a valid fraction
        assert 0 < st.busy_time <= res.span + 1e-9
        # work conservation: a mixed core steps exactly while it holds a request
        assert st.busy_time == pytest.approx(st.occupied_time, rel=1e-9)
        # every token the core emitted was delivered, one event per output token
        assert st.token_events == sum(r.output_tokens for r in mine)
        assert sum(r.output_tokens for r in mine) == sum(r.max_tokens for r in mine)
        # prefill work = uncached prompt tokens (no preemptions at this load)
        if not any(r.preemptions for r in mine):
            assert st.prefill_tokens == sum(r.prompt_tokens - r.cached_tokens for r in mine)
        # decode work: one decode token per output token after the first
        assert st.decode_tokens in (sum(r.output_tokens - 1 for r in mine),
                                    sum(r.output_tokens for r in mine))
    total_busy = sum(st.busy_time for st in res.core_stats)
    util = total_busy / (len(res.core_stats) * res.span)
    print(f"[{CORE_KIND}] utilisation {util:.2%} (busy = occupied time on every core)")
    assert 0 < util < 1


# A prefill-heavy skewed shared-prefix load: one hot system prompt takes ~half the traffic.
SKEW = {"groups": 8, "zipf": 1.5, "prefix_min": 1024, "prefix_max": 4096, "question": 1024,
        "output": 32}
PREFIX_ONLY = {"load-balance-weight": 0, "balance-abs-threshold": 1e9,
               "balance-rel-threshold": 1e9}


def test_prefix_only_collapses_under_skew_load_gated_does_not() -> None:
    wl = make_workload("multigroup", rate=SKEW_RATE, n=1200, seed=6, **SKEW)
    base = run(wl, policy="request_num").summary()
    gated = run(wl, policy="cache_aware").summary()
    only = run(wl, policy="cache_aware", scheduler_overrides=PREFIX_ONLY).summary()
    ratio = only["ttft_p99"] / gated["ttft_p99"]
    hot = max(only["per_instance"].values()) / 1200
    print(f"[{CORE_KIND}] collapse: TTFT p99 prefix-only {only['ttft_p99']:.3f}s vs gated "
          f"{gated['ttft_p99']:.3f}s (x{ratio:.1f}) vs request_num {base['ttft_p99']:.3f}s; "
          f"hot instance share {hot:.0%}; hit {only['token_hit_rate']:.3f} / "
          f"{gated['token_hit_rate']:.3f} / {base['token_hit_rate']:.3f}")
    assert hot > 0.45                          # the hot prefix pinned to one instance
    assert ratio > 10
    assert gated["ttft_p99"] < 2 * base["ttft_p99"]
    assert gated["completed"] == 1200


def test_working_set_fits_in_one_instance_small_gain() -> None:
    # 4 short system prompts, all of which fit in any one instance's cache
    wl = make_workload("multigroup", rate=FIT_RATE, n=1000, seed=7, groups=4, zipf=0.0,
                       prefix_min=1024, prefix_max=2048, question=64, output=64)
    base = run(wl, policy="request_num").summary()
    aware = run(wl, policy="cache_aware").summary()
    gain = (base["ttft_mean"] - aware["ttft_mean"]) / base["ttft_mean"]
    print(f"[{CORE_KIND}] fits-in-one: TTFT mean request_num {base['ttft_mean'] * 1e3:.1f} ms, "
          f"cache_aware {aware['ttft_mean'] * 1e3:.1f} ms, gain {gain:+.1%}; hit "
          f"{base['token_hit_rate']:.3f} vs {aware['token_hit_rate']:.3f}")
    assert gain <= 0.05
    assert aware["token_hit_rate"] - base["token_hit_rate"] < 0.03


def test_oracle_beats_cache_blind() -> None:
    wl = make_workload("b2b", rate=B2B_RATE, n=500, seed=8, groups=40, context=3000, users=2,
                       question=300, output=32)
    rr = run(wl, policy="round_robin").summary()
    orc = run(wl, policy="oracle").summary()
    print(f"[{CORE_KIND}] b2b: oracle hit {orc['token_hit_rate']:.3f} TTFT p90 "
          f"{orc['ttft_p90']:.3f}s; round_robin hit {rr['token_hit_rate']:.3f} TTFT p90 "
          f"{rr['ttft_p90']:.3f}s")
    assert orc["token_hit_rate"] > rr["token_hit_rate"]
    assert orc["ttft_p90"] <= rr["ttft_p90"]


def test_remote_metrics_policy_gets_snapshots() -> None:
    wl = make_workload("nosharing", rate=10, n=200, seed=9, output=32)
    res = run(wl, policy="fd_remote_metrics_score",
              scheduler_overrides={"metrics-scrape-interval-secs": 0.5})
    strategies = {r.strategy for r in res.results}
    assert strategies == {"policy"}          # never stale: snapshots every 0.5 s
    assert len(res.summary()["per_instance"]) == 4


def test_pd_disaggregation() -> None:
    wl = make_workload("multigroup", rate=8, n=200, seed=10, groups=4, question=256, output=32)
    res = run(wl, policy="cache_aware", instances=0, pd=(1, 2))
    s = res.summary()
    assert s["completed"] == 200
    assert set(s["per_prefill_instance"]) == {res.instances[0]}
    assert set(s["per_instance"]) == set(res.instances[1:])
    for r in res.results:
        assert r.transfer_time > 0
        assert r.ttft >= r.transfer_time
        assert r.output_tokens == r.max_tokens
    assert all(v == (0, 0) for v in res.final_load.values())
    pst, *dst = res.core_stats
    assert pst.requests == 200 and sum(d.requests for d in dst) == 200
    assert pst.prefill_tokens > 0 and sum(d.prefill_tokens for d in dst) == 0


def test_timeouts_count_as_failed() -> None:
    wl = make_workload("nosharing", rate=200, n=300, seed=11, output=64)
    res = run(wl, policy="round_robin", instances=1, request_timeout=1.0)
    s = res.summary()
    assert s["failed"] > 0 and s["completed"] + s["failed"] == 300
    assert all(r.e2e is not None and r.e2e <= 1.0 + 1e-9 for r in res.results)
    assert all(v == (0, 0) for v in res.final_load.values())


def test_injected_core_factory_standin() -> None:
    """The cluster drives any ``EngineCoreAPI`` (here the stand-in core above)."""
    wl = make_workload("b2b", rate=10, n=200, seed=12, groups=6, context=1500, question=200,
                       output=16)
    kw = {"instances": 3, "preset": "unused", "seed": 2, "core_factory": small_core}
    a = run_cluster(wl, policy="oracle", **kw)
    b = run_cluster(wl, policy="oracle", **kw)
    assert a.summary() == b.summary()
    rr = run_cluster(wl, policy="round_robin", **kw).summary()
    s = a.summary()
    assert s["completed"] == 200
    assert s["token_hit_rate"] > rr["token_hit_rate"]
    pd = run_cluster(wl, policy="request_num", pd=(1, 1), **{**kw, "instances": 2}).summary()
    assert pd["completed"] == 200
