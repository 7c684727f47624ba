"""PD (splitwise) inference through a real router process (docs/fastdeploy.md#pd-dispatch)."""

from __future__ import annotations

import asyncio
import re
import uuid

import aiohttp
import orjson
import pytest

from harness import metrics_text, post_json, register_all, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
FLAT_KEYS = {"prefill_ip", "decode_ip", "prefill_connector_port", "decode_connector_port",
             "decode_device_ids", "decode_rdma_ports", "transfer_protocol", "decode_tp_size"}


async def pd_router(router_factory, config: dict | None = None):
    return await router_factory(config or {}, "--splitwise")


async def pd_cluster(router_factory, sims, prefills: int = 1, decodes: int = 1,
                     config: dict | None = None):
    """A PD router with ``prefills`` prefill and ``decodes`` decode instances registered:
    ``(router, prefill instances, decode instances)``."""
    router = await pd_router(router_factory, config)
    ps = await sims(prefills, role="prefill")
    ds = await sims(decodes, role="decode")
    await register_all(router, *ps, *ds)
    return router, ps, ds


async def test_only_prefill_is_503(router_factory, sims):  # docs/fastdeploy.md#errors
    router = await pd_router(router_factory)
    (p,) = await sims(1, role="prefill")
    await register_all(router, p)
    status, body, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 503
    assert body["error"]["message"] == "No available prefill/decode workers"


# docs/fastdeploy.md#pd-dispatch
async def test_bodies_request_id_and_flat_info(router_factory, sims):
    router, (p,), (d,) = await pd_cluster(router_factory, sims)
    status, body, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    (pr,) = p.inference_requests
    (dr,) = d.inference_requests
    assert pr.body == dr.body
    sent = orjson.loads(pr.body)
    rid = sent["request_id"]
    assert str(uuid.UUID(rid)) == rid and uuid.UUID(rid).version == 4
    info = sent["disaggregate_info"]
    assert set(info) == FLAT_KEYS
    assert info["decode_connector_port"] == d.registration_payload()["connector_port"]
    assert isinstance(info["prefill_connector_port"], int)
    assert info["decode_device_ids"] == ["0"] and info["decode_rdma_ports"] == []
    assert headers["X-Router-Prefill-URL"] == p.url
    assert headers["X-Router-Decode-URL"] == d.url
    assert headers["X-Router-Request-ID"] == rid
    # the client gets D's answer (max_tokens tokens), not P's one-token completion
    assert body["id"] == f"chatcmpl-{rid}"
    assert len(body["choices"][0]["message"]["completion_token_ids"]) == 4


# docs/fastdeploy.md#commit-point, stream
async def test_stream_relays_decode(router_factory, sims):
    router, _, _ = await pd_cluster(router_factory, sims)
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions",
                          json={**CHAT, "stream": True}) as r:
            raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    tokens = [e for e in events if b'"completion_token_ids":[' in e]
    assert len(tokens) == 4


# docs/fastdeploy.md#request-ids
async def test_request_id_rules_and_exact_json(router_factory, sims):
    router, (p,), _ = await pd_cluster(router_factory, sims)
    raw = (b'{"messages":[{"role":"user","content":"<b>"}],"max_tokens":2,'
           b'"seed":12345678901234567890,"request_id":"abc"}')
    status, _, _ = await post_json(router.url + "/v1/chat/completions", data=raw)
    assert status == 200
    sent = p.inference_requests[0].body
    assert b'"request_id":"abc"' in sent
    assert b'"seed":12345678901234567890' in sent
    assert b'"content":"<b>"' in sent
    status, body, _ = await post_json(router.url + "/v1/chat/completions",
                                      {**CHAT, "request_id": 123})
    assert status == 400 and body["error"]["message"] == "request_id must be a string"


@pytest.mark.parametrize("p_cfg,d_cfg,proto,tp", [
    ({"device_ids": ["0", "1"]}, {"device_ids": ["0", "1"]}, "ipc", 2),
    ({}, {"advertise_host": "localhost"}, "rdma", 1),
    ({"device_ids": ["0", "1"]}, {"device_ids": ["0"]}, "ipc", 1),
    ({"tp_size": 2}, {"tp_size": 4}, "rdma", 4),
])
async def test_transfer_protocol_choice(router_factory, sims, p_cfg, d_cfg, proto, tp):  # 38
    router = await pd_router(router_factory)
    (p,) = await sims(1, role="prefill", **p_cfg)
    (d,) = await sims(1, role="decode", **d_cfg)
    for inst, cfg in ((p, p_cfg), (d, d_cfg)):
        payload = inst.registration_payload()
        if "tp_size" not in cfg:  # tp(x) then comes from len(device_ids)
            del payload["tp_size"]
        status, _, _ = await post_json(router.url + "/register", payload)
        assert status == 200
    status, _, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    info = orjson.loads(d.inference_requests[0].body)["disaggregate_info"]
    assert info["transfer_protocol"] == proto
    assert info["decode_tp_size"] == tp


