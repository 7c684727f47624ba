"""Hostile input values through a real router process: the PD ``request_id`` that was echoed
into response headers (response splitting, a 500 and leaked instance connections), JSON nested
deep enough to crash the parsers, registration hosts that ended up in header lines, and the
stdlib JSON fallback accepting what orjson refuses (docs/fastdeploy.md#errors,
docs/fastdeploy.md#request-ids, docs/fastdeploy.md#registration-errors).

The raw-socket reader here is shared with tests/test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass

import orjson
import pytest
from harness import register_all, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
INJECTED = ("x-injected", "set-cookie")
SPLIT_ID = "abc\r\nX-Injected: 1\r\nSet-Cookie: session=stolen"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2}) [\x20-\x7e]*")
HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\x20-\x7e\t]*?)[ \t]*")
READ_SECS = 15.0


@dataclass
class Reply:
    """One HTTP response as read from the socket."""

    status: int
    headers: list[tuple[str, str]]   # names lower-cased, in order
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> object:
        return orjson.loads(self.body)


class Malformed(AssertionError):
    """The router sent bytes that are not a well-formed HTTP/1.x response."""


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False,
                     head_secs: float = READ_SECS) -> Reply | None:
    """The next final response (1xx skipped), ``None`` if the connection closed before a
    status line; :class:`Malformed` if what arrived is not HTTP; ``TimeoutError`` if no head
    arrived within ``head_secs`` (nothing is consumed then) or no body within
    :data:`READ_SECS`."""
    while True:
        try:
            async with asyncio.timeout(head_secs):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise Malformed(f"connection closed inside a response head: "
                                f"{e.partial[:300]!r}") from None
            return None
        lines = head[:-4].split(b"\r\n")
        m = STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise Malformed(f"bad status line {lines[0][:200]!r}")
        headers = []
        for line in lines[1:]:
            h = HEADER_LINE.fullmatch(line)
            if h is None:
                raise Malformed(f"bad header line {line[:200]!r}")
            headers.append((h[1].decode().lower(), h[2].decode()))
        status = int(m[1])
        if 100 <= status < 200:
            continue
        reply = Reply(status, headers, b"")
        if head_only or status in (204, 304):
            return reply
        length = reply.header("content-length")
        async with asyncio.timeout(READ_SECS):
            if reply.header("transfer-encoding") == "chunked":
                reply.body = await _read_chunked(reader)
            elif length is not None:
                if not length.isdigit():
                    raise Malformed(f"bad Content-Length {length!r}")
                reply.body = await reader.readexactly(int(length))
            else:
                reply.body = await reader.read()   # close-delimited
        return reply


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise Malformed(f"bad chunk size line {size_line[:100]!r}") from None
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise Malformed("chunk not followed by CRLF")
        if size == 0:
            return b"".join(out)
        out.append(data[:-2])


async def exchange(host: str, port: int, data: bytes, *, head_only: bool = False) -> Reply | None:
    """Send ``data`` on a new connection and read one response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, head_only=head_only)
    finally:
        writer.transport.abort()


def request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def post(router, path: str, body: bytes) -> Reply:
    reply = await exchange(router.host, router.port, request("POST", path, body))
    assert reply is not None, "the router closed the connection without answering"
    return reply


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
async def pd(router_factory, sims):
    """A PD router with one prefill and one decode instance registered."""
    router = await router_factory({}, "--splitwise")
    (p,) = await sims(1, role="prefill")
    (d,) = await sims(1, role="decode")
    await register_all(router, p, d)
    return router, p, d


@pytest.fixture
async def mixed(router_factory, sims):
    """A mixed router with one instance registered."""
    router = await router_factory()
    (a,) = await sims(1)
    await register_all(router, a)
    return router, a


# --- the PD request_id -----------------------------------------------------------------------

@pytest.mark.parametrize("rid", [SPLIT_ID, "a\x00b", "a\tb", "a b", "\u65e5\u672c\u8a9e",
                                 "caf\u00e9", "x" * 257])
