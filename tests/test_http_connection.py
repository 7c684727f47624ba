"""One client connection over its life, against a real router process over raw sockets:
pipelined requests answered at once (each from the dispatcher's loop, not from the previous
one's call stack), and the request body's own clock (408 for a stalled body; a slow upload
that keeps sending is not cut by the keep-alive timer)."""

from __future__ import annotations

import asyncio

import orjson
from harness import bounded, closed_by_server, connect, read_response

PIPELINED = 1000
KEY = "sk-pipelined-0123456789"


def pipelined(i: int) -> bytes:
    """Request ``i`` of the pipeline, each answered inside its handler: invalid JSON failing
    at a position that names ``i`` (400), no API key (401), no instance to take it (503)."""
    body = b'{"a":' + b" " * i + b"x}" if i % 3 == 0 else b'{"prompt": "p%d"}' % i
    key = b"" if i % 3 == 1 else b"Authorization: Bearer %b\r\n" % KEY.encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"%bContent-Length: %d\r\n\r\n%b" % (key, len(body), body))


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]


@bounded(90)
async def test_pipelined_requests_answered_at_once_do_not_recurse(router_factory):
    """One connection: ``GET /health`` (answered in a task), then 1000 requests, each
    answered inside its handler: all get their answer, in order, and nothing is logged at
    ERROR (each was dispatched from the previous one's call stack, past Python's recursion
    limit: 500s and tracebacks)."""
    router = await router_factory({"auth": {"api-keys": [KEY]}})
    async with connect(router.port) as (r, w):
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"".join(pipelined(i) for i in range(PIPELINED)))
        drained = asyncio.ensure_future(w.drain())
        status, _, _ = await read_response(r)
        assert status == 200
        for i in range(PIPELINED):
            status, headers, raw = await read_response(r)
            error = orjson.loads(raw)["error"]
            want = [(400, "invalid_json"), (401, "invalid_api_key"),
                    (503, "no_available_instance")][i % 3]
            assert (status, error["code"]) == want, (i, status, error)
            if i % 3 == 0:
                assert f"(char {5 + i})" in error["message"], (i, error["message"])
            assert headers.get("connection") != "close"
        await drained
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")      # the connection still serves
        assert (await read_response(r))[0] == 200
    await router.stop()
    assert error_lines(router.log()) == []


def upload_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


@bounded(60)
async def test_slow_upload_that_keeps_sending_is_not_cut(router_factory):
    """keepalive 1 s, header timeout 2 s: a body sent one byte every 0.3 s for ~4.5 s is read
    to its end and answered (the keep-alive timer used to reset it, unanswered)."""
    router = await router_factory({"server": {"keepalive-timeout-secs": 1,
                                              "header-timeout-secs": 2}})
    body = b'{"messages": x}'           # invalid JSON: answered 400 once complete
    async with connect(router.port) as (r, w):
        w.write(upload_head(len(body)))
        for byte in body:
            w.write(bytes([byte]))
            await w.drain()
            await asyncio.sleep(0.3)
        status, headers, raw = await read_response(r)
        assert status == 400 and orjson.loads(raw)["error"]["code"] == "invalid_json", raw
        assert headers.get("connection") != "close"


@bounded(60)
async def test_body_after_an_idle_spell_gets_its_own_clock(router_factory):
    """keepalive 2 s: a connection idle 1.8 s, then a request whose body comes in two parts
    1.2 s apart, is answered (it was closed unanswered: the body was timed from the idle
    start)."""
    router = await router_factory({"server": {"keepalive-timeout-secs": 2}})
    body = b'{"messages": x}'
    async with connect(router.port) as (r, w):
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(r))[0] == 200
        await asyncio.sleep(1.8)
        w.write(upload_head(len(body)) + body[:5])
        await w.drain()
        await asyncio.sleep(1.2)
        w.write(body[5:])
        status, _, raw = await read_response(r)
        assert status == 400 and orjson.loads(raw)["error"]["code"] == "invalid_json", raw


@bounded(60)
async def test_stalled_body_gets_408_and_close(router_factory):
    """A body that stops arriving gets 408 (OpenAI-style JSON) once no byte came for
    ``header-timeout-secs``, then the connection is closed; a keep-alive timeout far longer
    does not delay it."""
    router = await router_factory({"server": {"keepalive-timeout-secs": 60,
                                              "header-timeout-secs": 1}})
    async with connect(router.port) as (r, w):
        w.write(upload_head(100) + b'{"messages": [')
        await w.drain()
        status, headers, raw = await asyncio.wait_for(read_response(r), 10)
        assert status == 408 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        error = orjson.loads(raw)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert "body" in error["message"]
        assert await closed_by_server(r)
    await router.stop()
    assert error_lines(router.log()) == []


@bounded(60)
async def test_stalled_chunked_body_gets_408(router_factory):
    """The same for a chunked upload that stops between chunks."""
    router = await router_factory({"server": {"keepalive-timeout-secs": 60,
                                              "header-timeout-secs": 1}})
    async with connect(router.port) as (r, w):
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"\r\n5\r\n{\"a\":\r\n")
        await w.drain()
        status, _, raw = await asyncio.wait_for(read_response(r), 10)
        assert status == 408 and orjson.loads(raw)["error"]["code"] == "request_timeout"
        assert await closed_by_server(r)
