"""vLLM and SGLang PD end to end: a ``--splitwise`` router process in front of ``kvrouter sim
--engine vllm|sglang --role prefill|decode`` instances listed in its register.yaml. The decode
pulls the prefill's KV over loopback (vLLM: from ``kv_transfer_params.remote_host:remote_port``;
SGLang: from ``bootstrap_host:bootstrap_port`` by ``bootstrap_room``), so an answer only comes
back when the router sent each leg what its protocol needs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from harness import Fleet, RouterProcess, bounded, get_json, wait_for
from test_engines import counter, metrics_text

from kvrouter.sim import SimInstance
from kvrouter.sim.tokens import render_chat, tokenize

CHAT = {"model": "default", "messages": [{"role": "user", "content": "x" * 600}],
        "max_tokens": 5}
PROMPT_TOKENS = len(tokenize(render_chat(CHAT["messages"])))   # as the sims count them


async def pd_router(fleet: Fleet, prefills: list[SimInstance],
                    decodes: list[SimInstance]) -> RouterProcess:
    path = fleet.tmp_path / f"register{len(fleet.routers)}.yaml"
    entries = [i.register_entry() for i in prefills + decodes]
    path.write_text(yaml.safe_dump({"instances": entries}))
    return await fleet.router({"manager": {"register-path": str(path)},
                               "scheduler": {"prefill-policy": "round_robin"}}, "--splitwise")


async def chat(router: RouterProcess, stream: bool) -> tuple[int, dict, dict]:
    """One chat through the router: status, headers, and the answer (a stream's text and
    usage gathered into one object)."""
    body = dict(CHAT, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as s, \
            s.post(router.url + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
        headers = dict(r.headers)
        if not stream or r.status != 200:
            return r.status, headers, orjson.loads(raw)
    text, usage = "", None
    for line in raw.split(b"\n\n"):
        if not line.startswith(b"data: {"):
            continue
        event = orjson.loads(line[6:])
        assert "error" not in event, event
        for choice in event["choices"]:
            text += choice["delta"].get("content") or ""
        usage = event.get("usage") or usage
    assert raw.rstrip().endswith(b"data: [DONE]")
    return 200, headers, {"text": text, "usage": usage}


def sent(inst: SimInstance) -> list[dict]:
    return [r.json() for r in inst.inference_requests]


async def phases(inst: SimInstance) -> list[str]:
    status, body = await get_json(inst.url + "/sim/requests")
    assert status == 200 and isinstance(body, dict)
    return [row["phase"] for row in body["requests"]]


def check_answer(stream: bool, answer: dict) -> None:
    """The decode's whole answer, and its usage says the prompt was not computed again."""
    text = answer["text"] if stream else answer["choices"][0]["message"]["content"]
    assert text == "tok0 tok1 tok2 tok3 tok4"
    usage = answer["usage"]
    assert usage["prompt_tokens"] == PROMPT_TOKENS and usage["completion_tokens"] == 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == PROMPT_TOKENS


