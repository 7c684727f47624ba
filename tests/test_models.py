"""Model-aware routing and the ``register.yaml`` re-read (README "Models"), through real router
processes in front of simulated instances on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml
from aiohttp import web
from harness import Fleet, RouterProcess, bounded, get_json, post_json, registered, wait_for

from kvrouter.sim import SimInstance
from kvrouter.sim.instance import ReceivedRequest

CHAT_PATH = "/v1/chat/completions"
RR = {"scheduler": {"policy": "round_robin"}}


async def register(router: RouterProcess, inst: SimInstance, **override) -> None:
    status, body, _ = await post_json(router.url + "/register",
                                      dict(inst.registration_payload(), **override))
    assert status == 200, body


def chat(model: str | None = None) -> dict:
    body: dict = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    if model is not None:
        body["model"] = model
    return body


async def routed(router: RouterProcess, body: dict, n: int,
                 path: str = CHAT_PATH) -> tuple[set[str], set[str]]:
    """Send ``body`` ``n`` times; the instance URLs that answered and the answers' models."""
    urls, models = set(), set()
    for _ in range(n):
        status, resp, headers = await post_json(router.url + path, body)
        assert status == 200, resp
        urls.add(headers["X-Router-Mixed-URL"])
        models.add(resp["model"])
    return urls, models


