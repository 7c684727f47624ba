"""Mixed-mode inference through a real router process (docs/fastdeploy.md#mixed-dispatch)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from harness import metrics_text, post_json, register_all, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


async def in_flight(router) -> float:
    text = await metrics_text(router)
    values = re.findall(r"^kvrouter_instance_in_flight_(?:requests|tokens)\{[^}]*\} (\S+)$",
                        text, re.M)
    return sum(float(v) for v in values)


async def test_invalid_json_is_400_json(router_factory, sims):  # docs/fastdeploy.md#errors
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    status, body, headers = await post_json(router.url + "/v1/chat/completions", data=b"not json")
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert "Invalid JSON format" in body["error"]["message"]
    status, body, _ = await post_json(router.url + "/v1/chat/completions", data=b"[1, 2]")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert a.inference_requests == []


async def test_no_instance_is_503(router_factory):  # docs/fastdeploy.md#errors
    router = await router_factory()
    status, body, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 503
    assert body["error"]["code"] == "no_available_instance"
    assert body["error"]["message"] == "No available mixed workers"


# docs/fastdeploy.md#mixed-dispatch
async def test_body_headers_and_path_pass_through_byte_exact(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    reply = b'{"id":"x","choices":[{"text":"\\u00e9 <b>"}],  "n": 12345678901234567890}'
    a.knobs.reply_status, a.knobs.reply_body = 200, reply
    sent = b'{"prompt":  "hi <b>",\n "max_tokens": 3, "seed": 12345678901234567890}'
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/completions?x=1", data=sent,
                          headers={"X-Test": "1", "Content-Type": "application/json"}) as r:
            got = await r.read()
            assert r.status == 200
            assert r.headers["X-Router-Mixed-URL"] == a.url
    assert got == reply
    (req,) = a.inference_requests
    assert req.path == "/v1/completions" and req.query == "x=1"
    assert req.body == sent
    assert req.headers["X-Test"] == "1"


# docs/fastdeploy.md#mixed-dispatch
@pytest.mark.parametrize("status", [400, 429, 500])
async def test_backend_error_status_is_not_masked(router_factory, sims, status):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.reply_status = status
    a.knobs.reply_body = {"error": {"message": "nope", "type": "invalid_request_error"}}
    got, body, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert got == status
    assert body == {"error": {"message": "nope", "type": "invalid_request_error"}}


async def test_sse_relayed_byte_for_byte(router_factory, sims):  # docs/fastdeploy.md#relay
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    script = [b'data: {"i":0} \n\n', b'data: {"i":1}\r\n\r\n', b"data: {\"i\":", b'2}\n\n',
              b"data: [DONE]\n\n"]
    a.knobs.sse_script = script
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            got = await r.read()
    assert got == b"".join(script)


async def test_real_stream_from_simulator(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions", json=body) as r:
            raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events[0].endswith(b"} ")  # FastDeploy's first-event quirk survives
    usage = orjson.loads(events[-2][len(b"data: "):])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4


# docs/fastdeploy.md#retries-and-timeouts
async def test_connect_failure_retries_elsewhere_and_probes(router_factory, sims):
    router = await router_factory()
    a, b = await sims(2)
    await register_all(router, a, b)
    await a.close_port()  # still registered and healthy in the router
    status, body, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["X-Router-Mixed-URL"] == b.url
    assert len(b.inference_requests) == 1

    async def a_probed():
        text = await metrics_text(router)
        return f'kvrouter_health_checks_total{{result="failure",url="{a.url}"}}' in text

    await wait_for(a_probed, 5)


# docs/fastdeploy.md#retries-and-timeouts
async def test_connect_failure_with_no_alternative_is_502(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    await a.close_port()
    status, body, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 502
    assert "Failed to connect to backend service" in body["error"]["message"]
    assert body["error"]["code"] == "backend_connection_error"
    assert headers["X-Router-Mixed-URL"] == a.url


# docs/fastdeploy.md#relay
async def test_mid_stream_reset_appends_error_event(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.drop_after_events = 3
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions",
                          json={**CHAT, "stream": True, "max_tokens": 10}) as r:
            assert r.status == 200
            raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 5, raw
    assert b'"code":"stream_interrupted"' in events[3]
    assert events[4] == b"data: [DONE]"
    assert len(a.inference_requests) == 1  # no retry after bytes were sent


async def test_non_stream_mid_body_reset_is_a_transport_error(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.drop_after_events = 1
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(router.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                await r.read()
    await wait_for(lambda: _zero(router), 5)


async def _zero(router) -> bool:
    return await in_flight(router) == 0


# docs/fastdeploy.md#retries-and-timeouts
async def test_first_byte_timeout_is_504(router_factory, sims):
    router = await router_factory({"server": {"first-byte-timeout-secs": 0.5}})
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.first_byte_delay = 3
    status, body, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 504
    assert body["error"]["code"] == "backend_timeout"
    assert await in_flight(router) == 0


async def test_request_num_balances_in_flight(router_factory, sims):  # docs/fastdeploy.md#policies
    router = await router_factory({"scheduler": {"policy": "request_num"}})
    a, b = await sims(2)
    await register_all(router, a, b)
    a.knobs.first_byte_delay = b.knobs.first_byte_delay = 0.0
    async with aiohttp.ClientSession() as s:
        a.knobs.itl = 0.3  # a slow stream: 4 tokens × 0.3 s
        slow = asyncio.ensure_future(s.post(router.url + "/v1/chat/completions",
                                            json={**CHAT, "stream": True}))
        await wait_for(lambda: _count(a, 1), 5)
        status, _, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
        assert headers["X-Router-Mixed-URL"] == b.url
        resp = await slow
        assert resp.headers["X-Router-Mixed-URL"] == a.url
        await resp.read()
    a.knobs.itl = None
    await wait_for(lambda: _zero(router), 5)
    _, _, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert headers["X-Router-Mixed-URL"] == a.url


async def _count(inst, n: int) -> bool:
    return len(inst.inference_requests) >= n


async def test_round_robin_sorted_order(router_factory, sims):  # docs/fastdeploy.md#policies
    router = await router_factory({"scheduler": {"policy": "round_robin"}})
    insts = await sims(3)
    await register_all(router, *reversed(insts))
    seen = []
    for _ in range(6):
        _, _, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
        seen.append(headers["X-Router-Mixed-URL"])
    urls = [i.url for i in insts]
    assert seen == urls + urls


async def test_inference_metrics(router_factory, sims):  # docs/fastdeploy.md#metrics
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    status, _, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    text = await metrics_text(router)
    line = (f'inference_requests_total{{decode_worker="",mixed_worker="{a.url}",'
            f'prefill_worker="",status_code="200"}} 1')
    assert line in text
    m = re.search(r'^http_requests_total\{endpoint="/v1/chat/completions",method="POST",'
                  r'status_code="200"\} (\S+)$', text, re.M)
    assert m and float(m.group(1)) >= 1
    assert re.search(rf'^kvrouter_backend_prompt_tokens_total\{{url="{re.escape(a.url)}"\}} '
                     r'[1-9]', text, re.M)


async def test_client_disconnect_releases_counters(router_factory, sims):
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.itl = 0.2
    async with aiohttp.ClientSession() as s:
        resp = await s.post(router.url + "/v1/chat/completions",
                            json={**CHAT, "stream": True, "max_tokens": 50})
        await resp.content.readany()
        assert await in_flight(router) > 0
        resp.close()
    await wait_for(lambda: _zero(router), 5)
    await wait_for(lambda: _gauge_zero(a), 5)


async def _gauge_zero(inst) -> bool:
    return inst.gauges().get("fastdeploy:num_requests_running", 1) == 0


async def test_hundreds_of_concurrent_streams(router_factory, sims):
    router = await router_factory({"scheduler": {"policy": "request_num"}})
    insts = await sims(2, max_num_seqs=256, time_scale=0.01)
    await register_all(router, *insts)
    n = 300
    body = {**CHAT, "stream": True, "max_tokens": 8}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one(i: int) -> bytes:
            async with s.post(router.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                return await r.read()

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one(i) for i in range(n)))
    assert all(r.endswith(b"data: [DONE]\n\n") for r in results)
    assert all(r.count(b"\n\n") == 1 + 8 + 1 for r in results)
    assert await in_flight(router) == 0
    served = [len(i.inference_requests) for i in insts]
    assert sum(served) == n and min(served) > n // 4


async def test_openai_client(router_factory, sims):
    openai = pytest.importorskip("openai")
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused")
    try:
        out = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.choices[0].message.content
        chunks = [c async for c in await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == out.choices[0].message.content
    finally:
        await client.close()


# docs/fastdeploy.md#relay, #retries-and-timeouts
async def test_stream_idle_timeout_interrupts(router_factory, sims):
    router = await router_factory({"server": {"stream-idle-timeout-secs": 0.3}})
    (a,) = await sims(1)
    await register_all(router, a)
    a.knobs.itl = 1.0
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions",
                          json={**CHAT, "stream": True}) as r:
            raw = await r.read()
    assert b"upstream stream interrupted" in raw and raw.endswith(b"data: [DONE]\n\n")
    assert 'kvrouter_errors_total{kind="stream_idle_timeout"} 1.0' in await metrics_text(router)
    await wait_for(lambda: _zero(router), 5)


async def test_body_over_limit_is_413(router_factory, sims):  # docs/fastdeploy.md#errors
    router = await router_factory({"server": {"max-body-mb": 0.01}})
    (a,) = await sims(1)
    await register_all(router, a)
    big = {"messages": [{"role": "user", "content": "x" * 20000}]}
    status, body, headers = await post_json(router.url + "/v1/chat/completions", big)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert headers["Content-Type"].startswith("application/json")
    assert a.inference_requests == []
