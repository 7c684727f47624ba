"""The ``kv_cost`` policy: estimated-TTFT decisions, its accounting, its configuration, and a
virtual-time comparison with ``cache_aware`` (docs/fastdeploy.md#cache-aware-routing)."""

from __future__ import annotations

import random

import pytest

from kvrouter.config import ConfigError, SchedulerConfig, load_config
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Load
from kvrouter.policies import make_policy
from kvrouter.policies.base import STRATEGY_COST, STRATEGY_EXPLORATION, RequestView
from kvrouter.policies.kv_cost import KvCostPolicy
from kvrouter.prefix.hashing import block_hashes
from kvrouter.prefix.index import PrefixIndex
from kvrouter.registry import Instance
from kvrouter.backends.snapshot import MetricsSnapshot

B = 16          # block size of these tests
RATE = 1000.0   # prefill tokens per second: 1 token = 1 ms


def instances(n: int, role: Role = Role.MIXED) -> list[Instance]:
    return [Instance(info=InstanceInfo(role=role, host="127.0.0.1", scheme="http",
                                       port=str(9001 + i)), load=Load())
            for i in range(n)]


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def req(toks: list[int], session_id: str | None = None) -> RequestView:
    return RequestView(prompt=toks, tokens=toks, token_estimate=len(toks),
                       hashes=block_hashes(toks, B), session_id=session_id)


def kv(role: str = "mixed", index: PrefixIndex | None = None, *, rng=None, clock=None,
       **kw) -> KvCostPolicy:
    settings = {"cache_block_size": B, "kv_cost_prefill_tokens_per_sec": RATE,
                "kv_cost_decode_weight": 0.0, "kv_cost_exploration": 0.0,
                "kv_cost_miss_weight": 0.0, "kv_cost_itl_weight": 0.0,
                "kv_cost_transfer_tokens_per_sec": 0.0}
    settings.update(kw)
    extra = {"clock": clock} if clock is not None else {}
    p = make_policy("kv_cost", role, SchedulerConfig(**settings),
                    index if index is not None else PrefixIndex(100_000, 0), rng, **extra)
    assert isinstance(p, KvCostPolicy)
    return p


def dispatch(p: KvCostPolicy, cands: list[Instance], r: RequestView):
    """Select and take the load with the selection's prefill estimate, as the proxy does."""
    sel = p.select(cands, r)
    return sel, sel.instance.load.acquire(r.token_estimate, prefill=sel.prefill_estimate)


# ------------------------------------------------------------------------------ estimates
def test_estimate_formula_uncached_and_queued_work():
    idx = PrefixIndex(100_000, 0)
    a, b, c = instances(3)
    prompt = tokens(1000, 1)                          # 62 full blocks + 8 tokens
    r = req(prompt)
    idx.record(r.hashes[:50], a.identity, 0.0)        # a holds 800 tokens
    idx.record(r.hashes[:10], b.identity, 0.0)        # b holds 160
    b.load.acquire(999, prefill=300)                  # b: 300 tokens of queued prefill
    ests, unc = kv(index=idx).estimates([a, b, c], r)
    assert unc == [200, 840, 1000]
    assert ests == pytest.approx([0.200, 0.300 + 0.840, 1.000])


def test_cost_ordering_hit_beats_cold_until_its_queue_is_longer():
    idx = PrefixIndex(100_000, 0)
    a, b = instances(2)
    prompt = tokens(800, 2)
    r = req(prompt)
    idx.record(r.hashes, a.identity, 0.0)             # a holds everything: U_a = 1 token
    p = kv(index=idx)
    sel = p.select([a, b], r)
    assert sel.instance is a and sel.strategy == STRATEGY_COST
    assert (sel.hit_blocks, sel.lookup_blocks) == (50, 50)
    # queued work on a: 700 + 1 < 800 → still a; 900 + 1 > 800 → b
    first = a.load.acquire(1, prefill=700)
    assert p.select([a, b], r).instance is a
    a.load.acquire(1, prefill=200)
    sel = p.select([a, b], r)
    assert sel.instance is b and sel.hit_blocks == 0
    # b is now recorded as holding the prompt too (it will, once it has run it)
    assert idx.match(r.hashes, [b.identity])[b.identity] == 50
    first.release()


