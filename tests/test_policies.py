"""Scheduling policies (docs/fastdeploy.md#policies, #cache-aware-routing, #session-affinity) and
/metrics parsing (docs/fastdeploy.md#remote-metrics-snapshots)."""

from __future__ import annotations

import math
import random
import time

import pytest

from kvrouter.config import ConfigError, SchedulerConfig, load_config
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Load
from kvrouter.backends.engines import parse_metrics as parse_fd_metrics
from kvrouter.policies import POLICY_NAMES, make_policy, policy_names
from kvrouter.policies import base as policy_base
from kvrouter.policies.base import (
    STRATEGY_CACHE_AWARE,
    STRATEGY_IMBALANCE,
    STRATEGY_POLICY,
    STRATEGY_STALE,
    Policy,
    RequestView,
    Selection,
    register,
)
from kvrouter.prefix.hashing import block_hashes
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.render import extract_session_id, render_prompt
from kvrouter.registry import Instance
from kvrouter.backends.snapshot import MetricsSnapshot

CHAT = "/v1/chat/completions"


def make_instances(n: int, role: Role = Role.MIXED, base_port: int = 8001) -> list[Instance]:
    return [
        Instance(
            info=InstanceInfo(role=role, host="127.0.0.1", scheme="http", port=str(base_port + i)),
            load=Load(),
        )
        for i in range(n)
    ]


def view(body: dict | None = None, block_size: int = 4) -> RequestView:
    """What the proxy builds without a tokenizer: code points as tokens
    (docs/fastdeploy.md#cache-aware-routing)."""
    body = body or {"prompt": "hi"}
    prompt = render_prompt(body, CHAT if "messages" in body else "/v1/completions")
    tokens = prompt if isinstance(prompt, list) else [ord(c) for c in prompt]
    estimate = len(prompt) if isinstance(prompt, list) else 2 * len(prompt)
    return RequestView(
        prompt=prompt,
        tokens=prompt if isinstance(prompt, list) else None,
        token_estimate=estimate,
        hashes=block_hashes(tokens, block_size),
        session_id=extract_session_id(body),
    )


def chat(*messages: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages], **extra}


def cfg(**kw) -> SchedulerConfig:
    return SchedulerConfig(**kw)


def policy(name: str, role: str = "mixed", index: PrefixIndex | None = None, **kw) -> Policy:
    sched = cfg(**{k: v for k, v in kw.items() if k not in ("rng", "clock")})
    extra = {"clock": kw["clock"]} if "clock" in kw else {}
    return make_policy(name, role, sched, index if index is not None else PrefixIndex(200_000, 0), kw.get("rng"), **extra)


def dispatch(pol: Policy, cands: list[Instance], req: RequestView):
    """Select and take the load, as the proxy does."""
    sel = pol.select(cands, req)
    lease = sel.instance.load.acquire(req.token_estimate, prefill=sel.prefill_estimate)
    return sel, lease


# --------------------------------------------------------------------------- factory
def test_policy_names_and_factory():
    assert POLICY_NAMES == (
        "random", "round_robin", "power_of_two", "process_tokens", "request_num",
        "fd_metrics_score", "fd_remote_metrics_score", "cache_aware", "remote_cache_aware",
        "sglang_cache_aware", "kv_cost",
    )
    assert policy_names() == POLICY_NAMES
    idx = PrefixIndex(10, 0)
    for name in POLICY_NAMES:
        p = make_policy(name, "prefill", SchedulerConfig(), idx)
        assert p.name == name and p.role == "prefill"
        assert p.needs_prefix == (
            name in ("cache_aware", "remote_cache_aware", "sglang_cache_aware", "kv_cost"))
        assert p.needs_remote_metrics == (
            name in ("fd_metrics_score", "fd_remote_metrics_score", "remote_cache_aware",
                     "kv_cost")
        )
    assert make_policy("request_num", Role.DECODE, SchedulerConfig(), idx).role == "decode"
    valid = ", ".join(POLICY_NAMES)
    with pytest.raises(ValueError) as exc:
        make_policy("typo_policy", "mixed", SchedulerConfig(), idx)
    assert str(exc.value) == f"unknown policy 'typo_policy' (valid: {valid})"


def test_config_checks_policy_names_against_the_registry(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  decode-policy: typo_policy\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), port=1)
    assert str(exc.value) == (f"config error: {path}: scheduler.decode-policy: unknown policy "
                              f"'typo_policy' (valid: {', '.join(POLICY_NAMES)})")


def test_a_registered_policy_is_known_to_make_policy_and_config(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_base, "_REGISTRY", dict(policy_base._REGISTRY))

    @register
    class FirstPolicy(Policy):
        name = "first"

        def select(self, candidates, request):
            return Selection(candidates[0])

    assert policy_names() == (*POLICY_NAMES, "first")
    p = make_policy("first", "decode", SchedulerConfig(), PrefixIndex(10, 0))
    assert isinstance(p, FirstPolicy) and p.role == "decode"
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  policy: first\n")
    assert load_config(str(path), port=1)[0].scheduler.policy == "first"
    with pytest.raises(ValueError, match="registered twice"):
        register(FirstPolicy)