async def test_pd_request_id_outside_visible_ascii_is_400_before_dispatch(pd, rid):
    router, p, d = pd
    reply = await post(router, "/v1/chat/completions", orjson.dumps({**CHAT, "request_id": rid}))
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "invalid_value"
    assert "request_id" in reply.json()["error"]["message"]
    assert not [k for k, _ in reply.headers if k in INJECTED]
    assert p.inference_requests == [] and d.inference_requests == []


@pytest.mark.parametrize("rid", ["req-42_A.b:c/d~!", "x" * 256])
async def test_pd_visible_ascii_request_id_is_kept_and_echoed(pd, rid):
    router, p, _ = pd
    reply = await post(router, "/v1/chat/completions", orjson.dumps({**CHAT, "request_id": rid}))
    assert reply.status == 200
    assert reply.header("x-router-request-id") == rid
    assert orjson.loads(p.inference_requests[0].body)["request_id"] == rid


async def test_pd_bad_request_ids_leak_no_connection(pd):
    router, _, _ = pd
    pid = router.proc.pid
    assert (await post(router, "/v1/chat/completions", orjson.dumps(CHAT))).status == 200
    await asyncio.sleep(0.2)
    before = open_fds(pid)
    statuses = []
    for i in range(12):
        rid = "\u65e5\u672c" if i % 2 else SPLIT_ID
        reply = await post(router, "/v1/completions",
                           orjson.dumps({"prompt": "hi", "max_tokens": 2, "request_id": rid}))
        statuses.append(reply.status)
    try:
        await wait_for(lambda: _at_most(pid, before), 5)
    except TimeoutError:
        pytest.fail(f"router fds {before} -> {open_fds(pid)} after 12 refused requests "
                    f"(statuses {statuses})")
    assert statuses == [400] * 12


async def _at_most(pid: int, n: int) -> bool:
    return open_fds(pid) <= n


# --- nesting depth ---------------------------------------------------------------------------

DEEP_OBJECTS = b'{"a":' * 2000 + b"1" + b"}" * 2000
DEEP_ARRAYS = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("raw", [DEEP_OBJECTS, DEEP_ARRAYS], ids=["objects-2k", "arrays-100k"])
async def test_deep_json_is_400_on_every_endpoint(mixed, raw):
    router, a = mixed
    for path in ("/v1/chat/completions", "/v1/completions"):
        reply = await post(router, path, raw)
        assert reply.status == 400, (path, reply)
        assert reply.json()["error"]["code"] == "invalid_json"
    reply = await post(router, "/register", raw)
    assert reply.status == 400
    assert reply.json()["msg"].startswith("Invalid InstanceInfo JSON format: ")
    reply = await post(router, "/v1/abort_requests", raw)
    assert reply.status == 400
    assert a.inference_requests == []
    assert "unhandled error" not in router.log()


def nested(depth: int) -> bytes:
    """A chat body ``depth`` levels deep (its ``metadata`` holds the rest)."""
    inner = b'{"k":' * (depth - 2) + b"1" + b"}" * (depth - 2)
    return orjson.dumps(CHAT)[:-1] + b',"metadata":' + inner + b"}"


async def test_pd_json_deeper_than_the_limit_is_400_not_a_crash(pd):
    router, p, _ = pd
    # orjson reads 1000 levels, but its dumps stops at 254 and the stdlib encoder overflowed
    reply = await post(router, "/v1/chat/completions", nested(1000))
    assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_json"
    assert p.inference_requests == []
    reply = await post(router, "/v1/chat/completions", nested(100))
    assert reply.status == 200
    sent = orjson.loads(p.inference_requests[0].body)["metadata"]
    assert sent == orjson.loads(nested(100))["metadata"]


# --- the stdlib fallback ---------------------------------------------------------------------

