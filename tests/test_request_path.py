"""The request path (kvrouter.server: inference, leg, pd, relay, forward) in-process, over real
sockets on 127.0.0.1, in front of scripted raw-socket instances.

Header forwarding (both directions, unit and end to end), the relay (framing, the
``stream_interrupted`` event, aborts, usage metrics), the PD retry rules (connect failures,
prefill statuses, ``pd_reschedule``, budgets, first-byte timeouts) and the mixed retry rules.
After every case the in-flight load of every instance is back to 0 and no lease was released
twice. The fakes and raw client helpers come from ``test_http_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace

import orjson
from harness import connect, read_head, read_response
from test_http_server import (
    CHAT,
    SSE_HEAD,
    FakeInstance,
    app_server,
    chunk,
    in_flight,
    on_loop,
    post,
    router_app,
    sse_script,
)

from kvrouter.config import RouterConfig
from kvrouter.http.headers import HOP_BY_HOP, end_to_end
from kvrouter.http.request import Request
from kvrouter.instance import InstanceInfo, Role
from kvrouter.server.app import App
from kvrouter.server.forward import forward_block
from kvrouter.server.relay import response_head, usage_of
from kvrouter.server.retry import RetryRatio

URL = "http://127.0.0.1:%d"


# -- helpers ------------------------------------------------------------------------------------
def reply(inst, status: int = 200, body: bytes = b"{}", ctype: bytes = b"application/json",
          extra: bytes = b"") -> None:
    """A complete answer with ``Content-Length`` on the fake instance's connection."""
    inst.transport.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (status, ctype, len(body), extra, body))


async def never(inst, head, body) -> None:
    """No answer at all (the router must give up or the client leave)."""


def json_script(status: int = 200, body: bytes = b'{"choices":[]}') -> Callable:
    async def script(inst, head, raw):
        reply(inst, status, body)
    return script


class KvCache:
    """Ties fake decodes to fake prefills like the engines are: a decode answers a request only
    once a prefill has answered the same ``request_id`` (its KV cache arrived)."""

    def __init__(self) -> None:
        self.ready: dict[str, asyncio.Event] = {}

    def _event(self, rid: str) -> asyncio.Event:
        return self.ready.setdefault(rid, asyncio.Event())

    def prefill(self, status: int = 200, body: bytes = b"{}") -> Callable:
        async def script(inst, head, raw):
            reply(inst, status, body)
            if status == 200:
                self._event(orjson.loads(raw)["request_id"]).set()
        return script

    def decode(self, answer: Callable) -> Callable:
        """``answer(inst)`` once the KV cache of the request is there (never, else)."""
        async def script(inst, head, raw):
            wait = asyncio.ensure_future(self._event(orjson.loads(raw)["request_id"]).wait())
            await asyncio.wait([wait, inst.lost], return_when=asyncio.FIRST_COMPLETED)
            if wait.done() and not inst.lost.done():
                answer(inst)
            wait.cancel()
        return script

    def decode_json(self, status: int = 200, body: bytes = b"{}") -> Callable:
        return self.decode(lambda inst: reply(inst, status, body))


class Dead:
    """A port that refuses connections: bound, never listening (held until closed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def fakes(*scripts):
    started = [await FakeInstance(s).start() for s in scripts]
    try:
        yield started
    finally:
        for f in started:
            f.close()


class LeaseLog(logging.Handler):
    """Collects ``kvrouter.load`` warnings (a lease released twice is clamped and logged)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watch_leases():
    handler = LeaseLog()
    logger = logging.getLogger("kvrouter.load")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages


async def until(cond: Callable[[], bool], secs: float = 3.0) -> None:
    """Wait for ``cond()`` (background work such as a prefill drain), bounded."""
    async with asyncio.timeout(secs):
        while not cond():
            await asyncio.sleep(0.005)


def loads(app: App) -> dict[str, tuple[int, int]]:
    return {i.url: (i.load.requests, i.load.tokens) for i in app.router.registry.all()}


async def settled(app: App) -> None:
    """Every instance's in-flight requests and tokens are back to 0."""
    try:
        await until(lambda: all(v == (0, 0) for v in loads(app).values()))
    except TimeoutError:
        pass
    assert all(v == (0, 0) for v in loads(app).values()), loads(app)


def sample(app: App, name: str, **labels: str) -> float:
    return app.router.metrics.registry.get_sample_value(name, labels) or 0.0


def retries(app: App, reason: str) -> float:
    return sample(app, "kvrouter_retries_total", reason=reason)


@contextlib.asynccontextmanager
async def mixed_app(*instances, **server_cfg):
    with watch_leases():
        async with router_app(*instances, **server_cfg) as (app, port, http):
            yield app, port, http
            await settled(app)


def pd_info(role: Role, port: int, engine: str | None = None) -> InstanceInfo:
    """A PD registration: FastDeploy's (rdma on both sides, so every pair can be made), or
    a vLLM / SGLang one."""
    if engine is not None:
        return InstanceInfo(role=role, host="127.0.0.1", scheme="http", port=str(port),
                            engine=engine, bootstrap_port="9011" if engine == "sglang" else None)
    return InstanceInfo(role=role, host="127.0.0.1", scheme="http", port=str(port),
                        connector_port=str(8100 + port % 100), engine_worker_queue_port="8200",
                        transfer_protocol=("rdma",), rdma_ports=("7000",), device_ids=("0",))


@contextlib.asynccontextmanager
async def pd_app(prefills, decodes, *, scheduler: dict | None = None, engine: str | None = None,
                 **server_cfg):
    cfg = RouterConfig()
    cfg.server.splitwise = True
    for k, v in server_cfg.items():
        setattr(cfg.server, k, v)
    for k, v in (scheduler or {}).items():
        setattr(cfg.scheduler, k, v)
    infos = ([pd_info(Role.PREFILL, inst.port, engine) for inst in prefills]
             + [pd_info(Role.DECODE, inst.port, engine) for inst in decodes])
    async with app_server(cfg, infos) as (app, port, _http):
        with watch_leases():
            yield app, port
            await settled(app)


