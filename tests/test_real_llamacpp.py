"""kvrouter in front of a real engine: llama.cpp's ``llama-server`` serving a tiny random-weight
llama model with the real Llama-2 vocabulary.

``scripts/real_engine.sh`` builds the server and writes the model into a cache outside the repo
(``$KVROUTER_ENGINE_CACHE``, default ``~/.cache/kvrouter/real-engines``); ``.ci/run`` runs its
``build`` step before the tests. Without the cache, a local run builds on first use (minutes);
under CI (``$CI`` set) a missing build fails these tests with the reason instead.

Each test starts its own llama-servers on free loopback ports (4 slots of 4,096 tokens each, no
host-RAM prompt cache, so what an engine caches is what its slots hold and placement decides the
hit rate) and a real router process in mixed mode with the servers in its ``register.yaml``,
and stops them all by PID.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from harness import bounded, get_json, metrics_text, sample, wait_for
from realengines import (
    assert_scraped_without_failures,
    free_port,
    front,
    post,
    shared_prefix_hit_rate,
    sse_events,
    words,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "real_engine.sh"
SLOTS = 4
SLOT_CTX = 4096

# --- the engine: built (or found) once per session -------------------------------------------

@pytest.fixture(scope="session")
def engine_files() -> tuple[str, str]:
    """``(llama-server, model.gguf)`` from the cache; builds locally on first use, fails (with
    the script's reason) under CI, where ``.ci/run`` has already tried to build."""
    step = "model" if os.environ.get("CI") else "all"
    # "model" writes the model if the engine was built (seconds) and fails if it was not
    run = subprocess.run(["bash", str(SCRIPT), step], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    if run.returncode == 0:
        run = subprocess.run(["bash", str(SCRIPT), "path"], capture_output=True, text=True,
                             env=dict(os.environ, PYTHON=sys.executable))
    if run.returncode != 0:
        pytest.fail(f"the real engine is not available: `scripts/real_engine.sh {step}` failed "
                    f"(exit {run.returncode}); .ci/run builds it with `scripts/real_engine.sh "
                    f"build` before the tests (needs cmake, ninja-build, g++).\n"
                    f"{run.stderr[-3000:]}", pytrace=False)
    binary, model = run.stdout.split()
    return binary, model


class LlamaServer:
    """One ``llama-server`` process on a free loopback port; stopped by its PID."""

    def __init__(self, files: tuple[str, str], alias: str, log_dir: Path,
                 threads: int = 1) -> None:
        binary, model = files
        self.alias = alias
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"llama-server-{alias}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-m", model, "-a", alias, "--host", "127.0.0.1",
                 "--port", str(self.port), "-c", str(SLOTS * SLOT_CTX), "-np", str(SLOTS),
                 "-t", str(threads), "--cache-ram", "0", "--metrics", "--no-ui"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n"
                                       + self.log())
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not ready after {timeout} s:\n" + self.log())
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, now (the instance dies mid-request)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def engines(engine_files, tmp_path) -> Iterator:
    """``await engines(n)`` → ``n`` fresh llama-servers, ready; all stopped after the test."""
    started: list[LlamaServer] = []

    async def start(n: int = 2) -> list[LlamaServer]:
        batch = [LlamaServer(engine_files, f"tiny-{len(started) + i}", tmp_path)
                 for i in range(n)]
        started.extend(batch)
        await asyncio.gather(*(s.ready() for s in batch))
        return batch

    yield start
    for server in started:
        server.stop()


# --- the tests ---------------------------------------------------------------------------------

@bounded(30)
async def test_static_instances_turn_healthy_and_models_are_merged(
        engines, router_factory, tmp_path):
    servers = await engines(2)
    router = await front(router_factory, tmp_path, servers)
    status, body = await get_json(router.url + "/registered")
    assert status == 200
    urls = {s.url for s in servers}
    assert len(body["mixed"]) == 2, body

    async def union():
        _, models = await get_json(router.url + "/v1/models")
        ids = {card["id"] for card in models.get("data", [])}
        return ids if ids == {"tiny-0", "tiny-1"} else None

    assert await wait_for(union, timeout=10)
    async with aiohttp.ClientSession() as s:
        status, _, headers = await post(s, router.url + "/v1/completions",
                                        {"prompt": "hello", "max_tokens": 2})
    assert status == 200 and headers["X-Router-Mixed-URL"] in urls


@bounded(40)
async def test_chat_and_completions_relayed_stream_and_not(engines, router_factory, tmp_path):
    servers = await engines(2)
    router = await front(router_factory, tmp_path, servers)
    urls = {s.url for s in servers}
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}
    completion = {"prompt": "Once upon a time", "max_tokens": 8}
    chat["ignore_eos"] = completion["ignore_eos"] = True   # exactly max_tokens tokens
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            status, raw, headers = await post(s, router.url + path, body)
            assert status == 200, raw
            assert headers["X-Router-Mixed-URL"] in urls
            doc = orjson.loads(raw)
            assert doc["usage"]["prompt_tokens"] > 0
            assert doc["usage"]["completion_tokens"] == 8
            choice = doc["choices"][0]
            assert isinstance(choice["message"]["content"] if "chat" in path else choice["text"],
                              str)

            stream = dict(body, stream=True, stream_options={"include_usage": True})
            status, raw, headers = await post(s, router.url + path, stream)
            assert status == 200, raw
            assert headers["X-Router-Mixed-URL"] in urls
            assert headers["Content-Type"].startswith("text/event-stream")
            assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            events = [orjson.loads(e) for e in sse_events(raw)[:-1]]
            assert any(e.get("usage") for e in events)
            assert sum(1 for e in events if e.get("choices")) >= 2   # tokens arrive in pieces
            assert not any("error" in e for e in events)


