"""Black-box acceptance tests: cache-aware and metrics policies through HTTP, health checking,
the admin endpoints, ``/metrics`` and the ``[stats]`` line (docs/fastdeploy.md#http-api, #policies,
#health-checking, #metrics).

Every test runs a real ``python -m kvrouter`` process (tests/harness.py) and simulated
FastDeploy instances (kvrouter.sim) on 127.0.0.1. "Slow requests in flight" are made with the
simulator's ``first_byte_delay`` knob (headers at once, body after the delay): the knob is set
while the slow request is dispatched and cleared as soon as the router counts it in flight.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
from aiohttp import web
from harness import (Fleet, RouterProcess, bounded, get_json, metrics_text, number, post_json,
                     registered, sample, samples, wait_for)

from kvrouter.sim.instance import SimInstance

CHAT_PATH = "/v1/chat/completions"
EMPTY = {"mixed": 0, "prefill": 0, "decode": 0}


# --- helpers -------------------------------------------------------------------------------------


async def register(router: RouterProcess, inst: SimInstance, **override) -> None:
    status, body, _ = await post_json(router.url + "/register",
                                      dict(inst.registration_payload(), **override))
    assert status == 200, body


def record(reg: dict, url: str) -> dict | None:
    for key in ("mixed", "prefill", "decode", "unavailable"):
        for w in reg[key]:
            if w["url"] == url:
                return dict(w, _list=key)
    return None


async def in_flight(router: RouterProcess) -> dict[str, int]:
    reg = await registered(router)
    return {w["url"]: w["in_flight_requests"]
            for key in ("mixed", "prefill", "decode", "unavailable") for w in reg[key]}


def chat(*messages: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages], "max_tokens": 2,
            **extra}


async def send(router: RouterProcess, body: dict, path: str = CHAT_PATH) -> tuple[int, object, dict]:
    return await post_json(router.url + path, body)


async def chosen(router: RouterProcess, body: dict, header: str = "X-Router-Mixed-URL") -> str:
    status, resp, headers = await send(router, body)
    assert status == 200, resp
    return headers[header]


async def hold(fleet: Fleet, router: RouterProcess, inst: SimInstance, body: dict,
               expect_in_flight: int, delay: float = 2.0) -> asyncio.Task:
    """Start a request that the router dispatches to ``inst`` and that stays in flight for
    ``delay`` s (first body byte delayed); returns once the router counts it."""
    before = len(inst.inference_requests)
    inst.knobs.first_byte_delay = delay
    task = fleet.spawn(send(router, body))

    async def counted() -> bool:
        return (await in_flight(router)).get(inst.url) == expect_in_flight

    try:
        await wait_for(counted, timeout=5)
        # the instance has read the knob once it recorded the request (no await in between)
        await wait_for(lambda: _true(len(inst.inference_requests) > before), timeout=2,
                       interval=0.005)
    finally:
        inst.knobs.first_byte_delay = 0.0
    return task


async def _true(value: bool) -> bool:
    return value


# --- load-balance-weight 0 is honoured (PD, cache_aware prefill) ----------------------------------


@bounded(25)
async def test_load_balance_weight_zero(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"prefill-policy": "cache_aware", "cache-block-size": 4,
                                          "load-balance-weight": 0}}, "--splitwise")
    p1, p2 = await fleet.sims_sorted(2, role="prefill")
    d = await fleet.sim(role="decode")
    for inst in (p1, p2, d):
        await register(r, inst)
    x = chat(("user", "the quick brown fox jumps over the lazy dog, twice over"))

    assert await chosen(r, x, "X-Router-Prefill-URL") == p1.url      # idle tie → P1, recorded
    slow = await hold(fleet, r, p1, chat(("user", "an unrelated slow prompt about ducks")), 1,
                      delay=3.0)
    assert (await in_flight(r))[p2.url] == 0
    for _ in range(3):
        # weight 0: P1 score 0 (full hit) vs P2 1. A weight replaced by 1 would tie at 1 and
        # P2's lower in-flight tokens would win.
        assert await chosen(r, x, "X-Router-Prefill-URL") == p1.url
    loads = await in_flight(r)
    assert (loads[p1.url], loads[p2.url]) == (1, 0), "the slow request must still hold P1"
    status, body, _ = await slow
    assert status == 200, body


# --- cache-aware routing, mixed (docs/fastdeploy.md#cache-aware-routing) --------------------------


CACHE_AWARE = {"scheduler": {"policy": "cache_aware", "cache-block-size": 4,
                             "load-balance-weight": 0.05}}


@bounded(25)
async def test_roles_are_part_of_the_key(fleet: Fleet) -> None:
    r = await fleet.router(CACHE_AWARE)
    p1, p2 = await fleet.sims_sorted(2)
    for inst in (p1, p2):
        await register(r, inst)
    text = "Tell me a story about a brave little toaster and its friends"
    x = chat(("user", text))
    x_system = chat(("system", text))

    assert await chosen(r, x) == p1.url
    slow = await hold(fleet, r, p1, chat(("user", "something else entirely, slowly please")), 1)
    assert (await in_flight(r))[p2.url] == 0
    assert await chosen(r, x) == p1.url, "full hit on P1 beats P2 at load 1 vs 0"
    assert await chosen(r, x_system) == p2.url, "a different role must not hit X's prefix"
    loads = await in_flight(r)
    assert (loads[p1.url], loads[p2.url]) == (1, 0), "the slow request must still hold P1"
    status, body, _ = await slow
    assert status == 200, body


@bounded(25)
async def test_fallback_records_and_partial_hits(fleet: Fleet) -> None:
    r = await fleet.router(CACHE_AWARE)
    p1, p2 = await fleet.sims_sorted(2)
    for inst in (p1, p2):
        await register(r, inst)
    u = "Here is a long shared system-ish preamble that both conversations start with."
    conv_a = chat(("user", u), ("assistant", "answer a, short"), ("user", "follow-up x"))
    conv_b = chat(("user", u), ("assistant", "reply b differs"), ("user", "question y"))
    slow_body = chat(("user", "unrelated slow request number one"))

    assert await chosen(r, conv_a) == p1.url
    slow1 = await hold(fleet, r, p1, slow_body, 1)
    slow2 = await hold(fleet, r, p1, slow_body, 2)   # hits slow1's prefix → P1 again
    loads = await in_flight(r)
    assert (loads[p1.url], loads[p2.url]) == (2, 0)

    assert await chosen(r, conv_b) == p2.url, "imbalance (2 vs 0) falls back to min tokens"
    text = await metrics_text(r)
    assert sample(text, "kvrouter_selections_total", url=p2.url,
                  strategy="imbalance_fallback") == 1
    for task in (slow1, slow2):
        status, body, _ = await task
        assert status == 200, body

    async def idle() -> bool:
        return all(v == 0 for v in (await in_flight(r)).values())

    await wait_for(idle, timeout=5)
    assert await chosen(r, conv_b) == p2.url, "B was recorded on P2 by the fallback decision"
    assert await chosen(r, conv_a) == p1.url
    text = await metrics_text(r)
    assert sample(text, "kvrouter_selections_total", url=p2.url,
                  strategy="cache_aware_scoring") >= 1
    # shorter than one block (4 code points): no hashes, still served
    status, body, _ = await send(r, {"prompt": "ab", "max_tokens": 1}, "/v1/completions")
    assert status == 200, body


# --- a failing remote tokenizer never fails a request (docs/fastdeploy.md#cache-aware-routing) ---


@bounded(20)
async def test_tokenizer_failure_is_tolerated(fleet: Fleet) -> None:
    seen: list[tuple[str, object]] = []

    async def tokenize(request: web.Request) -> web.Response:
        seen.append((request.path, json.loads(await request.read())))
        return web.json_response({"error": "boom"}, status=500)

    app = web.Application()
    app.router.add_post("/{tail:.*}", tokenize)
    tok_url = await fleet.fake(app)
    r = await fleet.router({"scheduler": {"policy": "cache_aware", "cache-block-size": 4,
                                          "tokenizer-url": tok_url}})   # empty path → /tokenize
    inst = await fleet.sim()
    await register(r, inst)
    for content in ("hello tokenizer world", "second request"):
        status, body, _ = await send(r, chat(("user", content)))
        assert status == 200, body
    assert len(seen) == 2, seen
    for (path, payload), content in zip(seen, ("hello tokenizer world", "second request")):
        assert path == "/tokenize"
        rendered = f"user:{content}\n"
        assert payload == {"text": rendered, "prompt": rendered, "message": rendered}


# --- fd_remote_metrics_score (docs/fastdeploy.md#policies) ----------------------------------------


@bounded(30)
async def test_remote_metrics_score(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"policy": "fd_remote_metrics_score",
                                          "metrics-scrape-interval-secs": 1,
                                          "metrics-scrape-timeout-secs": 1}})
    a, b = await fleet.sims_sorted(2)
    running, waiting = "fastdeploy:num_requests_running", "fastdeploy:num_requests_waiting"
    a.knobs.metrics_override = {running: 10, waiting: 5}
    b.knobs.metrics_override = {running: 2, waiting: 1}
    for inst in (a, b):
        await register(r, inst)

    async def scrapes(inst: SimInstance, result: str = "success") -> float:
        return sample(await metrics_text(r), "kvrouter_metrics_scrape_total",
                      url=inst.url, result=result)

    async def both_scraped() -> bool:
        return await scrapes(a) >= 1 and await scrapes(b) >= 1

    await wait_for(both_scraped, timeout=5)
    for _ in range(4):
        assert await chosen(r, chat(("user", "hi"))) == b.url   # 15 vs 3
    assert a.inference_requests == []

    # A's /metrics hangs: decisions read snapshots only
    a.knobs.metrics_delay = 5.0
    seen = len(a.requests_to("/metrics"))
    await wait_for(lambda: _true(len(a.requests_to("/metrics")) > seen), timeout=3)

    async def timed_requests() -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                t0 = time.perf_counter()
                async with s.post(r.url + CHAT_PATH, json=chat(("user", "quick"))) as resp:
                    await resp.read()
                elapsed = time.perf_counter() - t0
                assert resp.status == 200
                assert elapsed < 0.2, f"request took {elapsed:.3f}s while /metrics hangs"

    await timed_requests()                         # while A's scrape is hanging
    failed = await scrapes(a, "failure")
    await wait_for(lambda: _gt(scrapes(a, "failure"), failed), timeout=4)
    await timed_requests()                         # after the scrape timed out

    # both report 0: 4 concurrent slow requests must split 2/2 (pending adjustment)
    a.knobs.metrics_delay = 0.0
    a.knobs.metrics_override = {running: 0, waiting: 0}
    b.knobs.metrics_override = {running: 0, waiting: 0}
    base_a, base_b = await scrapes(a), await scrapes(b)
    await wait_for(lambda: _both_grew(scrapes, a, b, base_a + 2, base_b + 2), timeout=6)
    before = {s.url: len(s.inference_requests) for s in (a, b)}
    # fire right after a scrape so the 4 requests land within one scrape interval
    mark = await scrapes(a)
    await wait_for(lambda: _gt(scrapes(a), mark), timeout=3, interval=0.01)
    for inst in (a, b):
        inst.knobs.first_byte_delay = 1.0
    try:
        tasks = [fleet.spawn(send(r, chat(("user", f"slow {i}")))) for i in range(4)]

        async def all_arrived() -> bool:
            return sum(len(s.inference_requests) - before[s.url] for s in (a, b)) == 4

        await wait_for(all_arrived, timeout=3)
    finally:
        for inst in (a, b):
            inst.knobs.first_byte_delay = 0.0
    split = sorted(len(s.inference_requests) - before[s.url] for s in (a, b))
    assert split == [2, 2], split
    for t in tasks:
        status, body, _ = await t
        assert status == 200, body


async def _gt(value_coro, than: float) -> bool:
    return (await value_coro) > than


async def _both_grew(scrapes, a, b, want_a: float, want_b: float) -> bool:
    return await scrapes(a) >= want_a and await scrapes(b) >= want_b


# --- the prefix index is capped (docs/fastdeploy.md#cache-aware-routing) --------------------------


@bounded(40)
async def test_prefix_index_capacity(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"policy": "cache_aware", "cache-block-size": 4,
                                          "cache-max-blocks": 1000}})
    inst = await fleet.sim(time_scale=0.0)
    await register(r, inst)
    filler = "lorem ipsum dolor sit amet consectetur"
    sem = asyncio.Semaphore(32)
    statuses: list[int] = []

    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            body = {"prompt": f"{i:05d} {filler} {i}", "max_tokens": 1}
            async with sem, s.post(r.url + "/v1/completions", json=body) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(one(i) for i in range(3000)))
    assert statuses.count(200) == 3000
    text = await metrics_text(r)
    size = sample(text, "kvrouter_prefix_index_blocks")
    assert 0 < size <= 1000, size
    assert size >= 900, f"index should be near its cap after 3000 prompts, got {size}"
    assert sample(text, "kvrouter_prefix_evictions_total", reason="capacity") > 0


# --- thresholds count rounds; in-flight streams survive (docs/fastdeploy.md#health-checking) ---


@bounded(30)
async def test_failure_and_success_thresholds(fleet: Fleet) -> None:
    r = await fleet.router({"manager": {"health-check-interval-secs": 1,
                                        "health-failure-threshold": 3,
                                        "health-success-threshold": 2}})
    inst = await fleet.sim()
    await register(r, inst)

    async def health_counts() -> tuple[float, float, str]:
        text = await metrics_text(r)
        fails = sample(text, "kvrouter_health_checks_total", url=inst.url, result="failure")
        oks = sample(text, "kvrouter_health_checks_total", url=inst.url, result="success")
        state = next((s for s in ("healthy", "unhealthy", "paused")
                      if sample(text, "kvrouter_instance_state", url=inst.url,
                                state=s) == 1), "?")
        return fails, oks, state

    # a long stream (ca. 4.5 s) that is in flight while the instance goes unhealthy
    inst.knobs.itl = 0.045
    stream_body = chat(("user", "stream please"), stream=True, ignore_eos=True)
    stream_body["max_tokens"] = 100

    async def read_stream() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.post(r.url + CHAT_PATH, json=stream_body) as rs:
            return rs.status, await rs.read()

    inst.knobs.health_status = 500
    stream = fleet.spawn(read_stream())
    await wait_for(lambda: _true(len(inst.inference_requests) == 1), timeout=3)
    inst.knobs.itl = None

    seen_two_routable = False
    while True:
        fails, _, state = await health_counts()
        if fails < 3:
            assert state == "healthy", (fails, state)
            if fails == 2 and not seen_two_routable:   # round 3 is ~1 s away: check once
                assert (await number(r))["mixed"] == 1
                status, body, _ = await send(r, chat(("user", "still routable")))
                assert status == 200, body
                seen_two_routable = True
        else:
            break
        await asyncio.sleep(0.05)
    assert seen_two_routable
    async def unhealthy() -> bool:
        return (await health_counts())[2] == "unhealthy"
    await wait_for(unhealthy, timeout=1)
    assert (await number(r)) == EMPTY
    rec = record(await registered(r), inst.url)
    assert rec["_list"] == "unavailable" and rec["state"] == "unhealthy"
    assert rec["in_flight_requests"] == 1, "the stream must still be in flight when marked"
    assert not stream.done()
    status, body, _ = await send(r, chat(("user", "nobody home")))
    assert status == 503 and body["error"]["code"] == "no_available_instance"
    assert f"Instance {inst.url} marked unhealthy after 3 consecutive failed health checks" \
        in r.log()

    status, raw = await stream
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n") and b"stream_interrupted" not in raw
    assert raw.count(b"data: ") >= 100, "every token event relayed"

    inst.knobs.health_status = 200
    _, oks0, _ = await health_counts()
    saw_one_success_unroutable = False
    while True:
        _, oks, state = await health_counts()
        if oks - oks0 < 2:
            assert state == "unhealthy", (oks - oks0, state)
            if oks - oks0 == 1:
                saw_one_success_unroutable = True
        else:
            break
        await asyncio.sleep(0.05)
    assert saw_one_success_unroutable
    assert (await number(r))["mixed"] == 1
    assert r.log().count("[POST] /register") == 1, "recovery needs no registration POST"
    assert f"Instance {inst.url} healthy again" in r.log()
    status, body, _ = await send(r, chat(("user", "back again")))
    assert status == 200, body


# --- timed removal of unhealthy instances (docs/fastdeploy.md#health-checking) --------------------


@bounded(20)
async def test_unhealthy_removal(fleet: Fleet) -> None:
    # a remote-metrics policy, so a scrape of the dying instance is in flight when it is removed
    r = await fleet.router({"manager": {"health-check-interval-secs": 1,
                                        "unhealthy-removal-secs": 2},
                            "scheduler": {"policy": "fd_remote_metrics_score",
                                          "metrics-scrape-interval-secs": 1,
                                          "metrics-scrape-timeout-secs": 1}})
    inst = await fleet.sim()
    other = await fleet.sim()
    await register(r, inst)
    await register(r, other)
    inst.knobs.metrics_delay = 5.0     # its scrapes always hang until the 1 s timeout
    inst.knobs.health_status = 500

    async def listed_as(lst: str | None) -> bool:
        rec = record(await registered(r), inst.url)
        return (rec["_list"] if rec else None) == lst

    await wait_for(lambda: listed_as("unavailable"), timeout=3, interval=0.02)
    marked = time.monotonic()
    await wait_for(lambda: listed_as(None), timeout=5, interval=0.02)
    gone = time.monotonic() - marked
    assert 1.5 <= gone <= 3.0, f"removed {gone:.2f}s after being marked unhealthy"
    assert f"Removed unhealthy mixed instance: {inst.url}" in r.log()
    assert (await number(r))["mixed"] == 1

    # wait until a whole scrape round has ended after the removal (the other instance's
    # counter moves twice), then no series may carry the removed instance's label
    async def other_scrapes() -> float:
        return sample(await metrics_text(r), "kvrouter_metrics_scrape_total",
                      url=other.url)

    base = await other_scrapes()
    await wait_for(lambda: _gt(other_scrapes(), base + 1), timeout=5)
    text = await metrics_text(r)
    leftovers = [line for line in text.splitlines() if f'url="{inst.url}"' in line]
    assert leftovers == [], "a removed instance's series must be deleted"

    inst.knobs.health_status = 200
    inst.knobs.metrics_delay = 0.0
    assert await inst.register_once(r.url) == 200
    assert await number(r) == {"mixed": 2, "prefill": 0, "decode": 0}


@bounded(20)
async def test_static_instances_are_never_removed(fleet: Fleet) -> None:
    """With ``unhealthy-removal-secs: 0`` a heartbeat instance goes at its first failed round;
    a register.yaml entry stays, unhealthy, and serves again once it recovers."""
    static, dynamic = await fleet.sim(), await fleet.sim()
    path = fleet.tmp_path / "register.yaml"
    path.write_text(json.dumps({"instances": [{"role": "mixed", "host_ip": "127.0.0.1",
                                               "port": static.port}]}))
    r = await fleet.router({"manager": {"register-path": str(path), "unhealthy-removal-secs": 0,
                                        "health-check-interval-secs": 0.25}})
    await register(r, dynamic)
    for inst in (static, dynamic):
        inst.knobs.health_status = 500

    async def dynamic_gone() -> bool:
        return record(await registered(r), dynamic.url) is None

    await wait_for(dynamic_gone, timeout=5)
    await asyncio.sleep(1.0)                              # four more failed rounds
    rec = record(await registered(r), static.url)
    assert rec is not None and rec["_list"] == "unavailable" and rec["static"], rec
    assert f"Removed unhealthy mixed instance: {dynamic.url}" in r.log()
    assert f"Removed unhealthy mixed instance: {static.url}" not in r.log()

    static.knobs.health_status = 200
    await wait_for(lambda: _equals(number(r), {**EMPTY, "mixed": 1}), timeout=5)
    assert await chosen(r, chat(("user", "back"))) == static.url


async def _equals(value_coro, expected: object) -> bool:
    return (await value_coro) == expected


@bounded(25)
async def test_a_removed_instance_leaves_no_metrics_state(fleet: Fleet) -> None:
    """The scraper forgets an instance with its removal: registered again, it is new (no
    "fresh again" for metrics that were stale before it was removed)."""
    r = await fleet.router({"manager": {"health-check-interval-secs": 0.25,
                                        "unhealthy-removal-secs": 0},
                            "scheduler": {"policy": "fd_remote_metrics_score",
                                          "metrics-scrape-interval-secs": 0.2,
                                          "metrics-scrape-timeout-secs": 0.2}})
    inst = await fleet.sim()
    await register(r, inst)

    async def scrapes() -> float:
        return sample(await metrics_text(r), "kvrouter_metrics_scrape_total", url=inst.url,
                      result="success")

    await wait_for(lambda: _gt(scrapes(), 0), timeout=5)
    inst.knobs.metrics_delay = 5.0                      # every scrape times out: stale
    await wait_for(lambda: _true(f"metrics snapshot of {inst.url} is stale" in r.log()),
                   timeout=5)
    inst.knobs.health_status = 500                      # removed at the next round

    async def gone() -> bool:
        return record(await registered(r), inst.url) is None

    await wait_for(gone, timeout=5)
    inst.knobs.health_status = 200
    inst.knobs.metrics_delay = 0.0
    await register(r, inst)
    await wait_for(lambda: _gt(scrapes(), 1), timeout=5)   # its series restarted at removal
    assert f"metrics of {inst.url} fresh again" not in r.log()


# --- /health_generate (docs/fastdeploy.md#http-api) -----------------------------------------------


@bounded(20)
async def test_health_generate_is_observational(fleet: Fleet) -> None:
    r = await fleet.router()
    ok, sick, gone = await fleet.sims_sorted(3)
    for inst in (ok, sick, gone):
        await register(r, inst)
    sick.knobs.health_status = 500
    await gone.close_port()

    status, body = await get_json(r.url + "/health_generate")
    assert status == 200
    assert body["code"] == 200 and body["msg"] == "Health check complete"
    rows = {row["url"]: row for row in body["results"]}
    assert set(rows) == {ok.url, sick.url, gone.url}
    assert rows[ok.url]["healthy"] is True and rows[ok.url]["status_code"] == 200
    assert rows[sick.url]["healthy"] is False and rows[sick.url]["status_code"] == 500
    assert rows[gone.url]["healthy"] is False and rows[gone.url]["status_code"] is None
    assert rows[gone.url]["error"]
    for row in rows.values():
        assert row["worker_type"] == "mixed"
        assert isinstance(row["latency_ms"], float)
    assert (body["healthy"], body["unhealthy"]) == (1, 2)
    # observational: nothing changed
    assert await number(r) == {"mixed": 3, "prefill": 0, "decode": 0}
    assert all(w["state"] == "healthy" for w in (await registered(r))["mixed"])


# --- /health and an empty /registered (docs/fastdeploy.md#http-api) -------------------------------


@bounded(20)
async def test_health_and_empty_registered(fleet: Fleet) -> None:
    r = await fleet.router()
    status, body = await get_json(r.url + "/health")
    assert status == 200
    assert body == {"status": "ok", "mode": "mixed", "routable": EMPTY, "ready": False}
    status, body = await get_json(r.url + "/registered")
    assert status == 200
    assert body == {"code": 200, "msg": "success", "prefill": [], "decode": [], "mixed": [],
                    "unavailable": []}
    inst = await fleet.sim()
    await register(r, inst)
    _, body = await get_json(r.url + "/health")
    assert body["ready"] is True and body["routable"] == {"mixed": 1, "prefill": 0, "decode": 0}

    pd = await fleet.router({}, "--splitwise")
    _, body = await get_json(pd.url + "/health")
    assert body["mode"] == "splitwise" and body["ready"] is False
    await register(pd, await fleet.sim(role="prefill"))
    _, body = await get_json(pd.url + "/health")
    assert body["ready"] is False, "PD needs a prefill and a decode"
    await register(pd, await fleet.sim(role="decode"))
    _, body = await get_json(pd.url + "/health")
    assert body["ready"] is True


# --- /v1/models (docs/fastdeploy.md#http-api) ---------------------------------------------------


@bounded(20)
async def test_models_union(fleet: Fleet) -> None:
    r = await fleet.router()
    status, body = await get_json(r.url + "/v1/models")
    assert (status, body) == (200, {"object": "list", "data": []})
    paused = await fleet.sim(served_model_name="m2")
    await register(r, paused, is_paused=True)          # not routable: its cards are not listed
    for _ in range(2):
        await register(r, await fleet.sim(served_model_name="m1"))

    async def ids() -> list[str]:
        _, b = await get_json(r.url + "/v1/models")
        assert b["object"] == "list"
        return [m["id"] for m in b["data"]]

    await wait_for(ids, timeout=5)
    await asyncio.sleep(0.2)   # let every instance's cards land
    _, body = await get_json(r.url + "/v1/models")
    assert [m["id"] for m in body["data"]] == ["m1"], body
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "FastDeploy"
    assert card["max_model_len"] == 8192 and card["root"] == "m1"

    await register(r, paused, is_paused=False)          # routable again → listed

    async def both() -> bool:
        return sorted(await ids()) == ["m1", "m2"]

    await wait_for(both, timeout=5)


# --- /decode_instances (docs/fastdeploy.md#http-api) ----------------------------------------------


@bounded(20)
async def test_decode_instances(fleet: Fleet) -> None:
    r = await fleet.router({}, "--splitwise")
    d_v2a = await fleet.sim(role="decode", version="v2", rdma_ports=[7100, 7101])
    d_v1 = await fleet.sim(role="decode", version="v1")
    d_v2b = await fleet.sim(role="decode", version="v2")
    p_v2 = await fleet.sim(role="prefill", version="v2")
    for inst in (d_v2a, d_v1, d_v2b, p_v2):
        await register(r, inst)

    status, body = await get_json(r.url + "/decode_instances?version=v2")
    assert status == 200 and isinstance(body, list)
    assert sorted(d["port"] for d in body) == sorted(str(d.port) for d in (d_v2a, d_v2b))
    for rec in body:
        assert rec["role"] == "DECODE" and rec["version"] == "v2"
        assert rec["host_ip"] == "127.0.0.1"
        assert rec["transfer_protocol"] == ["ipc", "rdma"]
        assert isinstance(rec["rdma_ports"], list)
    first = next(d for d in body if d["port"] == str(d_v2a.port))
    assert first["rdma_ports"] == ["7100", "7101"]
    assert first["connector_port"] == str(d_v2a.connector_port)

    _, body = await get_json(r.url + "/decode_instances")
    assert len(body) == 3
    _, body = await get_json(r.url + "/decode_instances?version=v9")
    assert body == []

    mixed = await fleet.router()
    await register(mixed, await fleet.sim())
    status, body = await get_json(mixed.url + "/decode_instances?version=v2")
    assert (status, body) == (200, [])


# --- /v1/abort_requests fan-out (docs/fastdeploy.md#http-api) -------------------------------------


@bounded(20)
async def test_abort_fan_out(fleet: Fleet) -> None:
    broken_seen: list[bytes] = []

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def abort(request: web.Request) -> web.Response:
        broken_seen.append(await request.read())
        return web.json_response({"detail": "abort exploded"}, status=500)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/abort_requests", abort)
    broken_url = await fleet.fake(app)
    r = await fleet.router()
    a = await fleet.sim()
    paused = await fleet.sim()
    await register(r, a)
    await register(r, paused, is_paused=True)
    port = int(broken_url.rsplit(":", 1)[1])
    status, body, _ = await post_json(r.url + "/register", {"role": "mixed", "host_ip": "127.0.0.1",
                                                            "port": port})
    assert status == 200, body

    raw = b'{"req_ids":["a"]}'
    status, body, headers = await post_json(
        r.url + "/v1/abort_requests", data=raw,
        headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    assert body["code"] == 200 and body["msg"] == "success"
    rows = {row["url"]: row for row in body["results"]}
    assert set(rows) == {a.url, paused.url, broken_url}
    for inst in (a, paused):
        got = inst.requests_to("/v1/abort_requests")
        assert len(got) == 1 and got[0].body == raw
        assert got[0].headers.get("Authorization") == "Bearer k"
        assert rows[inst.url]["status_code"] == 200
        assert rows[inst.url]["body"]["not_found"] == ["a"]
        assert rows[inst.url]["worker_type"] == "mixed"
    assert broken_seen == [raw]
    assert rows[broken_url]["status_code"] == 500
    assert rows[broken_url]["body"] == {"detail": "abort exploded"}

    for bad in (b"{}", b'{"req_ids":[]}', b"[1]", b"nope"):
        status, body, headers = await post_json(r.url + "/v1/abort_requests", data=bad)
        assert status == 400, (bad, body)
        assert headers["Content-Type"].startswith("application/json")
        assert "error" in body
    assert len(a.requests_to("/v1/abort_requests")) == 1


# --- 404 / 405 (docs/fastdeploy.md#http-api) ------------------------------------------------------


@bounded(20)
async def test_not_found_and_method_not_allowed(fleet: Fleet) -> None:
    r = await fleet.router()
    async with aiohttp.ClientSession() as s:
        for method, path, want in (("GET", "/nope", 404), ("GET", CHAT_PATH, 405),
                                   ("DELETE", "/register", 405)):
            async with s.request(method, r.url + path) as resp:
                assert resp.status == want, (method, path)
                assert resp.headers["Content-Type"].startswith("application/json")
                body = await resp.json()
                assert isinstance(body["error"]["message"], str) and body["error"]["message"]
                assert "type" in body["error"] and "code" in body["error"]


# --- the [stats] line (docs/fastdeploy.md#logs) ---------------------------------------------------


STATS_RE = re.compile(
    r"\[stats\] total_running=(\d+), workers: \[(.*)\], "
    r"cache_hit_rate=(\d+\.\d\d)% \(hits=(\d+)/total=(\d+)\), prefix_hit_rate=(\d+\.\d\d)%, "
    r"measured_hit_rate=(\d+\.\d\d)%, requests=(\d+)$")
WORKER_RE = re.compile(r"(http://\S+): running=(\d+) prefill_tokens=(\d+) decoding=(\d+) "
                       r"state=(healthy|unhealthy|paused)")


def stats_lines(router: RouterProcess) -> list[re.Match]:
    out = []
    for line in router.log().splitlines():
        if "[stats]" in line:
            m = STATS_RE.search(line)
            assert m, f"malformed stats line: {line!r}"
            out.append(m)
    return out


@bounded(25)
async def test_stats_line_format(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"stats-interval-secs": 1, "policy": "cache_aware",
                                          "cache-block-size": 4}})
    a, b = await fleet.sims_sorted(2)
    await register(r, a)
    await register(r, b, is_paused=True)

    n0 = len(stats_lines(r))
    await wait_for(lambda: _true(len(stats_lines(r)) > n0), timeout=3, interval=0.02)
    # right after a line: both session requests land in the same interval
    body = chat(("user", "a prompt that spans several blocks"), session_id="s-1")
    for _ in range(2):
        status, resp, _ = await send(r, body)
        assert status == 200, resp
    n1 = len(stats_lines(r))
    await wait_for(lambda: _true(len(stats_lines(r)) > n1 + 1), timeout=4, interval=0.02)
    lines = stats_lines(r)
    busy, after = lines[n1], lines[n1 + 1]

    total_running, workers, rate, hits, total, prefix_rate, measured, ended = busy.groups()
    assert total_running == "0" and ended == "2"
    items = WORKER_RE.findall(workers)
    assert [i[0] for i in items] == [a.url, b.url], "workers sorted by URL"
    assert workers == ", ".join(f"{u}: running={n} prefill_tokens={t} decoding={d} state={s}"
                                for u, n, t, d, s in items)
    assert [i[4] for i in items] == ["healthy", "paused"]
    assert (hits, total, rate) == ("1", "2", "50.00")
    assert prefix_rate == "50.00"
    # measured at the instances: cached / prompt tokens from their usage, this interval
    text = await metrics_text(r)
    prompt = sample(text, "kvrouter_backend_prompt_tokens_total")
    cached = sample(text, "kvrouter_backend_cached_tokens_total")
    assert prompt > 0
    assert measured == f"{100.0 * cached / prompt:.2f}"
    # per interval: the next line starts from zero
    assert after.group(4, 5, 3, 6, 7, 8) == ("0", "0", "0.00", "0.00", "0.00", "0")


# --- kvrouter_* families on /metrics (docs/fastdeploy.md#metrics) ---------------------------------


KVROUTER_FAMILIES = {
    "kvrouter_instance_in_flight_requests": "gauge",
    "kvrouter_instance_in_flight_tokens": "gauge",
    "kvrouter_instance_state": "gauge",
    "kvrouter_instances": "gauge",
    "kvrouter_request_ttft_seconds": "histogram",
    "kvrouter_request_duration_seconds": "histogram",
    "kvrouter_schedule_decision_seconds": "histogram",
    "kvrouter_selections_total": "counter",
    "kvrouter_errors_total": "counter",
    "kvrouter_retries_total": "counter",
    "kvrouter_prefix_lookup_blocks_total": "counter",
    "kvrouter_prefix_hit_blocks_total": "counter",
    "kvrouter_prefix_index_blocks": "gauge",
    "kvrouter_prefix_evictions_total": "counter",
    "kvrouter_backend_prompt_tokens_total": "counter",
    "kvrouter_backend_cached_tokens_total": "counter",
    "kvrouter_metrics_scrape_total": "counter",
    "kvrouter_metrics_snapshot_age_seconds": "gauge",
    "kvrouter_health_checks_total": "counter",
}


def declared_types(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


@bounded(25)
async def test_metrics_kvrouter_families(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"policy": "remote_cache_aware", "cache-block-size": 4,
                                          "metrics-scrape-interval-secs": 0.5,
                                          "metrics-scrape-timeout-secs": 0.5},
                            "manager": {"health-check-interval-secs": 0.5}})
    inst = await fleet.sim()
    await register(r, inst)
    body = chat(("user", "count my prompt tokens please"))
    for _ in range(2):
        assert (await send(r, body))[0] == 200
    stream = dict(body, stream=True, stream_options={"include_usage": True})
    status, _, _ = await send(r, stream)
    assert status == 200
    assert (await post_json(r.url + CHAT_PATH, data=b"not json"))[0] == 400

    async def scraped_and_probed() -> bool:
        t = await metrics_text(r)
        return bool(sample(t, "kvrouter_metrics_scrape_total", url=inst.url)
                    and sample(t, "kvrouter_health_checks_total", url=inst.url))

    await wait_for(scraped_and_probed, timeout=5)
    text = await metrics_text(r)
    types = declared_types(text)
    missing = {n: k for n, k in KVROUTER_FAMILIES.items() if types.get(n) != k}
    assert not missing, f"missing or mistyped families: {missing}"

    url = inst.url
    # these series exist (sample() reads a missing one as 0)
    for name, labels in (("kvrouter_instance_in_flight_requests", {"role": "mixed"}),
                         ("kvrouter_instance_in_flight_tokens", {"role": "mixed"}),
                         ("kvrouter_instance_state", {"role": "mixed", "state": "unhealthy"}),
                         ("kvrouter_backend_cached_tokens_total", {}),
                         ("kvrouter_metrics_snapshot_age_seconds", {})):
        assert samples(text, name, url=url, **labels), (name, labels)
    assert sample(text, "kvrouter_instance_in_flight_requests", url=url, role="mixed") == 0
    assert sample(text, "kvrouter_instance_in_flight_tokens", url=url, role="mixed") == 0
    assert sample(text, "kvrouter_instance_state", url=url, role="mixed",
                  state="healthy") == 1
    assert sample(text, "kvrouter_instance_state", url=url, role="mixed",
                  state="unhealthy") == 0
    assert sample(text, "kvrouter_instances", role="mixed", state="healthy") == 1
    assert sample(text, "kvrouter_request_ttft_seconds_count", mode="mixed") >= 1
    assert sample(text, "kvrouter_request_duration_seconds_count", mode="mixed") == 3
    assert sample(text, "kvrouter_schedule_decision_seconds_count", role="mixed",
                  policy="remote_cache_aware") == 3
    assert sample(text, "kvrouter_selections_total", url=url, role="mixed") == 3
    assert sample(text, "kvrouter_errors_total", kind="invalid_request") == 1
    assert sample(text, "kvrouter_prefix_lookup_blocks_total", role="mixed") > 0
    assert sample(text, "kvrouter_prefix_hit_blocks_total", role="mixed") > 0
    assert sample(text, "kvrouter_prefix_index_blocks") > 0
    assert sample(text, "kvrouter_backend_prompt_tokens_total", url=url) > 0
    assert sample(text, "kvrouter_metrics_scrape_total", url=url, result="success") >= 1
    assert sample(text, "kvrouter_health_checks_total", url=url, result="success") >= 1