# --------------------------------------------------------------------------- simple
def test_random_uniform_over_candidates():
    cands = make_instances(3)
    p = policy("random", rng=random.Random(1))
    counts = {i.url: 0 for i in cands}
    for _ in range(3000):
        counts[p.select(cands, view()).instance.url] += 1
    assert all(800 < c < 1200 for c in counts.values())
    assert p.select(cands, view()).strategy == STRATEGY_POLICY


def test_round_robin_sorted_order_twice():  # docs/fastdeploy.md#policies
    cands = make_instances(3)
    p = policy("round_robin")
    picks = [p.select(cands, view()).instance.url for _ in range(6)]
    assert picks == [c.url for c in cands] * 2


def test_round_robin_counter_is_per_policy_object():
    cands = make_instances(2)
    mixed, decode = policy("round_robin"), policy("round_robin", role="decode")
    assert mixed.select(cands, view()).instance is cands[0]
    assert decode.select(cands, view()).instance is cands[0]
    assert mixed.select(cands, view()).instance is cands[1]
    # the candidate set may shrink: c mod n
    assert mixed.select(cands[:1], view()).instance is cands[0]


class ScriptedRng(random.Random):
    def __init__(self, draws):
        super().__init__(0)
        self.draws = list(draws)

    def sample(self, population, k):
        return self.draws.pop(0)


def test_power_of_two():
    cands = make_instances(3)
    assert policy("power_of_two").select(cands[:1], view()).instance is cands[0]
    cands[0].load.requests, cands[1].load.requests, cands[2].load.requests = 5, 2, 2
    p = policy("power_of_two", rng=ScriptedRng([[0, 1], [1, 0], [2, 1], [1, 2]]))
    assert p.select(cands, view()).instance is cands[1]   # lower R wins
    assert p.select(cands, view()).instance is cands[1]
    assert p.select(cands, view()).instance is cands[2]   # tie → first draw
    assert p.select(cands, view()).instance is cands[1]
    # real rng: never picks the most loaded one of three when the two others are idle
    cands[0].load.requests, cands[1].load.requests, cands[2].load.requests = 0, 0, 9
    p = policy("power_of_two", rng=random.Random(5))
    picks = {p.select(cands, view()).instance.url for _ in range(200)}
    assert cands[2].url not in picks and len(picks) == 2


# --------------------------------------------------------------------------- local load
def test_request_num_sequence():  # docs/fastdeploy.md#policies
    a, b = make_instances(2)
    p = policy("request_num")
    _, slow = dispatch(p, [a, b], view())
    assert slow.load is a.load
    _, second = dispatch(p, [a, b], view())
    assert second.load is b.load
    slow.release()
    second.release()
    assert p.select([a, b], view()).instance is a


def test_request_num_min_and_ties():
    cands = make_instances(3)
    cands[0].load.requests, cands[1].load.requests, cands[2].load.requests = 3, 1, 1
    assert policy("request_num").select(cands, view()).instance is cands[1]


def test_process_tokens_sequence():  # docs/fastdeploy.md#in-flight-accounting
    p1, p2 = make_instances(2, Role.PREFILL)
    p = policy("process_tokens", role="prefill")
    req = view({"prompt": "x" * 50})
    sel, first = dispatch(p, [p1, p2], req)
    assert sel.instance is p1 and p1.load.tokens == 100
    sel, second = dispatch(p, [p1, p2], req)
    assert sel.instance is p2
    second.release()          # P2 idle again
    first.release()           # P1's first chunk: prefill releases both counters
    assert p.select([p1, p2], req).instance is p1


def test_process_tokens_min():
    cands = make_instances(3)
    cands[0].load.tokens, cands[1].load.tokens, cands[2].load.tokens = 50, 10, 20
    assert policy("process_tokens").select(cands, view()).instance is cands[1]


# --------------------------------------------------------------------------- metrics scores
def snap(running, waiting, taken_at, max_batch=None):
    return MetricsSnapshot(running=running, waiting=waiting, taken_at=taken_at, max_batch_size=max_batch)


def test_fd_metrics_score_without_snapshot_is_request_num():
    cands = make_instances(3)
    cands[0].load.requests, cands[1].load.requests, cands[2].load.requests = 2, 1, 1
    assert policy("fd_metrics_score").select(cands, view()).instance is cands[1]


def test_fd_metrics_score_with_cap():
    a, b = make_instances(2)
    a.load.requests, b.load.requests = 5, 7
    a.snapshot = snap(0, 0, 0.0, max_batch=4)     # running 4, waiting 1 → 4 + 1 × 10 = 14
    b.snapshot = snap(0, 0, 0.0, max_batch=8)     # running 7 → 7
    p = policy("fd_metrics_score", waiting_weight=10)
    assert p.select([a, b], view()).instance is b
    p = policy("fd_metrics_score", waiting_weight=1)  # 5 vs 7
    assert p.select([a, b], view()).instance is a


def test_fd_remote_metrics_score_prefers_lower_remote_load():  # docs/fastdeploy.md#policies
    a, b = make_instances(2)
    now = 100.0
    for inst in (a, b):
        inst.stale_after = 6.0
    a.snapshot = snap(10, 5, now)
    b.snapshot = snap(2, 1, now)
    a.load.requests = 0
    b.load.requests = 50                           # local counters are ignored when fresh
    p = policy("fd_remote_metrics_score", clock=lambda: now + 1)
    sel = p.select([a, b], view())
    assert sel.instance is b and sel.strategy == STRATEGY_POLICY
    # waiting weight: A 1 + 0 × w, B 0 + 1 × 10
    a.snapshot, b.snapshot = snap(1, 0, now), snap(0, 1, now)
    assert policy("fd_remote_metrics_score", waiting_weight=10, clock=lambda: now).select([a, b], view()).instance is a


