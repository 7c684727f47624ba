"""Open-loop replay of a workload through a router over HTTP, measuring what a client sees.

Requests go to ``/v1/completions`` with ``prompt_token_ids`` (so the router and the instances
see exactly the workload's tokens), streamed; TTFT and inter-token gaps are client-side.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from kvrouter.sim.workloads import WorkloadRequest


@dataclass
class ClientResult:
    ok: bool
    status: int
    instance: str
    ttft: float | None         # seconds, as the client measured them (real time)
    end: float | None
    itl: list[float]
    output_tokens: int
    sent: float = 0.0          # real seconds after the replay started when it was sent


async def replay(url: str | Sequence[str], workload: Sequence[WorkloadRequest], *,
                 time_scale: float = 1.0,
                 progress: Callable[[int, int], None] | None = None,
                 timeout: float = 120.0,
                 prompt_format: str = "ids") -> tuple[list[ClientResult], float]:
    """Send every request at its arrival time × ``time_scale``; returns results and the span.
    ``url``: a router, or several (a round-robin client in front of router replicas: request
    i goes to ``url[i % len(url)]``).

    ``prompt_format``: ``"ids"`` sends ``prompt_token_ids`` (FastDeploy's field); ``"text"``
    sends ``prompt`` as text, four hex digits per token id (:func:`tokens_as_text`), for
    routers that drop unknown fields (sglang-router): the simulator cuts text into 4-character
    tokens, so the instances see as many tokens, with the same shared prefixes. ``"words"``
    sends ``prompt`` as English words, one per token id (:func:`tokens_as_words`), for real
    engines with the Llama-2 vocabulary."""
    if prompt_format not in ("ids", "text", "words"):
        raise ValueError(f"unknown prompt format {prompt_format!r} (ids, text or words)")
    urls = [url] if isinstance(url, str) else list(url)
    done = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(i: int, req: WorkloadRequest) -> ClientResult:
            nonlocal done
            await asyncio.sleep(max(0.0, t0 + req.arrival * time_scale - loop.time()))
            sent = loop.time() - t0
            try:
                async with asyncio.timeout(timeout):
                    res = await _send(s, urls[i % len(urls)], req, prompt_format)
            except (aiohttp.ClientError, TimeoutError):
                res = ClientResult(False, 0, "", None, None, [], 0)
            finally:
                done += 1
                if progress:
                    progress(done, len(workload))
            res.sent = sent
            return res

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(workload)))
        return list(results), loop.time() - t0


def tokens_as_text(tokens: Sequence[int]) -> str:
    """Token ids as text the simulator cuts back into as many tokens: four lowercase hex
    digits per id (ids are 0..65535), so equal id prefixes give equal text prefixes."""
    return "".join(f"{t & 0xFFFF:04x}" for t in tokens)


_WORD_TEXT = (
    "the of and to in is was for that on with as by at from his her they this which time people "
    "year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work number night point "
    "home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member "
    "law car city community name team minute idea body information back parent face level "
    "office door health person art war history party result change morning reason research girl "
    "moment air teacher force education")
#: words that are one token each (with their leading space) in the Llama-2 vocabulary
WORDS = tuple(_WORD_TEXT.split())


def tokens_as_words(tokens: Sequence[int]) -> str:
    """Token ids as text a real engine with the Llama-2 vocabulary reads as about as many
    tokens: one word of :data:`WORDS` per id, so equal id prefixes give equal text prefixes."""
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


async def _send(s: aiohttp.ClientSession, url: str, req: WorkloadRequest,
                prompt_format: str = "ids") -> ClientResult:
    body = {"model": "default", "max_tokens": req.max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if prompt_format == "text":
        body["prompt"] = tokens_as_text(req.prompt_tokens)
    elif prompt_format == "words":
        body["prompt"] = tokens_as_words(req.prompt_tokens)
    else:
        body["prompt_token_ids"] = req.prompt_tokens
    if req.session_id:
        body["session_id"] = req.session_id
    start = time.perf_counter()
    async with s.post(url + "/v1/completions", data=orjson.dumps(body),
                      headers={"Content-Type": "application/json"}) as r:
        instance = (r.headers.get("X-Router-Mixed-URL")
                    or r.headers.get("X-Router-Prefill-URL") or "")
        if r.status != 200:
            await r.read()
            return ClientResult(False, r.status, instance, None, None, [], 0)
        ttft = None
        last = start
        itl: list[float] = []
        usage: dict = {}
        failed = False
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            if line.startswith(b"data: [DONE]"):
                break
            event = orjson.loads(line[6:])
            if event.get("error"):
                failed = True
            choices = event.get("choices")
            if event.get("usage"):
                usage = event["usage"]
                # llama.cpp's finishing chunk carries usage and a choice without text
                if not choices or not any(c.get("text") or (c.get("delta") or {}).get("content")
                                          for c in choices):
                    continue
            if ttft is None:
                ttft = now - start
            else:
                itl.append(now - last)
            last = now
        end = time.perf_counter() - start
    return ClientResult(not failed and ttft is not None, 200, instance, ttft, end, itl,
                        usage.get("completion_tokens", 0))


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on a terminal; one line at the end otherwise."""
    def show(done: int, total: int, width: int = 30) -> None:
        if sys.stderr.isatty():
            filled = width * done // total
            print(f"\r  {label:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                  end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total:
            print(f"  {label:<18} {done}/{total} requests done", file=sys.stderr)
    return show
