"""The admission queue in the virtual-time cluster (``run_cluster(admission=True)``): the
server's :class:`kvrouter.admission.AdmissionQueue` driven by the event loop. Virtual time,
real engine cores, deterministic."""

from __future__ import annotations

import hashlib

import pytest

from kvrouter.admission import Priority
from kvrouter.sim.cluster import ClusterResult, percentile, run_cluster
from kvrouter.sim.cluster.des import EXPIRY_PERIOD
from kvrouter.sim.workloads import WorkloadRequest, make_workload

SMALL = {"preset": "llama3-8b-h100", "core_overrides": {"num_gpu_blocks": 64}}


def fingerprint(res: ClusterResult) -> str:
    rows = [(r.index, r.instance, r.prefill_instance, r.ttft, r.end, r.cached_tokens,
             r.output_tokens, r.queue_time, r.preemptions, r.error, tuple(r.itls))
            for r in res.results]
    extra = (res.start, res.end, res.in_system_integral, res.router_inflight_integral)
    return hashlib.sha256(repr((rows, extra)).encode()).hexdigest()[:16]


def b2b_small(rate: float, n: int, output: int) -> list[WorkloadRequest]:
    return make_workload("b2b", rate=rate, n=n, seed=4, groups=6, context=1024, users=2,
                         question=128, output=output)


# Digests of the same runs on the code before the admission queue existed: with admission
# off (the default) every number must stay the same (mixed, scraped metrics with timeouts,
# the oracle, PD).
BEFORE = {
    "mixed": (lambda: run_cluster(b2b_small(30, 120, 16), policy="round_robin", instances=3,
                                  seed=4, **SMALL), "f79683ba24d73bfc"),
    "scraped_timeouts": (lambda: run_cluster(b2b_small(200, 150, 64),
                                             policy="fd_remote_metrics_score", instances=2,
                                             seed=4, request_timeout=1.0, **SMALL),
                         "7cba674e354bc485"),
    "oracle": (lambda: run_cluster(make_workload("multiturn", rate=20, n=120, seed=5,
                                                 system=512, turns=4, user=64, output=16,
                                                 think=1.0),
                                   policy="oracle", instances=3, seed=5, **SMALL),
               "7de7b367975965d3"),
    "pd": (lambda: run_cluster(make_workload("nosharing", rate=20, n=100, seed=6,
                                             prompt_min=256, prompt_max=768, output=8),
                               policy="request_num", instances=0, pd=(1, 2), seed=6, **SMALL),
           "5e0960c7baefc1b7"),
}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_admission_off_gives_the_same_numbers_as_before(case):
    run, digest = BEFORE[case]
    res = run()
    assert fingerprint(res) == digest
    assert not res.admission and res.rejected == 0 and res.queue_peak == 0
    assert res.summary()["rejected"] == 0


def test_a_queued_request_is_bound_to_the_instance_that_frees_first():
    """Placement is decided when the request leaves the queue, not when it arrives."""
    prompt = list(range(300))
    wl = [WorkloadRequest(0.0, prompt, 300),            # long: holds its instance
          WorkloadRequest(0.001, prompt[::-1], 4),      # short: its instance frees first
          WorkloadRequest(0.002, [7] * 200, 4)]         # arrives with both instances busy
    res = run_cluster(wl, policy="request_num", instances=2, seed=1, admission=True,
                      scheduler_overrides={"max-inflight-per-instance": 1}, **SMALL)
    long, short, late = res.results
    assert all(r.ok for r in res.results) and res.queue_peak == 1
    assert long.instance != short.instance
    assert late.instance == short.instance               # the instance that freed up
    assert late.router_wait == pytest.approx(short.end - late.arrival)
    assert late.router_wait > 0 and late.end < long.end  # not stuck behind the long one
    assert long.router_wait == short.router_wait == 0.0


def test_overload_bounded_queue_rejections_and_accounting():
    n = 400
    wl = make_workload("nosharing", rate=400, n=n, seed=7, prompt_min=256, prompt_max=1024,
                       output=32)
    limits = {"max-inflight-per-instance": 4, "queue-size": 20, "queue-timeout-secs": 0.5}
    res = run_cluster(wl, policy="request_num", instances=2, seed=1, admission=True,
                      scheduler_overrides=limits, request_timeout=60.0, **SMALL)
    s = res.summary()
    rejected = [r for r in res.results if r.rejected is not None]
    assert 0 < res.queue_peak <= 20
    assert res.rejections["queue_full"] > 0
    assert s["rejected"] == res.rejected == len(rejected) > 0
    assert s["completed"] + s["failed"] + s["rejected"] == n
    assert [r.index for r in res.results] == list(range(n))      # arrival order
    for r in rejected:
        assert not r.ok and r.ttft is None and r.instance == "" and r.cached_tokens == 0
        assert r.error == r.rejected and r.router_wait <= 0.5 + EXPIRY_PERIOD + 1e-9
    served = [r for r in res.results if r.rejected is None]
    assert all(r.router_wait <= 0.5 + EXPIRY_PERIOD + 1e-9 for r in served)
    assert any(r.router_wait > 0 for r in served)
    assert sum(s["per_instance"].values()) == len(served)
    assert all(v == (0, 0) for v in res.final_load.values())     # every lease released
    # time in the system (queue included) integrates to the requests' own times
    assert res.in_system_integral == pytest.approx(
        sum(r.end - r.arrival for r in res.results), rel=1e-9)
    # without the queue the same burst goes to the engines, and waits there
    off = run_cluster(wl, policy="request_num", instances=2, seed=1, request_timeout=60.0,
                      **SMALL)
    assert off.rejected == 0 and off.summary()["completed"] == n
    assert percentile([r.ttft for r in served if r.ttft is not None], 99) < \
        percentile([r.ttft for r in off.results if r.ttft is not None], 50)