async def test_nested_format(router_factory, sims):  # docs/fastdeploy.md#disaggregate_info-formats
    router, _, (d,) = await pd_cluster(
        router_factory, sims, config={"server": {"disaggregate-info-format": "nested"}})
    status, _, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    info = orjson.loads(d.inference_requests[0].body)["disaggregate_info"]
    assert info["prefill"]["role"] == "PREFILL" and info["decode"]["role"] == "DECODE"
    assert info["role"] == "decode"
    assert info["transfer_protocol"] == "ipc"
    assert info["cache_info"]["ipc"]["ip"] == "127.0.0.1"


# docs/fastdeploy.md#commit-point
@pytest.mark.parametrize("stream", [False, True])
async def test_decode_not_held_back_by_prefill_headers(router_factory, sims, stream):
    router, (p,), _ = await pd_cluster(router_factory, sims)
    p.knobs.post_handoff_delay = 2.0
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        started = loop.time()
        async with s.post(router.url + "/v1/chat/completions",
                          json={**CHAT, "stream": stream}) as r:
            assert r.status == 200
            await r.content.readany()
            assert loop.time() - started < 1.0
            await r.read()


# docs/fastdeploy.md#prefill-failures
async def test_prefill_client_error_is_relayed(router_factory, sims):
    router, (p,), (d,) = await pd_cluster(router_factory, sims)
    p.knobs.reply_status = 400
    p.knobs.reply_body = {"error": {"message": "bad max_tokens", "type": "invalid_request_error"}}
    status, body, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 400
    assert body["error"]["message"] == "bad max_tokens"
    assert headers["X-Router-Decode-URL"] == d.url
    await wait_for(lambda: _idle(d), 5)  # the orphaned decode leg was closed


# docs/fastdeploy.md#prefill-failures
async def test_prefill_429_retries_other_prefill(router_factory, sims):
    router, (p1, p2), _ = await pd_cluster(router_factory, sims, prefills=2)
    p1.knobs.reply_status = 429
    p1.knobs.reply_body = {"detail": "Too many requests,current max concurrency is 512"}
    status, _, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["X-Router-Prefill-URL"] == p2.url


# docs/fastdeploy.md#prefill-failures
async def test_prefill_in_body_error_is_502(router_factory, sims):
    router, (p,), _ = await pd_cluster(router_factory, sims)
    p.knobs.reply_status = 200
    p.knobs.reply_body = {"error": {"message": "engine exploded", "type": "internal_error"}}
    status, body, _ = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 502
    assert body["error"]["code"] == "prefill_failed"
    assert "engine exploded" in body["error"]["message"]


# docs/fastdeploy.md#retries-and-timeouts
async def test_decode_connect_failure_retries_other_decode(router_factory, sims):
    router, _, (d1, d2) = await pd_cluster(router_factory, sims, decodes=2)
    await d1.close_port()
    status, _, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["X-Router-Decode-URL"] == d2.url


# docs/fastdeploy.md#commit-point
async def test_client_disconnect_closes_both_legs(router_factory, sims):
    router, _, (d,) = await pd_cluster(router_factory, sims)
    d.knobs.itl = 0.2
    async with aiohttp.ClientSession() as s:
        resp = await s.post(router.url + "/v1/chat/completions",
                            json={**CHAT, "stream": True, "max_tokens": 50})
        await resp.content.readany()
        resp.close()
    await wait_for(lambda: _idle(d), 5)

    async def router_idle():
        text = await metrics_text(router)
        values = re.findall(r"^kvrouter_instance_in_flight_\w+\{[^}]*\} (\S+)$", text, re.M)
        return values and all(float(v) == 0 for v in values)

    await wait_for(router_idle, 5)


