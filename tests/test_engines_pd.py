"""vLLM and SGLang PD end to end: a ``--splitwise`` router process in front of ``kvrouter sim
--engine vllm|sglang --role prefill|decode`` instances listed in its register.yaml. The decode
pulls the prefill's KV over loopback (vLLM: from ``kv_transfer_params.remote_host:remote_port``,
or with P2pNcclConnector from the prefill the ``X-Request-Id`` names; SGLang: from
``bootstrap_host:bootstrap_port`` by ``bootstrap_room``), so an answer only comes back when the
router sent each leg what its protocol needs."""

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
from harness import (
    Fleet,
    RouterProcess,
    bounded,
    get_json,
    metrics_text,
    post_json,
    sample,
    wait_for,
)

from kvrouter.sim import SimInstance
from kvrouter.sim.tokens import render_chat, tokenize

CHAT = {"model": "default", "messages": [{"role": "user", "content": "x" * 600}],
        "max_tokens": 5}
PROMPT_TOKENS = len(tokenize(render_chat(CHAT["messages"])))   # as the sims count them


async def pd_router(fleet: Fleet, prefills: list[SimInstance],
                    decodes: list[SimInstance], **manager: object) -> RouterProcess:
    """A ``--splitwise`` router with the instances in its register.yaml (``manager``: more
    ``manager.*`` keys, ``_`` for ``-``)."""
    path = fleet.tmp_path / f"register{len(fleet.routers)}.yaml"
    entries = [i.register_entry() for i in prefills + decodes]
    path.write_text(yaml.safe_dump({"instances": entries}))
    keys = {k.replace("_", "-"): v for k, v in manager.items()}
    router = await fleet.router({"manager": {"register-path": str(path), **keys},
                                 "scheduler": {"prefill-policy": "round_robin"}}, "--splitwise")

    async def probed() -> bool:        # the first health round is over: all of them routable
        _, body = await get_json(router.url + "/health")
        assert isinstance(body, dict), body
        routable = body.get("routable", {})
        return (routable.get("prefill") == len(prefills)
                and routable.get("decode") == len(decodes))

    await wait_for(probed)
    return router


async def chat(router: RouterProcess, stream: bool, headers: dict | None = None,
               **extra: object) -> tuple[int, dict, dict]:
    """One chat through the router (``extra`` added to the body): status, headers, and the
    answer (a stream's text and usage gathered into one object)."""
    body = dict(CHAT, stream=stream, **extra)
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as s, \
            s.post(router.url + "/v1/chat/completions", json=body, headers=headers) as r:
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
    rids = []
    for stream in (False, True):
        status, headers, answer = await chat(router, stream, {"X-Request-Id": "client-chosen"})
        assert status == 200, answer
        assert headers["X-Router-Decode-URL"] == d.url
        check_answer(stream, answer)
        rids.append(headers["X-Router-Request-ID"])
        if not stream:       # vLLM's own id is the header's: the one its abort endpoint takes
            assert answer["id"] == "chatcmpl-" + rids[-1]
    for inst in (p, d):      # the router's request id, on both legs, instead of the client's
        assert [r.headers.getall("X-Request-Id") for r in inst.inference_requests] == \
            [[rid] for rid in rids]
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


P2P = {"engine": "vllm", "kv_connector": "P2pNcclConnector", "time_scale": 0.01}


def p2p_id(prefill: SimInstance, decode: SimInstance, suffix: str) -> str:
    return (f"___prefill_addr_127.0.0.1:{prefill.connector_port}"
            f"___decode_addr_127.0.0.1:{decode.connector_port}_{suffix}")


@bounded(60)
async def test_vllm_p2p_nccl_request_id_names_both_connectors(fleet: Fleet) -> None:
    """With a kv_zmq_address on both sides, both legs carry vLLM's P2P NCCL request id (the
    prefill's and the decode's ZMQ addresses, then the request id with ``% : # _``
    percent-encoded) and the prefill no kv_transfer_params; the decode fetches the KV from
    the prefill the id names. A decode without the connector is never paired with them."""
    p = await fleet.sim(role="prefill", **P2P)
    d = await fleet.sim(role="decode", **P2P)
    nixl = await fleet.sim(engine="vllm", role="decode", time_scale=0.01)
    assert p.register_entry()["kv_zmq_address"] == f"127.0.0.1:{p.connector_port}"
    router = await pd_router(fleet, [p], [nixl, d])     # the policy's first choice: nixl
    for stream in (False, True, False):
        status, headers, answer = await chat(router, stream, {"X-Request-Id": "client"},
                                             request_id="__x:1#y%" if stream else None)
        assert status == 200, answer
        assert headers["X-Router-Decode-URL"] == d.url
        check_answer(stream, answer)
        rid = headers["X-Router-Request-ID"]
        xrid = p2p_id(p, d, "%5F%5Fx%3A1%23y%25" if stream else rid)
        for inst in (p, d):
            assert inst.inference_requests[-1].headers.getall("X-Request-Id") == [xrid]
        if not stream:
            assert answer["id"] == "chatcmpl-" + xrid
    assert not nixl.inference_requests
    for prefill_body in sent(p):
        assert prefill_body["max_tokens"] == 1 and "kv_transfer_params" not in prefill_body
    assert all("kv_transfer_params" not in b for b in sent(d))
    assert await phases(p) == ["prefill"] * 3
    assert await phases(d) == ["decode"] * 3


