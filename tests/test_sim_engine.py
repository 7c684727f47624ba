"""The simulated FastDeploy instance running the engine core, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from typing import Any

import aiohttp
import pytest

from harness import Factory
from kvrouter.sim import Knobs, SimInstance
from kvrouter.sim.cli import build_parser, configs_from_args, main
from kvrouter.sim.core import PRESETS
from kvrouter.sim.tokens import render_chat, tokenize



async def metrics(client: aiohttp.ClientSession, inst: SimInstance) -> dict[str, float]:
    async with client.get(inst.metrics_url) as r:
        text = await r.text()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)
            if not m.group(1).startswith("#")}


async def truth(client: aiohttp.ClientSession, inst: SimInstance) -> dict[str, Any]:
    async with client.get(inst.url + "/sim/requests") as r:
        assert r.status == 200
        return await r.json()


DOC = "".join(f"Section {i}: the quick brown fox jumps over the lazy dog. " for i in range(100))


def test_equal_text_prefixes_give_equal_token_prefixes() -> None:
    a, b = DOC[:2000], DOC[:2000] + "a different question"
    assert tokenize(b)[:500] == tokenize(a)
    sys_msg = {"role": "system", "content": DOC[:1500]}
    one = tokenize(render_chat([sys_msg, {"role": "user", "content": "first"}]))
    two = tokenize(render_chat([sys_msg, {"role": "user", "content": "second question"}]))
    shared = len("system:") + 1500 + 1
    assert one[: shared // 4] == two[: shared // 4]


async def test_repeated_long_prompt_hits_cache_and_gauges_move(sim: Factory,
                                                               client: aiohttp.ClientSession) -> None:
    inst = await sim(time_scale=0.5, num_gpu_blocks=400)
    body = {"prompt": DOC, "max_tokens": 40, "ignore_eos": True, "stream": True}
    n_prompt = len(tokenize(DOC))                           # 5,590 chars -> 1,398 tokens
    seen: dict[str, float] = {}

    async def run() -> dict[str, Any]:
        async with client.post(inst.url + "/v1/completions",
                               json=dict(body, stream_options={"include_usage": True})) as r:
            raw = await r.read()
        usage = [e for e in raw.split(b"\n\n") if b'"usage"' in e][-1]
        import orjson
        return orjson.loads(usage[len(b"data: "):])["usage"]

    task = asyncio.create_task(run())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not task.done():
        m = await metrics(client, inst)
        if m["fastdeploy:num_requests_running"] == 1 and m["fastdeploy:gpu_cache_usage_perc"] > 0:
            seen = m
            break
        await asyncio.sleep(0.005)
    first = await task
    assert seen, "gauges never showed the running request"
    assert seen["fastdeploy:available_gpu_block_num"] <= 400 - n_prompt // 64
    assert seen["fastdeploy:batch_size"] == 1 and seen["fastdeploy:available_batch_size"] == 7
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    second = await run()
    cached = (n_prompt - 1) // 64 * 64
    assert second["prompt_tokens_details"]["cached_tokens"] == cached > 0
    m = await metrics(client, inst)
    assert m["fastdeploy:num_requests_running"] == 0
    assert m["fastdeploy:available_gpu_block_num"] == m["fastdeploy:max_gpu_block_num"] == 400
    assert m["fastdeploy:gpu_cache_usage_perc"] == 0.0
    assert m["fastdeploy:hit_token_rate"] == pytest.approx(cached / (2 * n_prompt))
    assert m["fastdeploy:hit_req_rate"] == pytest.approx(0.5)
    assert m["fastdeploy:prefix_cache_token_num_total"] == cached
    assert m["fastdeploy:prompt_tokens_total"] == 2 * n_prompt
    assert m["fastdeploy:generation_tokens_total"] == 80
    # ground truth: model-time TTFT of the warm request is far below the cold one
    t = await truth(client, inst)
    assert t["preset"] == "llama3-8b-h100" and t["core"]["cached_tokens_total"] == cached
    cold, warm = t["requests"]
    assert (cold["cached_tokens"], warm["cached_tokens"]) == (0, cached)
    assert cold["prompt_tokens"] == n_prompt and cold["output_tokens"] == 40
    assert cold["preemptions"] == 0 and cold["finish_reason"] == "length"
    assert cold["queue_time"] >= 0 and cold["ttft"] > 2 * warm["ttft"]
    assert cold["ttft"] >= 1398 / 27_700                   # at least the linear prefill term
    assert cold["e2e"] > cold["ttft"] and cold["ttft_real"] > 0


async def test_preset_and_overrides_reach_metrics(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(preset="qwen3-32b-tp2-h100", max_num_seqs=None, num_gpu_blocks=None,
                     block_size=None)
    m = await metrics(client, inst)
    assert m["fastdeploy:max_gpu_block_num"] == 307_328 // 64
    assert m["fastdeploy:max_batch_size"] == 256
    assert inst.config.num_gpu_blocks == 307_328 // 64 and inst.config.block_size == 64
    args = build_parser().parse_args(["--instances", "2", "--preset", "llama3-70b-tp4-h100",
                                      "--block-size", "16", "--max-num-seqs", "32", "--seed", "7"])
    cfgs = configs_from_args(args)
    assert [c.seed for c in cfgs] == [7, 8]
    p = cfgs[0].engine_params()
    assert (p.name, p.block_size, p.max_num_seqs) == ("llama3-70b-tp4-h100", 16, 32)
    assert p.total_blocks == PRESETS["llama3-70b-tp4-h100"].kv_capacity // 16
    default = configs_from_args(build_parser().parse_args([]))[0]
    assert default.max_num_seqs == 256 and default.num_gpu_blocks == PRESETS["llama3-8b-h100"].total_blocks
    assert main(["--preset", "bogus"]) == 2 and main(["--num-gpu-blocks", "0"]) == 2


async def test_ttft_and_itl_knobs_still_override(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(time_scale=0.01, knobs=Knobs(ttft=0.25, itl=0.05))
    t0 = time.monotonic()
    stamps: list[float] = []
    async with client.post(inst.url + "/v1/completions",
                           json={"prompt": "hi", "max_tokens": 4, "stream": True}) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                stamps.append(time.monotonic() - t0)
    assert len(stamps) == 4
    assert 0.25 <= stamps[0] < 1.0
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(stamps))   # 50 ms holds


def flat_info(d: SimInstance, protocol: str) -> dict[str, Any]:
    return {"prefill_ip": "127.0.0.1", "decode_ip": "127.0.0.1", "prefill_connector_port": 1,
            "decode_connector_port": d.connector_port, "decode_device_ids": ["0"], "decode_rdma_ports": [],
            "transfer_protocol": protocol, "decode_tp_size": 1}


async def test_pd_prefill_releases_blocks_and_decode_waits_transfer(
        sim: Factory, client: aiohttp.ClientSession) -> None:
    p = await sim(role="prefill", time_scale=0.05)
    d = await sim(role="decode", time_scale=0.05)
    body = {"messages": [{"role": "user", "content": DOC[:4000]}], "max_tokens": 5,
            "request_id": "pd1", "disaggregate_info": flat_info(d, "rdma")}
    dec = asyncio.create_task(client.post(d.url + "/v1/chat/completions", json=body))
    async with client.post(p.url + "/v1/chat/completions", json=body) as r:
        pj = await r.json()
    resp = await dec
    dj = await resp.json()
    assert pj["choices"][0]["message"]["content"] == "tok0"
    assert dj["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    n_prompt = pj["usage"]["prompt_tokens"]
    # the prefill's blocks were released after the hand-off (its full blocks stay cached)
    pm = await metrics(client, p)
    assert pm["fastdeploy:available_gpu_block_num"] == pm["fastdeploy:max_gpu_block_num"]
    pt = await truth(client, p)
    assert pt["core"]["held"] == 0 and pt["core"]["cached_free_blocks"] == n_prompt // 64
    (prec,) = pt["requests"]
    assert prec["phase"] == "prefill" and prec["output_tokens"] == 1 and prec["request_id"] == "pd1"
    # the decode waited the modelled RDMA transfer: setup + tokens x KV bytes / 50 GB/s
    (drec,) = (await truth(client, d))["requests"]
    want = 0.01 + n_prompt * PRESETS["llama3-8b-h100"].kv_bytes_per_token / 50e9
    assert drec["phase"] == "decode" and drec["transfer_time"] == pytest.approx(want)
    assert drec["cached_tokens"] == 0 and drec["ttft"] >= want
    assert d.transfer_delay("ipc", n_prompt) < d.transfer_delay("rdma", n_prompt)
    dm = await metrics(client, d)
    assert dm["fastdeploy:available_gpu_block_num"] == dm["fastdeploy:max_gpu_block_num"]


async def test_queueing_over_http_matches_core(sim: Factory, client: aiohttp.ClientSession) -> None:
    inst = await sim(time_scale=0.2, max_num_seqs=2)
    body = {"prompt": DOC[:800], "max_tokens": 40, "ignore_eos": True}

    async def one(i: int) -> int:
        async with client.post(inst.url + "/v1/completions", json=dict(body, request_id=f"q{i}")) as r:
            await r.read()
            return r.status

    tasks = [asyncio.create_task(one(i)) for i in range(4)]
    deadline = time.monotonic() + 3
    waiting = 0.0
    while time.monotonic() < deadline and waiting < 2:
        waiting = (await metrics(client, inst))["fastdeploy:num_requests_waiting"]
        await asyncio.sleep(0.005)
    assert waiting == 2
    assert await asyncio.gather(*tasks) == [200] * 4
    rows = (await truth(client, inst))["requests"]
    assert len(rows) == 4
    queued = sorted(r["queue_time"] for r in rows)
    # two were admitted at once, two waited for a slot (~40 decode steps, model seconds); the
    # bound is relative because scheduling lag on a loaded machine is scaled up by 1/time_scale
    assert queued[2] > 0.2 and queued[1] < queued[2] / 3
    async with client.get(inst.url + "/sim/requests", params={"request_id": "q3"}) as r:
        assert [x["request_id"] for x in (await r.json())["requests"]] == ["q3"]


async def test_decode_out_of_blocks_answers_pd_reschedule(sim: Factory, client: aiohttp.ClientSession) -> None:
    d = await sim(role="decode", time_scale=0.05, block_size=16, num_gpu_blocks=10)
    bodies = [{"messages": [{"role": "user", "content": f"{i} " + DOC[:140]}], "max_tokens": 100,
               "ignore_eos": True, "request_id": f"d{i}", "disaggregate_info": flat_info(d, "ipc")}
              for i in range(2)]
    tasks = [asyncio.create_task(client.post(d.url + "/v1/chat/completions", json=b)) for b in bodies]
    for i in range(2):
        async with client.post(f"http://127.0.0.1:{d.connector_port}/handoff",
                               json={"request_id": f"d{i}", "first_token": 1000, "prompt_tokens": 40,
                                     "transfer_protocol": "ipc"}) as r:
            assert r.status == 200
        await asyncio.sleep(0.02)            # d0 is admitted first: d1 is the newest
    reasons = []
    for t in tasks:
        resp = await t
        reasons.append((await resp.json())["choices"][0]["finish_reason"])
    assert reasons == ["length", "pd_reschedule"]
    rows = {r["request_id"]: r for r in (await truth(client, d))["requests"]}
    assert rows["d1"]["finish_reason"] == "pd_reschedule" and rows["d0"]["output_tokens"] == 100
    assert (await truth(client, d))["core"]["pd_reschedules_total"] == 1