@contextlib.contextmanager
def hold(app: App, port: int, tokens: int = 1 << 20) -> Iterator[None]:
    """A lease on the instance at ``port`` during the block, so that load policies pick
    another one first."""
    inst = next(i for i in app.router.registry.all() if i.url == URL % port)
    lease = inst.load.acquire(tokens)
    try:
        yield
    finally:
        lease.release()


async def ask(port: int, body: bytes = CHAT, path: str = "/v1/chat/completions",
              extra: bytes = b"", version: bytes = b"1.1"):
    async with connect(port) as (r, w):
        w.write(post(path, body, version, extra))
        return await read_response(r)


def sent_json(fake: FakeInstance, i: int = -1) -> dict:
    return orjson.loads(fake.requests[i][1])


def error_of(body: bytes) -> dict:
    return orjson.loads(body)["error"]


PD_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "request_id": "req-1"})
PREFILL_OK = b'{"choices":[{"index":0}],"usage":{"prompt_tokens":5}}'
DECODE_OK = b'{"id":"chatcmpl-req-1","choices":[{"finish_reason":"stop"}]}'


# -- header forwarding: unit --------------------------------------------------------------------
CLIENT_HEADERS = [
    (b"Host", b"router.example"),
    (b"Connection", b"keep-alive, X-Secret"),
    (b"X-Secret", b"drop me"),
    (b"Keep-Alive", b"timeout=5"),
    (b"TE", b"trailers"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Trailer", b"X-T"),
    (b"Upgrade", b"h2c"),
    (b"Proxy-Authorization", b"Basic eA=="),
    (b"Content-Length", b"5"),
    (b"Expect", b"100-continue"),
    (b"X-KVRouter-Priority", b"batch"),     # the router's own
    (b"X-Request-Id", b"AbC-1"),
    (b"Accept-Encoding", b"gzip, br"),
    (b"authorization", b"Bearer t"),
    (b"x-MiXeD-Case", b"Value Kept"),
]
KEPT = (b"X-Request-Id: AbC-1\r\nAccept-Encoding: gzip, br\r\nauthorization: Bearer t\r\n"
        b"x-MiXeD-Case: Value Kept\r\n")


def request_with(headers: list[tuple[bytes, bytes]]) -> Request:
    return Request(None, "POST", b"/v1/chat/completions", "1.1", headers, True)  # type: ignore


def test_forward_block_drops_hop_by_hop_and_connection_named_headers():
    assert forward_block(request_with(CLIENT_HEADERS)) == KEPT


def test_forward_block_pd_replaces_accept_encoding_with_identity():
    block = forward_block(request_with(CLIENT_HEADERS), identity=True)
    assert block == (b"X-Request-Id: AbC-1\r\nauthorization: Bearer t\r\n"
                     b"x-MiXeD-Case: Value Kept\r\nAccept-Encoding: identity\r\n")
    # no Accept-Encoding from the client: identity is still sent
    assert forward_block(request_with([(b"X-A", b"1")]), identity=True) == \
        b"X-A: 1\r\nAccept-Encoding: identity\r\n"


def test_forward_block_connection_tokens_are_case_insensitive():
    headers = [(b"CONNECTION", b" X-One ,x-two,,"), (b"x-ONE", b"1"), (b"X-Two", b"2"),
               (b"X-Three", b"3")]
    assert forward_block(request_with(headers)) == b"X-Three: 3\r\n"


def test_forward_block_several_connection_headers_all_count():
    """Connection field lines combine (RFC 9110 §5.3): every one's names are dropped."""
    headers = [(b"Connection", b"X-A"), (b"Connection", b"X-B"), (b"X-A", b"1"),
               (b"X-B", b"2"), (b"X-C", b"3")]
    assert forward_block(request_with(headers)) == b"X-C: 3\r\n"


def test_response_head_filters_and_reports_framing():
    headers = [(b"Content-Type", b"Text/Event-Stream; charset=utf-8"),
               (b"Content-Length", b"12"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"),
               (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5"),
               (b"Proxy-Authenticate", b"Basic"), (b"Trailer", b"X-T"), (b"Upgrade", b"h2c"),
               (b"x-Backend-Case", b"KeepMe"), (b"Set-Cookie", b"a=1")]
    head, length, sse = response_head(headers, b"X-Router-Mixed-URL: u\r\n")
    assert head == (b"Content-Type: Text/Event-Stream; charset=utf-8\r\n"
                    b"x-Backend-Case: KeepMe\r\nSet-Cookie: a=1\r\nX-Router-Mixed-URL: u\r\n")
    assert (length, sse) == (12, True)
    head, length, sse = response_head(
        [(b"content-type", b"application/json"), (b"content-length", b"x1")], b"")
    assert (head, length, sse) == (b"content-type: application/json\r\n", None, False)


def test_usage_of_reads_the_last_usage():
    raw = (b'data: {"usage":{"prompt_tokens":1}}\n\n'
           b'data: {"usage":{"prompt_tokens" : 12,"prompt_tokens_details":'
           b'{"cached_tokens": 8}}}\n\n')
    assert usage_of(raw) == (12, 8)
    assert usage_of(b'{"text":"\\"prompt_tokens\\": 3"}') == (None, None)
    assert usage_of(b'{"usage":{"prompt_tokens":4}}') == (4, None)


# -- header forwarding: end to end --------------------------------------------------------------
RESPONSE_EXTRA = (b"Connection: keep-alive, X-Hop-Resp\r\nKeep-Alive: timeout=5\r\n"
                  b"X-Hop-Resp: secret\r\nProxy-Authenticate: Basic\r\n"
                  b"X-Backend-Case: KeepMe\r\n")


def request_headers(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")[1:]


def test_end_to_end_drops_what_connection_names_and_only_that():
    """The filter's cases, fast path (no ``Connection``, or one naming only dropped fields)
    and slow path alike: order, case and values of the kept headers are unchanged."""
    base = [(b"Host", b"h"), (b"X-A", b"1"), (b"Keep-Alive", b"timeout=5"), (b"x-b", b"2"),
            (b"Close", b"c"), (b"X-C", b"3")]
    kept = [(b"x-a", b"X-A", b"1"), (b"x-b", b"x-b", b"2"), (b"close", b"Close", b"c"),
            (b"x-c", b"X-C", b"3")]
    drop = HOP_BY_HOP | {b"host"}
    assert end_to_end(base, drop) == kept
    assert end_to_end([*base, (b"Connection", b"keep-alive")], drop) == kept
    assert end_to_end([(b"CONNECTION", b" Keep-Alive , ,Host "), *base], drop) == kept
    assert end_to_end([*base, (b"Connection", b"close")], drop) == \
        [h for h in kept if h[0] != b"close"]
    # several Connection headers, names in any case, empty items ignored
    assert end_to_end([(b"Connection", b"X-a,, "), *base, (b"connection", b"KEEP-ALIVE, x-C")],
                      drop) == [kept[1], kept[2]]
    assert end_to_end([(b"Connection", b""), *base], drop) == kept
    assert end_to_end([], drop) == []


@on_loop
async def test_headers_end_to_end_mixed():
    async def script(inst, head, body):
        reply(inst, 200, b'{"ok":1}', extra=RESPONSE_EXTRA)

    async with fakes(script) as (fake,), mixed_app(fake) as (app, port, _http):
        async with connect(port) as (r, w):
            w.write(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: router.example\r\n"
                    b"Connection: keep-alive, X-Secret\r\nX-Secret: drop me\r\n"
                    b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
                    b"Transfer-Encoding: chunked\r\nX-Request-Id: AbC-1\r\n"
                    b"Accept-Encoding: gzip, br\r\nauthorization: Bearer t\r\n"
                    b"x-MiXeD-Case: Value Kept\r\n\r\n" + chunk(CHAT) + b"0\r\n\r\n")
            status, headers, raw_head = await read_head(r)
            body = await r.readexactly(int(headers["content-length"]))
        assert status == 200 and body == b'{"ok":1}'
        # what the instance got
        head, got = fake.requests[0]
        assert got == CHAT
        lines = request_headers(head)
        assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert lines.count(b"Host: 127.0.0.1:%d" % fake.port) == 1
        assert [ln for ln in lines if ln.lower().startswith(b"host:")] == \
            [b"Host: 127.0.0.1:%d" % fake.port]
        assert b"Content-Length: %d" % len(CHAT) in lines
        for kept in (b"X-Request-Id: AbC-1", b"Accept-Encoding: gzip, br",
                     b"authorization: Bearer t", b"x-MiXeD-Case: Value Kept"):
            assert kept in lines
        names = {ln.partition(b":")[0].lower() for ln in lines if ln}
        assert not names & {b"connection", b"x-secret", b"keep-alive", b"te",
                            b"proxy-authorization", b"transfer-encoding"}, names
        # what the client got
        assert b"\r\nX-Backend-Case: KeepMe\r\n" in raw_head
        assert headers["x-router-mixed-url"] == URL % fake.port
        assert "x-hop-resp" not in headers and "proxy-authenticate" not in headers
        assert "keep-alive" not in headers
        assert "x-hop-resp" not in headers.get("connection", "").lower()
        assert in_flight(app) == 0


@on_loop
async def test_headers_end_to_end_pd_identity():
    kv = KvCache()
    decode = kv.decode(lambda inst: reply(inst, 200, DECODE_OK, extra=RESPONSE_EXTRA))
    async with fakes(kv.prefill(200, PREFILL_OK), decode) as (p, d), \
            pd_app([p], [d]) as (_app, port):
        status, headers, body = await ask(
            port, PD_BODY, extra=b"Accept-Encoding: gzip\r\nConnection: X-Secret\r\n"
                                 b"X-Secret: 1\r\nX-Trace: T1\r\n")
        assert status == 200 and body == DECODE_OK
        assert headers["x-router-prefill-url"] == URL % p.port
        assert headers["x-router-decode-url"] == URL % d.port
        assert headers["x-router-request-id"] == "req-1"
        assert headers["x-backend-case"] == "KeepMe" and "x-hop-resp" not in headers
        for fake in (p, d):
            lines = request_headers(fake.requests[0][0])
            enc = [ln for ln in lines if ln.lower().startswith(b"accept-encoding")]
            assert enc == [b"Accept-Encoding: identity"]
            assert b"X-Trace: T1" in lines
            assert not any(ln.lower().startswith((b"x-secret", b"connection")) for ln in lines)
        sent_p, sent_d = sent_json(p), sent_json(d)
        assert sent_p == sent_d and sent_p["request_id"] == "req-1"
        info = sent_p["disaggregate_info"]
        assert info["prefill_ip"] == info["decode_ip"] == "127.0.0.1"
        assert info["transfer_protocol"] == "rdma"


@on_loop
async def test_expect_100_continue_is_answered_by_the_router_not_forwarded():
    async with fakes(json_script(200, b'{"ok":1}')) as (fake,), \
            mixed_app(fake) as (_app, port, _):
        async with connect(port) as (r, w):
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(CHAT))
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            w.write(CHAT)
            status, _, body = await read_response(r)
        assert status == 200 and body == b'{"ok":1}'
        head, got = fake.requests[0]
        assert got == CHAT and b"expect" not in head.lower()


# -- relay --------------------------------------------------------------------------------------
USAGE = b'{"choices":[],"usage":{"prompt_tokens":7,"prompt_tokens_details":{"cached_tokens":3}}}'


@on_loop
async def test_relay_non_sse_keeps_content_length_and_counts_usage():
    async def script(inst, head, body):
        # headers and body in separate writes: the relay gets them in several chunks
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(USAGE))
        await asyncio.sleep(0)
        inst.transport.write(USAGE[:10])
        await asyncio.sleep(0.01)
        inst.transport.write(USAGE[10:])

    async with fakes(script) as (fake,), mixed_app(fake) as (app, port, _):
        for version in (b"1.1", b"1.0"):
            status, headers, body = await ask(port, version=version)
            assert status == 200 and body == USAGE
            assert headers["content-length"] == str(len(USAGE))
            assert "transfer-encoding" not in headers
        url = URL % fake.port
        await until(lambda: sample(app, "kvrouter_backend_prompt_tokens_total",
                                   url=url) == 14)
        assert sample(app, "kvrouter_backend_cached_tokens_total", url=url) == 6


SSE_EVENTS = [b'data: {"choices":[{"delta":{"content":"a"}}]} \n\n',
              b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":11,'
              b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n',
              b"data: [DONE]\n\n"]


@on_loop
async def test_relay_sse_chunked_to_http11_close_delimited_to_http10():
    async with fakes(sse_script(*SSE_EVENTS)) as (fake,), mixed_app(fake) as (app, port, _):
        stream = orjson.dumps({"stream": True, "messages": [],
                               "stream_options": {"include_usage": True}})
        status, headers, body = await ask(port, stream)
        assert fake.requests[-1][1] == stream          # the client asked for usage itself
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers and body == b"".join(SSE_EVENTS)
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", stream, b"1.0"))
            status, headers, _ = await read_head(r)
            assert status == 200 and headers["connection"] == "close"
            assert "transfer-encoding" not in headers and "content-length" not in headers
            assert await r.read() == b"".join(SSE_EVENTS)
        url = URL % fake.port
        await until(lambda: sample(app, "kvrouter_backend_prompt_tokens_total",
                                   url=url) == 22)
        assert sample(app, "kvrouter_backend_cached_tokens_total", url=url) == 8


@on_loop
async def test_relay_sse_broken_after_a_complete_event_ends_with_stream_interrupted():
    async def script(inst, head, body):
        inst.transport.write(SSE_HEAD + chunk(SSE_EVENTS[0]))
        await asyncio.sleep(0.01)
        inst.transport.write(chunk(b"data: x\n") + chunk(b"\n"))   # a split "\n\n"
        await asyncio.sleep(0.01)
        inst.transport.abort()                                      # mid-body reset

    async with fakes(script) as (fake,), mixed_app(fake) as (app, port, _):
        status, headers, body = await ask(port, orjson.dumps({"stream": True}))
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body.startswith(SSE_EVENTS[0] + b"data: x\n\n")
        events = [e for e in body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        err = orjson.loads(events[-2][len(b"data: "):])["error"]
        assert err["code"] == "stream_interrupted" and err["type"] == "backend_error"
        assert err["message"].startswith("upstream stream interrupted")
        assert in_flight(app) == 0


def assert_interrupted(body: bytes) -> None:
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    err = orjson.loads(events[-2][len(b"data: "):])["error"]
    assert err["code"] == "stream_interrupted", body


@on_loop
async def test_relay_sse_clean_end_without_done_ends_with_stream_interrupted():
    """An instance that closes its stream cleanly mid-answer: the client is told."""
    cut = SSE_EVENTS[:2]
    async with fakes(sse_script(*cut)) as (fake,), mixed_app(fake) as (app, port, _):
        status, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert status == 200 and body.startswith(b"".join(cut))
        assert_interrupted(body)
        assert sample(app, "kvrouter_errors_total", kind="stream_interrupted") == 1
        assert in_flight(app) == 0


@on_loop
async def test_relay_sse_unterminated_last_event_is_closed_before_the_interruption():
    async with fakes(sse_script(SSE_EVENTS[0], b"data: {}")) as (fake,), \
            mixed_app(fake) as (_app, port, _):
        _, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert body.startswith(SSE_EVENTS[0] + b"data: {}\n\n")
        assert_interrupted(body)


@on_loop
async def test_relay_sse_done_split_over_small_chunks_is_a_normal_end():
    pieces = [*SSE_EVENTS[:-1], b"data: [DO", b"NE]", b"\n", b"\n"]
    async with fakes(sse_script(*pieces)) as (fake,), mixed_app(fake) as (app, port, _):
        status, _, body = await ask(port, orjson.dumps({"stream": True}))
        # the router asked for the usage event: it is left out, the rest passed whole
        assert status == 200 and body == b"".join(p for p in pieces if p != SSE_EVENTS[2])
        assert sample(app, "kvrouter_errors_total", kind="stream_interrupted") == 0


@on_loop
async def test_pd_decode_stream_without_done_ends_with_stream_interrupted():
    kv = KvCache()

    def answer(inst) -> None:
        inst.transport.write(SSE_HEAD + chunk(SSE_EVENTS[0]) + b"0\r\n\r\n")

    stream = orjson.loads(PD_BODY) | {"stream": True}
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode(answer)) as (p, d), \
            pd_app([p], [d]) as (app, port):
        status, _, body = await ask(port, orjson.dumps(stream))
        assert status == 200 and body.startswith(SSE_EVENTS[0])
        assert_interrupted(body)
        await settled(app)


@on_loop
async def test_relay_sse_broken_mid_event_aborts_the_client_connection():
    async def script(inst, head, body):
        inst.transport.write(SSE_HEAD + chunk(SSE_EVENTS[0]) + chunk(b'data: {"partial'))
        await asyncio.sleep(0.01)
        inst.transport.close()          # EOF inside the chunked body

    async with fakes(script) as (fake,), mixed_app(fake) as (_app, port, _):
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", orjson.dumps(
                {"stream": True, "stream_options": {"include_usage": True}})))
            status, headers, _ = await read_head(r)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            raw = b""
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    raw += data
        payload, complete = dechunk(raw)
        assert payload == SSE_EVENTS[0] + b'data: {"partial' and not complete
        assert b"stream_interrupted" not in raw
        # when the router asked for usage it passes whole events only: the half event never
        # reached the client, and the stream ends honestly
        _, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert body.startswith(SSE_EVENTS[0] + b"data: {")
        assert b"partial" not in body
        assert_interrupted(body)