def test_fd_remote_metrics_score_stale_uses_local_requests():
    a, b = make_instances(2)
    for inst in (a, b):
        inst.stale_after = 6.0
    a.snapshot = snap(0, 0, 0.0)
    b.snapshot = snap(9, 9, 0.0)
    a.load.requests, b.load.requests = 3, 1
    p = policy("fd_remote_metrics_score", clock=lambda: 7.0)     # age 7 > 6: stale
    sel = p.select([a, b], view())
    assert sel.instance is b and sel.strategy == STRATEGY_STALE
    # no snapshot at all behaves the same
    a.snapshot = b.snapshot = None
    assert p.select([a, b], view()).strategy == STRATEGY_STALE


def test_fd_remote_metrics_score_pending_prevents_herding():  # docs/fastdeploy.md#policies
    a, b = make_instances(2)
    taken = time.monotonic()
    for inst in (a, b):
        inst.stale_after = 60.0
        inst.snapshot = snap(0, 0, taken)
        inst.load.on_snapshot(taken)
    p = policy("fd_remote_metrics_score")
    picks = [dispatch(p, [a, b], view())[0].instance for _ in range(4)]
    assert picks.count(a) == 2 and picks.count(b) == 2


# --------------------------------------------------------------------------- cache aware
def ca(role="mixed", index=None, **kw) -> Policy:
    return policy("cache_aware", role=role, index=index, **kw)


def test_cache_aware_first_request_ties_to_earliest_url_and_records():
    idx = PrefixIndex(1000, 0)
    p1, p2 = make_instances(2, Role.PREFILL)
    p = ca("prefill", idx)
    req = view(chat(("user", "hello world, a long enough prompt")))
    sel = p.select([p1, p2], req)
    assert sel.instance is p1 and sel.strategy == STRATEGY_CACHE_AWARE
    assert sel.lookup_blocks == len(req.hashes) > 0 and sel.hit_blocks == 0
    assert idx.match(req.hashes, [p1.identity, p2.identity]) == {p1.identity: len(req.hashes), p2.identity: 0}
    sel = p.select([p1, p2], req)
    assert sel.instance is p1 and sel.hit_blocks == sel.lookup_blocks


def test_cache_aware_imbalance_thresholds():
    # defaults (abs 1, rel 0.2): 0 vs 2 falls back, 0 vs 1 does not
    for loads, falls_back in (((0, 2), True), ((2, 0), True), ((0, 1), False), ((5, 5), False)):
        a, b = make_instances(2)
        a.load.requests, b.load.requests = loads
        a.load.tokens, b.load.tokens = 1, 0     # the fallback picks the minimum T: b
        sel = ca().select([a, b], view())
        assert (sel.strategy == STRATEGY_IMBALANCE) == falls_back, loads
        if falls_back:
            assert sel.instance is b


def test_cache_aware_imbalance_relative_threshold_boundaries():
    def strategy(la, lb, **kw):
        a, b = make_instances(2)
        a.load.requests, b.load.requests = la, lb
        return ca(**kw).select([a, b], view()).strategy

    assert strategy(10, 7) == STRATEGY_IMBALANCE        # 3 > 1 and 0.3 > 0.2
    assert strategy(10, 9) == STRATEGY_CACHE_AWARE      # 1 is not > 1
    assert strategy(20, 16) == STRATEGY_CACHE_AWARE     # 4 > 1 but 0.2 is not > 0.2
    assert strategy(0, 2, balance_abs_threshold=2) == STRATEGY_CACHE_AWARE
    assert strategy(0, 1, balance_abs_threshold=0) == STRATEGY_IMBALANCE
    assert strategy(0, 0, balance_abs_threshold=0, balance_rel_threshold=0) == STRATEGY_CACHE_AWARE
    a, = make_instances(1)
    a.load.requests = 100
    assert ca().select([a], view()).strategy == STRATEGY_CACHE_AWARE  # single candidate


def test_cache_aware_score_formula():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    req = view({"prompt": "abcdefghijklmnop"})       # 4 blocks of 4 code points
    assert len(req.hashes) == 4
    idx.record(req.hashes[:3], a.identity, 0.0)      # a: hit 75 %
    idx.record(req.hashes, b.identity, 0.0)          # b: hit 100 %
    a.load.requests, b.load.requests = 1, 1
    # a: 0.25 × 1 + 1 × 1 = 1.25; b: 0 + 1 = 1 → b
    assert ca(index=idx, load_balance_weight=1).select([a, b], req).instance is b
    # hit weight 0: pure load; equal loads → tie → lower T
    a.load.tokens, b.load.tokens = 5, 3
    assert ca(index=PrefixIndex(10, 0), hit_ratio_weight=0).select([a, b], req).instance is b
    a.load.tokens = b.load.tokens = 3                # full tie → earlier URL
    assert ca(index=PrefixIndex(10, 0), hit_ratio_weight=0).select([a, b], req).instance is a


