"""Workload generators: determinism, shapes, Mooncake trace replay, the unified-cache bound."""

from __future__ import annotations

import itertools
import os

import pytest

from kvrouter.sim.workloads import (
    TRACE_BLOCK_TOKENS,
    WORKLOADS,
    WorkloadRequest,
    make_workload,
    trace_block,
    unified_cache_bound,
)

TRACE = "/work/shared/data/mooncake/mooncake_conversation_trace.jsonl"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_per_seed(name: str) -> None:
    a = make_workload(name, rate=5.0, n=60, seed=11)
    b = make_workload(name, rate=5.0, n=60, seed=11)
    c = make_workload(name, rate=5.0, n=60, seed=12)
    assert a == b
    assert a != c
    assert len(a) == 60
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert all(isinstance(r, WorkloadRequest) and r.max_tokens > 0 and r.prompt_tokens
               for r in a)
    assert all(0 <= t < 65536 for r in a for t in r.prompt_tokens)


def test_poisson_rate() -> None:
    wl = make_workload("nosharing", rate=20.0, n=2000, seed=1)
    assert 18.0 < len(wl) / wl[-1].arrival < 22.0


def test_b2b_groups_share_context() -> None:
    wl = make_workload("b2b", rate=10.0, n=200, seed=1, groups=4, context=600, users=3,
                       question=100, output=16)
    groups: dict[str, list[WorkloadRequest]] = {}
    for r in wl:
        assert len(r.prompt_tokens) == 700 and r.max_tokens == 16
        assert r.session_id is not None
        groups.setdefault(r.session_id.split("-u")[0], []).append(r)
    assert len(groups) == 4
    assert {int(s.split("-u")[1]) for r in wl for s in [r.session_id]} == {0, 1, 2}
    for members in groups.values():
        for x, y in itertools.combinations(members[:5], 2):
            assert _common_prefix(x.prompt_tokens, y.prompt_tokens) >= 600
            assert x.prompt_tokens[600:] != y.prompt_tokens[600:]   # fresh questions
    firsts = [m[0].prompt_tokens for m in groups.values()]
    for x, y in itertools.combinations(firsts, 2):
        assert _common_prefix(x, y) < 600


def test_multigroup_sizes_and_skew() -> None:
    wl = make_workload("multigroup", rate=10.0, n=2000, seed=2, groups=4, prefix_min=256,
                       prefix_max=2048, zipf=1.0, question=32)
    sizes: dict[tuple[int, ...], int] = {}
    for r in wl:
        key = tuple(r.prompt_tokens[:8])
        sizes[key] = sizes.get(key, 0) + 1
        assert len(r.prompt_tokens) in (256 + 32, 512 + 32, 1024 + 32, 2048 + 32)
    assert len(sizes) == 4
    counts = sorted(sizes.values(), reverse=True)
    assert counts[0] > 3 * counts[-1]                    # zipf 1: 1 : 1/2 : 1/3 : 1/4
    big = [r for r in wl if len(r.prompt_tokens) == 2048 + 32]
    assert len(big) == counts[0]                         # the largest prefix is the hottest


def test_multiturn_history_grows() -> None:
    wl = make_workload("multiturn", rate=4.0, n=80, seed=3, system=256, turns=4, user=50,
                       output=40, think=2.0)
    sessions: dict[str, list[WorkloadRequest]] = {}
    for r in wl:
        sessions.setdefault(r.session_id, []).append(r)
    assert len(sessions) == 20
    for turns in sessions.values():
        assert len(turns) == 4
        for prev, nxt in itertools.pairwise(turns):
            assert nxt.arrival > prev.arrival
            # the next prompt = previous prompt + answer (40) + a new user message
            assert nxt.prompt_tokens[: len(prev.prompt_tokens)] == prev.prompt_tokens
            assert len(nxt.prompt_tokens) >= len(prev.prompt_tokens) + 40 + 25
    heads = [t[0].prompt_tokens for t in sessions.values()]
    assert all(h[:256] == heads[0][:256] for h in heads)   # shared system prompt
    assert len({tuple(h[256:]) for h in heads}) == len(heads)


