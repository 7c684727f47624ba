"""Instances of other engines behind a real router process: each instance's engine (named in
register.yaml or ``POST /register``, or recognised from its ``/metrics``) decides how it is
scraped, how the abort fan-out reaches it, and ``scheduler.tokenizer-engine`` how a remote
tokenizer is called. The instances are ``kvrouter sim --engine X`` (``SimConfig.engine``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
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

ENGINES = ("fastdeploy", "vllm", "sglang", "llamacpp")
ALL_NAMES = "fastdeploy, vllm, sglang, llamacpp, llama-cpp-python, openai"
# a scrape timeout long enough for a busy shared machine: the tests count failed scrapes
SCRAPING = {"policy": "fd_remote_metrics_score", "metrics-scrape-interval-secs": 1,
            "metrics-scrape-timeout-secs": 1}


def entry(url: str, engine: str | None = None) -> dict:
    host, _, port = url.removeprefix("http://").rpartition(":")
    out: dict = {"role": "mixed", "host_ip": host, "port": int(port)}
    if engine is not None:
        out["engine"] = engine
    return out


async def router_for(fleet: Fleet, entries: list[dict], scheduler: dict | None = None
                     ) -> RouterProcess:
    """A router whose register.yaml lists ``entries``."""
    path = fleet.tmp_path / f"register{len(fleet.routers)}.yaml"
    path.write_text(yaml.safe_dump({"instances": entries}))
    return await fleet.router({"scheduler": scheduler or {},
                               "manager": {"register-path": str(path)}})


async def workers(router: RouterProcess) -> dict[str, dict]:
    status, body = await get_json(router.url + "/registered")
    assert status == 200
    assert isinstance(body, dict)
    return {w["url"]: w for key in ("mixed", "unavailable") for w in body[key]}


async def engines(router: RouterProcess) -> dict[str, str | None]:
    return {url: w["engine"] for url, w in (await workers(router)).items()}


async def stream_directly(inst: SimInstance, **extra: object) -> bytes:
    """A long streamed completion sent to the instance itself, not through the router."""
    body = {"prompt": "load that the router does not see", "stream": True, "max_tokens": 200,
            "ignore_eos": True, **extra}
    async with aiohttp.ClientSession() as s, s.post(inst.url + "/v1/completions",
                                                    json=body) as r:
        return await r.read()


# --- per-instance engine: register.yaml, /register ------------------------------------------


@bounded(30)
async def test_register_payload_names_the_engine(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim(engine="llamacpp", time_scale=0.01)
    payload = entry(inst.url)
    status, body, _ = await post_json(r.url + "/register", dict(payload, engine="tgi\n"))
    assert status == 400
    assert body["msg"] == ("invalid InstanceInfo format:invalid engine: 'tgi\\n' "
                           f"(one of {ALL_NAMES})")
    status, body, _ = await post_json(r.url + "/register", dict(payload, engine=3))
    assert status == 400 and body["msg"].startswith("Invalid InstanceInfo JSON format: engine")
    assert await engines(r) == {}
    status, body, _ = await post_json(r.url + "/register", dict(payload, engine="LlamaCpp"))
    assert status == 200, body
    assert await engines(r) == {inst.url: "llamacpp"}
    # a FastDeploy heartbeat names no engine: it stays FastDeploy
    fd = await fleet.sim(time_scale=0.01)
    assert await fd.register_once(r.url) == 200
    assert (await engines(r))[fd.url] == "fastdeploy"


def test_unknown_engine_in_register_yaml_stops_startup(tmp_path: Path) -> None:
    reg = tmp_path / "register.yaml"
    reg.write_text(yaml.safe_dump({"instances": [dict(entry("http://127.0.0.1:9"),
                                                      engine="tgi")]}))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"manager": {"register-path": str(reg)}}))
    done = subprocess.run([sys.executable, "-m", "kvrouter", "--port", "0", "--config_path",
                           str(cfg)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert (f"config error: {reg}: instances[0]: invalid InstanceInfo format:invalid engine: "
            f"'tgi' (one of {ALL_NAMES})") in done.stderr


def test_tokenizer_engine_must_have_a_tokenize_endpoint(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"scheduler": {"tokenizer-engine": "openai"}}))
    done = subprocess.run([sys.executable, "-m", "kvrouter", "--port", "0", "--config_path",
                           str(cfg)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert (f"config error: {cfg}: scheduler.tokenizer-engine: must be one of fastdeploy, "
            "vllm, sglang, llamacpp, llama-cpp-python, got 'openai'") in done.stderr


# --- scrapes, recognition, the metrics policy -------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@bounded(60)
async def test_scrapes_recognition_and_remote_metrics_policy(fleet: Fleet, engine: str) -> None:
    """Both instances are scraped without a failure, the one listed without ``engine`` is
    recognised, and ``fd_remote_metrics_score`` reads the engine's gauges: load sent to the
    first instance directly (the one a tie would pick) sends the router's requests to the
    other."""
    busy, idle = await fleet.sims_sorted(2, engine=engine, time_scale=0.01)
    r = await router_for(fleet, [entry(busy.url, engine), entry(idle.url)], SCRAPING)

    async def recognised() -> bool:
        return await engines(r) == {busy.url: engine, idle.url: engine}
    await wait_for(recognised)

    busy.knobs.itl = 0.05
    load = [fleet.spawn(stream_directly(busy)) for _ in range(3)]

    async def running() -> bool:
        return busy.gauges()["fastdeploy:num_requests_running"] >= 3
    await wait_for(running)
    seen = len(busy.requests_to("/metrics"))

    async def scraped_twice() -> bool:      # the first answer is stored before the second call
        return len(busy.requests_to("/metrics")) >= seen + 2
    await wait_for(scraped_twice)

    for _ in range(4):
        status, body, headers = await post_json(
            r.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200, body
        assert headers["X-Router-Mixed-URL"] == idle.url
    text = await metrics_text(r)
    for inst in (busy, idle):
        assert sample(text, "kvrouter_metrics_scrape_total", url=inst.url,
                       result="success") > 0
        assert sample(text, "kvrouter_metrics_scrape_total", url=inst.url,
                       result="failure") == 0
    assert sample(text, "kvrouter_selections_total", strategy="policy") == 4
    for task in load:
        task.cancel()


@bounded(30)
async def test_unusable_metrics_are_logged_once_per_instance(fleet: Fleet) -> None:
    hits: dict[str, int] = {}

    def fake(page: str | None) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            return web.Response()

        async def metrics(request: web.Request) -> web.Response:
            hits[request.host] = hits.get(request.host, 0) + 1
            return web.Response(text=page) if page is not None else web.Response(status=404)

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        return app

    acme = await fleet.fake(fake("# TYPE acme:running gauge\nacme:running 1\nacme_up 1\n"))
    wrong = await fleet.fake(fake('vllm:num_requests_running{engine="0"} 1\n'
                                  'vllm:num_requests_waiting{engine="0"} 0\n'))
    bare = await fleet.fake(fake(None))           # no /metrics, like llama-cpp-python
    r = await router_for(fleet, [entry(acme), entry(wrong, "fastdeploy"), entry(bare)],
                         SCRAPING)

    async def scraped() -> bool:
        return hits.get(wrong.removeprefix("http://"), 0) >= 4
    await wait_for(scraped, timeout=20)
    assert await engines(r) == {acme: "openai", wrong: "fastdeploy", bare: "openai"}
    # recognised as engines without metrics: never scraped again, never a failure
    assert hits[acme.removeprefix("http://")] == 1 and hits[bare.removeprefix("http://")] == 1
    text = await metrics_text(r)
    assert sample(text, "kvrouter_metrics_scrape_total", url=wrong,
                   result="failure") >= 3
    assert sample(text, "kvrouter_metrics_scrape_total", url=acme) == 0
    log = r.log()
    unknown = [line for line in log.splitlines() if "use no known engine's names" in line]
    assert len(unknown) == 1 and acme in unknown[0] and "acme:running, acme_up" in unknown[0]
    lacking = [line for line in log.splitlines() if "lack fastdeploy:num_requests_running" in line]
    assert len(lacking) == 1 and wrong in lacking[0] and " ERROR " in lacking[0]
    assert "vllm:num_requests_running" in lacking[0]
    assert bare not in "".join(unknown + lacking)


# --- abort fan-out ------------------------------------------------------------------------------


def abort_calls(inst: SimInstance) -> list[tuple[str, object]]:
    return [(req.path, req.json()) for req in inst.received if "abort" in req.path]


@bounded(40)
async def test_abort_reaches_each_engines_endpoint(fleet: Fleet) -> None:
    fd = await fleet.sim(time_scale=0.01)
    vllm = await fleet.sim(engine="vllm", time_scale=0.01)
    sgl = await fleet.sim(engine="sglang", time_scale=0.01)
    llama = await fleet.sim(engine="llamacpp", time_scale=0.01)
    # no metrics policy: the engines not named are recognised when the abort needs them
    r = await router_for(fleet, [entry(fd.url), entry(vllm.url, "vllm"), entry(sgl.url),
                                 entry(llama.url)])
    vllm.knobs.itl = 0.05
    running = fleet.spawn(stream_directly(vllm, request_id="r1"))

    async def started() -> bool:
        return vllm.gauges()["fastdeploy:num_requests_running"] >= 1
    await wait_for(started)

    raw = b'{"req_ids":["cmpl-r1","x"]}'
    status, body, _ = await post_json(
        r.url + "/v1/abort_requests", data=raw,
        headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
    assert status == 200, body
    rows = {row["url"]: row for row in body["results"]}
    assert {url: row["engine"] for url, row in rows.items()} == {
        fd.url: "fastdeploy", vllm.url: "vllm", sgl.url: "sglang", llama.url: "llamacpp"}
    assert await engines(r) == {row: rows[row]["engine"] for row in rows}

    assert fd.requests_to("/v1/abort_requests")[0].body == raw       # FastDeploy: unchanged
    assert abort_calls(vllm) == [("/inference/v1/abort_requests",
                                  {"request_ids": ["cmpl-r1", "x"]})]
    assert vllm.requests_to("/inference/v1/abort_requests")[0].headers["Authorization"] \
        == "Bearer k"
    assert rows[vllm.url]["status_code"] == 200
    assert rows[vllm.url]["body"]["not_found"] == ["x"]
    assert [a["request_id"] for a in rows[vllm.url]["body"]["aborted"]] == ["r1"]
    final = (await asyncio.wait_for(running, 10)).split(b"data: [DONE]")[0]
    assert b'"finish_reason":"abort"' in final           # the running request was stopped
    assert abort_calls(sgl) == [("/abort_request", {"rid": "cmpl-r1"}),
                                ("/abort_request", {"rid": "x"})]
    assert rows[sgl.url]["status_code"] == 200
    assert rows[llama.url]["skipped"] == "no abort endpoint"
    assert rows[llama.url]["status_code"] is None and abort_calls(llama) == []

    status, body, _ = await post_json(r.url + "/v1/abort_requests", {"abort_all": True})
    assert status == 200, body
    rows = {row["url"]: row for row in body["results"]}
    assert rows[vllm.url]["skipped"] == "cannot abort all requests"
    assert len(abort_calls(vllm)) == 1
    assert abort_calls(sgl)[-1] == ("/abort_request", {"abort_all": True})
    assert abort_calls(fd)[-1] == ("/v1/abort_requests", {"abort_all": True})
    assert rows[llama.url]["skipped"] == "no abort endpoint"


# --- remote tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("engine, sent", [
    ("fastdeploy", lambda p: {"text": p, "prompt": p, "message": p}),
    ("vllm", lambda p: {"prompt": p}),
    ("sglang", lambda p: {"prompt": p}),
    ("llamacpp", lambda p: {"content": p}),
])
@bounded(30)
async def test_remote_tokenizer_agrees_with_the_engine(fleet: Fleet, engine: str, sent) -> None:
    """The router's token estimate of a request in flight is the engine's prompt token count:
    the tokenizer endpoint was called the engine's way."""
    inst = await fleet.sim(engine=engine, time_scale=0.01)
    r = await router_for(fleet, [entry(inst.url, engine)], {
        "policy": "cache_aware", "tokenizer-url": inst.url, "tokenizer-engine": engine})
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    inst.knobs.header_delay = 1.0          # in flight, before its first byte, for a second
    reply = fleet.spawn(post_json(r.url + "/v1/chat/completions",
                                  {"messages": messages, "max_tokens": 2}))

    async def estimate() -> int:
        return (await workers(r))[inst.url]["in_flight_tokens"]
    tokens = await wait_for(estimate)
    status, body, _ = await reply
    assert status == 200, body
    rendered = render_chat(messages)
    assert tokens == body["usage"]["prompt_tokens"] == len(tokenize(rendered))
    (call,) = inst.requests_to("/tokenize")
    assert call.json() == sent(rendered)