# docs/fastdeploy.md#cache-aware-routing
def test_cache_aware_load_balance_weight_zero_is_honoured():
    idx = PrefixIndex(1000, 0)
    p1, p2 = make_instances(2, Role.PREFILL)
    p = ca("prefill", idx, load_balance_weight=0)
    req = view(chat(("user", "a prompt that hit P1 once")))
    sel, lease = dispatch(p, [p1, p2], req)
    assert sel.instance is p1
    for _ in range(5):                               # P1 holds one in-flight request, P2 none
        sel = p.select([p1, p2], req)
        assert sel.instance is p1 and sel.strategy == STRATEGY_CACHE_AWARE
    lease.release()
    # with weight 1 (the value 0 would be replaced by in fd-router) P2 wins:
    # P1: 0 + 1 × 1 = 1 vs P2: 1 + 0 = 1 → tie → lower T (P2 has 0)
    q = ca("prefill", idx, load_balance_weight=1)
    dispatch(q, [p1, p2], view({"prompt": "zz"}))    # P1 takes an unrelated request
    assert q.select([p1, p2], req).instance is p2


def test_cache_aware_roles_are_part_of_the_key():  # docs/fastdeploy.md#cache-aware-routing
    idx = PrefixIndex(1000, 0)
    p1, p2 = make_instances(2, Role.PREFILL)
    p = ca("prefill", idx, cache_block_size=4, load_balance_weight=0.05)
    x = view(chat(("user", "Tell me a story about routers.")))
    x_sys = view(chat(("system", "Tell me a story about routers.")))
    assert p.select([p1, p2], x).instance is p1
    slow = p1.load.acquire(10)                       # exactly one slow request on P1
    sel = p.select([p1, p2], x)
    assert sel.instance is p1 and sel.hit_blocks == sel.lookup_blocks
    sel = p.select([p1, p2], x_sys)
    assert sel.instance is p2 and sel.hit_blocks == 0
    slow.release()


def test_cache_aware_conversations_a_b():  # docs/fastdeploy.md#cache-aware-routing
    idx = PrefixIndex(1000, 0)
    p1, p2 = make_instances(2, Role.PREFILL)
    p = ca("prefill", idx, load_balance_weight=0.05)
    u = "Here is a long shared document that both conversations start with. " * 3
    conv_a = view(chat(("user", u), ("assistant", "answer a"), ("user", "question x")))
    conv_b = view(chat(("user", u), ("assistant", "answer b"), ("user", "question y")))
    assert p.select([p1, p2], conv_a).instance is p1
    busy = [p1.load.acquire(100), p1.load.acquire(100)]   # two unrelated slow requests
    sel = p.select([p1, p2], conv_b)
    assert sel.instance is p2 and sel.strategy == STRATEGY_IMBALANCE
    assert sel.hit_blocks == 0 and sel.lookup_blocks == len(conv_b.hashes)
    # recorded on P2 although chosen by the fallback
    assert idx.match(conv_b.hashes, [p2.identity])[p2.identity] == len(conv_b.hashes)
    for lease in busy:
        lease.release()
    shared = idx.match(conv_b.hashes, [p1.identity])[p1.identity]
    assert 0 < shared < len(conv_b.hashes)          # P1 has the shared U only
    sel = p.select([p1, p2], conv_b)
    assert sel.instance is p2 and sel.hit_blocks == len(conv_b.hashes)
    sel = p.select([p1, p2], conv_a)
    assert sel.instance is p1 and sel.hit_blocks == len(conv_a.hashes)
    # a prompt shorter than one block: no hashes, nothing recorded, still routed
    size = idx.size
    short = view({"prompt": "ab"})
    assert short.hashes == []
    sel = p.select([p1, p2], short)
    assert sel.instance in (p1, p2) and sel.lookup_blocks == 0 and sel.hit_blocks == 0
    assert idx.size == size


def test_cache_aware_fallback_reports_hit_of_chosen():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    req = view({"prompt": "abcdefgh"})
    idx.record(req.hashes, b.identity, 0.0)
    a.load.requests, a.load.tokens = 5, 50
    sel = ca(index=idx).select([a, b], req)
    assert sel.strategy == STRATEGY_IMBALANCE and sel.instance is b
    assert (sel.hit_blocks, sel.lookup_blocks) == (2, 2)


def test_cache_aware_records_with_clock_and_ttl():
    idx = PrefixIndex(1000, 60)
    a, b = make_instances(2)
    req = view({"prompt": "abcdefgh"})
    ca(index=idx, clock=lambda: 100.0).select([a, b], req)
    assert idx.sweep(160.0) == 0
    assert idx.sweep(160.5) == 2


def test_cache_aware_session_stats():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2, Role.PREFILL)
    p = ca("prefill", idx)
    req = view({"prompt": "abcdefgh", "session_id": "s1"})
    assert p.select([a, b], req).session_hit is False      # first of the session
    assert p.select([a, b], req).session_hit is True
    a.load.requests, a.load.tokens = 5, 50                  # imbalance → min T: b
    assert p.select([a, b], req).session_hit is False
    assert p.select([a, b], view({"prompt": "abcdefgh"})).session_hit is None
    # decode decisions are not counted
    d = ca("decode", idx)
    assert d.select([a, b], req).session_hit is None


def test_cache_aware_index_cap():  # docs/fastdeploy.md#cache-aware-routing, at the policy level
    idx = PrefixIndex(1000, 0)
    cands = make_instances(3)
    p = ca(index=idx)
    rng = random.Random(11)
    for i in range(3000):
        text = f"{i}:" + "".join(rng.choice("abcdefgh") for _ in range(40))
        p.select(cands, view({"prompt": text}))
        assert idx.size <= 1000
    assert idx.evictions["capacity"] > 0


