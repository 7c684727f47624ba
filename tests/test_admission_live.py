"""The admission queue in a real router process in front of simulated instances: late binding,
429 with Retry-After beyond the queue, priorities, client disconnects, metrics."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from harness import metrics_text, post_json, register_all, sample, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
URL = "/v1/chat/completions"


def admission(inflight: int, size: int, timeout: float = 20.0) -> dict:
    return {"scheduler": {"policy": "request_num", "max-inflight-per-instance": inflight,
                          "queue-size": size, "queue-timeout-secs": timeout}}


async def timed_post(session: aiohttp.ClientSession, url: str, headers: dict | None = None
                     ) -> tuple[int, float, dict]:
    start = time.monotonic()
    async with session.post(url, json=CHAT, headers=headers) as r:
        await r.read()
        return r.status, time.monotonic() - start, dict(r.headers)


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
