"""Relaying an instance's response to the client, byte for byte (contract §5.2, §5.7).

The status and the filtered headers are written once, together with the first body bytes; the
rest of the body is pushed from the instance's connection straight to the client's as it
arrives (no task wake-up, no parsing per chunk). Framing towards the client: a non-SSE body
with a ``Content-Length`` keeps it (raw bytes); otherwise chunked (HTTP/1.1 clients) or
close-delimited (HTTP/1.0 clients). A slow client pauses reading from the instance; a client
that goes away closes the instance connection.

Per chunk the relay keeps only what the contract needs: the last body bytes (the
``stream_interrupted`` rule needs the last two) and, when asked, usage: an SSE chunk is searched
for ``"prompt_tokens"`` (a substring test), a non-SSE body (up to 1 MiB) once at the end; the
numbers are read next to the keys, no JSON is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from kvrouter.http.request import Request
from kvrouter.http.server import CHUNKED
from kvrouter.http.upstream import BodyFailed, Upstream

log = logging.getLogger("kvrouter.relay")

INTERRUPTED = (b'data: {"error":{"message":"upstream stream interrupted: %s","type":"backend_error",'
               b'"code":"stream_interrupted"}}\n\n' b"data: [DONE]\n\n")
USAGE_SCAN_LIMIT = 1 << 20
USAGE_KEY = b'"prompt_tokens"'
CACHED_KEY = b'"cached_tokens"'

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
_NO_BODY = frozenset({204, 304})


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()} - {b"close", b"keep-alive"}


def response_head(headers: list[tuple[bytes, bytes]], extra: bytes
                  ) -> tuple[bytes, int | None, bool]:
    """Instance → client header lines (§5.2: hop-by-hop, the headers ``Connection`` names and
    ``Content-Length`` dropped; ``extra`` router lines appended), the instance's
    ``Content-Length`` and whether the body is SSE."""
    lines: list[bytes] = []
    length: int | None = None
    sse = False
    named: set[bytes] | None = None
    for name, value in headers:
        n = name.lower()
        if n in HOP_BY_HOP:
            if n == b"connection":
                named = _connection_tokens(value) or None
            continue
        if n == b"content-length":
            try:
                length = int(value)
            except ValueError:
                pass
            continue
        if n == b"content-type":
            sse = value.lstrip().lower().startswith(b"text/event-stream")
        lines.append(name + b": " + value + b"\r\n")
    if named:
        lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in named]
    lines.append(extra)
    return b"".join(lines), length, sse


class Relay:
    """One relayed response; also its outcome for accounting (a body sink for
    :meth:`Upstream.relay`)."""

    __slots__ = (
        "cached_tokens",
        "chunked",
        "client_gone",
        "conn",
        "failure",
        "first_byte_at",
        "on_done",
        "parts",
        "prev",
        "prompt_tokens",
        "scan",
        "size",
        "sse",
        "tail",
        "transport",
        "up",
    )

    def __init__(self, conn, up: Upstream | None, sse: bool, scan: bool) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.up = up
        self.chunked = False
        self.sse = sse
        self.scan = scan
        self.tail = b""
        self.prev = b""
        self.parts: list[bytes] = []
        self.size = 0
        self.first_byte_at: float | None = None
        self.failure: BodyFailed | None = None
        self.client_gone = False
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.on_done: Callable[[Relay], None] | None = None

    # -- body sink (called by the instance connection) -----------------------------------------
    def chunk(self, data: bytes) -> None:
        if self.chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)
        self.prev = self.tail
        self.tail = data
        if self.scan:
            self._observe(data)

    def end(self) -> None:
        conn = self.conn
        conn.flow = conn.on_lost = None
        conn.finish()
        self.up.release()
        self._resolve()

    def fail(self, exc: BodyFailed) -> None:
        self.failure = exc
        conn = self.conn
        conn.flow = conn.on_lost = None
        self.up.close()
        log.warning("backend %s body failed mid-relay: %s", self.up.target.key, exc)
        if self.sse and self._last_two() == b"\n\n" and not conn.closed:
            conn.write(INTERRUPTED % str(exc).replace('"', "'").encode())
            conn.finish()
        else:
            conn.abort()  # no clean terminator: the client sees a broken body
        self._resolve()

    def client_lost(self) -> None:
        self.client_gone = True
        self.conn.flow = None
        if self.up is not None:
            self.up.close()
        self._resolve()

    # -- helpers -------------------------------------------------------------------------------
    def _resolve(self) -> None:
        done = self.on_done
        if done is not None:
            self.on_done = None
            conn = self.conn
            conn.flow = None
            conn.on_lost = None
            self._complete()
            done(self)

    def _complete(self) -> None:
        if self.first_byte_at is None and self.tail:
            self.first_byte_at = time.perf_counter()
        self._finish_scan()

    def _last_two(self) -> bytes:
        tail = self.tail
        return tail[-2:] if len(tail) >= 2 else (self.prev[-1:] + tail)[-2:]

    def _observe(self, data: bytes) -> None:
        if self.sse:
            if USAGE_KEY in data:
                prompt, cached = usage_of(data)
                if prompt is not None:
                    self.prompt_tokens, self.cached_tokens = prompt, cached
        elif self.size < USAGE_SCAN_LIMIT:
            self.parts.append(data)
            self.size += len(data)

    def _finish_scan(self) -> None:
        if self.scan and not self.sse and self.parts and self.size < USAGE_SCAN_LIMIT:
            parts = self.parts
            self.prompt_tokens, self.cached_tokens = usage_of(
                parts[0] if len(parts) == 1 else b"".join(parts))
        self.parts = []


_NUMBER = re.compile(rb"\s*:\s*(\d+)")


def _last_int(raw: bytes, key: bytes) -> int | None:
    """The integer value of the last ``"key": <int>`` in JSON bytes (a quoted name followed
    by a colon can only be an object key: inside JSON strings quotes are escaped)."""
    pos = raw.rfind(key)
    while pos >= 0:
        m = _NUMBER.match(raw, pos + len(key))
        if m:
            return int(m.group(1))
        pos = raw.rfind(key, 0, pos)
    return None


def usage_of(raw: bytes) -> tuple[int | None, int | None]:
    """``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens`` of a body (the
    last ones in it: for SSE the last usage event), found without parsing the JSON."""
    prompt = _last_int(raw, USAGE_KEY)
    if prompt is None:
        return None, None
    return prompt, _last_int(raw, CACHED_KEY)


def start_relay(req: Request, up: Upstream, first: bytes, extra: bytes,
                on_done: Callable[[Relay], None], *, scan_usage: bool = True) -> Relay:
    """Send ``up``'s status, headers and body to the client; ``on_done(relay)`` is called once
    the body has been relayed, the instance failed or the client left (maybe before this
    returns). ``first`` is the body read so far; if ``up`` has already received its whole
    body, nothing more is read."""
    conn = req.conn
    head, length, sse = response_head(up.headers, extra)
    r = Relay(conn, up, sse, scan_usage)
    if sse:
        length = None  # the stream_interrupted event may have to be appended
    mode = conn.start_stream(up.status, head, length, first,
                             no_body=up.status in _NO_BODY or up.status < 200)
    r.chunked = mode == CHUNKED
    if first:
        r.first_byte_at = time.perf_counter()
        r.tail = first
        if scan_usage:
            r._observe(first)
    if conn.closed or up.done:
        if conn.closed:
            r.client_gone = True
            up.close()
        else:
            conn.finish()
            up.release()
        r._complete()
        on_done(r)
    else:
        r.on_done = on_done
        conn.flow = up
        conn.on_lost = r.client_lost
        if conn.write_paused:
            up.pause_reading()
        up.relay(r)
    return r


async def relay(req: Request, up: Upstream, first: bytes, extra: bytes, *,
                scan_usage: bool = True) -> Relay:
    """:func:`start_relay` as a coroutine that returns once the relay is over."""
    fut = req.conn.loop.create_future()

    def done(_: Relay) -> None:
        if not fut.done():
            fut.set_result(None)

    r = start_relay(req, up, first, extra, done, scan_usage=scan_usage)
    if not fut.done():
        try:
            await fut
        except asyncio.CancelledError:
            up.close()
            raise
    return r
