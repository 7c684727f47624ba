"""Limits on what one client may send or hold, against a real router process over raw sockets:
request-target length (414), head size and header count (431), a head sent too slowly (408),
the keep-alive idle timeout and the cap on open connections (503, counted on /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys

import orjson
import pytest
from harness import bounded, closed_by_server, connect, read_response


async def refused(router, request: bytes) -> tuple[int, dict, dict]:
    """Send ``request`` on a new connection; the answer (status, headers, JSON error), after
    which the router must have closed the connection."""
    async with connect(router.port) as (r, w):
        w.write(request)
        status, headers, body = await read_response(r)
        assert await closed_by_server(r)
    return status, headers, orjson.loads(body)


async def ok(router, request: bytes) -> int:
    async with connect(router.port) as (r, w):
        w.write(request)
        return (await read_response(r))[0]


def health(target: bytes = b"/health", headers: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target, headers)


async def send_slowly(writer: asyncio.StreamWriter, parts: list[bytes], pause: float) -> None:
    """Write ``parts`` one by one, ``pause`` seconds apart, until the router closes."""
    with contextlib.suppress(ConnectionError):
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)


@bounded(60)
async def test_long_url_is_414_and_closes(router_factory):
    router = await router_factory()
    assert await ok(router, health(b"/health?" + b"q" * 8000)) == 200   # under 8 KiB: served
    for size in (9000, 100_000):
        status, headers, body = await refused(router, health(b"/health?" + b"q" * size))
        assert status == 414 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert body["error"]["code"] == "uri_too_long"
        assert body["error"]["type"] == "invalid_request_error"
        assert "8192" in body["error"]["message"]


@bounded(60)
async def test_big_header_is_431_in_one_read_or_many(router_factory):
    router = await router_factory({"server": {"max-header-bytes": 16384}})
    assert await ok(router, health(headers=b"X-Big: " + b"b" * 15000 + b"\r\n")) == 200
    status, headers, body = await refused(router, health(headers=b"X-Big: " + b"b" * 100_000
                                                         + b"\r\n"))
    assert status == 431 and headers["connection"] == "close"
    assert body["error"]["code"] == "headers_too_large" and "16384" in body["error"]["message"]
    async with connect(router.port) as (r, w):      # two reads, each under the limit
        w.write(b"GET /health HTTP/1.1\r\nX-One: " + b"1" * 10_000 + b"\r\n")
        await w.drain()
        await asyncio.sleep(0.2)
        w.write(b"X-Two: " + b"2" * 10_000 + b"\r\n\r\n")
        status, _, _ = await read_response(r)
        assert status == 431 and await closed_by_server(r)
    async with connect(router.port) as (r, w):      # one endless header line, many small reads
        w.write(b"GET /health HTTP/1.1\r\nX-Slow: ")
        dribble = asyncio.ensure_future(send_slowly(w, [b"s" * 500] * 200, 0.002))
        status, headers, _ = await read_response(r)
        dribble.cancel()
        assert status == 431 and await closed_by_server(r)


@bounded(60)
async def test_many_headers_is_431(router_factory):
    router = await router_factory()
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(90))
    assert await ok(router, health(headers=fields)) == 200
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    status, headers, body = await refused(router, health(headers=fields))
    assert status == 431 and headers["connection"] == "close"
    assert body["error"]["code"] == "headers_too_large" and "100" in body["error"]["message"]


@bounded(60)
async def test_slow_head_gets_408_but_an_idle_connection_does_not(router_factory):
    router = await router_factory({"server": {"header-timeout-secs": 1}})
    async with connect(router.port) as (idle_r, idle_w), connect(router.port) as (r, w):
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        # one header every 0.1 s, for 10 s: the head is never complete within 1 s
        dribble = asyncio.ensure_future(
            send_slowly(w, [b"X-Drip-%d: 1\r\n" % i for i in range(100)], 0.1))
        status, headers, raw = await read_response(r)
        dribble.cancel()
        assert status == 408 and headers["connection"] == "close"
        assert orjson.loads(raw)["error"]["code"] == "request_timeout"
        assert await closed_by_server(r)
        # a connection that has not started a request is not timed by the header timeout
        idle_w.write(health())
        assert (await read_response(idle_r))[0] == 200


@bounded(60)
async def test_idle_keepalive_connection_is_closed(router_factory):
    router = await router_factory({"server": {"keepalive-timeout-secs": 1}})
    async with connect(router.port) as (r, w):
        w.write(health())
        status, headers, _ = await read_response(r)
        assert status == 200 and "connection" not in headers      # kept alive
        assert await closed_by_server(r, timeout=15)


async def refused_total(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """``kvrouter_http_connections_refused_total``, asked on an open connection."""
    writer.write(health(b"/metrics"))
    status, _, body = await read_response(reader)
    assert status == 200
    match = re.search(rb"^kvrouter_http_connections_refused_total (\S+)$", body, re.M)
    assert match, "the counter is exposed"
    return float(match.group(1))


@bounded(60)
async def test_connection_cap_refuses_new_connections_and_counts_them(router_factory):
    router = await router_factory({"server": {"max-connections": 4}})
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connect(router.port)) for _ in range(4)]
        assert await refused_total(*held[0]) == 0
        for r, w in held:                       # all four accepted and served
            w.write(health())
            assert (await read_response(r))[0] == 200
        for _ in range(2):
            async with connect(router.port) as (r, _w):
                try:
                    status, headers, body = await read_response(r)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass                        # closed before the 503 could be read
                else:
                    assert status == 503 and headers["connection"] == "close"
                    assert orjson.loads(body)["error"]["code"] == "too_many_connections"
                assert await closed_by_server(r)
        assert await refused_total(*held[0]) == 2
        held[1][1].close()                      # one leaves: room for a new one
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    if await ok(router, health()) == 200:
                        break
                await asyncio.sleep(0.05)       # the router has not seen the close yet


@pytest.mark.parametrize("key, value", [("max-headers", 0), ("header-timeout-secs", 0),
                                        ("max-connections", "many"), ("max-url-bytes", 10)])
async def test_bad_limit_is_a_config_error_naming_file_and_key(tmp_path, key, value):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"server:\n  port: 0\n  {key}: {value}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "--config_path", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(tmp_path))
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:             # it started instead of refusing the value
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert f"config error: {cfg}: server.{key}: " in err.decode()