# --- the simulated engines' surfaces ------------------------------------------------------------


async def sse(inst: SimInstance, path: str, body: dict) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(inst.url + path, json=body) as r:
        assert r.status == 200
        return await r.read()


def usage_events(stream: bytes) -> list[dict]:
    events = [e.strip() for e in stream.split(b"\n\n") if e.strip()]
    docs = [orjson.loads(e[len(b"data: "):]) for e in events if e != b"data: [DONE]"]
    return [d["usage"] for d in docs if d.get("usage")]


@bounded(30)
async def test_sim_stream_usage_and_framing_per_engine(fleet: Fleet) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}
    completion = {"prompt": "hello", "stream": True, "max_tokens": 3}
    with_usage = {"stream_options": {"include_usage": True}}
    for engine in ENGINES:
        inst = await fleet.sim(engine=engine, time_scale=0.01)
        plain = await sse(inst, "/v1/chat/completions", chat)
        # FastDeploy's role chunk ends with a space before the blank line; nobody else's does
        assert plain.split(b"\n\n")[0].endswith(b" ") == (engine == "fastdeploy")
        assert usage_events(plain) == []
        assert len(usage_events(await sse(inst, "/v1/chat/completions",
                                          chat | with_usage))) == 1
        always = engine == "llamacpp"      # llama.cpp: every completions stream, last chunk
        stream = await sse(inst, "/v1/completions", completion)
        assert len(usage_events(stream)) == (1 if always else 0)
        if always:
            *_, last, _done = [e for e in stream.split(b"\n\n") if e]
            assert b'"finish_reason":"length"' in last and b'"usage"' in last
        assert len(usage_events(await sse(inst, "/v1/completions",
                                          completion | with_usage))) == 1