def test_miss_weight_raises_the_bar_for_recomputing_a_held_prefix():
    idx = PrefixIndex(100_000, 0)
    a, b = instances(2)
    r = req(tokens(800, 3))
    idx.record(r.hashes, a.identity, 0.0)
    a.load.acquire(1, prefill=900)                    # Q_a = 900: greedy TTFT says b
    assert kv(index=idx).select([a, b], r).instance is b
    idx2 = PrefixIndex(100_000, 0)
    idx2.record(r.hashes, a.identity, 0.0)
    # α = 1: b costs 800 + 1 × 799 = 1599 > 901 → a keeps it
    p = kv(index=idx2, kv_cost_miss_weight=1.0)
    ests, _ = p.estimates([a, b], r)
    assert ests == pytest.approx([0.901, 0.800 + 0.799])
    assert p.select([a, b], r).instance is a
    # … until a's queue exceeds (1 + α) × the recomputation: Q_a > 1598
    a.load.acquire(1, prefill=800)
    assert p.select([a, b], r).instance is b


def test_selection_carries_the_uncached_work_for_the_lease():
    idx = PrefixIndex(100_000, 0)
    a, b = instances(2)
    r = req(tokens(640, 4))                           # 40 blocks
    idx.record(r.hashes[:30], a.identity, 0.0)        # a holds 480: U_a = 160
    p = kv(index=idx)
    sel, lease = dispatch(p, [a, b], r)
    assert sel.instance is a and sel.prefill_estimate == 160
    assert lease.prefill == 160 and lease.tokens == 640
    assert (a.load.prefill_tokens, a.load.prefill_leases, a.load.decoding) == (160, 1, 0)
    # the same prompt again: a now holds all of it (recorded), U = 1, queued 160
    ests, unc = p.estimates([a, b], r)
    assert unc == [1, 640] and ests == pytest.approx([0.161, 0.640])
    lease.release_tokens()                            # first byte: the prefill work is done
    assert (a.load.prefill_tokens, a.load.decoding) == (0, 1)
    lease.release()
    assert a.load.idle and a.load.prefill_leases == 0


def test_decode_weight_counts_requests_past_their_first_byte():
    a, b = instances(2)
    r = req(tokens(100, 5))
    p = kv(kv_cost_decode_weight=0.05)
    leases = [a.load.acquire(10, prefill=0) for _ in range(3)]
    for lease in leases:
        lease.release_tokens()                        # three requests decoding on a
    ests, _ = p.estimates([a, b], r)
    assert ests == pytest.approx([0.100 + 3 * 0.05, 0.100])
    assert p.select([a, b], r).instance is b


def test_itl_weight_steers_long_prefills_away_from_decoding_instances():
    idx = PrefixIndex(100_000, 0)
    a, b = instances(2)
    for _ in range(10):                               # ten requests decoding on a
        a.load.acquire(10, prefill=0).release_tokens()
    b.load.acquire(1, prefill=300)                    # b: 300 tokens of queued prefill
    p = kv(index=idx, kv_cost_itl_weight=0.1)
    warm = req(tokens(320, 13))
    idx.record(warm.hashes, a.identity, 0.0)
    ests, _ = p.estimates([a, b], warm)               # U_a = 1, U_b = 320
    assert ests == pytest.approx([0.001 + 0.1 * 10 * 0.001, 0.300 + 0.320])
    assert p.select([a, b], warm).instance is a       # a short prefill barely delays them
    cold = req(tokens(2000, 14))
    ests, _ = p.estimates([a, b], cold)               # 2.0 + 0.1 × 10 × 2.0 vs 0.3 + 2.0
    assert ests == pytest.approx([2.0 + 2.0, 2.3])
    assert p.select([a, b], cold).instance is b
    assert kv(kv_cost_itl_weight=0.0).select([a, b], req(tokens(2000, 15))).instance is a


def test_prompt_shorter_than_a_block_and_empty_prompt():
    a, b = instances(2)
    p = kv()
    short = req(tokens(5, 6))
    assert short.hashes == []
    ests, unc = p.estimates([a, b], short)
    assert unc == [5, 5] and ests == pytest.approx([0.005, 0.005])
    sel = p.select([a, b], short)
    assert sel.lookup_blocks == 0 and sel.hit_blocks == 0
    assert p.estimates([a, b], req([]))[1] == [0, 0]


def test_code_point_prompts_are_scaled_to_tokens():
    a, = instances(1)
    text = "x" * 400
    r = RequestView(prompt=text, tokens=None, token_estimate=800,
                    hashes=block_hashes([ord(ch) for ch in text], B))
    ests, unc = kv(kv_cost_chars_per_token=4).estimates([a], r)
    assert unc == [100] and ests == pytest.approx([0.100])


# ------------------------------------------------------------------------------ ties, exploration
def test_cold_prompts_spread_over_an_idle_cluster():
    cands = instances(4)
    p = kv()
    picks = [p.select(cands, req(tokens(64, 100 + i))).instance for i in range(8)]
    assert picks == cands * 2                         # first one → the earliest URL