def test_remote_cache_aware_loads_from_snapshot_plus_pending():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    for inst in (a, b):
        inst.stale_after = 6.0
    now = 50.0
    a.snapshot = snap(4, 0, now)
    b.snapshot = snap(0, 0, now)
    a.load.requests = 0                                    # local R is not used when fresh
    p = policy("remote_cache_aware", index=idx, clock=lambda: now)
    sel = p.select([a, b], view({"prompt": "abcdefgh"}))
    assert sel.strategy == STRATEGY_IMBALANCE and sel.instance is a  # min T (both 0) → a
    a.snapshot = snap(1, 0, now)
    b.load.pending = 1                                     # 1 vs 1: no imbalance
    sel = p.select([a, b], view({"prompt": "abcdefgh"}))
    assert sel.strategy == STRATEGY_CACHE_AWARE and sel.instance is a  # recorded hit
    # stale snapshots: local R
    p_stale = policy("remote_cache_aware", index=idx, clock=lambda: now + 10)
    a.load.requests, b.load.requests = 0, 3
    sel = p_stale.select([a, b], view({"prompt": "zzzzzzzz"}))
    assert sel.strategy == STRATEGY_IMBALANCE and sel.instance is a


# --------------------------------------------------------------------------- /metrics
FD_METRICS = """\
# HELP fastdeploy:num_requests_running Number of requests currently running
# TYPE fastdeploy:num_requests_running gauge
fastdeploy:num_requests_running 3.0
# TYPE fastdeploy:num_requests_waiting gauge
fastdeploy:num_requests_waiting 1.0
fastdeploy:available_gpu_block_num 1.234e3
fastdeploy:max_batch_size 64.0
fastdeploy:gpu_cache_usage_perc 0.25
fastdeploy:time_to_first_token_seconds_bucket{le="0.5"} 7.0
http_requests_total{method="POST",path="/v1/chat/completions",status_code="200"} 12.0
"""


def test_parse_fd_metrics_basic():
    s = parse_fd_metrics(FD_METRICS, 12.5)
    assert s == MetricsSnapshot(
        running=3.0, waiting=1.0, taken_at=12.5, available_gpu_block_num=1234.0,
        max_batch_size=64.0, gpu_cache_usage_perc=0.25,
    )


def test_parse_fd_metrics_labelled_series_are_summed():
    text = (
        'fastdeploy:num_requests_running{dp="0",x="a}b c"} 2\n'
        'fastdeploy:num_requests_running{dp="1"} 3.5 1700000000000\n'
        "fastdeploy:num_requests_waiting{dp=\"0\",q=\"\\\"}\\\"\"} 1e1\n"
        "available_gpu_block_num 100\n"
    )
    s = parse_fd_metrics(text, 0.0)
    assert s is not None
    assert (s.running, s.waiting, s.available_gpu_block_num) == (5.5, 10.0, 100.0)
    assert s.max_batch_size is None and s.gpu_cache_usage_perc is None


def test_parse_fd_metrics_missing_and_nan():
    assert parse_fd_metrics("fastdeploy:num_requests_running 1\n", 0.0) is None
    assert parse_fd_metrics("", 0.0) is None
    assert parse_fd_metrics("garbage {{{\nfastdeploy:num_requests_waiting x\n", 0.0) is None
    nan = "fastdeploy:num_requests_running NaN\nfastdeploy:num_requests_waiting 0\n"
    assert parse_fd_metrics(nan, 0.0) is None
    s = parse_fd_metrics(
        "fastdeploy:num_requests_running 1\nfastdeploy:num_requests_waiting 0\n"
        "fastdeploy:max_batch_size NaN\nfastdeploy:gpu_cache_usage_perc +Inf\n", 0.0
    )
    assert s is not None and s.max_batch_size is None and s.gpu_cache_usage_perc is None
    # the prefixed block count wins over the bare one
    s = parse_fd_metrics(
        "fastdeploy:num_requests_running 0\nfastdeploy:num_requests_waiting 0\n"
        "available_gpu_block_num 5\nfastdeploy:available_gpu_block_num 7\n", 0.0
    )
    assert s is not None and s.available_gpu_block_num == 7.0
    # a prefix of a wanted name is not that name
    assert parse_fd_metrics(
        "fastdeploy:num_requests_running_total 1\nfastdeploy:num_requests_waiting 0\n", 0.0
    ) is None
    assert not math.isnan(parse_fd_metrics("fastdeploy:num_requests_running -0\n"
                                            "fastdeploy:num_requests_waiting 0\n", 0.0).running)


def test_parse_fd_metrics_large_page():
    lines = [FD_METRICS]
    for i in range(5000):
        lines.append(f'fastdeploy:request_prompt_tokens_bucket{{le="{i}"}} {i}.0\n')
    s = parse_fd_metrics("".join(lines), 0.0)
    assert s is not None and s.running == 3.0


