"""Tests of the simulated FastDeploy instance (kvrouter.sim), over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from harness import Factory
from kvrouter.sim import Knobs, SimConfig, SimInstance
from kvrouter.sim.metrics import COUNTERS, GAUGES, HISTOGRAMS



def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def event_json(event: bytes) -> Any:
    assert event.startswith(b"data: ")
    return orjson.loads(event[len(b"data: "):].strip())


async def metric(client: aiohttp.ClientSession, url: str, name: str) -> float:
    async with client.get(url) as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing"
    return float(m.group(1))


async def wait_for(cond: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond() if asyncio.iscoroutinefunction(cond) else cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# ---------------------------------------------------------------- health / models / metrics
async def test_health_and_ping(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim()
    assert inst.port > 0 and inst.url == f"http://127.0.0.1:{inst.port}"
    async with client.get(inst.url + "/health") as r:
        assert r.status == 200 and await r.read() == b""
    for method in ("GET", "POST"):
        async with client.request(method, inst.url + "/ping") as r:
            assert r.status == 200
    inst.knobs.health_status = 503
    async with client.get(inst.url + "/health") as r:
        assert r.status == 503
    inst.knobs.health_status = 200
    inst.knobs.health_delay = 0.2
    t0 = time.monotonic()
    async with client.get(inst.url + "/health") as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.2
    assert [r.path for r in inst.received].count("/health") == 3


async def test_models(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(served_model_name="m1", max_model_len=4096)
    async with client.get(inst.url + "/v1/models") as r:
        data = await r.json()
    assert data["object"] == "list"
    card = data["data"][0]
    assert card["id"] == "m1" and card["object"] == "model" and card["owned_by"] == "FastDeploy"
    assert card["max_model_len"] == 4096 and card["parent"] is None and "root" in card


async def test_metrics_names_and_format(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(max_num_seqs=4)
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 200
    async with client.get(inst.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    for name in GAUGES:
        assert f"# TYPE {name} gauge" in text
        assert re.search(rf"^{re.escape(name)} -?\d+\.\d+(e-?\d+)?$", text, re.M), name
    for name in COUNTERS:
        assert f"# TYPE {name} counter" in text
    for name in HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text
    assert "fastdeploy:num_requests_running 0.0\n" in text
    assert "fastdeploy:max_batch_size 4.0\n" in text
    assert "fastdeploy:requests_number_total 1.0\n" in text
    assert "fastdeploy:request_success_total 1.0\n" in text
    assert 'fastdeploy:time_to_first_token_seconds_bucket{le="+Inf"} 1.0' in text
    assert "fastdeploy:time_to_first_token_seconds_count 1.0" in text
    assert re.search(r'^http_requests_total\{method="POST",path="/v1/chat/completions",status_code="200"\} 1\.0$',
                     text, re.M)
    # override and delay knobs
    inst.knobs.metrics_override = {"fastdeploy:num_requests_running": 10,
                                   "fastdeploy:num_requests_waiting": None, "custom_metric": 1}
    inst.knobs.metrics_delay = 0.1
    t0 = time.monotonic()
    async with client.get(inst.url + "/metrics") as r:
        text = await r.text()
    assert time.monotonic() - t0 >= 0.1
    assert "fastdeploy:num_requests_running 10.0\n" in text
    assert not re.search(r"^fastdeploy:num_requests_waiting ", text, re.M)
    assert "custom_metric 1.0\n" in text


async def test_metrics_on_separate_port(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(metrics_port=0)
    assert inst.metrics_port and inst.metrics_port != inst.port
    assert inst.registration_payload()["metrics_port"] == inst.metrics_port
    async with client.get(f"http://127.0.0.1:{inst.metrics_port}/metrics") as r:
        assert r.status == 200 and "fastdeploy:num_requests_running" in await r.text()
    async with client.get(inst.url + "/metrics") as r:
        assert r.status == 404


async def test_gauges_under_load(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(max_num_seqs=2, num_gpu_blocks=100, knobs=Knobs(itl=0.01))
    murl = inst.url + "/metrics"
    body = {"prompt": "x" * 1000, "max_tokens": 30, "ignore_eos": True}  # 250 tokens = 4 blocks

    async def one() -> int:
        async with client.post(inst.url + "/v1/completions", json=body) as r:
            await r.read()
            return r.status

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await wait_for(lambda: inst.gauges()["fastdeploy:num_requests_waiting"] == 3)
    assert await metric(client, murl, "fastdeploy:num_requests_running") == 2.0
    assert await metric(client, murl, "fastdeploy:num_requests_waiting") == 3.0
    assert await metric(client, murl, "fastdeploy:batch_size") == 2.0
    assert await metric(client, murl, "fastdeploy:available_batch_size") == 0.0
    free = await metric(client, murl, "fastdeploy:available_gpu_block_num")
    assert free <= 100 - 2 * 4
    assert await metric(client, murl, "fastdeploy:gpu_cache_usage_perc") > 0.0
    assert await asyncio.gather(*tasks) == [200] * 5
    assert await metric(client, murl, "fastdeploy:num_requests_running") == 0.0
    assert await metric(client, murl, "fastdeploy:num_requests_waiting") == 0.0
    assert await metric(client, murl, "fastdeploy:available_gpu_block_num") == 100.0
    assert await metric(client, murl, "fastdeploy:generation_tokens_total") == 150.0
    assert await metric(client, murl, "fastdeploy:prompt_tokens_total") == 1250.0


# ---------------------------------------------------------------- response formats
async def test_non_stream_chat_format(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(output_tokens=5)
    async with client.post(inst.url + "/v1/chat/completions",
                           json=chat_body(request_id="r1", max_tokens=3)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        data = await r.json()
    assert data["id"] == "chatcmpl-r1" and data["object"] == "chat.completion"
    assert data["model"] == "default" and isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    msg = choice["message"]
    for key in ("role", "content", "reasoning_content", "tool_calls", "prompt_token_ids", "completion_token_ids"):
        assert key in msg
    assert msg["content"] == "tok0 tok1 tok2" and msg["completion_token_ids"] == [1000, 1001, 1002]
    u = data["usage"]
    assert u["completion_tokens"] == 3 and u["total_tokens"] == u["prompt_tokens"] + 3
    assert u["prompt_tokens_details"]["cached_tokens"] == 0
    assert "completion_tokens_details" in u
    # natural stop below max_tokens; generated id without request_id
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body(max_tokens=100)) as r:
        data = await r.json()
    assert data["choices"][0]["finish_reason"] == "stop" and data["usage"]["completion_tokens"] == 5
    assert re.fullmatch(r"chatcmpl-[0-9a-f-]{36}", data["id"])


async def test_non_stream_completion_format(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(output_tokens=4)
    async with client.post(inst.url + "/v1/completions",
                           json={"prompt": "abc", "request_id": "c1", "prompt_token_ids": [1, 2, 3, 4, 5]}) as r:
        data = await r.json()
    assert data["id"] == "cmpl-c1" and data["object"] == "text_completion"
    choice = data["choices"][0]
    assert choice["text"] == "tok0 tok1 tok2 tok3" and choice["completion_token_ids"] == [1000, 1001, 1002, 1003]
    assert choice["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 5


async def test_stream_chat_bytes(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim()
    body = chat_body(request_id="s1", stream=True, max_tokens=3, stream_options={"include_usage": True})
    async with client.post(inst.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await r.read()
    assert raw.startswith(b"data: {") and raw.endswith(b"}\n\ndata: [DONE]\n\n")
    events = sse_events(raw)
    assert len(events) == 1 + 3 + 1 + 1
    first_end = raw.index(b"\n\n") + 2
    assert raw[:first_end].endswith(b"} \n\n")      # FastDeploy's extra space
    assert raw.count(b" \n\n") == 1
    role = event_json(events[0])
    assert role["id"] == "chatcmpl-s1" and role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"]["role"] == "assistant" and role["choices"][0]["delta"]["content"] == ""
    assert "finish_reason" not in role["choices"][0]
    contents = [event_json(e) for e in events[1:4]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in contents) == "tok0 tok1 tok2"
    assert [("finish_reason" in c["choices"][0]) for c in contents] == [False, False, True]
    assert contents[-1]["choices"][0]["finish_reason"] == "length"
    assert all("arrival_time" in c["choices"][0] for c in contents)
    usage = event_json(events[4])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert events[5] == b"data: [DONE]"


async def test_stream_completion_without_usage(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(output_tokens=2)
    async with client.post(inst.url + "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
        raw = await r.read()
    events = sse_events(raw)
    assert b" \n\n" not in raw
    assert len(events) == 3 and events[-1] == b"data: [DONE]"
    assert [event_json(e)["choices"][0]["text"] for e in events[:2]] == ["tok0", " tok1"]
    assert event_json(events[1])["choices"][0]["finish_reason"] == "stop"


async def test_errors_429_400_401(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(max_concurrency=1, knobs=Knobs(itl=0.05))
    slow = asyncio.create_task(client.post(inst.url + "/v1/chat/completions",
                                           json=chat_body(max_tokens=10, ignore_eos=True)))
    await wait_for(lambda: inst.in_flight == 1)
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 429
        assert await r.read() == b'{"detail":"Too many requests,current max concurrency is 1"}'
    resp = await slow
    assert resp.status == 200
    await resp.read()
    async with client.post(inst.url + "/v1/chat/completions", data=b"not json") as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with client.post(inst.url + "/v1/chat/completions", json={"messages": []}) as r:
        assert r.status == 400
    keyed = await sim(api_key="sk")
    async with client.post(keyed.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 401 and await r.json() == {"error": "Unauthorized"}
    async with client.post(keyed.url + "/v1/chat/completions", json=chat_body(),
                           headers={"Authorization": "Bearer sk"}) as r:
        assert r.status == 200
    async with client.get(keyed.url + "/health") as r:
        assert r.status == 200


async def test_prefix_cache_cached_tokens(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim()
    prompt = "The quick brown fox jumps over the lazy dog. " * 30  # 1350 chars → 338 tokens
    cached = []
    for _ in range(2):
        async with client.post(inst.url + "/v1/completions", json={"prompt": prompt}) as r:
            cached.append((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 5 * 64]
    # a shared prefix hits its full blocks only
    async with client.post(inst.url + "/v1/completions", json={"prompt": prompt[:700] + "different"}) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * 64
    assert await metric(client, inst.url + "/metrics", "fastdeploy:hit_token_rate") > 0
    assert await metric(client, inst.url + "/metrics", "fastdeploy:prefix_cache_token_num_total") == 7 * 64


# ---------------------------------------------------------------- PD
def flat_info(d: SimInstance, protocol: str = "ipc") -> dict[str, Any]:
    return {"prefill_ip": "127.0.0.1", "decode_ip": "127.0.0.1", "prefill_connector_port": 1,
            "decode_connector_port": d.connector_port, "decode_device_ids": ["0"], "decode_rdma_ports": [],
            "transfer_protocol": protocol, "decode_tp_size": 1}


def nested_info(d: SimInstance, kind: str) -> dict[str, Any]:
    rec = {"role": "DECODE", "host_ip": "127.0.0.1", "port": str(d.port), "connector_port": str(d.connector_port),
           "engine_worker_queue_port": "0", "transfer_protocol": ["ipc", "rdma"], "rdma_ports": [], "device_ids": []}
    cache = ({"ipc": {"ip": "127.0.0.1", "port": "0", "device_ids": []}} if kind == "ipc" else
             {"rdma": {"ip": "127.0.0.1", "port": d.connector_port, "rdma_port": []}})
    return {"prefill": dict(rec, role="PREFILL"), "decode": rec, "role": "decode",
            "transfer_protocol": kind, "cache_info": cache}


@pytest.mark.parametrize("fmt", ["flat", "nested-ipc", "nested-rdma"])
@pytest.mark.parametrize("stream", [False, True])
async def test_pd_handoff(sim: Factory, client: aiohttp.ClientSession, fmt: str, stream: bool) -> None:
    p = await sim(role="prefill")
    d = await sim(role="decode")
    assert d.connector_port and p.registration_payload()["role"] == "prefill"
    info = flat_info(d) if fmt == "flat" else nested_info(d, fmt.split("-")[1])
    body = orjson.dumps(chat_body("some prompt " * 40, request_id=f"pd-{fmt}-{stream}", max_tokens=4,
                                  stream=stream, disaggregate_info=info))
    headers = {"Content-Type": "application/json"}

    async def call(inst: SimInstance) -> tuple[float, int, bytes]:
        async with client.post(inst.url + "/v1/chat/completions", data=body, headers=headers) as r:
            raw = await r.read()
            return time.monotonic(), r.status, raw

    d_task = asyncio.create_task(call(d))
    await asyncio.sleep(0.15)
    assert not d_task.done()          # D holds its answer until the hand-off
    p_done, p_status, p_raw = await call(p)
    d_done, d_status, d_raw = await d_task
    assert p_status == 200 and d_status == 200
    assert d_done >= p_done - 0.05
    assert len(d.handoffs_received) == 1
    h = d.handoffs_received[0]
    assert h["request_id"] == f"pd-{fmt}-{stream}" and h["first_token"] == 1000
    assert h["transfer_protocol"] == ("rdma" if fmt == "nested-rdma" else "ipc") and h["prompt_tokens"] > 0
    if stream:
        p_events = [event_json(e) for e in sse_events(p_raw)[:-1]]
        d_events = [event_json(e) for e in sse_events(d_raw)[:-1]]
        assert len(p_events) == 2 and p_events[1]["choices"][0]["delta"]["content"] == "tok0"
        assert p_events[1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert "".join(e["choices"][0]["delta"]["content"] for e in d_events[1:]) == "tok0 tok1 tok2 tok3"
    else:
        pj, dj = orjson.loads(p_raw), orjson.loads(d_raw)
        assert pj["usage"]["completion_tokens"] == 1 and pj["choices"][0]["message"]["content"] == "tok0"
        assert dj["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
        assert dj["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert dj["id"] == pj["id"] == f"chatcmpl-pd-{fmt}-{stream}"


async def test_pd_early_handoff_and_no_cache_on_decode(sim: Factory, client: aiohttp.ClientSession) -> None:
    p = await sim(role="prefill")
    d = await sim(role="decode")
    body = chat_body("long prompt " * 60, request_id="early", max_tokens=2, disaggregate_info=flat_info(d))
    async with client.post(p.url + "/v1/chat/completions", json=body) as r:   # P first
        assert r.status == 200
    async with client.post(d.url + "/v1/chat/completions", json=body) as r:   # D later: buffered hand-off
        assert r.status == 200
        assert (await r.json())["choices"][0]["message"]["content"] == "tok0 tok1"
    body["request_id"] = "early2"
    async with client.post(p.url + "/v1/chat/completions", json=body) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] > 0   # P has a prefix cache
    async with client.post(d.url + "/v1/chat/completions", json=body) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # D never does


async def test_pd_decode_timeout_and_prefill_failures(sim: Factory, client: aiohttp.ClientSession) -> None:
    p = await sim(role="prefill")
    d = await sim(role="decode", knobs=Knobs(handoff_timeout=0.2))
    body = chat_body(request_id="lonely", disaggregate_info=flat_info(d))
    t0 = time.monotonic()
    async with client.post(d.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 504 and "error" in await r.json()
    assert 0.2 <= time.monotonic() - t0 < 2
    # D's connector unreachable → P fails fast
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    bad = dict(flat_info(d), decode_connector_port=dead_port)
    t0 = time.monotonic()
    async with client.post(p.url + "/v1/chat/completions", json=chat_body(request_id="x", disaggregate_info=bad)) as r:
        assert r.status == 500 and "unreachable" in (await r.json())["error"]["message"]
    assert time.monotonic() - t0 < 2
    # malformed disaggregate_info → 400, on P and D
    for info in ({"decode_ip": "127.0.0.1"}, "nope", {"transfer_protocol": "ipc"},
                 {"transfer_protocol": "tcp", "decode_ip": "1.2.3.4", "decode_connector_port": 5},
                 {"transfer_protocol": "ipc", "cache_info": {"ipc": {"ip": "127.0.0.1"}}}):
        for inst in (p, d):
            async with client.post(inst.url + "/v1/chat/completions",
                                   json=chat_body(request_id="m", disaggregate_info=info)) as r:
                assert r.status == 400, info
    # no disaggregate_info on a P/D instance: served like mixed
    async with client.post(d.url + "/v1/chat/completions", json=chat_body(max_tokens=2)) as r:
        assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2


async def test_pd_decode_wait_is_visible_and_cancellable(sim: Factory) -> None:
    d = await sim(role="decode")
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(d.url + "/v1/chat/completions",
                                          json=chat_body(request_id="w", disaggregate_info=flat_info(d))))
        await wait_for(lambda: d.handoffs.waiting() == 1)
        assert d.gauges()["fastdeploy:num_requests_waiting"] == 1.0
        task.cancel()                     # the router closes an orphaned D leg
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_for(lambda: d.handoffs.waiting() == 0 and d.in_flight == 0)
    assert d.gauges()["fastdeploy:num_requests_waiting"] == 0.0


async def test_pd_reschedule_knob(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(knobs=Knobs(pd_reschedule_on={1}))
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body(max_tokens=8)) as r:
        data = await r.json()
    assert data["choices"][0]["finish_reason"] == "pd_reschedule"
    assert data["choices"][0]["message"]["completion_token_ids"] == [1000, 1001]
    retry = chat_body(max_tokens=8, completion_token_ids=[1000, 1001])
    async with client.post(inst.url + "/v1/chat/completions", json=retry) as r:
        data = await r.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["completion_token_ids"][0] == 1002


# ---------------------------------------------------------------- aborts, disconnects, faults
async def test_client_disconnect_frees_slot(sim: Factory) -> None:
    inst = await sim(max_num_seqs=1, knobs=Knobs(itl=0.05))
    async with aiohttp.ClientSession() as s:
        r = await s.post(inst.url + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=100, ignore_eos=True))
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        assert inst.gauges()["fastdeploy:num_requests_running"] == 1
        r.close()
    await wait_for(lambda: inst.gauges()["fastdeploy:num_requests_running"] == 0 and inst.in_flight == 0)
    assert inst.gauges()["fastdeploy:available_gpu_block_num"] == inst.config.num_gpu_blocks


async def test_abort_requests(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(knobs=Knobs(itl=0.05))
    task = asyncio.create_task(client.post(inst.url + "/v1/chat/completions",
                                           json=chat_body(request_id="ab", max_tokens=100, ignore_eos=True)))
    await wait_for(lambda: inst.gauges()["fastdeploy:num_requests_running"] == 1)
    await asyncio.sleep(0.12)
    async with client.post(inst.url + "/v1/abort_requests", json={"req_ids": ["ab", "zz"]}) as r:
        data = await r.json()
    assert data["aborted"][0]["request_id"] == "ab" and data["aborted"][0]["generated_tokens"] >= 1
    assert data["not_found"] == ["zz"]
    resp = await task
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "abort"
    async with client.post(inst.url + "/v1/abort_requests", json={"abort_all": True}) as r:
        assert r.status == 200 and (await r.json())["aborted"] == []
    async with client.post(inst.url + "/v1/abort_requests", json={}) as r:
        assert r.status == 400
    assert len(inst.requests_to("/v1/abort_requests")) == 3


async def test_reset_before_response(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(knobs=Knobs(reset_before_response=True))
    with pytest.raises(aiohttp.ClientError):
        async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
            await r.read()
    assert len(inst.inference_requests) == 1


async def test_drop_after_events(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(knobs=Knobs(drop_after_events=3))
    got = b""
    with pytest.raises(aiohttp.ClientError):
        async with client.post(inst.url + "/v1/chat/completions",
                               json=chat_body(stream=True, max_tokens=10)) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                got += chunk
    assert len(sse_events(got)) == 3 and got.endswith(b"\n\n")
    # non-stream: half a body, then a reset
    with pytest.raises(aiohttp.ClientError):
        async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
            await r.read()


async def test_sse_script_forced_reply_and_delays(sim: Factory, client: aiohttp.ClientSession) -> None:
    script = [b'data: {"a":1} \r\n\r\n', b"data: {\"b\":2}\n\n", b"data: [DONE]\n\n"]
    inst = await sim(knobs=Knobs(sse_script=script))
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert await r.read() == b"".join(script)
    inst.knobs.sse_script = None
    inst.knobs.reply_status = 429
    inst.knobs.reply_body = {"detail": "busy"}
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 429 and await r.json() == {"detail": "busy"}
    inst.knobs.reply_status = None
    inst.knobs.first_byte_delay = 0.3
    t0 = time.monotonic()
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 200 and time.monotonic() - t0 < 0.25   # headers at once
        data = await r.json()
        assert time.monotonic() - t0 >= 0.3 and data["choices"][0]["message"]["content"]
    inst.knobs.first_byte_delay = 0
    inst.knobs.header_delay = 0.2
    t0 = time.monotonic()
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert time.monotonic() - t0 >= 0.2


async def test_received_records_and_echo(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(knobs=Knobs(echo=True))
    raw = b'{"messages":[{"role":"user","content":"<b>"}],"seed":12345678901234567890}'
    async with client.post(inst.url + "/v1/chat/completions?x=1", data=raw,
                           headers={"X-Test": "1", "Content-Type": "application/json"}) as r:
        data = await r.json()
    assert data["echo"]["body"] == raw.decode() and data["echo"]["headers"]["X-Test"] == "1"
    rec = inst.inference_requests[-1]
    assert rec.body == raw and rec.headers["x-test"] == "1" and rec.query == "x=1" and rec.method == "POST"


async def test_restart_after_close_port(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim()
    port = inst.port
    await inst.close_port()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(inst.url + "/health"):
            pass
    await inst.start()
    assert inst.port == port
    async with client.get(inst.url + "/health") as r:
        assert r.status == 200


async def test_ipv6(sim: Factory, client: aiohttp.ClientSession) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        inst = await sim(host="::1")
    except OSError:
        pytest.skip("::1 not available")
    assert inst.url == f"http://[::1]:{inst.port}"
    assert inst.registration_payload()["host_ip"] == "::1"
    async with client.post(inst.url + "/v1/chat/completions", json=chat_body()) as r:
        assert r.status == 200


# ---------------------------------------------------------------- registration
class FakeRouter:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()

        async def register(request: web.Request) -> web.Response:
            self.posts.append(await request.json())
            return web.json_response({"code": self.status, "msg": "x"}, status=self.status)

        app.router.add_post("/register", register)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def router() -> AsyncIterator[FakeRouter]:
    r = FakeRouter()
    await r.start()
    yield r
    await r.stop()


async def test_register_once_and_payload(sim: Factory, router: FakeRouter) -> None:
    inst = await sim(role="decode", version="v2", rdma_ports=[7100], device_ids=["0", "1"], tp_size=2)
    assert await inst.register_once(f"127.0.0.1:{router.port}") == 200     # http:// added
    payload = router.posts[0]
    assert payload == inst.registration_payload()
    assert payload["role"] == "decode" and payload["host_ip"] == "127.0.0.1" and payload["port"] == inst.port
    assert payload["connector_port"] == inst.connector_port and payload["metrics_port"] == inst.port
    assert payload["version"] == "v2" and payload["is_paused"] is False and payload["tp_size"] == 2
    for key in ("engine_worker_queue_port", "transfer_protocol", "rdma_ports", "device_ids", "connected_decodes"):
        assert key in payload
    assert inst.received[-1].path == "/health"    # the own probe came first
    router.status = 503
    assert await inst.register_once(f"http://127.0.0.1:{router.port}/") == 503
    inst.knobs.health_status = 500
    assert await inst.register_once(f"127.0.0.1:{router.port}") == 0
    assert len(router.posts) == 2


async def test_heartbeat_loop(sim: Factory, router: FakeRouter) -> None:
    inst = await sim()
    inst.start_heartbeat(f"127.0.0.1:{router.port}", period=0.05)
    await wait_for(lambda: len(router.posts) >= 2)
    assert router.posts[0]["is_paused"] is False
    inst.config.is_paused = True              # refreshed before every POST
    n = len(router.posts)
    await wait_for(lambda: len(router.posts) > n + 1)
    assert router.posts[-1]["is_paused"] is True
    inst.knobs.health_status = 500            # no POST while unhealthy
    await asyncio.sleep(0.1)
    n = len(router.posts)
    await asyncio.sleep(0.2)
    assert len(router.posts) <= n + 1
    await inst.stop_heartbeat()
    assert any(h.register_status == 200 for h in inst.heartbeats)


async def test_cli_runs_and_stops(router: FakeRouter) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.sim", "--instances", "2", "--role", "prefill",
        "--router", f"127.0.0.1:{router.port}", "--time-scale", "0.01", "--heartbeat-period", "0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    try:
        lines = [await asyncio.wait_for(proc.stdout.readline(), 10) for _ in range(2)]
        for line in lines:
            assert re.fullmatch(rb"sim instance prefill http://127\.0\.0\.1:\d+ ready\n", line), line
        await wait_for(lambda: len({p["port"] for p in router.posts}) == 2, timeout=5)
        assert all(p["role"] == "prefill" and p["connector_port"] for p in router.posts)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0, (await proc.stderr.read()).decode() if proc.stderr else ""


def test_cli_usage_error() -> None:
    from kvrouter.sim.cli import main
    assert main(["--role", "bogus"]) == 2
    assert main(["--instances", "0"]) == 2


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimConfig(role="custom")
    assert SimConfig(role="DECODE").role == "decode"
    assert json.loads(json.dumps(SimInstance(SimConfig()).registration_payload()))["role"] == "mixed"


async def test_knobs_over_http():
    inst = SimInstance(SimConfig(time_scale=0.01))
    await inst.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(inst.url + "/sim/knobs",
                              json={"health_status": 500, "pd_reschedule_on": [2]}) as r:
                assert r.status == 200
                assert (await r.json())["pd_reschedule_on"] == [2]
            async with s.get(inst.url + "/health") as r:
                assert r.status == 500
            async with s.post(inst.url + "/sim/knobs", json={"nope": 1}) as r:
                assert r.status == 400 and "nope" in (await r.json())["error"]
            async with s.get(inst.url + "/sim/knobs") as r:
                assert (await r.json())["health_status"] == 500
        assert inst.knobs.pd_reschedule_on == {2}
    finally:
        await inst.stop()