@bounded(30)
async def test_llamacpp_completion_streams_feed_the_usage_counters(fleet: Fleet) -> None:
    inst = await fleet.sim(engine="llamacpp", time_scale=0.01)
    r = await router_for(fleet, [entry(inst.url)])
    prompt = "count these prompt tokens"
    async with aiohttp.ClientSession() as s, s.post(
            r.url + "/v1/completions",
            json={"prompt": prompt, "stream": True, "max_tokens": 2}) as resp:
        assert resp.status == 200
        await resp.read()

    async def counted() -> float:
        return sample(await metrics_text(r), "kvrouter_backend_prompt_tokens_total",
                       url=inst.url)
    assert await wait_for(counted) == len(tokenize(prompt))


@pytest.mark.parametrize("engine, present, absent", [
    ("vllm", 'vllm:num_requests_running{engine="0",model_name="default"} 0.0',
     "/v1/abort_requests"),
    ("sglang", 'sglang:num_queue_reqs{model_name="default",tp_rank="0"} 0.0',
     "/inference/v1/abort_requests"),
    ("llamacpp", "llamacpp:requests_deferred 0\n", "/abort_request"),
])
@bounded(30)
async def test_sim_cli_engine(tmp_path: Path, engine: str, present: str, absent: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "sim", "--engine", engine, "--time-scale", "0.01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=str(tmp_path))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("sim instance mixed http://"), line
        url = line.split()[3]
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as resp:
                page = await resp.text()
            assert present in page and "fastdeploy:" not in page
            async with s.get(url + "/health") as resp:
                assert resp.status == 200
                assert (await resp.read()) == (b'{"status":"ok"}' if engine == "llamacpp"
                                               else b"")
            async with s.post(url + absent, json={}) as resp:
                assert resp.status == 404
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_sim_cli_other_engines_never_register() -> None:
    done = subprocess.run([sys.executable, "-m", "kvrouter", "sim", "--engine", "vllm",
                           "--router", "127.0.0.1:9"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "never registers" in done.stderr
