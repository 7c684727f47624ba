"""Test harness: a real kvrouter process on 127.0.0.1 with a config written for the test."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import yaml
from aiohttp import web

from kvrouter.sim import SimConfig, SimInstance

Factory = Callable[..., Awaitable[SimInstance]]
"""The ``sim`` fixture: ``await sim(**SimConfig fields)`` → a started instance."""

QUIET = {"scheduler": {"stats-interval-secs": 0},
         "manager": {"health-check-interval-secs": 60},
         "server": {"shutdown-grace-secs": 5}}


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


class RouterProcess:
    """``python -m kvrouter`` started with ``--port 0``; knows its URL once it serves."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = 0
        self.host = "127.0.0.1"
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start_router(tmp_path: Path, config: dict | None = None, *args: str,
                       quiet: bool = True) -> RouterProcess:
    cfg = merge(QUIET, config or {}) if quiet else (config or {})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "router.log"
    logf = open(log_path, "wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "--port", "0", "--config_path", str(cfg_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=logf, env=env, cwd=str(tmp_path))
    router = RouterProcess(proc, log_path)
    try:
        async with asyncio.timeout(20):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"router exited: {router.log()}")
                logf.write(line)
                logf.flush()
                text = line.decode()
                if text.startswith("Starting server on "):
                    hostport = text.split()[-1]
                    if "://" in hostport:
                        router.scheme, _, hostport = hostport.partition("://")
                    host, _, port = hostport.rpartition(":")
                    router.port = int(port)
                    if host not in ("0.0.0.0", "[::]"):
                        router.host = host
                    break
    except BaseException:
        with contextlib.suppress(ProcessLookupError):    # it may have exited by itself
            proc.kill()
        await proc.wait()
        raise
    asyncio.get_running_loop().create_task(_pump(proc.stdout, logf))
    return router


async def _pump(stream: asyncio.StreamReader, sink) -> None:
    while line := await stream.readline():
        sink.write(line)
        sink.flush()


async def get_json(url: str, **kw) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, **kw) as r:
            return r.status, await r.json(content_type=None)


async def post_json(url: str, payload: object = None, *, data: bytes | None = None,
                    headers: dict | None = None) -> tuple[int, object, dict]:
    async with aiohttp.ClientSession() as s:
        kw = {"data": data} if data is not None else {"json": payload}
        async with s.post(url, headers=headers, **kw) as r:
            raw = await r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            return r.status, body, dict(r.headers)


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll an async predicate until it returns a truthy value."""
    async with asyncio.timeout(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(interval)


def bounded(seconds: float):
    """Fail a test that runs longer than ``seconds``."""
    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)
        return wrapper
    return deco


class Fleet:
    """Routers, simulated instances and tiny aiohttp fakes of one test; stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.routers: list[RouterProcess] = []
        self.sims: list[SimInstance] = []
        self.runners: list[web.AppRunner] = []
        self.tasks: list[asyncio.Task] = []

    async def router(self, config: dict | None = None, *args: str) -> RouterProcess:
        d = self.tmp_path / f"router{len(self.routers)}"
        d.mkdir()
        r = await start_router(d, config, *args)
        self.routers.append(r)
        return r

    async def sim(self, **cfg) -> SimInstance:
        inst = SimInstance(SimConfig(**cfg))
        await inst.start()
        self.sims.append(inst)
        return inst

    async def sims_sorted(self, n: int, **cfg) -> list[SimInstance]:
        """``n`` instances sorted by URL (the policies' candidate order)."""
        out = [await self.sim(**cfg) for _ in range(n)]
        return sorted(out, key=lambda s: s.url)

    async def fake(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in self.routers:
            await r.stop()
        for s in self.sims:
            await s.stop()
        for runner in self.runners:
            await runner.cleanup()


async def registered(router: RouterProcess) -> dict:
    """``GET /registered`` (asserting 200)."""
    status, body = await get_json(router.url + "/registered")
    assert status == 200
    return body


async def number(router: RouterProcess) -> dict:
    """``GET /registered_number`` (asserting 200)."""
    status, body = await get_json(router.url + "/registered_number")
    assert status == 200
    return body


async def register_all(router: RouterProcess, *instances: SimInstance) -> None:
    """Register each instance once by heartbeat (asserting 200), not waiting for its loop."""
    for inst in instances:
        assert await inst.register_once(router.url) == 200


class Served(Protocol):
    """Anything that serves HTTP at ``url``: a router, a simulated or a real instance."""

    @property
    def url(self) -> str: ...


async def metrics_text(target: Served) -> str:
    """``GET /metrics`` (asserting 200): the Prometheus exposition of a router or an instance."""
    async with aiohttp.ClientSession() as s, s.get(target.url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` whose labels include ``labels``, in
    a Prometheus exposition."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append((have, float(m.group(2))))
    return out


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of :func:`samples` (0 if there is none): one series when the labels pick one, a
    family's total when they pick several."""
    return sum(value for _, value in samples(text, name, **labels))


# -- raw HTTP/1.1 over a socket: what a client library hides (framing, closes, partial heads) --
@contextlib.asynccontextmanager
async def connect(port: int, host: str = "127.0.0.1"
                  ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection to ``host:port``, closed after the block."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (names lowercased) and the raw bytes of one response head."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers, head


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The body framed as ``headers`` say: ``Content-Length``, chunked, or up to the close."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
    return await reader.read()  # close-delimited


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers, _ = await read_head(reader)
    return status, headers, await read_body(reader, headers)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    """True once the server closed the connection (end of file or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionError:
        return True


# what differs between two answers of an engine to the same request: ids, clocks, sampled text,
# cache hits (what the first request left in the cache)
_VOLATILE = re.compile(rb'"(id|created|arrival_time|content|text|completion_token_ids|'
                       rb'cache_n|prompt_n|cached_tokens|prompt_ms|prompt_per_token_ms|'
                       rb'prompt_per_second|predicted_ms|predicted_per_token_ms|'
                       rb'predicted_per_second)":("(?:[^"\\]|\\.)*"|[^,}]*)')


def shape(raw: bytes) -> bytes:
    """An answer with what differs between two answers to the same request blanked out."""
    return _VOLATILE.sub(rb'"\1":_', raw)