# --------------------------------------------------------------------------- cold-prefix spreading
def test_cache_aware_cold_prefixes_spread_over_idle_instances():
    idx = PrefixIndex(1000, 0)
    cands = make_instances(3)
    p = ca(index=idx)
    prompts = [view({"prompt": f"{i}: a cold prompt " * 3}) for i in range(6)]   # distinct 1st block
    # nothing in flight (each request finished before the next): loads tie every time, no
    # candidate has a hit → least recently selected, the first request to the earliest URL
    picks = [p.select(cands, req).instance for req in prompts]
    assert picks == cands * 2
    # a known prefix still goes where it was recorded
    assert p.select(cands, prompts[1]).instance is cands[1]
    # the next cold ones go to the least recently selected: cands[0] (4th pick), then
    # cands[2] (6th pick) — cands[1] was just selected for the known prefix
    assert p.select(cands, view({"prompt": "another cold prompt " * 3})).instance is cands[0]
    assert p.select(cands, view({"prompt": "yet another cold one " * 3})).instance is cands[2]


def test_cache_aware_cold_spreading_only_breaks_exact_ties():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    p = ca(index=idx)
    assert p.select([a, b], view({"prompt": "first cold prompt"})).instance is a
    # lower load still wins over recency: a idle, b busy (0 vs 1: no imbalance fallback)
    lease = b.load.acquire(5)
    assert p.select([a, b], view({"prompt": "second cold prompt"})).instance is a
    lease.release()
    # and lower T breaks a load tie before recency
    p2 = ca(index=PrefixIndex(1000, 0))
    a.load.tokens = 7
    assert p2.select([a, b], view({"prompt": "third cold prompt"})).instance is b
    a.load.tokens = 0


def test_cache_aware_cold_spreading_counts_fallback_choices():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    p = ca(index=idx)
    a.load.requests, a.load.tokens = 2, 20          # 2 vs 0: imbalance fallback → b
    assert p.select([a, b], view({"prompt": "one: cold"})).strategy == STRATEGY_IMBALANCE
    a.load.requests, a.load.tokens = 0, 0
    # b was selected last, so the next cold prompt goes to a
    assert p.select([a, b], view({"prompt": "two: cold"})).instance is a
    assert p.select([a, b], view({"prompt": "six: cold"})).instance is b


# --------------------------------------------------------------------------- sglang_cache_aware
def sgl(index=None, **kw) -> Policy:
    return policy("sglang_cache_aware", index=index, **kw)


def test_sglang_balanced_match_above_threshold_goes_to_holder():
    idx = PrefixIndex(1000, 0)
    a, b, c = make_instances(3)
    req = view({"prompt": "abcdefghijklmnop"})      # 4 blocks
    idx.record(req.hashes[:2], b.identity, 0.0)     # b: 50 % > 0.3
    idx.record(req.hashes[:1], c.identity, 0.0)     # c: 25 %
    b.load.requests = 3                             # 3 − 0 is not > 64: balanced
    sel = sgl(idx).select([a, b, c], req)
    assert sel.instance is b and sel.strategy == STRATEGY_CACHE_AWARE
    assert (sel.hit_blocks, sel.lookup_blocks) == (2, 4)
    assert idx.match(req.hashes, [b.identity])[b.identity] == 4    # recorded


def test_sglang_balanced_low_match_goes_to_min_load_or_smallest_tree():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    req = view({"prompt": "abcdefghijklmnop"})
    idx.record(req.hashes[:1], a.identity, 0.0)     # 25 % is not > 30 %
    a.load.requests, b.load.requests = 2, 1
    sel = sgl(idx).select([a, b], req)
    assert sel.instance is b and sel.strategy == STRATEGY_CACHE_AWARE
    # ties on load → the first worker (SGLang's behaviour, sglang#32983)
    a.load.requests = b.load.requests = 0
    assert sgl(PrefixIndex(1000, 0)).select([a, b], view({"prompt": "zzzzzzzz"})).instance is a
    # threshold is a strict ">": exactly 25 % with threshold 0.25 is still a miss
    for threshold, expected in ((0.25, a), (0.2, b)):
        idx2 = PrefixIndex(1000, 0)
        idx2.record(req.hashes[:1], b.identity, 0.0)
        p = sgl(idx2, sglang_cache_threshold=threshold)
        assert p.select([a, b], req).instance is expected
    # smallest_tree: the instance with the fewest blocks recorded by this policy
    p = sgl(PrefixIndex(1000, 0), sglang_miss_policy="smallest_tree")
    assert p.select([a, b], view({"prompt": "x" * 40})).instance is a      # 10 blocks on a
    a.load.requests = 5                                                   # load is ignored
    assert p.select([a, b], view({"prompt": "y" * 8})).instance is b       # 0 < 10
    assert p.select([a, b], view({"prompt": "w" * 80})).instance is b      # 2 < 10
    assert p.select([a, b], view({"prompt": "v" * 8})).instance is a       # 10 < 22


def test_sglang_imbalanced_goes_to_shortest_queue():
    idx = PrefixIndex(1000, 0)
    a, b = make_instances(2)
    req = view({"prompt": "abcdefghijklmnop"})
    idx.record(req.hashes, a.identity, 0.0)         # a holds the whole prompt
    a.load.requests, b.load.requests = 70, 5        # 65 > 64 and 70 > 5 × 1.5
    sel = sgl(idx).select([a, b], req)
    assert sel.instance is b and sel.strategy == STRATEGY_IMBALANCE
    assert idx.match(req.hashes, [b.identity])[b.identity] == 4    # recorded in this state too
    # both conditions are needed
    a.load.requests, b.load.requests = 70, 50       # 20 is not > 64
    assert sgl(idx).select([a, b], req).strategy == STRATEGY_CACHE_AWARE
    a.load.requests, b.load.requests = 200, 135     # 65 > 64 but 200 is not > 202.5
    assert sgl(idx).select([a, b], req).strategy == STRATEGY_CACHE_AWARE
    a.load.requests, b.load.requests = 3, 0
    assert sgl(idx, sglang_balance_abs_threshold=2,
               sglang_balance_rel_threshold=1.5).select([a, b], req).instance is b


