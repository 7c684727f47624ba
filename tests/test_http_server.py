"""The HTTP data plane (kvrouter.http + kvrouter.server.app) at the byte level.

Part 1 drives :mod:`kvrouter.http.server` with small handlers over raw sockets (HTTP/1.0,
chunked request bodies, pipelining, ``Expect: 100-continue``, body limits, malformed input).
Part 2 runs the router's application in-process in front of a scripted raw-socket instance
(relay framing, backpressure from a slow client, client disconnects, large bodies, stale pooled
connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable

import orjson
import pytest
from harness import connect, read_head, read_response

from kvrouter.config import RouterConfig
from kvrouter.http.server import start_server
from kvrouter.http.upstream import UpstreamPool
from kvrouter.instance import InstanceInfo, Role
from kvrouter.router import Router
from kvrouter.server.app import App

LOOPS = ["asyncio", "uvloop"]


def on_loop(case):
    """Run the async test ``case`` on both event loops (the router itself runs on uvloop)."""
    @pytest.mark.parametrize("loop", LOOPS)
    def test(loop: str) -> None:
        if loop == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            uvloop.run(asyncio.wait_for(case(), 60))
        else:
            asyncio.run(asyncio.wait_for(case(), 60))
    test.__name__ = case.__name__
    test.__doc__ = case.__doc__
    return test


# -- part 1: the server protocol ----------------------------------------------------------------
async def echo(req) -> None:
    """Echo method, path, query, body size and digest; ``/stream`` streams 3 parts."""
    conn = req.conn
    if req.path == "/stream":
        conn.start_stream(200, b"Content-Type: text/plain\r\n", None, b"one,")
        await asyncio.sleep(0.01)
        conn.write(b"two,")
        conn.write(b"three")
        conn.finish()
        return
    if req.too_large:
        conn.send(413, b'{"error":"too large"}')
        return
    body = orjson.dumps({"method": req.method, "path": req.path, "query": req.query_string,
                         "len": len(req.body), "sha": hashlib.sha256(req.body).hexdigest(),
                         "expect": (req.header(b"expect") or b"").decode()})
    conn.send(200, body)


@contextlib.asynccontextmanager
async def echo_server():
    server, http = await start_server(echo, "127.0.0.1", 0, max_body=1 << 20)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        http.close_all()


@on_loop
async def test_http10_close_and_keepalive():
    async with echo_server() as port:
        async with connect(port) as (r, w):
            w.write(b"GET /a?x=1 HTTP/1.0\r\n\r\n")
            status, headers, body = await read_response(r)
            assert status == 200 and orjson.loads(body)["query"] == "x=1"
            assert headers["connection"] == "close"
            assert await r.read() == b""          # the server closed the connection
        async with connect(port) as (r, w):
            for path in ("/one", "/two"):
                w.write(b"GET %s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % path.encode())
                status, headers, body = await read_response(r)
                assert headers["connection"] == "keep-alive"
                assert orjson.loads(body)["path"] == path


@on_loop
async def test_http10_streamed_response_is_close_delimited():
    async with echo_server() as port:
        async with connect(port) as (r, w):
            w.write(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            _, headers, _ = await read_head(r)
            assert "transfer-encoding" not in headers and "content-length" not in headers
            assert await r.read() == b"one,two,three"
        async with connect(port) as (r, w):  # HTTP/1.1: chunked, connection kept
            w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            _status, headers, body = await read_response(r)
            assert headers["transfer-encoding"] == "chunked" and body == b"one,two,three"
            w.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(r))[0] == 200


@on_loop
async def test_chunked_request_body():
    async with echo_server() as port:
        payload = b"hello chunked world" * 1000
        chunks = [payload[i:i + 777] for i in range(0, len(payload), 777)]
        async with connect(port) as (r, w):
            w.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for c in chunks:
                w.write(b"%x\r\n%s\r\n" % (len(c), c))
                await w.drain()
            w.write(b"0\r\n\r\n")
            status, _, body = await read_response(r)
        data = orjson.loads(body)
        assert status == 200 and data["len"] == len(payload)
        assert data["sha"] == hashlib.sha256(payload).hexdigest()


@on_loop
async def test_pipelined_requests_answer_in_order():
    async with echo_server() as port:
        reqs = b"".join(b"POST /p%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                        % (i, i, b"x" * i) for i in range(1, 6))
        async with connect(port) as (r, w):
            w.write(reqs)                  # five requests in one packet
            for i in range(1, 6):
                status, _, body = await read_response(r)
                data = orjson.loads(body)
                assert (status, data["path"], data["len"]) == (200, f"/p{i}", i)


@on_loop
async def test_expect_100_continue():
    async with echo_server() as port:
        async with connect(port) as (r, w):
            w.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            w.write(b"hello")
            status, _, body = await read_response(r)
            assert status == 200 and orjson.loads(body)["len"] == 5
        async with connect(port) as (r, w):  # too large: 413 at once, no 100
            w.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                    b"Expect: 100-continue\r\n\r\n" % (2 << 20))
            status, headers, _ = await read_response(r)
            assert status == 413 and headers["connection"] == "close"


@on_loop
async def test_large_body_and_limit():
    async with echo_server() as port:
        body = bytes(range(256)) * 4000            # ~1 MB, under the 1 MiB limit
        async with connect(port) as (r, w):
            w.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            w.write(body)
            status, _, out = await read_response(r)
            assert status == 200 and orjson.loads(out)["sha"] == hashlib.sha256(body).hexdigest()
        big = b"y" * (3 << 20)
        async with connect(port) as (r, w):  # over: 413 although the upload continues
            w.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big))
            w.write(big)
            status, _headers, _ = await read_response(r)
            assert status == 413
        async with connect(port) as (r, w):  # chunked over the limit
            w.write(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                w.write(b"%x\r\n%s\r\n" % (1 << 20, b"z" * (1 << 20)))
            status, _, _ = await read_response(r)
            assert status == 413


@on_loop
async def test_malformed_request_is_400():
    async with echo_server() as port, connect(port) as (r, w):
        w.write(b"NOT A REQUEST\r\n\r\n")
        status, _headers, body = await read_response(r)
        assert status == 400 and b"error" in body
        assert await r.read() == b""


@on_loop
async def test_oversized_head_is_431():
    async with echo_server() as port, connect(port) as (r, w):
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(80):                   # ~80 KB of unterminated headers, many reads
            w.write(b"X-Filler: " + b"f" * 1000 + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.003)
        status, headers, _ = await read_response(r)
        assert await r.read() == b""
        assert status == 431 and headers["connection"] == "close"


@on_loop
async def test_idle_keepalive_connections_are_closed():
    server, http = await start_server(echo, "127.0.0.1", 0, max_body=1 << 20)
    http.keepalive_secs = 0.2
    try:
        async with connect(server.sockets[0].getsockname()[1]) as (r, w):
            w.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(r))[0] == 200
            assert await asyncio.wait_for(r.read(), 2) == b""   # closed by the server
    finally:
        server.close()
        http.close_all()


# -- part 2: the router application in front of a scripted instance ------------------------------
class Instance(asyncio.Protocol):
    """A raw instance: records requests; answers per ``script(instance, request)``."""

    def __init__(self, owner: FakeInstance) -> None:
        self.owner = owner
        self.buf = b""
        self.served = 0
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.owner.conns.append(self)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            if head.startswith(b"GET "):        # probes, /v1/models
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            self.owner.requests.append((head, body))
            if self not in self.owner.posts:
                self.owner.posts.append(self)
            self.served += 1
            asyncio.ensure_future(self.owner.script(self, head, body))


class FakeInstance:
    def __init__(self, script) -> None:
        self.script = script
        self.requests: list[tuple[bytes, bytes]] = []
        self.conns: list[Instance] = []
        self.posts: list[Instance] = []     # connections that carried inference requests
        self.server = None
        self.port = 0

    async def start(self) -> FakeInstance:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: Instance(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.transport.close()


@contextlib.asynccontextmanager
async def router_app(*instances: FakeInstance, **server_cfg):
    cfg = RouterConfig()
    for k, v in server_cfg.items():
        setattr(cfg.server, k, v)
    infos = [InstanceInfo(role=Role.MIXED, host="127.0.0.1", scheme="http", port=str(inst.port))
             for inst in instances]
    async with app_server(cfg, infos) as served:
        yield served


@contextlib.asynccontextmanager
async def app_server(cfg: RouterConfig, infos: list[InstanceInfo]):
    """The router's application for ``cfg`` in-process on a free port, ``infos`` registered:
    ``(app, port, http server)``; everything closed after the block."""
    router = Router(cfg)
    for info in infos:
        router.registry.add(info)
    s = cfg.server
    pool = UpstreamPool(s.connect_timeout_secs, s.first_byte_timeout_secs,
                        s.stream_idle_timeout_secs)
    app = App(router, pool)
    server, http = await start_server(app.handle, "127.0.0.1", 0,
                                      max_body=int(s.max_body_mb * (1 << 20)))
    try:
        yield app, server.sockets[0].getsockname()[1], http
    finally:
        server.close()
        http.close_all()
        pool.close()
        await router.close()


CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_script(*pieces: bytes, pause: float = 0.002) -> Callable:
    """An SSE answer written as the given chunks, ``pause`` seconds apart, ended cleanly."""
    async def script(inst, head, raw):
        inst.transport.write(SSE_HEAD)
        for p in pieces:
            inst.transport.write(chunk(p))
            await asyncio.sleep(pause)
        inst.transport.write(b"0\r\n\r\n")
    return script


def post(path: str, body: bytes, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), version, extra, len(body), body))


def in_flight(app: App) -> int:
    return sum(i.load.requests for i in app.router.registry.all())


@on_loop
async def test_relay_framing_http10_and_11():
    events = [b"data: {\"i\":%d} \n\n" % i for i in range(5)] + [b"data: [DONE]\n\n"]
    fake = await FakeInstance(sse_script(*events, pause=0.005)).start()
    async with router_app(fake) as (_app, port, _http):
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", CHAT))
            status, headers, body = await read_response(r)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert headers["x-router-mixed-url"] == f"http://127.0.0.1:{fake.port}"
            assert body == b"".join(events)
        async with connect(port) as (r, w):     # HTTP/1.0: de-chunked, close-delimited
            w.write(post("/v1/chat/completions", CHAT, b"1.0"))
            status, headers, _ = await read_head(r)
            assert "transfer-encoding" not in headers and headers["connection"] == "close"
            assert await r.read() == b"".join(events)
    fake.close()


@on_loop
async def test_non_stream_keeps_content_length_and_pools_connections():
    reply = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 3}})

    async def script(inst, head, body):
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nX-Extra: 1\r\n\r\n%s" % (len(reply), reply))

    fake = await FakeInstance(script).start()
    async with router_app(fake) as (_app, port, _http):
        async with connect(port) as (r, w):
            for _ in range(5):
                w.write(post("/v1/chat/completions?q=1", CHAT, extra=b"X-Test: 1\r\n"))
                status, headers, body = await read_response(r)
                assert status == 200 and body == reply
                assert headers["content-length"] == str(len(reply)) and headers["x-extra"] == "1"
        assert len(fake.posts) == 1           # one pooled keep-alive connection
        head, body = fake.requests[-1]
        assert head.startswith(b"POST /v1/chat/completions?q=1 HTTP/1.1") and body == CHAT
        assert b"X-Test: 1" in head and head.count(b"Content-Length") == 1
    fake.close()


@on_loop
async def test_pipelined_inference_requests_answered_at_once_and_relayed_in_order():
    """Requests answered on the spot (no instance: 503, inside the parser's callback) and
    relayed ones, pipelined in one write: every answer, in order; ``close`` is honoured."""
    reply = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1}})

    async def script(inst, head, body):
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))

    async with router_app() as (app, port, _http):
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", CHAT) * 3)
            for _ in range(3):
                status, _, body = await read_response(r)
                assert status == 503 and orjson.loads(body)["error"]["type"]
        fake = await FakeInstance(script).start()
        app.router.registry.add(InstanceInfo(role=Role.MIXED, host="127.0.0.1", scheme="http",
                                             port=str(fake.port)))
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", CHAT) * 2
                    + post("/v1/chat/completions", CHAT, extra=b"Connection: close\r\n"))
            for _ in range(3):
                status, _, body = await read_response(r)
                assert status == 200 and body == reply
            assert await r.read() == b""                        # closed after the third
        async with connect(port) as (r, w):   # a malformed one after two good ones
            w.write(post("/v1/chat/completions", CHAT) * 2 + b"BOGUS\r\n\r\n")
            for _ in range(2):
                status, _, body = await read_response(r)
                assert status == 200 and body == reply
            status, _, body = await read_response(r)
            assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_request"
            assert await r.read() == b""
        assert len(fake.requests) == 5 and in_flight(app) == 0
        fake.close()


@on_loop
async def test_chunked_and_large_request_bodies_reach_the_instance():
    big = orjson.dumps({"messages": [{"role": "user", "content": "p" * (6 << 20)}]})

    async def script(inst, head, body):
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    fake = await FakeInstance(script).start()
    async with router_app(fake) as (_app, port, _http), connect(port) as (r, w):
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"\r\n")
        for i in range(0, len(CHAT), 7):
            w.write(chunk(CHAT[i:i + 7]))
        w.write(b"0\r\n\r\n")
        assert (await read_response(r))[2] == b"ok"
        w.write(post("/v1/chat/completions", big))
        assert (await read_response(r))[2] == b"ok"
    assert fake.requests[0][1] == CHAT and b"Transfer-Encoding" not in fake.requests[0][0]
    assert fake.requests[1][1] == big
    fake.close()


@on_loop
async def test_slow_client_backpressure_bounds_router_memory():
    event = b"data: " + b"x" * (32768 - 8) + b"\n\n"     # 32 KiB events, 64 MiB in total
    total = 2048
    sent = []

    async def script(inst, head, body):
        inst.transport.write(SSE_HEAD)
        for _ in range(total):
            while inst.transport.get_write_buffer_size() > (1 << 20):
                if inst.lost.done():           # a well-behaved instance waits for its socket
                    return
                await asyncio.sleep(0.005)
            inst.transport.write(chunk(event))
            sent.append(1)
        inst.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    fake = await FakeInstance(script).start()
    async with router_app(fake) as (app, port, http):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v1/chat/completions", orjson.dumps({"stream": True, "messages": []})))
        status, headers, _ = await read_head(reader)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        writer.transport.pause_reading()           # the client stalls
        await asyncio.sleep(1.0)
        assert len(sent) < total // 2, "the instance was not slowed down"
        buffered = sum(c.transport.get_write_buffer_size() for c in http.connections)
        assert buffered <= 1 << 20, buffered    # the router holds about its high-water mark
        assert any(up._paused for up in app.pool._live)
        writer.transport.resume_reading()
        digest, size = hashlib.sha256(), 0
        while True:                               # de-chunk while hashing (64 MiB)
            n = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if n == 0:
                break
            data = await reader.readexactly(n + 2)
            digest.update(data[:-2])
            size += n
        assert size == len(event) * total + len(b"data: [DONE]\n\n")
        expected = hashlib.sha256()
        for _ in range(total):
            expected.update(event)
        expected.update(b"data: [DONE]\n\n")
        assert digest.hexdigest() == expected.hexdigest()
        writer.close()
    fake.close()


@on_loop
async def test_client_disconnect_closes_the_instance_connection():
    async def script(inst, head, body):
        inst.transport.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        for i in range(200):
            await asyncio.sleep(0.02)
            if inst.lost.done():
                return
            inst.transport.write(chunk(b"data: more\n\n"))

    fake = await FakeInstance(script).start()
    async with router_app(fake) as (app, port, _http):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v1/chat/completions", orjson.dumps({"stream": True,
                                                                "messages": []})))
        await read_head(reader)
        await reader.read(10)
        assert in_flight(app) == 1
        writer.transport.abort()                  # the client goes away mid-stream
        await asyncio.wait_for(fake.posts[0].lost, 2)   # the instance sees the disconnect
        for _ in range(100):
            if in_flight(app) == 0:
                break
            await asyncio.sleep(0.01)
        assert in_flight(app) == 0
    fake.close()


@on_loop
async def test_stale_pooled_connection_is_retried_transparently():
    """The keep-alive race: the instance closes an idle connection just as the router reuses
    it. The request is sent again on a fresh connection to the same instance."""
    async def script(inst, head, body):
        if inst.served == 2:
            inst.transport.close()            # closes instead of answering the reused request
            return
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    fake = await FakeInstance(script).start()
    async with router_app(fake) as (_app, port, _http), connect(port) as (r, w):
        for _ in range(2):
            w.write(post("/v1/chat/completions", CHAT))
            status, _, body = await read_response(r)
            assert status == 200 and body == b"ok"
    assert len(fake.requests) == 3 and len(fake.posts) == 2
    fake.close()


# -- the load-only request view ------------------------------------------------------------------
VIEW_BODIES = [
    ({"messages": [{"role": "user", "content": "Say hi."}]}, "/v1/chat/completions"),
    ({"messages": [{"role": "system", "content": "a" * 100}, {"role": "user", "content": "é✓"},
                   {"role": "assistant", "content": None}], "tools": [{"b": 1, "a": [1, 2]}],
      "session_id": "s1"}, "/v1/chat/completions"),
    ({"messages": []}, "/v1/chat/completions"),
    ({}, "/v1/chat/completions"),
    ({"messages": "x"}, "/v1/chat/completions"),
    ({"prompt": "hello", "extra_body": {"session_id": "s2"}}, "/v1/completions"),
    ({"prompt": ["hello", "x"]}, "/v1/completions"),
    ({"prompt": [1, 2, 3]}, "/v1/completions"),
    ({"prompt_token_ids": [1, 2]}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": 1}]}]},
     "/v1/chat/completions"),
]


@pytest.mark.parametrize(("body", "endpoint"), VIEW_BODIES)
async def test_load_only_view_equals_the_full_view(body, endpoint):
    """kvrouter.prefix.view.fast_view computes the token estimate without rendering; it must
    agree with Router.request_view (it falls back to it for shapes it does not handle)."""
    from kvrouter.prefix.view import fast_view

    router = Router(RouterConfig())
    try:
        assert router.load_only((Role.MIXED,))
        full = await router.request_view(body, endpoint, (Role.MIXED,))
        fast = fast_view(body, endpoint)
        if fast is None:     # handled by the full path
            return
        assert (fast.token_estimate, fast.prompt, fast.tokens, fast.hashes, fast.session_id) == \
            (full.token_estimate, full.prompt, full.tokens, full.hashes, full.session_id)
    finally:
        await router.close()