def test_nosharing_has_no_shared_prefix() -> None:
    wl = make_workload("nosharing", rate=10.0, n=100, seed=4, prompt_min=100, prompt_max=200)
    assert all(100 <= len(r.prompt_tokens) <= 200 for r in wl)
    assert len({tuple(r.prompt_tokens[:16]) for r in wl}) == 100
    assert unified_cache_bound(wl, 10**6, 16) == 0.0


def test_unknown_workload_and_missing_args() -> None:
    with pytest.raises(ValueError):
        make_workload("nope", rate=1.0, n=1, seed=0)
    with pytest.raises(ValueError):
        make_workload("b2b", rate=None, n=10, seed=0)
    with pytest.raises(TypeError):
        make_workload("b2b", rate=1.0, n=10, seed=0, bogus=1)


@pytest.mark.skipif(not os.path.exists(TRACE), reason="Mooncake trace not present")
def test_trace_replay_first_200_lines() -> None:
    import json

    with open(TRACE) as fh:
        recs = [json.loads(line) for _, line in zip(range(200), fh)]
    wl = make_workload(f"trace:{TRACE}", rate=None, n=200, seed=0, speed=2.0)
    assert len(wl) == 200
    again = make_workload(f"trace:{TRACE}", rate=None, n=200, seed=99, speed=2.0)
    assert wl == again                                   # trace replay ignores the seed
    by_arrival = sorted(recs, key=lambda r: r["timestamp"])
    block_of: dict[int, list[int]] = {}
    for rec, req in zip(by_arrival, wl):
        assert req.arrival == pytest.approx(rec["timestamp"] / 1000.0 / 2.0)
        assert len(req.prompt_tokens) == rec["input_length"]
        assert req.max_tokens == max(1, rec["output_length"])
        for k, h in enumerate(rec["hash_ids"]):
            block = req.prompt_tokens[k * TRACE_BLOCK_TOKENS:(k + 1) * TRACE_BLOCK_TOKENS]
            assert block == trace_block(h)[: len(block)]
            if len(block) == TRACE_BLOCK_TOKENS:
                assert block_of.setdefault(h, block) == block   # equal ids → equal blocks
    # chained ids: requests sharing the first k ids share k × 512 leading tokens
    a, b = by_arrival[0], by_arrival[1]
    shared = len(list(itertools.takewhile(lambda p: p[0] == p[1],
                                          zip(a["hash_ids"], b["hash_ids"]))))
    assert shared >= 1
    assert _common_prefix(wl[0].prompt_tokens, wl[1].prompt_tokens) >= shared * 512
    assert trace_block(1) != trace_block(2)
    # the reuse ceiling of this trace is ~40 %; the first 200 lines reuse some of it
    assert 0.05 < unified_cache_bound(wl, 10**7, 512) < 0.9


def test_unified_cache_bound_hand_made() -> None:
    bs = 4
    a = [1, 2, 3, 4, 5, 6, 7, 8]            # two blocks: A1 A2
    b = [1, 2, 3, 4, 9, 9, 9, 9, 7]         # A1 B2 + a partial block
    c = [5, 5, 5, 5]                        # C1
    wl = [WorkloadRequest(0.0, a, 1), WorkloadRequest(1.0, a, 1), WorkloadRequest(2.0, b, 1),
          WorkloadRequest(3.0, c, 1), WorkloadRequest(4.0, a, 1)]
    total = 8 + 8 + 9 + 4 + 8
    # unbounded: a→0, a→8, b→4 (A1), c→0, a→8
    assert unified_cache_bound(wl, 100, bs) == pytest.approx(20 / total)
    # 3 blocks of room. After b: LRU order A2, B2, A1 (A1 freshest). c evicts A2
    # (the oldest) → last a hits A1 only.
    assert unified_cache_bound(wl, 3, bs) == pytest.approx((8 + 4 + 4) / total)
    # one block: a leaves A1 (its ancestor is fresher than A2); second a hits 4; b hits A1 (4);
    # b leaves A1 again; c evicts it → last a misses.
    assert unified_cache_bound(wl, 1, bs) == pytest.approx((4 + 4) / total)
    assert unified_cache_bound(wl, 0, bs) == 0.0
    # order matters: arrival order, not list order
    assert unified_cache_bound(list(reversed(wl)), 100, bs) == pytest.approx(20 / total)