@bounded(40)
async def test_chat_streams_without_usage_are_measured_from_timings(engines, router_factory,
                                                                   tmp_path):
    """A chat stream whose client does not ask for usage carries only llama.cpp's ``timings``:
    the router counts those (the client's stream is left as the engine sent it), so the
    measured hit rate covers it; the repeated prompt is served from the slot's cache."""
    (server,) = await engines(1)
    router = await front(router_factory, tmp_path, [server], engine="llamacpp")
    chat = {"messages": [{"role": "user", "content": words(random.Random(3), 400)}],
            "max_tokens": 2, "stream": True}
    seen: list[dict] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            status, raw, _ = await post(s, router.url + "/v1/chat/completions", chat)
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            events = [orjson.loads(e) for e in sse_events(raw)[:-1]]
            assert not any("usage" in e for e in events)
            seen.append(events[-1]["timings"])       # on the finishing event, as sent
    prompt = sum(t["prompt_n"] + t["cache_n"] for t in seen)
    cached = sum(t["cache_n"] for t in seen)
    assert cached > prompt // 4

    async def counted() -> tuple[float, float] | None:
        text = await metrics_text(router)
        got = (sample(text, "kvrouter_backend_prompt_tokens_total", url=server.url),
               sample(text, "kvrouter_backend_cached_tokens_total", url=server.url))
        return got if got[0] >= prompt else None

    assert await wait_for(counted) == (prompt, cached)


@bounded(30)
async def test_engine_error_keeps_its_status(engines, router_factory, tmp_path):
    servers = await engines(2)
    router = await front(router_factory, tmp_path, servers)
    too_long = words(random.Random(1), SLOT_CTX + 500)     # more tokens than a slot holds
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            status, raw, headers = await post(s, router.url + "/v1/completions", {
                "prompt": too_long, "max_tokens": 4, "stream": stream})
            assert status == 400, (stream, raw[:300])
            assert headers["X-Router-Mixed-URL"] in {x.url for x in servers}
            error = orjson.loads(raw)["error"]
            assert error["type"] == "exceed_context_size_error", error
        # the instances are still routable afterwards
        status, _, _ = await post(s, router.url + "/v1/completions",
                                  {"prompt": "hello", "max_tokens": 2})
        assert status == 200