@bounded(30)
async def test_sim_p2p_nccl_legs_need_their_addresses(fleet: Fleet) -> None:
    """The simulated P2pNcclConnector pair: a leg without the addresses in its id is a 400 (a
    real one stops its engine), and so is a decode whose id names another decode."""
    p = await fleet.sim(role="prefill", **P2P)
    d = await fleet.sim(role="decode", **P2P)
    other = await fleet.sim(role="decode", **P2P)
    async with aiohttp.ClientSession() as s:
        async def post(inst: SimInstance, xrid: str | None) -> tuple[int, dict]:
            headers = {"X-Request-Id": xrid} if xrid is not None else {}
            async with s.post(inst.url + "/v1/chat/completions", json=CHAT,
                              headers=headers) as r:
                return r.status, await r.json()

        for inst in (p, d):
            status, body = await post(inst, None)
            assert status == 400 and "does not contain hostname and port" in \
                body["error"]["message"]
        status, body = await post(p, p2p_id(p, d, "one"))
        assert status == 200
        status, body = await post(other, p2p_id(p, d, "one"))
        assert status == 400 and "names decode" in body["error"]["message"]
        status, body = await post(d, p2p_id(p, d, "one"))
        assert status == 200, body
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == PROMPT_TOKENS


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


@pytest.mark.parametrize("engine", ["vllm", "sglang", "P2pNcclConnector"])
@bounded(60)
async def test_pd_dead_prefill_is_retried_on_another(fleet: Fleet, engine: str) -> None:
    """(P2pNcclConnector: the retry's id names the new prefill.)"""
    cfg = P2P if engine == "P2pNcclConnector" else {"engine": engine, "time_scale": 0.01}
    prefills = await fleet.sims_sorted(2, role="prefill", **cfg)
    decodes = await fleet.sims_sorted(2, role="decode", **cfg)
    # no health round in between: the requests themselves find the dead one
    router = await pd_router(fleet, prefills, decodes, health_check_interval_secs=60)
    dead, live = prefills
    await dead.close_port()
    for stream in (False, True, False):      # round robin: the dead one comes up
        status, headers, answer = await chat(router, stream)
        assert status == 200, answer
        assert headers["X-Router-Prefill-URL"] == live.url
        check_answer(stream, answer)
    assert len(sent(live)) == 3 and not sent(dead)
    assert sample(await metrics_text(router), "kvrouter_retries_total", reason="connect") >= 1


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


@bounded(40)
async def test_vllm_pd_request_is_aborted_by_its_request_id(fleet: Fleet) -> None:
    """``/v1/abort_requests`` with ``chatcmpl-<request id>`` stops a vLLM PD request's decode:
    vLLM took the router's request id from ``X-Request-Id``."""
    p = await fleet.sim(engine="vllm", role="prefill", time_scale=0.01)
    d = await fleet.sim(engine="vllm", role="decode", time_scale=0.01)
    router = await pd_router(fleet, [p], [d])
    d.knobs.itl = 0.05
    running = fleet.spawn(chat(router, True, request_id="abort-me", max_tokens=200,
                               ignore_eos=True))

    async def decoding() -> bool:
        return d.gauges()["fastdeploy:num_requests_running"] >= 1
    await wait_for(decoding)
    status, body, _ = await post_json(router.url + "/v1/abort_requests",
                                      {"req_ids": ["chatcmpl-abort-me"]})
    assert status == 200, body
    rows = {row["url"]: row for row in body["results"]}
    assert [a["request_id"] for a in rows[d.url]["body"]["aborted"]] == ["abort-me"]
    status, _, answer = await asyncio.wait_for(running, 10)
    assert status == 200 and answer["usage"]["completion_tokens"] < 200


@bounded(40)
async def test_kv_zmq_address_is_checked_at_registration(fleet: Fleet) -> None:
    """A ``kv_zmq_address`` ends up in a header the connector parses: anything but host:port
    is refused by ``POST /register`` (400) and in register.yaml (the router does not start,
    naming the file, the entry and the key)."""
    router = await fleet.router(None, "--splitwise")
    p = await fleet.sim(role="prefill", **P2P)
    base = {"role": "prefill", "host_ip": "127.0.0.1", "port": p.port, "engine": "vllm"}
    for bad in ("127.0.0.1", "127.0.0.1:0", "h_x:1", "a:1\r\nX-Evil: 1", "fe80::1:21001",
                "x" * 300 + ":1", 21001):
        status, body, _ = await post_json(router.url + "/register",
                                          base | {"kv_zmq_address": bad})
        assert status == 400 and "kv_zmq_address" in body["msg"], (bad, body)
    status, body, _ = await post_json(router.url + "/register",
                                      base | {"kv_zmq_address": "[::1]:21001"})
    assert status == 200, body
    path = fleet.tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"instances": [base | {"kv_zmq_address": "10.0.0.5"}]}))
    with pytest.raises(RuntimeError, match=r"config error: \S*bad\.yaml: instances\[0\]: "
                                           r"invalid InstanceInfo format:invalid kv_zmq_address"):
        await fleet.router({"manager": {"register-path": str(path)}}, "--splitwise")


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
    done = subprocess.run([sys.executable, "-m", "kvrouter", "sim", "--engine", "sglang",
                           "--role", "decode", "--kv-connector", "P2pNcclConnector"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "P2pNcclConnector is for vllm" in done.stderr