async def model_ids(router: RouterProcess) -> dict[str, dict]:
    status, body = await get_json(router.url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    return {card["id"]: card for card in body["data"]}


# --- model-aware routing -----------------------------------------------------------------------


@bounded(40)
async def test_two_models_on_four_instances(fleet: Fleet) -> None:
    r = await fleet.router({**RR, "scheduler": {**RR["scheduler"],
                                                "model-aliases": {"fast": "model-a"}}})
    a1, a2 = [await fleet.sim(served_model_name="model-a") for _ in range(2)]
    b1, b2 = [await fleet.sim(served_model_name="model-b") for _ in range(2)]
    # a1, b1: their models come from /v1/models; a2, b2: from their registration's `models`
    await register(r, a1)
    await register(r, b1)

    async def both_listed() -> bool:
        return {"model-a", "model-b"} <= (await model_ids(r)).keys()

    await wait_for(both_listed, timeout=10)
    await register(r, a2, models=["model-a"])
    await register(r, b2, models=["model-b"])
    a_urls, b_urls = {a1.url, a2.url}, {b1.url, b2.url}

    assert await routed(r, chat("model-a"), 8) == (a_urls, {"model-a"})
    assert await routed(r, chat("model-b"), 8) == (b_urls, {"model-b"})
    completion = {"model": "model-b", "prompt": "hello", "max_tokens": 2}
    assert (await routed(r, completion, 4, "/v1/completions"))[0] == b_urls
    # the alias goes to model-a's instances, passed unchanged: the answer names what was asked
    assert await routed(r, chat("fast"), 8) == (a_urls, {"fast"})
    # no model, or FastDeploy's wildcard `default` that no instance lists: any instance
    assert (await routed(r, chat(), 8))[0] == a_urls | b_urls
    assert (await routed(r, chat("default"), 8))[0] == a_urls | b_urls
    assert all(req_model(q) in ("model-a", "fast", None, "default")
               for inst in (a1, a2) for q in inst.inference_requests)
    assert all(req_model(q) in ("model-b", None, "default")
               for inst in (b1, b2) for q in inst.inference_requests)

    before = sum(len(i.inference_requests) for i in (a1, a2, b1, b2))
    status, body, headers = await post_json(r.url + CHAT_PATH, chat("model-c"))
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert body == {"error": {"message": "The model 'model-c' does not exist",
                              "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}
    assert sum(len(i.inference_requests) for i in (a1, a2, b1, b2)) == before

    cards = await model_ids(r)
    assert cards.keys() == {"model-a", "model-b", "fast"}
    assert cards["fast"]["root"] == "model-a" and cards["fast"]["owned_by"] == "FastDeploy"


@bounded(40)
async def test_pd_pairs_serve_the_requested_model(fleet: Fleet) -> None:
    r = await fleet.router(RR, "--splitwise")
    pairs = {}
    for model in ("model-a", "model-b"):
        p = await fleet.sim(role="prefill", served_model_name=model)
        d = await fleet.sim(role="decode", served_model_name=model)
        for inst in (p, d):
            await register(r, inst, models=[model])      # known at once
        pairs[model] = (p.url, d.url)
    for model, (p_url, d_url) in pairs.items():
        for _ in range(4):
            status, resp, headers = await post_json(r.url + CHAT_PATH, chat(model))
            assert status == 200, resp
            assert resp["model"] == model
            assert (headers["X-Router-Prefill-URL"], headers["X-Router-Decode-URL"]) == \
                (p_url, d_url)
    status, body, _ = await post_json(r.url + CHAT_PATH, chat("model-c"))
    assert status == 404 and body["error"]["code"] == "model_not_found"


def req_model(q: ReceivedRequest) -> str | None:
    return q.json().get("model")


async def openai_fake(fleet: Fleet, name: str, models_status: int) -> str:
    """An OpenAI-style server whose ``/v1/models`` answers ``models_status`` (its model list is
    then unknown) and whose chat answers name ``name`` and the requested model."""
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=models_status)

    async def chat_(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"object": "chat.completion", "model": body.get("model"),
                                  "served_by": name, "choices": []})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post(CHAT_PATH, chat_)
    return await fleet.fake(app)


async def register_url(router: RouterProcess, url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    status, body, _ = await post_json(router.url + "/register",
                                      {"role": "mixed", "host_ip": "127.0.0.1", "port": port})
    assert status == 200, body


@bounded(30)
async def test_an_instance_whose_models_are_unknown_serves_every_model(fleet: Fleet) -> None:
    r = await fleet.router(RR)
    a = await fleet.sim(served_model_name="model-a")
    c = await fleet.sim(served_model_name="model-c")
    for inst in (a, c):
        await register(r, inst)
    await wait_for(lambda: _has(r, "model-a", "model-c"), timeout=10)
    fake = await openai_fake(fleet, "fake", 500)
    await register_url(r, fake)
    # model-b: listed by nobody, but the fake's list is unknown: it goes there, not a 404
    assert await routed(r, chat("model-b"), 6) == ({fake}, {"model-b"})
    assert (await routed(r, chat("model-a"), 6))[0] == {a.url, fake}
    assert all(req_model(q) == "model-a" for q in a.inference_requests)
    assert c.inference_requests == []


async def _has(router: RouterProcess, *models: str) -> bool:
    return set(models) <= (await model_ids(router)).keys()


@bounded(30)
async def test_fleets_without_model_lists_route_any_model_anywhere(fleet: Fleet) -> None:
    r = await fleet.router(RR)
    fakes = {await openai_fake(fleet, f"f{i}", 404) for i in range(2)}
    for url in fakes:
        await register_url(r, url)
    assert await routed(r, chat("anything"), 6) == (fakes, {"anything"})
    assert (await model_ids(r)) == {}


@bounded(30)
async def test_a_single_model_fleet_behaves_as_before(fleet: Fleet) -> None:
    r = await fleet.router(RR)
    sims = [await fleet.sim() for _ in range(2)]       # each serves `default`
    for inst in sims:
        await register(r, inst)
    await wait_for(lambda: _has(r, "default"), timeout=10)
    urls = {inst.url for inst in sims}
    assert await routed(r, chat("default"), 6) == (urls, {"default"})
    assert (await routed(r, chat(), 6))[0] == urls
    # a name the fleet does not list: with one model, the engine judges it (as before)
    assert await routed(r, chat("ernie"), 6) == (urls, {"ernie"})
    assert (await model_ids(r)).keys() == {"default"}


@bounded(30)
async def test_models_in_a_registration_are_checked(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    for models, message in (
            ([1], "Invalid InstanceInfo JSON format: models[0]: expected a string, "
                  "got number 1"),
            ("m", "Invalid InstanceInfo JSON format: models: expected an array, got string"),
            (["ok", "a\nb"], "invalid InstanceInfo format:invalid models[1]: 'a\\nb' "
                             "(1 to 256 characters, no control characters)"),
            ([f"m{i}" for i in range(65)], "invalid InstanceInfo format:invalid models: "
                                           "at most 64 names")):
        status, body, _ = await post_json(r.url + "/register",
                                          dict(inst.registration_payload(), models=models))
        assert (status, body) == (400, {"code": 400, "msg": message})
    assert (await registered(r))["mixed"] == []


def run_cli(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrouter", "--port", "0", "--config_path",
                           str(cfg)], cwd=cfg.parent, capture_output=True, text=True, timeout=15)


def test_model_aliases_config_errors(tmp_path: Path) -> None:
    cases = [
        ("[fast]", "must be a mapping of alias: model name, got ['fast']"),
        ("{fast: model-a, model-a: model-b}",
         "alias 'fast' maps to 'model-a', which is an alias too"),
        ("{fast: 7}", "alias 'fast': model must be a string of 1 to 256 characters without "
                      "control characters, got 7"),
        ("{fast: ''}", "alias 'fast': model must be a string of 1 to 256 characters without "
                       "control characters, got ''"),
    ]
    for i, (value, reason) in enumerate(cases):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(f"scheduler:\n  model-aliases: {value}\n")
        result = run_cli(cfg)
        assert result.returncode == 1, result.stderr
        assert f"config error: {cfg}: scheduler.model-aliases: {reason}" in result.stderr


# --- register.yaml re-read ---------------------------------------------------------------------


def write_register(path: Path, *entries: dict | str) -> None:
    """Replace the file atomically (as the README asks)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(entries[0] if entries and isinstance(entries[0], str)
                   else yaml.safe_dump({"instances": list(entries)}))
    os.replace(tmp, path)


def entry(inst: SimInstance, **extra) -> dict:
    return {"role": "mixed", "host_ip": "127.0.0.1", "port": inst.port, **extra}


async def urls_of(router: RouterProcess) -> dict[str, bool]:
    """Registered instance URL → static."""
    reg = await registered(router)
    return {w["url"]: w["static"] for key in ("mixed", "unavailable") for w in reg[key]}


@bounded(60)
async def test_register_yaml_is_re_read_on_change(fleet: Fleet) -> None:
    s1 = await fleet.sim(served_model_name="model-a")
    s2, s3 = await fleet.sim(), await fleet.sim()
    path = fleet.tmp_path / "register.yaml"
    write_register(path, entry(s1, models=["model-a"]))
    r = await fleet.router({**RR, "manager": {"register-path": str(path)}})
    await register(r, s3)                              # by heartbeat: never touched by the file
    assert await urls_of(r) == {s1.url: True, s3.url: False}
    await wait_for(lambda: _has(r, "default"), timeout=10)     # s3's list is known
    assert await routed(r, chat("model-a"), 4) == ({s1.url}, {"model-a"})

    write_register(path, entry(s1, models=["model-a"]), entry(s2))

    async def has_s2() -> bool:
        return s2.url in await urls_of(r)

    await wait_for(has_s2, timeout=10)
    assert await urls_of(r) == {s1.url: True, s2.url: True, s3.url: False}
    assert (await routed(r, chat(), 6))[0] == {s1.url, s2.url, s3.url}

    write_register(path, entry(s2), entry(s3))         # s3 stays a heartbeat instance

    async def s1_gone() -> bool:
        return s1.url not in await urls_of(r)

    await wait_for(s1_gone, timeout=10)
    assert await urls_of(r) == {s2.url: True, s3.url: False}
    served = len(s1.inference_requests)
    assert (await routed(r, chat(), 6))[0] == {s2.url, s3.url}
    assert len(s1.inference_requests) == served

    for text, problem in (("instances: [\n", "invalid YAML"),
                          (yaml.safe_dump({"instances": [entry(s1, port=70000)]}),
                           "instances[0]: invalid InstanceInfo format:invalid port: 70000")):
        write_register(path, text)

        def count(problem: str = problem) -> int:
            return sum(f"config error: {path}: " in ln and problem in ln
                       for ln in r.log().splitlines())

        async def logged(count=count) -> bool:
            return count() > 0

        await wait_for(logged, timeout=10)
        await asyncio.sleep(2.5)                       # at least one more check of the file
        assert count() == 1
        assert await urls_of(r) == {s2.url: True, s3.url: False}
    assert "keeping the 1 static instances" in r.log()

    write_register(path, entry(s1))

    async def only_s1() -> bool:
        return await urls_of(r) == {s1.url: True, s3.url: False}

    await wait_for(only_s1, timeout=10)


@bounded(40)
async def test_a_hostile_register_yaml_is_logged_and_the_watch_goes_on(fleet: Fleet) -> None:
    s1, s2 = await fleet.sim(), await fleet.sim()
    path = fleet.tmp_path / "register.yaml"
    write_register(path, entry(s1))
    r = await fleet.router({**RR, "manager": {"register-path": str(path)}})
    assert await urls_of(r) == {s1.url: True}
    # what PyYAML answers with other errors than its own: RecursionError, ValueError
    for text, problem in (("instances: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
                          (f"instances: [{{role: mixed, host_ip: 127.0.0.1, port: {s2.port}, "
                           "version: 2020-13-45}]", "month must be in 1..12")):
        write_register(path, text)
        line = f"config error: {path}: invalid YAML: {problem}; keeping the 1 static instances"

        async def logged(line: str = line) -> bool:
            return line in r.log()

        await wait_for(logged, timeout=10)
        assert await urls_of(r) == {s1.url: True}
    write_register(path, entry(s2))                    # the watch still runs

    async def only_s2() -> bool:
        return await urls_of(r) == {s2.url: True}

    await wait_for(only_s2, timeout=10)