# docs/fastdeploy.md#prefill-failures
async def test_prefill_reset_retries_other_prefill(router_factory, sims):
    router, (p1, p2), (d,) = await pd_cluster(router_factory, sims, prefills=2)
    p1.knobs.reset_before_response = True
    status, body, headers = await post_json(router.url + "/v1/chat/completions",
                                            {**CHAT, "request_id": "r42"})
    assert status == 200, body
    assert headers["X-Router-Prefill-URL"] == p2.url
    assert headers["X-Router-Request-ID"] == "r42-retry1"
    assert orjson.loads(p2.inference_requests[0].body)["request_id"] == "r42-retry1"
    assert [orjson.loads(r.body)["request_id"] for r in d.inference_requests] == \
        ["r42", "r42-retry1"]
    await wait_for(lambda: _idle(d), 5)


async def _idle(inst) -> bool:
    g = inst.gauges()
    return g.get("fastdeploy:num_requests_running", 0) == 0 and \
        g.get("fastdeploy:num_requests_waiting", 0) == 0


# docs/fastdeploy.md#prefill-failures
async def test_prefill_reset_with_one_prefill_is_502(router_factory, sims):
    router, (p,), (d,) = await pd_cluster(router_factory, sims)
    p.knobs.reset_before_response = True
    status, body, headers = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert status == 502
    assert body["error"]["code"] == "backend_connection_error"
    assert headers["X-Router-Prefill-URL"] == p.url
    assert len(d.inference_requests) == 1
    await wait_for(lambda: _idle(d), 5)  # D saw the disconnect and dropped the request
    assert d.handoffs.waiting() == 0


# docs/fastdeploy.md#in-flight-accounting
async def test_prefill_load_released_at_first_byte(router_factory, sims):
    router, (p1, p2), (d,) = await pd_cluster(
        router_factory, sims, prefills=2,
        config={"scheduler": {"prefill-policy": "process_tokens"}})
    p1.knobs.first_byte_delay = 1.0
    d.knobs.handoff_timeout = 5
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(s.post(router.url + "/v1/chat/completions", json=CHAT))
        await wait_for(lambda: _count(p1, 1), 5)
        _, _, h2 = await post_json(router.url + "/v1/chat/completions", CHAT)
        assert h2["X-Router-Prefill-URL"] == p2.url
        r1 = await first
        assert r1.headers["X-Router-Prefill-URL"] == p1.url
        await r1.read()
    p1.knobs.first_byte_delay = 0
    _, _, h3 = await post_json(router.url + "/v1/chat/completions", CHAT)
    assert h3["X-Router-Prefill-URL"] == p1.url


async def _count(inst, n: int) -> bool:
    return len(inst.inference_requests) >= n


# docs/fastdeploy.md#reschedule-retries
async def test_pd_reschedule_retries_non_stream(router_factory, sims):
    router, _, (d1, d2) = await pd_cluster(router_factory, sims, decodes=2)
    d1.knobs.pd_reschedule_on = {1}
    status, body, headers = await post_json(router.url + "/v1/chat/completions",
                                            {**CHAT, "request_id": "r44"})
    assert status == 200
    assert body["choices"][0]["finish_reason"] != "pd_reschedule"
    assert headers["X-Router-Decode-URL"] == d2.url
    assert headers["X-Router-Request-ID"] == "r44-retry1"
    first = d1.inference_requests[0]
    generated = None
    (retry,) = d2.inference_requests
    sent = orjson.loads(retry.body)
    assert sent["request_id"] == "r44-retry1"
    assert sent["completion_token_ids"] and all(isinstance(t, int)
                                                for t in sent["completion_token_ids"])
    assert orjson.loads(first.body).get("completion_token_ids") is generated


# docs/fastdeploy.md#reschedule-retries
async def test_pd_reschedule_stream_not_retried(router_factory, sims):
    router, _, (d1, d2) = await pd_cluster(router_factory, sims, decodes=2)
    d1.knobs.pd_reschedule_on = {1}
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions",
                          json={**CHAT, "stream": True}) as r:
            raw = await r.read()
    assert b"pd_reschedule" in raw
    assert len(d1.inference_requests) + len(d2.inference_requests) == 1


async def test_pd_metrics_and_counters_settle(router_factory, sims):
    router, (p,), (d,) = await pd_cluster(router_factory, sims)
    results = await asyncio.gather(*(post_json(router.url + "/v1/chat/completions",
                                               {**CHAT, "stream": i % 2 == 0})
                                     for i in range(20)))
    assert all(r[0] == 200 for r in results)
    text = await metrics_text(router)
    line = (f'inference_requests_total{{decode_worker="{d.url}",mixed_worker="",'
            f'prefill_worker="{p.url}",status_code="200"}} 20')
    assert line in text
    values = re.findall(r"^kvrouter_instance_in_flight_\w+\{[^}]*\} (\S+)$", text, re.M)
    assert values and all(float(v) == 0 for v in values)