def test_sglang_session_stats_and_short_prompt():
    a, b = make_instances(2, Role.PREFILL)
    p = sgl(PrefixIndex(1000, 0), role="prefill")
    req = view({"prompt": "abcdefgh", "session_id": "s"})
    assert p.select([a, b], req).session_hit is False
    assert p.select([a, b], req).session_hit is True
    sel = p.select([a, b], view({"prompt": "ab"}))           # shorter than one block
    assert sel.lookup_blocks == 0 and sel.hit_blocks == 0


def test_a_session_id_over_256_characters_is_neither_remembered_nor_counted():
    """The memory holds up to 100,000 ids and is replicated to every worker and replica: an id
    longer than 256 characters is not stored, not passed on, and the decision counts as
    session-less (README "Metrics and logs", ``cache_hit_rate``)."""
    from kvrouter.policies.cache_aware import SessionAffinity

    memory = SessionAffinity()
    told: list[tuple[str, str]] = []
    memory.add_listener(lambda sid, ident: told.append((sid, ident)))
    longest, too_long = "s" * 256, "s" * 257
    assert memory.observe(longest, "a:1") is False and memory.observe(longest, "a:1") is True
    assert memory.observe(too_long, "a:1") is None and memory.observe(too_long, "a:1") is None
    assert memory.remember(too_long, "a:1") is None           # another router's: not stored
    assert len(memory) == 1 and told == [(longest, "a:1")] * 2
    a, b = make_instances(2, Role.PREFILL)
    for name in ("cache_aware", "sglang_cache_aware", "kv_cost"):
        pol = policy(name, role="prefill")
        req = view({"prompt": "abcdefgh", "session_id": too_long})
        assert [pol.select([a, b], req).session_hit for _ in range(2)] == [None, None], name
        req = view({"prompt": "abcdefgh", "session_id": longest})
        assert pol.select([a, b], req).session_hit is False, name
        assert len(pol.sessions) == 1, name


def test_forget_drops_a_removed_instances_state_in_every_policy():
    """Policies keep per-instance state (sglang's tree sizes, the selection recency of cold
    prompts); a removed instance's goes, so it does not grow with every instance ever seen,
    and one that registers again starts afresh."""
    a, b = make_instances(2)
    req = view({"prompt": "abcdefghijklmnop"})
    tree = sgl(PrefixIndex(1000, 0), sglang_miss_policy="smallest_tree")
    tree.select([a, b], req)
    assert tree.tree_blocks == {a.identity: 4}
    tree.forget(a.identity)
    assert tree.tree_blocks == {}
    for name in ("cache_aware", "kv_cost"):
        pol = policy(name)
        pol.select([a, b], req)
        assert pol.recency.last(a.identity) >= 0, name
        pol.forget(a.identity)
        assert pol.recency.last(a.identity) == -1, name
    for name in POLICY_NAMES:          # every policy takes it; unknown identities are fine
        policy(name).forget("10.9.9.9:1")


async def test_the_router_makes_every_policy_forget_a_removed_instance():
    from kvrouter.config import RouterConfig
    from kvrouter.router import Router

    config = RouterConfig()
    config.server.splitwise = True
    config.scheduler.prefill_policy = "sglang_cache_aware"
    config.scheduler.sglang_miss_policy = "smallest_tree"
    config.scheduler.decode_policy = "kv_cost"
    config.scheduler.cache_block_size = 4
    router = Router(config)
    (p_inst,) = make_instances(1, Role.PREFILL)
    (d_inst,) = make_instances(1, Role.DECODE, base_port=9001)
    p_inst = router.registry.add(p_inst.info)
    d_inst = router.registry.add(d_inst.info)
    req = view({"prompt": "abcdefghijklmnop"})
    router.select(Role.PREFILL, req)
    router.select(Role.DECODE, req)
    prefill, decode = router.policies[Role.PREFILL], router.policies[Role.DECODE]
    assert prefill.tree_blocks == {p_inst.identity: 4}
    assert decode.recency.last(d_inst.identity) >= 0
    router.registry.remove(p_inst, "instance_removed")
    router.registry.remove(d_inst, "instance_removed")
    assert prefill.tree_blocks == {}
    assert decode.recency.last(d_inst.identity) == -1
    await router.close()      # registering started its model-list fetches on this loop


# --------------------------------------------------------------------------- Load prefill work
def test_load_prefill_estimate_is_released_with_tokens():
    load = Load()
    lease = load.acquire(100)                     # no estimate: the token estimate
    assert (load.prefill_tokens, load.prefill_leases) == (100, 1)
    second = load.acquire(100, prefill=30)
    assert second.prefill == 30 and load.prefill_tokens == 130
    assert load.acquire(10, prefill=0).prefill == 0
    assert load.acquire(10).prefill == 10
    assert load.prefill_tokens == 140 and load.decoding == 0
    lease.release_tokens()                        # first byte
    assert (load.prefill_tokens, load.prefill_leases, load.decoding) == (40, 3, 1)
    lease.release_tokens()                        # idempotent
    assert load.prefill_tokens == 40
    second.release()
    assert (load.prefill_tokens, load.requests, load.decoding) == (10, 3, 1)