@bounded(60)
async def test_vllm_pd_two_stages_through_the_router(fleet: Fleet) -> None:
    p = await fleet.sim(engine="vllm", role="prefill", time_scale=0.01)
    d = await fleet.sim(engine="vllm", role="decode", time_scale=0.01)
    router = await pd_router(fleet, [p], [d])
    for stream in (False, True):
        status, headers, answer = await chat(router, stream)
        assert status == 200, answer
        assert headers["X-Router-Decode-URL"] == d.url
        check_answer(stream, answer)
    to_p, to_d = sent(p), sent(d)
    assert len(to_p) == len(to_d) == 2
    for prefill_body in to_p:
        assert prefill_body["max_tokens"] == 1 and prefill_body["stream"] is False
        assert prefill_body["kv_transfer_params"]["do_remote_decode"] is True
    for i, decode_body in enumerate(to_d):
        params = decode_body["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        assert params["remote_engine_id"] == p.engine_id
        assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", p.connector_port)
        assert decode_body["stream"] is (i == 1) and decode_body["max_tokens"] == 5
    # two distinct transfers, each pulled once
    assert to_d[0]["kv_transfer_params"]["remote_block_ids"] != \
        to_d[1]["kv_transfer_params"]["remote_block_ids"]
    assert await phases(p) == ["prefill", "prefill"]
    assert await phases(d) == ["decode", "decode"]


@bounded(60)
async def test_sglang_pd_one_room_for_both_legs_through_the_router(fleet: Fleet) -> None:
    p = await fleet.sim(engine="sglang", role="prefill", time_scale=0.01)
    d = await fleet.sim(engine="sglang", role="decode", time_scale=0.01)
    assert p.bootstrap_port and p.bootstrap_port not in (p.port, d.port)
    router = await pd_router(fleet, [p], [d])
    for stream in (False, True):
        status, headers, answer = await chat(router, stream)
        assert status == 200, answer
        assert headers["X-Router-Decode-URL"] == d.url
        check_answer(stream, answer)
    to_p, to_d = sent(p), sent(d)
    assert to_p == to_d and len(to_p) == 2
    assert [b["bootstrap_port"] for b in to_p] == [p.bootstrap_port] * 2
    assert to_p[0]["bootstrap_room"] != to_p[1]["bootstrap_room"]
    assert await phases(p) == ["prefill", "prefill"]
    assert await phases(d) == ["decode", "decode"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@bounded(60)
async def test_pd_dead_prefill_is_retried_on_another(fleet: Fleet, engine: str) -> None:
    prefills = await fleet.sims_sorted(2, engine=engine, role="prefill", time_scale=0.01)
    decodes = await fleet.sims_sorted(2, engine=engine, role="decode", time_scale=0.01)
    router = await pd_router(fleet, prefills, decodes)
    dead, live = prefills
    await dead.close_port()
    for stream in (False, True, False):      # round robin: the dead one comes up
        status, headers, answer = await chat(router, stream)
        assert status == 200, answer
        assert headers["X-Router-Prefill-URL"] == live.url
        check_answer(stream, answer)
    assert len(sent(live)) == 3 and not sent(dead)
    assert counter(await metrics_text(router), "kvrouter_retries_total", reason="connect") >= 1


@bounded(30)
async def test_decode_alone_computes_the_prompt_and_rejects_bad_pd_fields(fleet: Fleet) -> None:
    """Without PD fields a decode serves the request whole; malformed ones are a 400; an SGLang
    room no prefill ever serves ends in a 504 after the decode's wait."""
    vd = await fleet.sim(engine="vllm", role="decode", time_scale=0.01)
    sd = await fleet.sim(engine="sglang", role="decode", time_scale=0.01,
                         handoff_timeout=0.5)
    async with aiohttp.ClientSession() as s:
        async def post(inst: SimInstance, extra: dict) -> tuple[int, dict]:
            async with s.post(inst.url + "/v1/chat/completions", json=CHAT | extra) as r:
                return r.status, await r.json()

        status, body = await post(vd, {})
        assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert await phases(vd) == ["full"]
        status, body = await post(vd, {"kv_transfer_params": {
            "do_remote_prefill": True, "remote_block_ids": [1], "remote_engine_id": "e",
            "remote_host": "127.0.0.1", "remote_port": "x"}})
        assert status == 400 and "remote_port" in body["error"]["message"]
        status, body = await post(sd, {"bootstrap_room": -1, "bootstrap_host": "127.0.0.1",
                                       "bootstrap_port": vd.connector_port})
        assert status == 400 and "bootstrap_room" in body["error"]["message"]
        p = await fleet.sim(engine="sglang", role="prefill", time_scale=0.01)
        status, body = await post(sd, {"bootstrap_room": 7, "bootstrap_host": "127.0.0.1",
                                       "bootstrap_port": p.bootstrap_port})
        assert status == 504 and body["error"]["code"] == "timeout"

        async def released() -> bool:     # the prefill stops waiting when the decode leaves
            return not p.kv_outbox.waiting()
        await wait_for(released, 5)


@bounded(30)
async def test_vllm_kv_blocks_are_pulled_once(fleet: Fleet) -> None:
    """The prefill hands its blocks to one decode: a second pull of the same blocks fails."""
    p = await fleet.sim(engine="vllm", role="prefill", time_scale=0.01)
    d = await fleet.sim(engine="vllm", role="decode", time_scale=0.01)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json=CHAT | {
                "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}) as r:
            assert r.status == 200
            params = (await r.json())["kv_transfer_params"]
        for expected in (200, 500):
            async with s.post(d.url + "/v1/chat/completions",
                              json=CHAT | {"kv_transfer_params": params}) as r:
                assert r.status == expected, await r.text()


@bounded(40)
async def test_sim_cli_sglang_prefill_prints_its_register_entry(tmp_path: Path) -> None:
    """``kvrouter sim --engine sglang --role prefill --bootstrap-port P`` listens on P and
    prints the register.yaml entry that carries it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "sim", "--engine", "sglang", "--role", "prefill",
        "--bootstrap-port", str(port), "--time-scale", "0.01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=str(tmp_path))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("sim instance prefill http://127.0.0.1:"), line
        line = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        assert line.startswith("sim register.yaml entry: "), line
        entry = orjson.loads(line.split(": ", 1)[1])
        assert entry["engine"] == "sglang" and entry["role"] == "prefill"
        assert entry["bootstrap_port"] == port
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    done = subprocess.run([sys.executable, "-m", "kvrouter", "sim", "--engine", "vllm",
                           "--bootstrap-port", "9000"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--bootstrap-port" in done.stderr