@bounded(40)
async def test_killing_an_instance_mid_stream_interrupts_the_stream(
        engines, router_factory, tmp_path):
    servers = await engines(2)
    router = await front(router_factory, tmp_path, servers)
    by_url = {s.url: s for s in servers}
    body = {"prompt": "Tell me a long story.", "max_tokens": 3000, "ignore_eos": True,
            "stream": True}
    async with aiohttp.ClientSession() as s, \
            s.post(router.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        victim = by_url[r.headers["X-Router-Mixed-URL"]]
        seen = 0
        async for line in r.content:
            if line.startswith(b"data:"):
                seen += 1
                if seen == 3:
                    break
        victim.kill()
        rest = await asyncio.wait_for(r.content.read(), 20)
    events = sse_events(rest)
    assert events[-1] == b"[DONE]", rest[-300:]
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "stream_interrupted", error
    # the survivor still serves (the dead one is dropped by the health check or the retry)
    async with aiohttp.ClientSession() as s:
        status, _, headers = await post(s, router.url + "/v1/completions",
                                        {"prompt": "hello", "max_tokens": 2})
    assert status == 200 and headers["X-Router-Mixed-URL"] != victim.url


@bounded(120)
async def test_cache_aware_routing_beats_round_robin_on_a_real_engine(
        engines, router_factory, tmp_path):
    rates = {}
    for policy in ("round_robin", "cache_aware"):
        servers = await engines(2)              # fresh servers: empty prompt caches
        router = await front(router_factory, tmp_path, servers, policy)
        rates[policy], placement = await shared_prefix_hit_rate(router, servers, 7)
        rates[policy + " placement"] = placement
        await router.stop()
        for server in servers:
            server.stop()
    assert rates["cache_aware"] >= 0.6, rates
    assert rates["cache_aware"] >= 5 * rates["round_robin"], rates


@bounded(30)
async def test_metrics_scraped_without_failures(engines, router_factory, tmp_path):
    """With ``engine: llamacpp`` the router reads llama-server's ``llamacpp:*`` gauges: every
    scrape succeeds and fd_remote_metrics_score never falls back to stale metrics."""
    servers = await engines(2)
    router = await front(router_factory, tmp_path, servers, "fd_remote_metrics_score",
                         engine="llamacpp", **{"metrics-scrape-interval-secs": 0.2,
                                              "metrics-scrape-timeout-secs": 0.2})
    await assert_scraped_without_failures(router, servers, timeout=10)


@bounded(30)
async def test_tokenizer_agreement(engines, router_factory, tmp_path):
    """The router's remote tokenizer, pointed at llama-server's ``/tokenize``, counts the same
    tokens as the engine does for the same prompt (the engine's ``usage.prompt_tokens`` less
    the special tokens it adds, i.e. BOS). Observed through the prefix lookups of cache_aware
    with one-token blocks: one block looked up per token."""
    servers = await engines(2)
    router = await front(
        router_factory, tmp_path, servers, "cache_aware",
        **{"tokenizer-url": servers[0].url + "/tokenize", "tokenizer-engine": "llamacpp",
           "cache-block-size": 1})
    texts = ["The quick brown fox jumps over the lazy dog.",
             "  leading spaces, tabs\tand\nnew lines",
             "Übergrößenträger café naïve — 日本語のテキスト 🙂🚀",
             "x = [1, 2, 3]; print(sum(x) / len(x))  # 2.0"]

    async def lookups() -> float:
        return sample(await metrics_text(router), "kvrouter_prefix_lookup_blocks_total")

    agree = []
    async with aiohttp.ClientSession() as s:
        for text in texts:
            plain = orjson.loads((await post(s, servers[0].url + "/tokenize",
                                             {"content": text}))[1])["tokens"]
            special = orjson.loads((await post(s, servers[0].url + "/tokenize",
                                               {"content": text, "add_special": True}))[1])
            added = len(special["tokens"]) - len(plain)
            before = await lookups()
            status, raw, _ = await post(s, router.url + "/v1/completions",
                                        {"prompt": text, "max_tokens": 1})
            assert status == 200, raw[:300]
            engine_count = orjson.loads(raw)["usage"]["prompt_tokens"] - added
            agree.append((text, int(await lookups() - before), engine_count, len(text)))
    assert all(router_count == engine_count for _, router_count, engine_count, _ in agree), \
        "(text, router tokens, engine tokens, characters): " + repr(agree)
