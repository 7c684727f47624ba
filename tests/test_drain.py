"""Graceful drain on SIGTERM, with a real router process in front of simulated instances that
stream slowly: the streams in progress finish, ``/health`` answers 503 ``draining`` on an open
connection, new connections are refused, idle ones closed, and the process exits 0; a second
SIGTERM exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aiohttp
import orjson
import pytest
from harness import bounded, closed_by_server, read_response

CHAT = {"model": "default", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def slow_instances(sims, n: int, router, *, tokens: int, itl: float) -> None:
    """``n`` instances answering ``tokens`` tokens, one every ``itl`` seconds, registered."""
    for inst in await sims(n, max_num_seqs=256, output_tokens=tokens):
        inst.knobs.itl = itl
        assert await inst.register_once(router.url) == 200


async def stream(session: aiohttp.ClientSession, router, started: list[int],
                 tokens: int) -> bytes:
    """One streamed chat completion; ``started`` gets an entry once its first bytes came."""
    async with session.post(router.url + "/v1/chat/completions",
                            json={**CHAT, "max_tokens": tokens}) as r:
        assert r.status == 200
        first = await r.content.readany()
        started.append(1)
        return first + await r.read()


async def start_streams(router, count: int, tokens: int
                        ) -> tuple[aiohttp.ClientSession, list[asyncio.Task], list[int]]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    started: list[int] = []
    tasks = [asyncio.ensure_future(stream(session, router, started, tokens))
             for _ in range(count)]
    async with asyncio.timeout(30):
        while len(started) < count:
            await asyncio.sleep(0.05)
    return session, tasks, started


async def refuses_new_connections(router) -> None:
    """Wait until a new connection to the router is refused (its listening sockets closed)."""
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection(router.host, router.port)
            except (ConnectionRefusedError, ConnectionResetError):
                return      # reset: the attempt was in the closed socket's backlog
            writer.close()
            await asyncio.sleep(0.02)


async def draining_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Finish the request head started before SIGTERM: ``/health`` is 503 ``draining``, with
    its other fields, and closes the connection."""
    writer.write(b"Host: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    data = orjson.loads(body)
    assert status == 503 and headers["connection"] == "close"
    assert data["status"] == "draining"
    assert data["mode"] == "mixed" and data["ready"] is True and data["routable"]["mixed"] == 2
    assert await closed_by_server(reader)


@bounded(120)
async def test_sigterm_lets_200_streams_finish_then_exits_0(router_factory, sims):
    grace = 30
    router = await router_factory({"server": {"shutdown-grace-secs": grace}})
    await slow_instances(sims, 2, router, tokens=40, itl=0.1)       # streams of about 4 s
    probe = await asyncio.open_connection(router.host, router.port)
    idle = await asyncio.open_connection(router.host, router.port)
    idle[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(idle[0]))[0] == 200
    session, tasks, _ = await start_streams(router, 200, tokens=40)
    probe[1].write(b"GET /health HTTP/1.1\r\n")      # a request arriving during the drain
    try:
        router.proc.send_signal(signal.SIGTERM)
        await refuses_new_connections(router)
        await draining_health(*probe)
        assert await closed_by_server(idle[0]), "an idle keep-alive connection is closed"
        assert not all(t.done() for t in tasks), "closed while the streams still ran"
        bodies = await asyncio.gather(*tasks)
        assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
        assert await asyncio.wait_for(router.proc.wait(), grace) == 0
    finally:
        for task in tasks:
            task.cancel()
        await session.close()
        for _, writer in (probe, idle):
            writer.close()
    log = router.log()
    assert "draining: new connections refused; 200 requests in progress" in log
    assert "requests still running" in log and ": 0 requests still running" in log


@bounded(60)
async def test_second_sigterm_exits_at_once(router_factory, sims):
    router = await router_factory({"server": {"shutdown-grace-secs": 20}})
    await slow_instances(sims, 2, router, tokens=200, itl=0.1)      # streams of about 20 s
    probe = await asyncio.open_connection(router.host, router.port)
    session, tasks, _ = await start_streams(router, 10, tokens=200)
    probe[1].write(b"GET /health HTTP/1.1\r\n")
    try:
        router.proc.send_signal(signal.SIGTERM)
        await refuses_new_connections(router)
        await draining_health(*probe)                # draining, not gone
        assert router.proc.returncode is None and not any(t.done() for t in tasks)
        router.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(router.proc.wait(), 5) == 0, "well within the grace"
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Exception) or not r.endswith(b"data: [DONE]\n\n")
                   for r in results), "the streams were cut"
    finally:
        for task in tasks:
            task.cancel()
        await session.close()
        probe[1].close()
    assert "(second signal)" in router.log()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


@bounded(120)
@pytest.mark.parametrize("group", [False, True], ids=["supervisor", "process-group"])
async def test_workers_drain_on_sigterm(router_factory, sims, group):
    """``group``: every process gets the signal, as from Ctrl-C or systemd; the supervisor's
    forwarded stop may reach a worker before the signal does, and is not a second signal."""
    router = await router_factory({"server": {"shutdown-grace-secs": 30}}, "--workers", "2")
    await slow_instances(sims, 2, router, tokens=30, itl=0.1)
    session, tasks, _ = await start_streams(router, 20, tokens=30)
    workers = children(router.proc.pid)
    assert len(workers) == 2
    try:
        router.proc.send_signal(signal.SIGTERM)
        if group:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
        await refuses_new_connections(router)
        bodies = await asyncio.gather(*tasks)
        assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
        assert await asyncio.wait_for(router.proc.wait(), 30) == 0
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await session.close()
    assert router.log().count("drained in") == 2, "each worker drained"