def flood(batch: Priority, tenant: str) -> list[WorkloadRequest]:
    """A batch client sending 3 s of requests at 200 req/s, and an interactive one sending a
    request every 0.25 s."""
    flood = make_workload("nosharing", rate=200, n=600, seed=9, prompt_min=512,
                          prompt_max=1024, output=16)
    out = [WorkloadRequest(r.arrival, r.prompt_tokens, r.max_tokens, priority=batch,
                           tenant="batch") for r in flood]
    live = make_workload("nosharing", rate=4, n=12, seed=10, prompt_min=256, prompt_max=512,
                         output=16)
    out += [WorkloadRequest(0.25 * (i + 1), r.prompt_tokens, r.max_tokens, "live",
                            priority=Priority.INTERACTIVE if batch is Priority.BATCH
                            else Priority.DEFAULT, tenant=tenant)
            for i, r in enumerate(live)]
    return sorted(out, key=lambda r: r.arrival)


def interactive_ttfts(wl: list[WorkloadRequest]) -> tuple[list[float], ClusterResult]:
    res = run_cluster(wl, policy="request_num", instances=2, seed=1, admission=True,
                      scheduler_overrides={"max-inflight-per-instance": 4,
                                           "queue-size": 10_000,
                                           "queue-timeout-secs": 120.0}, **SMALL)
    ttfts = [r.ttft for r in res.results if r.session_id == "live"]
    assert len(ttfts) == 12
    assert all(t is not None for t in ttfts)
    return [t for t in ttfts if t is not None], res


def test_interactive_requests_keep_their_ttft_while_a_batch_client_floods():
    fcfs, _ = interactive_ttfts(flood(Priority.DEFAULT, "batch"))       # one queue: FCFS
    prio, res = interactive_ttfts(flood(Priority.BATCH, "interactive"))
    fair, _ = interactive_ttfts(flood(Priority.DEFAULT, "interactive"))  # DRR by tenant
    assert res.rejected == 0 and res.summary()["completed"] == 612   # the flood is served
    assert max(fcfs) > 2.0                       # behind the flood's queue
    assert max(prio) < 0.5 and max(prio) < max(fcfs) / 4
    assert max(fair) < max(fcfs) / 4


def test_pd_admission_queues_on_the_prefill_side():
    wl = make_workload("nosharing", rate=300, n=200, seed=6, prompt_min=256, prompt_max=768,
                       output=8)
    res = run_cluster(wl, policy="request_num", instances=0, pd=(1, 2), seed=6, admission=True,
                      scheduler_overrides={"max-inflight-per-instance": 2, "queue-size": 30,
                                           "queue-timeout-secs": 1.0}, **SMALL)
    s = res.summary()
    assert res.queue_peak > 0 and s["rejected"] == res.rejected > 0
    assert s["completed"] + s["failed"] + s["rejected"] == 200 and s["completed"] > 0
    assert all(v == (0, 0) for v in res.final_load.values())


def test_a_burst_after_a_quiet_hour_is_queued_not_answered_deadline():
    """The queue's pace counts only time during which requests waited: an hour without
    traffic between two bursts is not an hour of service time (it made the second burst's
    requests that found one ahead of them rejected ``deadline`` at once)."""
    prompt = list(range(64))
    burst = [WorkloadRequest(0.01 * i, [*prompt[i:], i], 4) for i in range(8)]
    later = [WorkloadRequest(3600.0 + 0.01 * i, [*prompt[i:], 100 + i], 4) for i in range(8)]
    res = run_cluster(burst + later, policy="request_num", instances=1, seed=2, admission=True,
                      scheduler_overrides={"max-inflight-per-instance": 1,
                                           "queue-timeout-secs": 5.0}, **SMALL)
    assert res.queue_peak > 1                           # both bursts queued
    assert res.rejected == 0 and res.rejections == {}
    assert all(r.ok for r in res.results)
    assert sum(r.router_wait > 0 for r in res.results[8:]) >= 6