def test_exploration_is_deterministic_per_seed_and_stays_near_best():
    def run(seed: int) -> list[tuple[int, str]]:
        cands = instances(4)
        cands[3].load.acquire(1, prefill=100_000)     # far from the best: never explored
        p = kv(rng=random.Random(seed), kv_cost_exploration=0.5)
        out = []
        for i in range(40):
            sel = p.select(cands, req(tokens(64, 200 + i)))
            out.append((cands.index(sel.instance), sel.strategy))
        return out

    a, b = run(7), run(7)
    assert a == b
    assert a != run(8)
    strategies = {s for _, s in a}
    assert strategies == {STRATEGY_COST, STRATEGY_EXPLORATION}
    assert all(i != 3 for i, _ in a)
    explored = sum(s == STRATEGY_EXPLORATION for _, s in a)
    assert 8 <= explored <= 32


def test_no_exploration_without_a_near_best_candidate():
    idx = PrefixIndex(100_000, 0)
    a, b = instances(2)
    r = req(tokens(3200, 9))                          # a holds it: 0.001 s vs 3.2 s on b
    idx.record(r.hashes, a.identity, 0.0)
    p = kv(index=idx, rng=random.Random(1), kv_cost_exploration=1.0)
    for _ in range(20):
        sel = p.select([a, b], r)
        assert sel.instance is a and sel.strategy == STRATEGY_COST


# ------------------------------------------------------------------------------ snapshot
def test_fresh_snapshot_waiting_queue_corrects_the_queued_work():
    a, b = instances(2)
    now = 50.0
    for inst in (a, b):
        inst.stale_after = 6.0
    r = req(tokens(200, 10))
    p = kv(clock=lambda: now)
    # the router knows of nothing on a, but a reports 3 waiting requests (another client)
    a.snapshot = MetricsSnapshot(running=1, waiting=3, taken_at=now - 1)
    a.load.on_snapshot(now - 1)
    ests, _ = p.estimates([a, b], r)
    assert ests == pytest.approx([(3 * 200 + 200) / RATE, 0.200])   # ū = this request's U
    assert p.select([a, b], r).instance is b
    # with legs of its own in flight, ū is the mean of those dispatched before the snapshot
    # and the work dispatched since counts on top
    a.load.acquire(1, now=now - 3, prefill=100)       # before the snapshot
    a.load.acquire(1, now=now - 2, prefill=500)       # before the snapshot
    a.load.on_snapshot(now - 1)
    a.load.acquire(1, now=now, prefill=300)           # after it: pending
    assert (a.load.pending_prefill, a.load.pending_prefill_leases) == (300, 1)
    ests, _ = p.estimates([a, b], r)
    assert ests[0] == pytest.approx((3 * 300 + 300 + 200) / RATE)
    # the local count wins when it is larger (fewer waiting than legs the router knows of)
    a.snapshot = MetricsSnapshot(running=1, waiting=1, taken_at=now - 1)
    assert p.estimates([a, b], r)[0][0] == pytest.approx((900 + 200) / RATE)
    # a stale snapshot is ignored
    a.snapshot = MetricsSnapshot(running=1, waiting=30, taken_at=now - 10)
    assert p.estimates([a, b], r)[0][0] == pytest.approx((900 + 200) / RATE)


# ------------------------------------------------------------------------------ PD
def test_pd_prefill_includes_transfer_and_decode_is_load_only():
    idx = PrefixIndex(100_000, 0)
    p1, p2 = instances(2, Role.PREFILL)
    d1, d2 = instances(2, Role.DECODE)
    r = req(tokens(1000, 11))
    idx.record(r.hashes[:50], p2.identity, 0.0)       # p2 holds 800
    kw = {"kv_cost_transfer_tokens_per_sec": 10_000.0, "kv_cost_decode_weight": 0.01}
    pre = kv("prefill", idx, **kw)
    ests, unc = pre.estimates([p1, p2], r)
    assert unc == [1000, 200]
    assert ests == pytest.approx([1.000 + 0.1, 0.200 + 0.1])        # X = 1000 / 10k
    assert kv("mixed", idx, **kw).estimates([p1, p2], r)[0] == pytest.approx([1.0, 0.2])
    sel, p_lease = dispatch(pre, [p1, p2], r)
    assert sel.instance is p2 and sel.prefill_estimate == p_lease.prefill == 200

    dec = kv("decode", idx, **kw)
    d1.load.acquire(10)
    d1.load.acquire(10)
    d2.load.acquire(500)
    ests, unc = dec.estimates([d1, d2], r)
    assert ests == pytest.approx([0.02 + 0.1, 0.01 + 0.1]) and unc == [0, 0]
    size = idx.size
    sel, d_lease = dispatch(dec, [d1, d2], r)
    assert sel.instance is d2 and sel.lookup_blocks == 0
    assert idx.size == size                           # decode choices are not recorded
    assert sel.prefill_estimate == d_lease.prefill == 0
    # equal requests: fewer in-flight tokens, then the least recently selected
    d3, d4 = instances(2, Role.DECODE)
    d3.load.tokens = 5
    assert dec.select([d3, d4], r).instance is d4
    d3.load.tokens = 0
    assert dec.select([d3, d4], r).instance is d3