@on_loop
async def test_relay_non_sse_broken_mid_body_aborts_the_client_connection():
    async def script(inst, head, body):
        inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"choices\":")
        await asyncio.sleep(0.01)
        inst.transport.close()

    async with fakes(script) as (fake,), mixed_app(fake) as (_app, port, _):
        async with connect(port) as (r, w):
            w.write(post("/v1/chat/completions", CHAT))
            status, headers, _ = await read_head(r)
            assert status == 200 and headers["content-length"] == "100"
            raw = b""
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    raw += data
        assert raw == b'{"choices":'       # the client sees a short body, then the close


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body read up to EOF, and whether it ended with its last chunk."""
    out = b""
    while b"\r\n" in raw:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out, rest == b"\r\n"
        if len(rest) < size + 2:
            return out + rest[:size], False
        out, raw = out + rest[:size], rest[size + 2:]
    return out, False


# -- PD retry rules -----------------------------------------------------------------------------
def counting(*answers: Callable[[object], None]) -> tuple[Callable, list[int]]:
    """An answer shared by several fakes: the n-th call (whichever fake makes it) answers with
    ``answers[min(n, last)]``; returns it and the list of fake ports in call order."""
    order: list[int] = []

    def answer(inst) -> None:
        n = len(order)
        order.append(inst.transport.get_extra_info("sockname")[1])
        answers[min(n, len(answers) - 1)](inst)
    return answer, order


def urls(*instances) -> list[str]:
    return sorted(URL % x.port for x in instances)


@on_loop
async def test_pd_prefill_connect_failure_is_retried_on_another_prefill():
    kv = KvCache()
    dead = Dead()
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode_json(200, DECODE_OK)) as (p, d), \
            pd_app([dead, p], [d]) as (app, port):
        with hold(app, p.port):           # the dead prefill is chosen first
            status, headers, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        assert headers["x-router-prefill-url"] == URL % p.port
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "connect") == 1 and retries(app, "prefill_status") == 0
        assert [sent_json(p, i)["request_id"] for i in range(len(p.requests))] == \
            ["req-1-retry1"]
        assert sent_json(d)["request_id"] == "req-1-retry1"
    dead.close()


@on_loop
async def test_pd_decode_connect_failure_is_retried_on_another_decode():
    kv = KvCache()
    dead = Dead()
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode_json(200, DECODE_OK)) as (p, d), \
            pd_app([p], [dead, d]) as (app, port):
        with hold(app, d.port):           # the dead decode is chosen first
            status, headers, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        assert headers["x-router-decode-url"] == URL % d.port
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "connect") == 1
    dead.close()


@on_loop
async def test_pd_prefill_503_is_retried_on_another_prefill():
    kv = KvCache()
    ok = kv.prefill(200, PREFILL_OK)
    order: list[int] = []

    async def prefill(inst, head, raw):
        order.append(inst.transport.get_extra_info("sockname")[1])
        if len(order) == 1:
            reply(inst, 503, b'{"error":"busy"}')
        else:
            await ok(inst, head, raw)

    async with fakes(prefill, prefill, kv.decode_json(200, DECODE_OK)) as (p1, p2, d), \
            pd_app([p1, p2], [d]) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        assert len(order) == 2 and order[0] != order[1]     # the 503 one was excluded
        assert headers["x-router-prefill-url"] == URL % order[1]
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "prefill_status") == 1 and retries(app, "connect") == 0


@on_loop
async def test_pd_prefill_400_is_answered_as_is():
    bad = b'{"error":{"message":"max_tokens too large","code":400}}'
    kv = KvCache()
    async with fakes(kv.prefill(400, bad), kv.decode_json()) as (p, d), \
            pd_app([p], [d]) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        assert status == 400 and body == bad
        assert headers["content-type"] == "application/json"
        assert headers["x-router-prefill-url"] == URL % p.port
        assert headers["x-router-request-id"] == "req-1"
        assert retries(app, "prefill_status") == 0 and retries(app, "connect") == 0
        assert len(p.requests) == 1
        for conn in d.posts:                # the decode leg, if it was sent, was dropped
            await asyncio.wait_for(conn.lost, 2)


@on_loop
async def test_pd_prefill_in_body_error_is_502_prefill_failed():
    kv = KvCache()
    async with fakes(kv.prefill(200, b'{"error":{"message":"oom in prefill"}}'),
                     kv.decode_json(200, DECODE_OK)) as (p, d), \
            pd_app([p], [d]) as (_app, port):
        status, headers, body = await ask(port, PD_BODY)
        err = error_of(body)
        assert status == 502 and err["code"] == "prefill_failed"
        assert "oom in prefill" in err["message"] and URL % p.port in err["message"]
        assert headers["x-router-prefill-url"] == URL % p.port


RESCHEDULE = orjson.dumps({"choices": [{"finish_reason": "pd_reschedule",
                                        "message": {"completion_token_ids": [5, 6]}}]})


@on_loop
async def test_pd_decode_reschedule_retries_with_tokens_and_retry_id():
    kv = KvCache()
    answer, order = counting(lambda i: reply(i, 200, RESCHEDULE),
                             lambda i: reply(i, 200, DECODE_OK))
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode(answer), kv.decode(answer)) \
            as (p, d1, d2), pd_app([p], [d1, d2]) as (app, port):
        body = orjson.dumps({**orjson.loads(PD_BODY), "completion_token_ids": [1]})
        status, headers, answer_body = await ask(port, body)
        assert status == 200 and answer_body == DECODE_OK
        assert len(order) == 2 and order[0] != order[1]   # the first decode was excluded
        first, second = (d1, d2) if order[0] == d1.port else (d2, d1)
        assert sent_json(first)["request_id"] == "req-1"
        assert sent_json(first)["completion_token_ids"] == [1]
        sent = sent_json(second)
        assert sent["request_id"] == "req-1-retry1"
        assert sent["completion_token_ids"] == [1, 5, 6]
        assert headers["x-router-decode-url"] == URL % second.port
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "pd_reschedule") == 1
        assert [sent_json(p, i)["request_id"] for i in range(2)] == ["req-1", "req-1-retry1"]
        assert sent_json(p, 1)["completion_token_ids"] == [1, 5, 6]


@on_loop
async def test_pd_stream_reschedule_is_relayed_not_retried():
    event = b'data: {"choices":[{"finish_reason":"pd_reschedule"}]}\n\n'
    kv = KvCache()
    decode = kv.decode(lambda inst: inst.transport.write(
        SSE_HEAD + chunk(event) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"))
    async with fakes(kv.prefill(200, PREFILL_OK), decode, decode) as (p, d1, d2), \
            pd_app([p], [d1, d2]) as (app, port):
        body = orjson.dumps({**orjson.loads(PD_BODY), "stream": True})
        status, headers, answer = await ask(port, body)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert answer == event + b"data: [DONE]\n\n"
        assert retries(app, "pd_reschedule") == 0
        assert len(d1.requests) + len(d2.requests) == 1


@on_loop
async def test_pd_reschedule_budget_exhausted_returns_the_last_answer():
    kv = KvCache()
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode_json(200, RESCHEDULE),
                     kv.decode_json(200, RESCHEDULE)) as (p, d1, d2), \
            pd_app([p], [d1, d2], scheduler={"pd_retry_count": 1}) as (app, port):
        status, headers, answer = await ask(port, PD_BODY)
        assert status == 200 and answer == RESCHEDULE
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "pd_reschedule") == 1
        assert len(d1.requests) == len(d2.requests) == 1


@on_loop
async def test_pd_prefill_status_budget_exhausted_returns_the_last_error():
    kv = KvCache()
    async with fakes(kv.prefill(503, b'{"e":1}'), kv.prefill(429, b'{"e":2}'),
                     kv.prefill(502, b'{"e":3}'), kv.decode_json()) as (p1, p2, p3, d), \
            pd_app([p1, p2, p3], [d], connect_retries=1) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        order = urls(p1, p2, p3)         # process_tokens, all idle: URL order
        tried = sorted(URL % f.port for f in (p1, p2, p3) if f.requests)
        assert tried == order[:2]        # one try + one retry
        err = error_of(body)
        assert status == 502 and err["code"] == "prefill_failed"
        assert headers["x-router-prefill-url"] == order[1] and order[1] in err["message"]
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "prefill_status") == 1


@on_loop
async def test_pd_all_prefills_refuse_returns_the_last_connect_error():
    kv = KvCache()
    dead = [Dead(), Dead()]
    async with fakes(kv.decode_json()) as (d,), pd_app(dead, [d]) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        err = error_of(body)
        assert status == 502 and err["code"] == "backend_connection_error"
        assert headers["x-router-prefill-url"] == urls(*dead)[1]     # tried in URL order
        assert urls(*dead)[1] in err["message"]
        assert retries(app, "connect") == 2
    for x in dead:
        x.close()


@on_loop
async def test_pd_decode_first_byte_timeout_is_504():
    kv = KvCache()
    async with fakes(kv.prefill(200, PREFILL_OK), never) as (p, d), \
            pd_app([p], [d], first_byte_timeout_secs=0.2) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        err = error_of(body)
        assert status == 504 and err["code"] == "backend_timeout"
        assert URL % d.port in err["message"]
        assert headers["x-router-decode-url"] == URL % d.port
        assert retries(app, "connect") == 0 and len(d.requests) == 1


@on_loop
async def test_pd_prefill_first_byte_timeout_is_504():
    kv = KvCache()
    async with fakes(never, kv.decode_json()) as (p, d), \
            pd_app([p], [d], first_byte_timeout_secs=0.2) as (app, port):
        status, headers, body = await ask(port, PD_BODY)
        err = error_of(body)
        assert status == 504 and err["code"] == "backend_timeout"
        assert headers["x-router-prefill-url"] == URL % p.port
        assert retries(app, "connect") == 0 and len(p.requests) == 1


@on_loop
async def test_pd_client_disconnect_before_the_answer_releases_both_legs():
    kv = KvCache()
    async with fakes(kv.prefill(200, PREFILL_OK), never) as (p, d), \
            pd_app([p], [d]) as (app, port):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v1/chat/completions", PD_BODY))
        await until(lambda: d.requests and p.requests)
        assert loads(app)[URL % d.port][0] == 1
        writer.transport.abort()
        await asyncio.wait_for(d.posts[0].lost, 2)     # the decode leg was closed


@on_loop
async def test_pd_client_disconnect_mid_stream_closes_the_decode():
    kv = KvCache()
    decode = kv.decode(lambda inst: inst.transport.write(SSE_HEAD + chunk(SSE_EVENTS[0])))
    async with fakes(kv.prefill(200, PREFILL_OK), decode) as (p, d), \
            pd_app([p], [d]) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v1/chat/completions",
                          orjson.dumps({**orjson.loads(PD_BODY), "stream": True})))
        status, headers, _ = await read_head(reader)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert loads(app)[URL % d.port][0] == 1          # the decode is held while relayed
        writer.transport.abort()
        await asyncio.wait_for(d.posts[0].lost, 2)


# -- mixed retry rules --------------------------------------------------------------------------
@on_loop
async def test_mixed_connect_failure_is_retried_on_the_other_instance():
    dead = Dead()
    async with fakes(json_script(200, b'{"ok":1}')) as (live,), \
            mixed_app(dead, live) as (app, port, _):
        with hold(app, live.port, tokens=0):      # request_num: the dead one goes first
            status, headers, body = await ask(port)
        assert status == 200 and body == b'{"ok":1}'
        assert headers["x-router-mixed-url"] == URL % live.port
        assert retries(app, "connect") == 1
    dead.close()


@on_loop
async def test_mixed_all_instances_refuse_is_502_with_the_last_url():
    dead = [Dead(), Dead()]
    async with mixed_app(*dead) as (app, port, _):
        status, headers, body = await ask(port)
        err = error_of(body)
        assert status == 502 and err["code"] == "backend_connection_error"
        urls = sorted(URL % x.port for x in dead)
        assert headers["x-router-mixed-url"] == urls[-1]     # tried in URL order
        assert urls[-1] in err["message"]
        assert retries(app, "connect") == 2
    for x in dead:
        x.close()


@on_loop
async def test_mixed_connect_retries_zero_answers_the_first_failure():
    dead = [Dead(), Dead()]
    async with mixed_app(*dead, connect_retries=0) as (app, port, _):
        status, headers, _ = await ask(port)
        assert status == 502
        assert headers["x-router-mixed-url"] == min(URL % x.port for x in dead)
        assert retries(app, "connect") == 0
    for x in dead:
        x.close()


@on_loop
async def test_mixed_client_disconnect_before_the_answer_releases_the_load():
    async with fakes(never) as (fake,), mixed_app(fake) as (app, port, _):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v1/chat/completions", CHAT))
        await until(lambda: fake.requests)
        assert in_flight(app) == 1
        writer.transport.abort()
        await asyncio.wait_for(fake.posts[0].lost, 2)   # the instance sees the disconnect


@on_loop
async def test_mixed_5xx_is_retried_once_then_relayed():
    """Every instance answers 503: one retry (server.status-retries), then the answer."""
    bad = json_script(503, b'{"error":"overloaded"}')
    async with fakes(bad, bad, bad) as (a, b, c), mixed_app(a, b, c) as (app, port, _):
        status, headers, body = await ask(port)
        assert status == 503 and body == b'{"error":"overloaded"}'
        assert len(a.requests) + len(b.requests) + len(c.requests) == 2
        assert retries(app, "status") == 1 and retries(app, "connect") == 0
        assert headers["x-router-mixed-url"] in {URL % f.port for f in (a, b, c) if f.requests}


@on_loop
async def test_mixed_500_is_retried_on_another_instance():
    async with fakes(json_script(500, b'{"error":"boom"}'), json_script(200, b'{"ok":1}')) \
            as (bad, good), mixed_app(bad, good) as (app, port, _):
        with hold(app, good.port, tokens=0):     # the failing one goes first
            status, headers, body = await ask(port)
        assert status == 200 and body == b'{"ok":1}'
        assert headers["x-router-mixed-url"] == URL % good.port
        assert len(bad.requests) == 1 and retries(app, "status") == 1


@on_loop
async def test_mixed_5xx_with_no_other_instance_is_relayed():
    async with fakes(json_script(502, b'{"error":"x"}')) as (bad,), \
            mixed_app(bad) as (app, port, _):
        status, _, body = await ask(port)
        assert status == 502 and body == b'{"error":"x"}'
        assert len(bad.requests) == 1 and retries(app, "status") == 0


@on_loop
async def test_mixed_4xx_is_never_retried():
    bad = json_script(429, b'{"error":"slow down"}')
    async with fakes(bad, bad) as (a, b), mixed_app(a, b) as (app, port, _):
        status, _, _ = await ask(port)
        assert status == 429 and len(a.requests) + len(b.requests) == 1
        assert retries(app, "status") == 0


@on_loop
async def test_pd_decode_500_is_retried_on_another_decode():
    kv = KvCache()
    async with fakes(kv.prefill(200, PREFILL_OK), kv.decode_json(500, b'{"error":"x"}'),
                     kv.decode_json(200, DECODE_OK)) as (p, bad, good), \
            pd_app([p], [bad, good]) as (app, port):
        with hold(app, good.port):          # the failing decode is chosen first
            status, headers, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        assert headers["x-router-decode-url"] == URL % good.port
        assert headers["x-router-request-id"] == "req-1-retry1"
        assert retries(app, "status") == 1


def test_retry_ratio_caps_retries_at_a_share_of_requests():
    now = [0.0]
    ratio = RetryRatio(20, window=10.0, floor=3, clock=lambda: now[0])
    assert [ratio.take() for _ in range(4)] == [True, True, True, False]   # the floor
    for _ in range(100):
        ratio.request()
    assert sum(ratio.take() for _ in range(50)) == 17       # 20 % of 100, 3 already spent
    now[0] = 25.0                                            # two windows later: fresh
    assert ratio.take()


@on_loop
async def test_mixed_first_byte_timeout_is_504():
    async with fakes(never) as (fake,), \
            mixed_app(fake, first_byte_timeout_secs=0.2) as (app, port, _):
        status, headers, body = await ask(port)
        assert status == 504 and error_of(body)["code"] == "backend_timeout"
        assert headers["x-router-mixed-url"] == URL % fake.port
        assert retries(app, "connect") == 0


# -- PD with other engines' protocols -----------------------------------------------------------
KV_PARAMS = {"do_remote_prefill": True, "remote_block_ids": [1, 2, 3], "remote_host": "127.0.0.1",
             "remote_port": 19011, "remote_engine_id": "e-1"}


@on_loop
async def test_pd_vllm_two_stages_pass_kv_transfer_params():
    """vLLM: the prefill gets max_tokens 1, stream false and do_remote_decode; the decode
    gets the client's request plus the kv_transfer_params the prefill answered with, and is
    sent only after the prefill answered."""
    order: list[str] = []

    async def prefill(inst, head, raw):
        order.append("prefill")
        reply(inst, 200, orjson.dumps({"choices": [{"index": 0}], "kv_transfer_params": KV_PARAMS,
                                       "usage": {"prompt_tokens": 5}}))

    async def decode(inst, head, raw):
        order.append("decode")
        inst.transport.write(SSE_HEAD + chunk(SSE_EVENTS[0]) + chunk(b"data: [DONE]\n\n")
                             + b"0\r\n\r\n")

    client = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
              "max_tokens": 7, "stream_options": {"include_usage": True}}
    async with fakes(prefill, decode) as (p, d), pd_app([p], [d], engine="vllm") as (_app, port):
        status, headers, body = await ask(port, orjson.dumps(client))
        assert status == 200 and body == SSE_EVENTS[0] + b"data: [DONE]\n\n"
        assert order == ["prefill", "decode"]
        sent_p, sent_d = sent_json(p), sent_json(d)
        assert sent_p["max_tokens"] == 1 and sent_p["stream"] is False
        assert "stream_options" not in sent_p
        assert sent_p["kv_transfer_params"]["do_remote_decode"] is True
        assert sent_d == client | {"kv_transfer_params": KV_PARAMS}
        assert headers["x-router-decode-url"] == URL % d.port


@on_loop
async def test_pd_vllm_prefill_connect_failure_is_retried_before_the_decode():
    dead = Dead()

    async def prefill(inst, head, raw):
        reply(inst, 200, orjson.dumps({"kv_transfer_params": KV_PARAMS}))

    async with fakes(prefill, json_script(200, DECODE_OK)) as (p, d), \
            pd_app([dead, p], [d], engine="vllm") as (app, port):
        with hold(app, p.port):
            status, _, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        assert len(d.requests) == 1 and retries(app, "connect") == 1
    dead.close()


@on_loop
async def test_pd_sglang_both_legs_get_the_same_bootstrap_room():
    async with fakes(json_script(200, b"{}"), json_script(200, DECODE_OK)) as (p, d), \
            pd_app([p], [d], engine="sglang") as (_app, port):
        status, _, body = await ask(port, PD_BODY)
        assert status == 200 and body == DECODE_OK
        sent_p, sent_d = sent_json(p), sent_json(d)
        assert sent_p == sent_d
        assert sent_p["bootstrap_host"] == "127.0.0.1" and sent_p["bootstrap_port"] == 9011
        assert 0 <= sent_p["bootstrap_room"] < 1 << 63
        _, _, _ = await ask(port, PD_BODY)
        assert sent_json(p)["bootstrap_room"] != sent_p["bootstrap_room"]



@on_loop
async def test_pd_decode_of_another_kind_is_never_paired():
    """A decode that cannot take the prefill's KV cache (another engine; vLLM P2P NCCL on one
    side only) is no fallback: the request is 503, nothing reaches it. FastDeploy's transfer
    protocol match stays a preference (``test_pd_fd_protocol_mismatch_falls_back``)."""
    cfg = RouterConfig()
    cfg.server.splitwise = True
    async with fakes(json_script(200, b"{}"), json_script(200, DECODE_OK),
                     json_script(200, DECODE_OK)) as (p, d_vllm, d_plain):
        infos = [pd_info(Role.PREFILL, p.port, "sglang"),
                 pd_info(Role.DECODE, d_vllm.port, "vllm")]
        async with app_server(cfg, infos) as (_app, port, _):
            status, _, body = await ask(port, PD_BODY)
            assert status == 503, body
            assert not p.requests and not d_vllm.requests
        p2p = InstanceInfo(role=Role.PREFILL, host="127.0.0.1", scheme="http", port=str(p.port),
                           engine="vllm", kv_zmq_address="127.0.0.1:21001")
        async with app_server(cfg, [p2p, pd_info(Role.DECODE, d_plain.port, "vllm")]) as (
                _app, port, _):
            status, _, body = await ask(port, PD_BODY)
            assert status == 503, body
            assert not p.requests and not d_plain.requests


@on_loop
async def test_pd_fd_protocol_mismatch_falls_back():
    """FastDeploy: no decode reaches the prefill by ipc or rdma; any decode is used, as
    fd-router does (docs/fastdeploy.md#pd-dispatch)."""
    cfg = RouterConfig()
    cfg.server.splitwise = True
    async with fakes(json_script(200, b"{}"), json_script(200, DECODE_OK)) as (p, d):
        infos = [pd_info(Role.PREFILL, p.port), pd_info(Role.DECODE, d.port)]
        infos[0] = replace(infos[0], transfer_protocol=("ipc",))
        async with app_server(cfg, infos) as (_app, port, _):
            status, _, body = await ask(port, PD_BODY)
            assert status == 200 and body == DECODE_OK


def test_sglang_registration_carries_its_bootstrap_port():
    from kvrouter.instance import RegistrationError, parse_registration_bytes

    info = parse_registration_bytes(
        b'{"role":"prefill","host_ip":"127.0.0.1","port":8000,"engine":"sglang",'
        b'"bootstrap_port":9011}', splitwise=True)
    assert info.engine == "sglang" and info.bootstrap_port == "9011"
    try:
        parse_registration_bytes(b'{"role":"prefill","host_ip":"127.0.0.1","port":8000,'
                                 b'"bootstrap_port":"x\\r\\n"}', splitwise=True)
    except RegistrationError as e:
        assert "bootstrap_port" in str(e.body)
    else:
        raise AssertionError("an invalid bootstrap_port was accepted")
