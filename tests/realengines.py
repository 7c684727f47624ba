"""What the real-engine tests (tests/test_real_llamacpp.py, tests/test_real_vllm.py) share: the
words of their prompts, the router in front of the engines, and the checks that read the
engines' own answers (prefix-cache hit rate) and the router's scrapes of their /metrics."""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson
import yaml
from harness import RouterProcess, get_json, metrics_text, sample, samples, wait_for

# ~1 token each (with the leading space) in the Llama-2 vocabulary
_TEXT = ("the of and to in is was for that on with as by at from his her they this which time "
         "people year way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work number "
         "night point home water room mother area money story fact month lot right study book "
         "eye job word business issue side kind head house service friend father power hour game "
         "line end member law car city community name team minute idea body information back "
         "parent face level office door health person art war history party result change "
         "morning reason research girl moment air teacher force education")
WORDS = _TEXT.split()


class Engine(Protocol):
    """A real engine server a test started on a loopback port."""

    port: int
    url: str


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_config(tmp_path: Path, servers: Sequence[Engine], policy: str = "round_robin",
                  engine: str | None = None, **scheduler) -> dict:
    """A mixed-mode config with ``servers`` as static instances (``engine`` named or not)."""
    entries = [{"role": "mixed", "host_ip": "127.0.0.1", "port": s.port} for s in servers]
    if engine is not None:
        for entry in entries:
            entry["engine"] = engine
    register = tmp_path / f"register-{servers[0].port}.yaml"
    register.write_text(yaml.safe_dump({"instances": entries}))
    return {"scheduler": {"policy": policy, **scheduler},
            "manager": {"register-path": str(register), "health-check-interval-secs": 1}}


async def front(router_factory, tmp_path: Path, servers: Sequence[Engine],
                policy: str = "round_robin", *, timeout: float = 10, **kw) -> RouterProcess:
    """A router in front of ``servers`` (``kw``: :func:`router_config`'s), once it reports them
    routable."""
    router = await router_factory(router_config(tmp_path, servers, policy, **kw))

    async def ready() -> bool:
        _, body = await get_json(router.url + "/health")
        assert isinstance(body, dict), body
        return bool(body.get("ready")) and body["routable"]["mixed"] == len(servers)

    await wait_for(ready, timeout=timeout)
    return router


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, bytes, dict]:
    async with session.post(url, json=body) as r:
        return r.status, await r.read(), dict(r.headers)


def sse_events(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]


async def shared_prefix_hit_rate(router: RouterProcess, servers: Sequence[Engine], seed: int,
                                 **body: object) -> tuple[float, dict[int, str]]:
    """5 groups × 6 requests, each a ~1,000-token group prefix plus a short question, sent
    interleaved one at a time; the hit rate is the engines' own count: cached / prompt tokens
    in ``usage`` (at best about 5/6, less where the engine caches whole blocks only). Also each
    group's placement. ``seed`` picks the prefixes (a new one: none an earlier run left in the
    engines' caches); ``body``: more fields of every request."""
    rng = random.Random(seed)
    prefixes = [words(rng, 1000) for _ in range(5)]
    prompt = cached = 0
    placement: dict[int, str] = {}
    letter = {s.url: "ab"[i] for i, s in enumerate(servers)}
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            for g, prefix in enumerate(prefixes):
                status, raw, headers = await post(s, router.url + "/v1/completions", {
                    **body, "prompt": f"{prefix} {words(rng, 12)}", "max_tokens": 2,
                    "temperature": 0})
                assert status == 200, raw[:300]
                usage = orjson.loads(raw)["usage"]
                prompt += usage["prompt_tokens"]
                cached += usage["prompt_tokens_details"]["cached_tokens"]
                placement[g] = placement.get(g, "") + letter[headers["X-Router-Mixed-URL"]]
    return cached / prompt, placement


async def assert_scraped_without_failures(router: RouterProcess, servers: Sequence[Engine],
                                          timeout: float, **body: object) -> None:
    """Once the router has scraped every server 3 times, 4 completions (``body``: more fields)
    are routed by the policy itself, and no scrape ever failed (a metrics policy would fall
    back to stale metrics)."""
    async def scraped() -> bool:
        text = await metrics_text(router)
        return min(sample(text, "kvrouter_metrics_scrape_total", url=s.url)
                   for s in servers) >= 3

    assert await wait_for(scraped, timeout=timeout)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            status, raw, _ = await post(s, router.url + "/v1/completions",
                                        {**body, "prompt": "hello", "max_tokens": 2})
            assert status == 200, raw[:300]
    text = await metrics_text(router)
    for server in servers:
        results = {lab["result"]: v
                   for lab, v in samples(text, "kvrouter_metrics_scrape_total", url=server.url)}
        assert results.get("failure", 0) == 0 and results.get("success", 0) >= 3, \
            (server.url, results)
    strategies = {lab["strategy"] for lab, v in samples(text, "kvrouter_selections_total") if v}
    assert strategies == {"policy"}, strategies