HUGE = b"1" + b"0" * 400    # an integer orjson refuses (beyond a double)


async def test_stdlib_fallback_takes_huge_integers_only(pd, mixed):
    router, p, _ = pd
    reply = await post(router, "/v1/completions",
                       b'{"prompt":"hi","max_tokens":2,"user_tag":' + HUGE + b"}")
    # re-serialised exactly; the simulated instance (orjson too) then refuses it itself
    assert b'"user_tag":' + HUGE in p.inference_requests[0].body
    assert reply.status == 400 and reply.header("x-router-prefill-url") == p.url
    m_router, a = mixed
    for extra in (b"NaN", b"-Infinity", b"1e400", b'"\xff"'):
        body = b'{"prompt":"hi","max_tokens":2,"big":' + HUGE + b',"x":' + extra + b"}"
        for r in (router, m_router):
            reply = await post(r, "/v1/completions", body)
            assert reply.status == 400, (extra, reply)
            assert reply.json()["error"]["code"] == "invalid_json"
    assert a.inference_requests == [] and len(p.inference_requests) == 1


# --- registration values that reach header lines ---------------------------------------------

@pytest.mark.parametrize("host", ["fe80::1%\r\nX-Injected: 1", "[fe80::1%\r\nX-Injected: 1]",
                                  "fe80::1%eth0 x", "\u017f.example", "127.0.0.1\r\nX-Injected: 1"])
async def test_registration_host_that_cannot_go_in_a_header_is_400(router_factory, host):
    router = await router_factory()
    payload = {"role": "mixed", "host_ip": host, "port": 8080}
    reply = await post(router, "/register", orjson.dumps(payload))
    assert reply.status == 400
    assert reply.json()["msg"].startswith("invalid InstanceInfo format:invalid host_ip: ")
    # the refusal is logged with the value escaped: no forged log line
    await asyncio.sleep(0.1)
    assert not re.search(r"^x-injected", router.log(), re.M | re.I)


# --- the one header writer -------------------------------------------------------------------

def test_header_block_encodes_values_that_would_split_or_break_the_head():
    from kvrouter.http.response import header_block

    assert header_block({"X-Router-Request-ID": "req-1 ok"}) == b"X-Router-Request-ID: req-1 ok\r\n"
    assert (header_block({"X-Router-Request-ID": "a\r\nX-Injected: 1"})
            == b"X-Router-Request-ID: a%0D%0AX-Injected: 1\r\n")
    # non-Latin-1 text (a UnicodeEncodeError before), NUL, DEL, and "%" once encoding applies
    assert header_block({"X-A": "\u65e5\x00\x7f%"}) == b"X-A: %E6%97%A5%00%7F%25\r\n"
    assert header_block([(b"X-B", b"v\nw\xff")]) == b"X-B: v%0Aw%FF\r\n"
    for name in ("X-A\r\nX-Injected", "X A", "", "X-\u00e9"):
        with pytest.raises(ValueError):
            header_block({name: "1"})


def test_depth_check_matches_the_nesting_with_brackets_quotes_and_escapes_in_strings():
    from kvrouter.jsondepth import MAX_DEPTH, check_depth

    rng = random.Random(7)
    tricky = ["[", '{"', '\\"[', "\\\\", '\\\\"', "\u00e9]", '}"']

    def nested_value(depth: int) -> object:
        """``depth`` nested containers, with bracket-rich keys and strings at every level."""
        value: object = rng.choice(tricky) * rng.randrange(0, 200)
        for _ in range(depth):
            pad = rng.choice(tricky) * rng.randrange(0, 3)
            value = [pad, value] if rng.random() < 0.5 else {pad: value, "k" + pad: pad}
        return value

    for depth in (0, 1, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 200, 254):
        for _ in range(5):
            raw = orjson.dumps(nested_value(depth))
            if depth > MAX_DEPTH:
                with pytest.raises(ValueError):
                    check_depth(raw)
            else:
                check_depth(raw)