def test_session_affinity_stats():
    a, b = instances(2, Role.PREFILL)
    p = kv("prefill")
    r = req(tokens(64, 12), session_id="s")
    assert p.select([a, b], r).session_hit is False
    assert p.select([a, b], r).session_hit is True
    assert kv("decode").select([a, b], r).session_hit is None


# ------------------------------------------------------------------------------ configuration
def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_config_keys_and_defaults(tmp_path):
    cfg, warnings = load_config(write(tmp_path, """
server: {port: 9000}
scheduler:
  policy: kv_cost
  prefill-policy: sglang_cache_aware
  kv-cost-prefill-tokens-per-sec: "20000"
  kv-cost-decode-weight: 0
  kv-cost-exploration: 0.05
  kv-cost-miss-weight: 3
  kv-cost-itl-weight: 0.5
  kv-cost-transfer-tokens-per-sec: 0
  kv-cost-chars-per-token: 3.5
  sglang-cache-threshold: 0.5
  sglang-balance-abs-threshold: 32
  sglang-balance-rel-threshold: 2
  sglang-miss-policy: smallest_tree
"""))
    assert warnings == []
    s = cfg.scheduler
    assert (s.policy, s.prefill_policy) == ("kv_cost", "sglang_cache_aware")
    assert (s.kv_cost_prefill_tokens_per_sec, s.kv_cost_decode_weight, s.kv_cost_exploration,
            s.kv_cost_miss_weight, s.kv_cost_itl_weight, s.kv_cost_transfer_tokens_per_sec,
            s.kv_cost_chars_per_token) == (20000.0, 0.0, 0.05, 3.0, 0.5, 0.0, 3.5)
    assert (s.sglang_cache_threshold, s.sglang_balance_abs_threshold,
            s.sglang_balance_rel_threshold, s.sglang_miss_policy) == (0.5, 32.0, 2.0,
                                                                     "smallest_tree")
    d = SchedulerConfig()
    assert (d.kv_cost_prefill_tokens_per_sec, d.kv_cost_decode_weight, d.kv_cost_exploration,
            d.kv_cost_miss_weight, d.kv_cost_itl_weight) == (12000.0, 0.002, 0.01, 2.0, 0.1)
    assert (d.sglang_cache_threshold, d.sglang_balance_abs_threshold,
            d.sglang_balance_rel_threshold, d.sglang_miss_policy) == (0.3, 64.0, 1.5, "min_load")


@pytest.mark.parametrize("key,value,reason", [
    ("kv-cost-prefill-tokens-per-sec", "0", "must be > 0"),
    ("kv-cost-decode-weight", "-1", "must be >= 0"),
    ("kv-cost-exploration", "1.5", "must be between 0 and 1"),
    ("kv-cost-miss-weight", "abc", "must be a number"),
    ("kv-cost-itl-weight", "-0.1", "must be >= 0"),
    ("kv-cost-chars-per-token", "0", "must be > 0"),
    ("sglang-cache-threshold", "2", "must be between 0 and 1"),
    ("sglang-miss-policy", "largest", "must be one of min_load, smallest_tree"),
])
def test_config_validation(tmp_path, key, value, reason):
    path = write(tmp_path, f"server: {{port: 9000}}\nscheduler:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"config error: {path}: scheduler.{key}: {reason}")


# ------------------------------------------------------------------------------ virtual time
def test_kv_cost_beats_cache_aware_on_shared_contexts():
    """b2b-like shared contexts on 4 simulated Qwen3-32B instances near cache_aware's saturation
    (docs/fastdeploy.md#cache-aware-routing): kv_cost keeps each context on few instances (higher
    hit rate at the instances) and cuts the TTFT tail."""
    from kvrouter.sim.cluster import run_cluster
    from kvrouter.sim.workloads import make_workload

    wl = make_workload("b2b", rate=16, n=500, seed=3, groups=40, context=4000, question=800,
                       output=64)
    runs = {pol: run_cluster(wl, policy=pol, instances=4, preset="qwen3-32b-tp2-h100",
                             seed=3).summary()
            for pol in ("cache_aware", "kv_cost")}
    ca, kc = runs["cache_aware"], runs["kv_cost"]
    assert ca["completed"] == kc["completed"] == 500
    assert kc["token_hit_rate"] > ca["token_hit_rate"] + 0.1
    assert kc["ttft_p90"] < 0.75 * ca["ttft_p90"]
    assert kc["ttft_mean"] < ca["ttft_mean"]