def test_load_pending_prefill_follows_snapshots():
    load = Load()
    old = load.acquire(10, now=1.0, prefill=40)
    load.on_snapshot(5.0)
    assert (load.pending, load.pending_prefill) == (0, 0)
    new = load.acquire(10, now=6.0, prefill=25)
    assert (load.pending, load.pending_prefill) == (1, 25)
    new.release_tokens()
    assert load.pending_prefill == 0 and load.pending == 1
    new.release_request()
    assert load.pending == 0
    old.release()
    assert load.prefill_tokens == 0 and load.idle


# --------------------------------------------------------------------------- many candidates
# With ≥ VECTOR_MIN candidates the ranked policies score with numpy arrays; the result must be
# the decision of the one-candidate-at-a-time loop, ties included.
def _world(n: int, seed: int, name: str, **kw):
    rng = random.Random(seed)
    cands = make_instances(n)
    idx = PrefixIndex(50_000, 0)
    p = policy(name, index=idx, rng=random.Random(seed), clock=lambda: 1.0, **kw)
    for inst in cands:                       # a few ties on R, spread T, some decoding legs
        for j in range(rng.randrange(0, 3)):
            lease = inst.load.acquire(rng.choice((100, 100, 300, 700)))
            if j == 0 and rng.random() < 0.3:
                lease.release_tokens()
    prefixes = [[rng.randrange(50_000) for _ in range(64)] for _ in range(5)]
    for k in range(40):                      # prefixes held by a few instances, to varied depths
        toks = rng.choice(prefixes)[: rng.randrange(4, 65)]
        idx.record(block_hashes(toks, 4), rng.choice(cands).identity, 0.5)
    return rng, cands, p, prefixes


@pytest.mark.parametrize("name, kw", [
    ("cache_aware", {}),
    ("cache_aware", {"hit_ratio_weight": 0.0}),            # load-only: many exact ties
    ("sglang_cache_aware", {}),
    ("sglang_cache_aware", {"sglang_miss_policy": "smallest_tree"}),
    ("kv_cost", {"cache_block_size": 4, "kv_cost_exploration": 0.2}),
])
def test_vectorised_scoring_equals_the_loop(monkeypatch, name, kw):
    from kvrouter.policies import cache_aware, kv_cost

    worlds = {flag: _world(80, 3, name, **kw) for flag in ("loop", "vector")}
    for step in range(60):
        picks = {}
        for flag, (rng, cands, p, prefixes) in worlds.items():
            limit = 10**9 if flag == "loop" else 0
            monkeypatch.setattr(cache_aware, "VECTOR_MIN", limit)
            monkeypatch.setattr(kv_cost, "VECTOR_MIN", limit)
            toks = rng.choice(prefixes)[: rng.randrange(0, 65)] + [rng.randrange(50_000)
                                                                    for _ in range(8)]
            req = RequestView(prompt=toks, tokens=toks, token_estimate=len(toks),
                              hashes=block_hashes(toks, 4))
            sel = p.select(cands, req)
            picks[flag] = (cands.index(sel.instance), sel.strategy, sel.hit_blocks)
            lease = sel.instance.load.acquire(len(toks))
            if rng.random() < 0.5:
                lease.release()
        assert picks["loop"] == picks["vector"], step


def test_kv_cost_vector_estimates_equal_the_loop(monkeypatch):
    from kvrouter.policies import kv_cost

    rng, cands, p, prefixes = _world(50, 4, "kv_cost", cache_block_size=4,
                                     kv_cost_itl_weight=0.1, kv_cost_decode_weight=0.002,
                                     kv_cost_miss_weight=2.0)
    now = time.monotonic()
    cands[3].snapshot = MetricsSnapshot(running=2, waiting=3, taken_at=now)
    cands[7].snapshot = MetricsSnapshot(running=1, waiting=0, taken_at=now)
    toks = prefixes[0][:40] + [1, 2, 3, 4, 5]
    req = RequestView(prompt=toks, tokens=toks, token_estimate=len(toks),
                      hashes=block_hashes(toks, 4))
    monkeypatch.setattr(kv_cost, "VECTOR_MIN", 10**9)
    loop = p.estimates(cands, req, now=now)
    monkeypatch.setattr(kv_cost, "VECTOR_MIN", 0)
    vector = p.estimates(cands, req, now=now)
    assert loop == vector                      # the same floats, not just close ones


def test_candidate_cache_follows_new_lists():
    idx = PrefixIndex(1000, 0)
    a, b, c = make_instances(3)
    p = ca(index=idx)
    cands = [a, b]
    assert p.select(cands, view({"prompt": "a first prompt, cold"})).instance is a
    req = view({"prompt": "a prompt long enough for blocks"})
    idx.record(req.hashes, c.identity, 0.0)
    assert p.select([a, b, c], req).instance is c           # another list: recomputed
    # the first list again: c is not a candidate; a cold tie goes to the never-selected b
    assert p.select(cands, view({"prompt": "another cold prompt"})).instance is b
