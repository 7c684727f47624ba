"""The admission queue in a real router process in front of simulated instances: late binding,
429 with Retry-After beyond the queue, priorities, client disconnects, metrics, headroom over
the instances a request can use (its model, outlier ejection), PD."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
from harness import bounded, metrics_text, post_json, register_all, sample, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
URL = "/v1/chat/completions"


def admission(inflight: int, size: int, timeout: float = 20.0) -> dict:
    return {"scheduler": {"policy": "request_num", "max-inflight-per-instance": inflight,
                          "queue-size": size, "queue-timeout-secs": timeout}}


async def timed_post(session: aiohttp.ClientSession, url: str, headers: dict | None = None,
                     body: dict | None = None) -> tuple[int, float, dict]:
    start = time.monotonic()
    async with session.post(url, json=body or CHAT, headers=headers) as r:
        await r.read()
        return r.status, time.monotonic() - start, dict(r.headers)


def one_at_a_time(received: list, delay: float) -> bool:
    """Whether an instance ``received`` its requests at least ``delay`` (its first-byte delay,
    during which the router counts the request on it) apart: never two at once."""
    times = sorted(r.time for r in received)
    return all(b - a >= 0.9 * delay for a, b in itertools.pairwise(times))


async def test_burst_beyond_capacity_queues_then_429s_with_retry_after(router_factory, sims):
    """2 instances × 2 in flight, 6 queued: of 24 concurrent requests, 10 are served, 14 get
    429 with Retry-After at once; no instance ever holds more than 2."""
    router = await router_factory(admission(inflight=2, size=6))
    a, b = await sims(2)
    await register_all(router, a, b)
    a.knobs.first_byte_delay = b.knobs.first_byte_delay = 0.4
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL) for _ in range(24)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 10 and statuses.count(429) == 14, statuses
    rejected = [r for r in results if r[0] == 429]
    assert all(int(r[2]["Retry-After"]) >= 1 for r in rejected)
    assert max(r[1] for r in rejected) < 0.4         # answered at once, not after waiting
    assert len(a.inference_requests) + len(b.inference_requests) == 10
    text = await metrics_text(router)
    assert sample(text, "kvrouter_queue_rejections_total", reason="queue_full") == 14
    assert sample(text, "kvrouter_queue_depth", priority="default") == 0
    assert sample(text, "kvrouter_queue_wait_seconds_count", priority="default") >= 6


async def test_late_binding_sends_queued_requests_to_the_instance_that_frees_first(
        router_factory, sims):
    router = await router_factory(admission(inflight=1, size=8))
    a, b = await sims(2)
    await register_all(router, a, b)
    a.knobs.first_byte_delay = 2.0       # a is slow, b is fast
    b.knobs.first_byte_delay = 0.05
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL) for _ in range(8)))
    assert [r[0] for r in results] == [200] * 8
    served_by = [r[2]["X-Router-Mixed-URL"] for r in results]
    assert served_by.count(a.url) == 1        # bound at arrival, a would have taken half


async def test_interactive_requests_pass_a_batch_flood(router_factory, sims):
    router = await router_factory(admission(inflight=1, size=64))
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.first_byte_delay = 0.1
    async with aiohttp.ClientSession() as s:
        flood = [asyncio.ensure_future(timed_post(s, router.url + URL,
                                                  {"x-kvrouter-priority": "batch"}))
                 for _ in range(20)]
        await wait_for(lambda: _queued(router, "batch"), 5)
        status, waited, _ = await timed_post(s, router.url + URL,
                                             {"x-kvrouter-priority": "interactive"})
        batch = await asyncio.gather(*flood)
    assert status == 200
    assert waited < 0.6                       # ~1 request ahead, not 20 × 0.1 s
    assert max(r[1] for r in batch) > 1.5 and all(r[0] == 200 for r in batch)


async def _queued(router, priority: str) -> bool:
    return sample(await metrics_text(router), "kvrouter_queue_depth", priority=priority) >= 5


async def test_bad_priority_is_400(router_factory, sims):
    router = await router_factory(admission(inflight=1, size=4))
    (a,) = await sims(1)
    await register_all(router, a)
    status, body, _ = await post_json(router.url + URL, CHAT,
                                      headers={"x-kvrouter-priority": "urgent"})
    assert status == 400 and "x-kvrouter-priority" in body["error"]["message"]


async def test_client_leaving_the_queue_frees_its_place(router_factory, sims):
    router = await router_factory(admission(inflight=1, size=1, timeout=20))
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.first_byte_delay = 1.0
    async with aiohttp.ClientSession() as s:
        busy = asyncio.ensure_future(timed_post(s, router.url + URL))
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(timed_post(s, router.url + URL))
        await wait_for(lambda: _depth_is(router, 1), 5)
        waiting.cancel()                      # the client gives up while queued
        await asyncio.gather(waiting, return_exceptions=True)
        await wait_for(lambda: _depth_is(router, 0), 5)
        status, _, _ = await timed_post(s, router.url + URL)   # the place is free again
        assert status == 200
        assert (await busy)[0] == 200
    assert len(a.inference_requests) == 2      # the one that left never reached the instance


async def _depth_is(router, n: int) -> bool:
    return sample(await metrics_text(router), "kvrouter_queue_depth", priority="default") == n


async def test_queue_timeout_is_429(router_factory, sims):
    router = await router_factory(admission(inflight=1, size=4, timeout=0.3))
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.first_byte_delay = 1.5
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL) for _ in range(3)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 429, 429], statuses
    text = await metrics_text(router)
    assert sample(text, "kvrouter_queue_rejections_total", reason="queue_timeout") + \
        sample(text, "kvrouter_queue_rejections_total", reason="deadline") == 2


@bounded(30)
async def test_wait_histogram_counts_requests_admitted_at_once(router_factory, sims):
    """``kvrouter_queue_wait_seconds`` observes every admitted request, 0 for one that found
    room at arrival: its count is the admitted requests, not only those that waited."""
    router = await router_factory(admission(inflight=4, size=4))
    (a,) = await sims(1)
    await register_all(router, a)
    for _ in range(3):
        status, _, _ = await post_json(router.url + URL, CHAT)
        assert status == 200
    text = await metrics_text(router)
    assert sample(text, "kvrouter_queue_wait_seconds_count", priority="default") == 3
    assert sample(text, "kvrouter_queue_wait_seconds_sum", priority="default") == 0


async def register_serving(router, inst, model: str) -> None:
    status, body, _ = await post_json(router.url + "/register",
                                      dict(inst.registration_payload(), models=[model]))
    assert status == 200, body


@bounded(30)
async def test_instances_of_another_model_make_no_room(router_factory, sims):
    """One instance per model, 1 in flight each: model-b's idle instance must not let
    model-a's requests pile onto model-a's instance."""
    router = await router_factory(admission(inflight=1, size=8))
    (a,) = await sims(1, served_model_name="model-a")
    (b,) = await sims(1, served_model_name="model-b")
    await register_serving(router, a, "model-a")
    await register_serving(router, b, "model-b")
    a.knobs.first_byte_delay = 0.4
    body = {**CHAT, "model": "model-a"}
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL, body=body)
                                         for _ in range(3)))
        # model-b's instance serves its own requests at once meanwhile
        assert [r[0] for r in results] == [200] * 3
    assert len(a.inference_requests) == 3 and not b.inference_requests
    assert one_at_a_time(a.inference_requests, 0.4)


@bounded(40)
async def test_an_ejected_instance_makes_no_room(router_factory, sims):
    """An instance ejected by outlier detection is idle, but requests cannot go there: its
    slot must not admit requests that all land on the instance left."""
    router = await router_factory({**admission(inflight=1, size=8),
                                   "outlier": {"consecutive-failures": 2,
                                               "base-ejection-secs": 60},
                                   "server": {"status-retries": 1}})
    bad, good = await sims(2)               # by URL: load ties go to `bad` first
    await register_all(router, bad, good)
    bad.knobs.reply_status, bad.knobs.reply_body = 500, {"error": {"message": "broken"}}

    async def ejected() -> bool:
        return sample(await metrics_text(router), "kvrouter_outlier_ejected_instances") == 1

    for _ in range(6):
        status, _, _ = await post_json(router.url + URL, CHAT)   # retried on `good`
        assert status == 200
        if await ejected():
            break
    assert await ejected()
    tried, before = len(bad.inference_requests), len(good.inference_requests)
    good.knobs.first_byte_delay = 0.4
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL) for _ in range(3)))
    assert [r[0] for r in results] == [200] * 3
    assert len(bad.inference_requests) == tried
    measured = good.inference_requests[before:]
    assert len(measured) == 3 and one_at_a_time(measured, 0.4)


@bounded(40)
async def test_pd_admits_one_request_per_free_prefill_slot(router_factory, sims):
    """PD: an admitted request takes its prefill lease later, in its task; until then it
    holds the slot, so 5 concurrent requests reach a 1-in-flight prefill one at a time."""
    router = await router_factory(admission(inflight=1, size=8), "--splitwise")
    (p,) = await sims(1, role="prefill")
    (d,) = await sims(1, role="decode")
    await register_all(router, p, d)
    p.knobs.first_byte_delay = 0.4           # the prefill's lease lasts until its first byte
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(timed_post(s, router.url + URL) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5
    assert len(p.inference_requests) == 5 and one_at_a_time(p.inference_requests, 0.4)
    text = await metrics_text(router)
    assert sample(text, "kvrouter_queue_wait_seconds_count", priority="default") == 5


@bounded(30)
async def test_queue_size_zero_with_a_limit_sheds_load(router_factory, sims):
    """``queue-size: 0`` with a limit: the limit holds and nothing waits; a request without
    headroom gets 429 ``queue_full`` at once (the limit used to be ignored)."""
    router = await router_factory(admission(inflight=1, size=0))
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.first_byte_delay = 0.4
    async def busy() -> bool:
        return len(a.inference_requests) == 1

    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(timed_post(s, router.url + URL))
        await wait_for(busy, 5)
        async with s.post(router.url + URL, json=CHAT) as r:
            body = await r.json()
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert body["error"]["code"] == "queue_full"
        assert (await first)[0] == 200
    assert len(a.inference_requests) == 1
