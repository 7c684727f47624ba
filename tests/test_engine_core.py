"""The engine core of the simulator (kvrouter.sim.core), in virtual time: pure and fast."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from kvrouter.sim.core import (
    PHASE_DECODE,
    PHASE_PREFILL,
    PRESETS,
    CoreRequest,
    EngineCore,
    KVCache,
    make_engine_core,
    make_params,
)
from kvrouter.sim.core.timing import (
    BatchEntry,
    LinearModel,
    MockerPolyModel,
    RooflineModel,
)
from kvrouter.sim.core.virtual import run_virtual


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 150_000) for _ in range(n)]


def run_one(core: EngineCore, req: CoreRequest, t0: float) -> float:
    """Run ``req`` alone from ``t0``; returns the time the core went idle."""
    return run_virtual(core, [(t0, req)], start=t0).end


# ------------------------------------------------------------------------------ presets / timing
# reference table: (KV KiB/token, prefill tok/s, 1k ms, 8k ms, decode B=1/32/128 ms)
TABLE = {
    "llama3-8b-h100": (128, 27.7e3, 36, 289, (8.9, 12.4, 23.2)),
    "qwen3-32b-tp2-h100": (256, 13.6e3, 74, 590, (16.0, 19.6, 30.3)),
    "llama3-70b-tp4-h100": (320, 12.6e3, 79, 635, (17.1, 19.3, 26.0)),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_numbers_match_engine_model_table(name: str) -> None:
    p = PRESETS[name]
    kib, tput, t1k, t8k, dec = TABLE[name]
    assert p.kv_bytes_per_token == kib * 1024
    assert p.gpu_flops * p.tp * p.mfu_prefill / (2 * p.n_params) == pytest.approx(tput, rel=0.01)
    # The table is the linear term only: the full roofline adds attention, the step overhead and
    # the TP all-reduce latency, so prefill lands 5-10 % (1k) and 10-20 % (8k) above it.
    m = RooflineModel(p)
    pre_1k = m.step_time([BatchEntry(1000, 0, False)]) * 1e3
    pre_8k = m.step_time([BatchEntry(8000, 0, False)]) * 1e3
    assert t1k * 1.0 <= pre_1k <= t1k * 1.12, pre_1k
    assert t8k * 1.0 <= pre_8k <= t8k * 1.2, pre_8k
    linear_8k = 2 * p.n_params * 8000 / (p.gpu_flops * p.tp * p.mfu_prefill) * 1e3
    assert linear_8k == pytest.approx(t8k, rel=0.02)
    # Decode steps at context ~2k are memory-bound and match the table within 5 %.
    for b, want in zip((1, 32, 128), dec):
        got = m.step_time([BatchEntry(1, 2000, True)] * b) * 1e3
        assert got == pytest.approx(want, rel=0.05), (b, got, want)
    b = m.breakdown([BatchEntry(8000, 0, False)])
    assert b["compute"] > b["memory"]                          # prefill: compute-bound
    b = m.breakdown([BatchEntry(1, 2000, True)] * 128)
    assert b["memory"] > b["compute"]                          # decode: memory-bound


def test_kv_capacity_of_presets() -> None:
    assert PRESETS["qwen3-32b-tp2-h100"].kv_capacity == 307_328          # llm-d measured
    assert PRESETS["qwen3-32b-tp2-h100"].total_blocks == 307_328 // 64
    assert PRESETS["qwen3-32b-tp2-h100"].replace(block_size=16).total_blocks == 307_328 // 16
    assert 380_000 <= PRESETS["llama3-8b-h100"].kv_capacity <= 420_000   # "~400k tokens"
    assert make_params("llama3-8b-h100", num_gpu_blocks=100).total_blocks == 100
    with pytest.raises(ValueError):
        make_params("no-such-preset")
    with pytest.raises(ValueError):
        make_params("llama3-8b-h100", timing="bogus")


def test_mocker_poly_and_linear_models() -> None:
    p = make_params("llama3-8b-h100", timing="mocker-poly")
    m = MockerPolyModel(p)
    assert m.step_time([BatchEntry(1024, 0, False)]) * 1e3 == pytest.approx(32.5, abs=0.1)
    assert m.step_time([BatchEntry(8192, 0, False)]) * 1e3 == pytest.approx(169.2, abs=0.3)
    assert m.step_time([BatchEntry(1, 100, True)], kv_usage=0.0) * 1e3 == pytest.approx(5.74)
    assert m.step_time([BatchEntry(1, 100, True)], kv_usage=1.0) * 1e3 == pytest.approx(34.01)
    # a mixed step pays prefill + decode
    mixed = m.step_time([BatchEntry(1024, 0, False), BatchEntry(1, 10, True)], kv_usage=0.5)
    assert mixed * 1e3 == pytest.approx(32.5 + 26.31, abs=0.1)
    lin = LinearModel(make_params("llama3-8b-h100", timing="linear", linear_prefill_overhead=0.01,
                                  linear_prefill_per_token=1e-4, linear_itl=0.02))
    assert lin.step_time([BatchEntry(100, 0, False)]) == pytest.approx(0.02)
    assert lin.step_time([BatchEntry(1, 100, True)]) == pytest.approx(0.02)
    assert lin.step_time([BatchEntry(1000, 0, False)]) == pytest.approx(0.11)
    core = make_engine_core("llama3-8b-h100", timing="mocker-poly", jitter_sigma=0)
    req = CoreRequest("r", tokens(1024, 1), 2)
    run_one(core, req, 0.0)
    assert req.first_token_at == pytest.approx(0.0325, abs=1e-3)


# ------------------------------------------------------------------------------ fidelity gate 1
def test_fidelity_cached_vs_uncached_ttft_10k() -> None:
    """Fidelity gate 1 on qwen3-32b-tp2-h100, in model time: a 10k-token prompt whose
    first 9k tokens are already cached (the llm-d long-context case: shared document, new
    question) reaches its first token 5-10x sooner than cold. A fully repeated prompt is even
    faster (one memory-bound step), which bounds the ratio from above."""
    core = make_engine_core("qwen3-32b-tp2-h100", seed=3)
    doc = tokens(10_000, 1)
    cold = CoreRequest("cold", doc, 1)
    t = run_one(core, cold, 0.0)
    warm = CoreRequest("warm", doc[:9_000] + tokens(1_000, 2), 1)
    t = run_one(core, warm, t + 1.0)
    same = CoreRequest("same", doc, 1)
    run_one(core, same, t + 1.0)

    def ttft(r: CoreRequest) -> float:
        assert r.first_token_at is not None
        return r.first_token_at - r.arrival

    assert cold.cached_tokens == 0
    assert warm.cached_tokens == 9_000 // 64 * 64
    assert same.cached_tokens == (10_000 - 1) // 64 * 64
    assert 0.6 < ttft(cold) < 1.2                 # ~13.6k tok/s plus attention over 10k context
    ratio = ttft(cold) / ttft(warm)
    assert 5.0 <= ratio <= 10.0, ratio
    assert ttft(cold) / ttft(same) > 10.0         # nothing but one small step left


# ------------------------------------------------------------------------------ scheduler
def test_chunked_prefill_respects_token_budget() -> None:
    core = make_engine_core("llama3-8b-h100", max_num_batched_tokens=512, jitter_sigma=0)
    reqs = [(0.0, CoreRequest("long", tokens(2000, 1), 3)),
            (0.0, CoreRequest("short", tokens(100, 2), 20))]
    run = run_virtual(core, reqs)
    assert all(s.prefill_tokens + s.decode_tokens <= 512 for s in run.steps)
    # 2000 + 100 prompt tokens in 512-token chunks: 5 steps carry prefill
    prefill_steps = [s for s in run.steps if s.prefill_tokens]
    assert len(prefill_steps) == math.ceil(2100 / 512)
    assert sum(s.prefill_tokens for s in run.steps) == 2100
    # decode of "short" runs alongside the chunks of "long" once its own prefill is done
    assert any(s.prefill_tokens and s.decode_tokens for s in run.steps)
    long_req = reqs[0][1]
    assert long_req.output_tokens == 3 and long_req.finish_reason == "length"


def test_max_num_seqs_respected() -> None:
    core = make_engine_core("llama3-8b-h100", max_num_seqs=3, jitter_sigma=0)
    seen: list[int] = []
    arrivals = [(0.0, CoreRequest(f"r{i}", tokens(50, i), 5)) for i in range(10)]
    run = run_virtual(core, arrivals, on_event=lambda t, ev: seen.append(int(core.gauges()["running"])))
    assert max(s.batch_size for s in run.steps) == 3
    assert max(seen) <= 3
    assert all(r.output_tokens == 5 and r.finish_reason == "length" for _, r in arrivals)
    g = core.gauges()
    assert g["running"] == g["waiting"] == 0 and g["finished_total"] == 10
    assert g["free_blocks"] == g["num_gpu_blocks"]


def test_preemption_when_blocks_run_out_and_requests_complete() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=20, watermark=0.0,
                            enable_prefix_caching=False, jitter_sigma=0)
    arrivals = [(0.0, CoreRequest(f"r{i}", tokens(80, i), 100)) for i in range(3)]
    run = run_virtual(core, arrivals)
    assert core.preemptions_total > 0
    assert sum(r.preemptions for _, r in arrivals) == core.preemptions_total
    for _, r in arrivals:                 # every request still completes with all its tokens
        assert r.output_tokens == 100 and r.finish_reason == "length"
    events = [ev for _, ev in run.events if ev.request_id == "r2"]
    assert [ev.index for ev in events] == list(range(100))
    assert core.recomputed_tokens_total > 0
    core.kv.check()
    assert core.kv.num_free == 20


def test_preempted_victim_is_newest_and_goes_to_front() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=12, watermark=0.0,
                            enable_prefix_caching=False, jitter_sigma=0)
    for i in range(3):
        core.add_request(CoreRequest(f"r{i}", tokens(60, i), 200), 0.0)
    t = 0.0
    while core.preemptions_total == 0:
        step = core.next_step(t)
        assert step is not None
        t += step.duration
        core.finish_step(step, t)
    assert core.waiting[0].req.request_id == "r2"          # the newest admitted, at the front
    assert core.request("r2").preemptions == 1


def test_only_full_blocks_hit_and_one_token_is_recomputed() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, jitter_sigma=0)
    base = tokens(100, 7)
    t = run_one(core, CoreRequest("a", base, 1), 0.0)
    again = CoreRequest("b", base, 1)
    t = run_one(core, again, t)
    assert again.cached_tokens == 96                       # 6 full blocks of 16, not the 4-token tail
    assert core.cached_prefix_tokens(base) == 96 and core.cached_prefix_tokens(base[:20]) == 16
    partial = CoreRequest("c", base[:40] + tokens(30, 8), 1)
    t = run_one(core, partial, t)
    assert partial.cached_tokens == 32                     # blocks 0-1; block 2 differs at token 40
    exact = tokens(64, 9)
    t = run_one(core, CoreRequest("d", exact, 1), t)
    rep = CoreRequest("e", exact, 1)
    run_one(core, rep, t)
    assert rep.cached_tokens == 48                         # the last block is recomputed
    g = core.gauges()
    assert g["cached_tokens_total"] == 96 + 32 + 48
    assert 0 < g["hit_token_rate"] < 1


def test_kvcache_lru_eviction_unit() -> None:
    kv = KVCache(4, 2)
    a = kv.allocate(2)
    kv.publish(a[0], 11)
    kv.publish(a[1], 12)
    kv.free(a)                      # a[1] (tail) enters the LRU pool before a[0] (head)
    b = kv.allocate(1)
    kv.publish(b[0], 21)
    kv.free(b)
    assert kv.num_empty == 1 and kv.num_cached_free == 3 and kv.num_free == 4
    assert kv.match([11, 12]) == a
    kv.allocate(2)                  # the empty block, then the LRU one: a[1] (hash 12)
    assert kv.match([11, 12]) == [a[0]] and kv.evictions == 1
    kv.allocate(1)                  # next LRU: a[0] (hash 11); hash 21 (freed later) survives
    assert kv.match([11]) == [] and kv.match([21]) == b
    assert not kv.publish(b[0], 99)             # already hashed
    kv.check()


def test_lru_eviction_of_cached_free_blocks_in_the_engine() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=4, num_gpu_blocks=6, watermark=0.0,
                            jitter_sigma=0)
    A, B, C = tokens(8, 1), tokens(8, 2), tokens(16, 3)
    t = run_one(core, CoreRequest("A", A, 1), 0.0)
    t = run_one(core, CoreRequest("B", B, 1), t)
    assert core.kv.num_cached_free == 4 and core.kv.num_empty == 2
    t = run_one(core, CoreRequest("C", C, 1), t)           # 2 empty + evicts A's 2 (the oldest)
    assert core.kv.evictions == 2
    b2 = CoreRequest("B2", B, 1)
    t = run_one(core, b2, t)
    a2 = CoreRequest("A2", A, 1)
    run_one(core, a2, t)
    assert b2.cached_tokens == 4 and a2.cached_tokens == 0
    core.kv.check()


def test_watermark_and_fcfs_head_of_line() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=100, watermark=0.1,
                            jitter_sigma=0)
    core.add_request(CoreRequest("big", tokens(16 * 60, 1), 50), 0.0)
    core.add_request(CoreRequest("big2", tokens(16 * 35, 2), 5), 0.0)   # 61 + 36 > 100 - 10
    core.add_request(CoreRequest("small", tokens(16, 3), 5), 0.0)       # FCFS: waits behind big2
    core.next_step(0.0)
    g = core.gauges()
    assert g["running"] == 1 and g["waiting"] == 2


# ------------------------------------------------------------------------------ PD roles
def test_prefill_role_holds_blocks_until_released() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, jitter_sigma=0)
    req = CoreRequest("p", tokens(100, 1), 50, phase=PHASE_PREFILL)
    core.add_request(req, 0.0)
    step = core.next_step(0.0)
    events = core.finish_step(step, step.duration)
    assert [(e.index, e.finished) for e in events] == [(0, True)]
    g = core.gauges()
    assert g["running"] == 0 and g["held"] == 1 and g["used_blocks"] == math.ceil(100 / 16)
    assert core.next_step(step.duration) is None and core.next_wakeup() is None
    core.release_prefill("p")
    g = core.gauges()
    assert g["held"] == 0 and g["used_blocks"] == 0
    assert g["cached_free_blocks"] == 6                    # its full blocks stay hittable
    assert req.output_tokens == 1 and req.finish_reason == "length"
    assert core.idle


def test_decode_role_waits_for_transfer_time() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, jitter_sigma=0)
    prompt = tokens(100, 1)
    run_one(core, CoreRequest("warm", prompt, 1), 0.0)      # the prompt is now cached...
    d = CoreRequest("d", prompt, 4, phase=PHASE_DECODE, transfer_time=0.5, start_index=0)
    core.add_request(d, 10.0)
    assert core.next_step(10.0) is None                     # admitted, waiting for its KV
    assert core.next_wakeup() == pytest.approx(10.5)
    assert core.gauges()["running"] == 1
    assert d.cached_tokens == 0                             # ...but a decode never uses it
    step = core.next_step(10.5)
    assert step is not None and step.decode_tokens == 1 and step.prefill_tokens == 0
    events = core.finish_step(step, 10.5 + step.duration)
    assert [e.index for e in events] == [0]
    assert d.first_token_at == pytest.approx(10.5 + step.duration)
    run = run_virtual(core, [], start=d.first_token_at)
    assert [e.index for _, e in run.events] == [1, 2, 3]
    assert d.finish_reason == "length" and core.idle


def test_decode_role_out_of_blocks_ends_with_pd_reschedule() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=14, watermark=0.0,
                            enable_prefix_caching=False, jitter_sigma=0)
    arrivals = [(0.0, CoreRequest(f"d{i}", tokens(60, i), 100, phase=PHASE_DECODE,
                                  transfer_time=0.01)) for i in range(3)]
    run = run_virtual(core, arrivals)
    ended = [ev for _, ev in run.events if ev.index == -1]
    assert ended and all(ev.finish_reason == "pd_reschedule" and ev.finished for ev in ended)
    assert core.pd_reschedules_total == len(ended) and core.preemptions_total == 0
    assert any(r.output_tokens == 100 for _, r in arrivals)
    assert core.idle and core.kv.num_free == 14


# ------------------------------------------------------------------------------ driver contract
def test_abort_frees_everything() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, jitter_sigma=0)
    core.add_request(CoreRequest("a", tokens(300, 1), 100), 0.0)
    core.add_request(CoreRequest("b", tokens(300, 2), 100), 0.0)
    step = core.next_step(0.0)
    assert core.abort("a", 0.001)                          # aborted while its step runs
    events = core.finish_step(step, step.duration)
    assert [e.request_id for e in events] == ["b"]
    assert core.abort("b", 1.0) and not core.abort("b", 1.0) and not core.abort("zz", 1.0)
    assert core.idle and core.kv.num_free == core.kv.num_blocks
    assert core.gauges()["aborted_total"] == 2
    with pytest.raises(RuntimeError):
        core.finish_step(step, 2.0)


def test_pacing_holds() -> None:
    core = make_engine_core("llama3-8b-h100", jitter_sigma=0)
    r = CoreRequest("r", tokens(50, 1), 3, hold_first=1.0, hold_between=0.5)
    run = run_virtual(core, [(0.0, r)])
    times = [t for t, _ in run.events]
    assert r.first_token_at is not None and r.first_token_at >= 1.0
    assert all(b - a >= 0.5 for a, b in itertools.pairwise(times))
    assert core.gauges()["steps_total"] == 3


def test_identical_seeds_identical_step_durations() -> None:
    def durations(seed: int) -> list[float]:
        core = make_engine_core("qwen3-32b-tp2-h100", seed=seed, max_num_batched_tokens=1024)
        arrivals = [(0.01 * i, CoreRequest(f"r{i}", tokens(200 + 50 * i, i % 3), 20)) for i in range(12)]
        return [s.duration for s in run_virtual(core, arrivals).steps]

    a, b, c = durations(5), durations(5), durations(6)
    assert a == b
    assert a != c and len(a) == len(c)
    # jitter is mean-one log-normal with sigma 0.03: every step stays within a few sigma
    base = [s.duration for s in run_virtual(
        make_engine_core("qwen3-32b-tp2-h100", jitter_sigma=0, max_num_batched_tokens=1024),
        [(0.01 * i, CoreRequest(f"r{i}", tokens(200 + 50 * i, i % 3), 20)) for i in range(12)]).steps]
    ratios = [x / y for x, y in zip(a, base)]
    assert all(0.85 < q < 1.15 for q in ratios)


def test_request_that_can_never_fit_is_rejected() -> None:
    core = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=4)
    with pytest.raises(ValueError):
        core.add_request(CoreRequest("huge", tokens(64, 1), 1), 0.0)
    with pytest.raises(ValueError):
        core.add_request(CoreRequest("ok", tokens(10, 1), 1), 0.0) or \
            core.add_request(CoreRequest("ok", tokens(10, 1), 1), 0.0)
    # a context that outgrows the whole cache ends with "length" (index -1)
    core2 = make_engine_core("llama3-8b-h100", block_size=16, num_gpu_blocks=4, watermark=0.0,
                             jitter_sigma=0)
    r = CoreRequest("grow", tokens(40, 2), 1000)
    run = run_virtual(core2, [(0.0, r)])
    assert r.finish_reason == "length" and r.output_tokens == 64 - 40 + 1   # the last one is not stored
    assert run.events[-1][1].index == -1 and core2.idle
