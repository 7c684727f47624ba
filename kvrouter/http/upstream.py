"""Pooled keep-alive HTTP/1.1 connections to instances, parsed with httptools.

:meth:`UpstreamPool.open` sends one request (pre-built head and body bytes) and returns the
:class:`Upstream` connection with the response status and headers, plus the first body bytes.
The rest of the body is then either pulled (:meth:`Upstream.read_chunk`, used where the router
inspects a body) or pushed straight into a sink as it arrives (:meth:`Upstream.relay`, the
pass-through hot path: no task wake-up per chunk).

Failures are classified for the retry rules (docs/fastdeploy.md#retries-and-timeouts):

* :class:`ConnectFailed` – no response status: refused, unreachable, DNS, connect timeout, reset
  or EOF before the status line. A pooled connection that the instance closed while idle (the
  keep-alive race) is retried once on a fresh connection to the same instance, transparently;
* :class:`FirstByteTimeout` – no body byte (or end of an empty body) within the first-byte
  timeout, measured from sending;
* :class:`BodyFailed` – the body broke off after the status line (reset, parse error, or the
  stream-idle timeout, which does not count while the client side holds the relay paused).

A body without ``Content-Length`` or chunked framing ends at EOF (close-delimited).
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_mod
from collections.abc import Callable
from typing import Protocol as TypingProtocol

import httptools

from kvrouter.http.response import header_value
from kvrouter.http.sockets import set_nodelay

KEEPALIVE_SECS = 15.0      # idle pooled connections are closed after this long
MAX_IDLE_PER_TARGET = 512


class TransportError(Exception):
    """Base of the classified failures; ``str(err)`` is a short reason."""


class ConnectFailed(TransportError):
    """No response status was received: refused, unreachable, DNS, connect timeout, early reset."""

    def __init__(self, reason: str, *, nothing_received: bool = False) -> None:
        super().__init__(reason)
        self.nothing_received = nothing_received


class FirstByteTimeout(TransportError):
    """The instance sent no response body byte within the first-byte timeout."""


class BodyFailed(TransportError):
    """The body broke off after the status line (reset or idle timeout)."""

    def __init__(self, reason: str, idle_timeout: bool = False) -> None:
        super().__init__(reason)
        self.idle_timeout = idle_timeout


class Sink(TypingProtocol):
    """Receives a relayed body: ``chunk`` per piece as it arrives, then ``end`` or ``fail``."""

    def chunk(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def fail(self, exc: BodyFailed) -> None: ...


class Target:
    """Where an instance listens: pool key, address, whether it speaks TLS (with the pool's
    client context), and its ``Host`` header line."""

    __slots__ = ("host", "host_line", "key", "port", "tls")

    def __init__(self, host: str, port: int, *, tls: bool = False) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        shown = f"[{host}]" if ":" in host else host
        self.key = f"{'https' if tls else 'http'}://{shown}:{port}"
        self.host_line = b"Host: " + header_value(f"{shown}:{port}".encode()) + b"\r\n"

    def __repr__(self) -> str:
        return f"<Target {self.key}>"


def _reason(e: BaseException | None, default: str) -> str:
    if e is None:
        return default
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Upstream(asyncio.Protocol):
    """One connection to an instance, and the response of its current exchange.

    After :meth:`UpstreamPool.open`: ``status``, ``headers`` (raw ``(name, value)`` pairs) are
    set; the body continues through :meth:`read_chunk` or :meth:`relay`.
    End every exchange with :meth:`release` (back to the pool if the body was read to its end)
    or :meth:`close` (drop it: the instance sees a disconnect).
    """

    __slots__ = (
        "_active",
        "_eof",
        "_error",
        "_feeding",
        "_got_bytes",
        "_headers_done",
        "_idle_timer",
        "_informational",
        "_keep",
        "_last",
        "_parts",
        "_paused",
        "_put_after_feed",
        "_ready",
        "_sink",
        "_time",
        "_waiter",
        "_wake_after_feed",
        "closed",
        "headers",
        "idle_since",
        "loop",
        "parser",
        "pool",
        "status",
        "target",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.loop = pool.loop
        self._time = self.loop.time
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._active = False
        self._got_bytes = False
        self._eof = False
        self._keep = True
        self._error: TransportError | None = None
        self._parts: list[bytes] = []
        self._waiter: asyncio.Future | None = None
        self._ready: Callable[[], None] | None = None   # the exchange waiting for its answer
        self._sink: Sink | None = None
        self._feeding = False          # inside parser.feed_data
        self._put_after_feed = False   # released while feeding: pool it once the feed returns
        self._wake_after_feed = False  # the answer arrived in this feed: tell it at its end
        self._last = 0.0
        self._paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._informational = False
        self._headers_done = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        set_nodelay(transport)
        self.pool._live.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._active:      # nothing asked: an idle connection must stay silent
            self.transport.close()
            return
        self._got_bytes = True
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._keep = False
            self._put_after_feed = False
            if not self._eof:
                self._failed(_reason(e.__context__ or e, "invalid response"))
            self.transport.abort()
        finally:
            self._feeding = False
        if self._wake_after_feed:
            self._wake_after_feed = False
            self._wake()
        if self._put_after_feed:
            # released by a callback of this very feed: reuse only after the whole input was
            # parsed (bytes after the response mean the connection must not be reused)
            self._put_after_feed = False
            if self._keep and not self._active and not self.closed \
                    and not self.transport.is_closing():
                self.pool._put(self)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        if not self._active or self._eof or self._error is not None:
            return
        if self._headers_done and exc is None and self._close_delimited():
            self._message_complete()   # the body ended at EOF, as its framing said
        else:
            self._failed(_reason(exc, "connection closed by the instance"))

    def pause_reading(self) -> None:
        """The client is slow: stop reading the instance (the stream-idle clock stops too)."""
        if not self._paused and not self.closed and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._last = self._time()
            if not self.closed and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._eof:                 # bytes after the response: never reuse this connection
            self._keep = False
            self.transport.close()
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True    # skip interim responses
            return
        self.status = status
        self._headers_done = True
        self._keep = self._keep and self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._last = self._time()
        sink = self._sink
        if sink is not None:
            sink.chunk(body)
            return
        self._parts.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._message_complete()

    # -- exchange ------------------------------------------------------------------------------
    def _message_complete(self) -> None:
        self._eof = True
        self._cancel_idle_timer()
        sink = self._sink
        if sink is not None:
            self._sink = None
            sink.end()
            return
        self._wake()

    def _failed(self, reason: str, *, idle: bool = False) -> None:
        if not self._headers_done:
            self._error = ConnectFailed(reason, nothing_received=not self._got_bytes)
        else:
            self._error = BodyFailed(reason, idle_timeout=idle)
        self._keep = False
        self._cancel_idle_timer()
        sink = self._sink
        if sink is not None:
            self._sink = None
            sink.fail(self._error)  # type: ignore[arg-type]
            return
        self._wake()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _wake(self) -> None:
        ready = self._ready
        if ready is not None:
            if self._feeding:    # first the whole input: the answer may be complete in it
                self._wake_after_feed = True
                return
            self._ready = None
            ready()
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _close_delimited(self) -> bool:
        for name, value in self.headers:
            n = name.lower()
            if n == b"content-length":
                return False
            if n == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return self.status not in (204, 304)

    def _send(self, data: bytes, ready: Callable[[], None]) -> None:
        """Send ``data`` (a complete request); ``ready()`` is called once the status, headers
        and first body bytes (or a failure) arrived: it then calls :meth:`_first`."""
        if self.closed or self.transport.is_closing():
            raise ConnectFailed("connection closed by the instance", nothing_received=True)
        self._active = True
        self._got_bytes = self._eof = self._headers_done = self._informational = False
        self._error = None
        self.status = 0
        self.headers = []
        self._parts = []
        self._ready = ready
        self.transport.write(data)
        deadlines = self.pool._deadlines
        if deadlines is not None:
            deadlines.add(self)

    def _first(self) -> bytes:
        """The first body bytes of the answer :meth:`_send` waited for, or its failure."""
        deadlines = self.pool._deadlines
        if deadlines is not None:
            deadlines.discard(self)
        if self._error is not None:
            self.close()
            raise self._error
        parts = self._parts
        self._parts = []
        first = parts[0] if len(parts) == 1 else b"".join(parts)
        if not self._eof:
            idle = self.pool.idle_timeout
            if idle:
                self._last = self._time()
                self._idle_timer = self.loop.call_later(idle, self._idle_check)
        return first

    def _first_byte_timeout(self, secs: float) -> None:
        if self._eof or self._error is not None or self._parts:
            return
        self._error = FirstByteTimeout(f"no response within {secs:g}s")
        self._keep = False
        self._wake()

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self.pool.idle_timeout
        if self._eof or self._error is not None or not self._active or idle is None:
            return
        now = self._time()
        if self._paused:
            self._last = now
        due = self._last + idle
        if now >= due:
            self._failed(f"no data for {idle:g}s", idle=True)
            self.close()
        else:
            self._idle_timer = self.loop.call_at(due, self._idle_check)

    # -- reading the body ----------------------------------------------------------------------
    @property
    def is_sse(self) -> bool:
        for name, value in self.headers:
            if len(name) == 12 and name.lower() == b"content-type":
                return value.lstrip().lower().startswith(b"text/event-stream")
        return False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a response header (``name`` in lower case)."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def done(self) -> bool:
        """The whole body has been received."""
        return self._eof

    async def read_chunk(self) -> bytes:
        """The body bytes received since the last read (``b""`` at the end)."""
        while True:
            parts = self._parts
            if parts:
                self._parts = []
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._error is not None:
                raise self._error
            if self._eof or not self._active:
                return b""
            waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                self.close()
                raise

    def relay(self, sink: Sink) -> None:
        """Push the rest of the body into ``sink`` as it arrives (buffered bytes first)."""
        parts = self._parts
        if parts:
            self._parts = []
            for p in parts:
                sink.chunk(p)
        if self._error is not None:
            sink.fail(self._error)  # type: ignore[arg-type]
        elif self._eof or not self._active:
            sink.end()
        else:
            self._sink = sink

    # -- ending the exchange -------------------------------------------------------------------
    def release(self) -> None:
        """End the exchange: back to the pool when the body was fully read, else close."""
        if not self._active:
            return
        self._active = False
        self._sink = None
        if self._eof and self._keep and not self.closed and not self.transport.is_closing():
            self.resume_reading()
            if self._feeding:
                self._put_after_feed = True
            else:
                self.pool._put(self)
        else:
            self._drop()

    def close(self) -> None:
        """End the exchange and the connection (the instance sees a disconnect)."""
        self._active = False
        self._sink = None
        self._drop()

    def _drop(self) -> None:
        self._waiter = None
        self._ready = None
        self._put_after_feed = self._wake_after_feed = False
        self._cancel_idle_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()


class _Deadlines:
    """First-byte deadlines of the exchanges waiting for an answer, checked by one coarse
    timer (a timeout fires between ``timeout`` and ``timeout + period`` after sending) instead
    of a timer per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.period = min(max(timeout / 8, 0.01), 1.0)
        self.waiting: dict[Upstream, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, up: Upstream) -> None:
        self.waiting[up] = self.loop.time() + self.timeout
        if self._timer is None:
            self._timer = self.loop.call_later(self.period, self._check)

    def discard(self, up: Upstream) -> None:
        self.waiting.pop(up, None)

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        for up in [u for u, due in self.waiting.items() if due <= now]:
            del self.waiting[up]
            up._first_byte_timeout(self.timeout)
        if self.waiting:
            self._timer = self.loop.call_later(self.period, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


Answered = Callable[["Upstream | None", bytes, "TransportError | None"], None]


class Exchange:
    """One request sent through the pool, driven by callbacks: a pooled connection if one is
    idle, else a new one. A pooled connection that the instance closed while idle (the
    keep-alive race: nothing received) is retried once on a fresh connection, transparently.
    """

    __slots__ = ("_task", "data", "done", "pool", "pooled", "target", "up")

    def __init__(self, pool: UpstreamPool, target: Target, data: bytes, done: Answered) -> None:
        self.pool = pool
        self.target = target
        self.data = data
        self.done: Answered | None = done
        self.up: Upstream | None = None
        self.pooled = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        up = self.pool._take(self.target.key)
        if up is None:
            self._connect()
        else:
            self.pooled = True
            self._send(up)

    def cancel(self) -> None:
        """The requester is gone: stop connecting, or close the connection waiting for its
        answer (the instance sees a disconnect)."""
        self.done = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        up = self.up
        if up is not None:
            self.up = None
            deadlines = self.pool._deadlines
            if deadlines is not None:
                deadlines.discard(up)
            up.close()

    def _send(self, up: Upstream) -> None:
        self.up = up
        try:
            up._send(self.data, self._answered)
        except ConnectFailed as e:
            self._failed(e)

    def _answered(self) -> None:
        up = self.up
        self.up = None
        if up is None:      # cancelled
            return
        try:
            first = up._first()
        except ConnectFailed as e:
            self._failed(e)
        except TransportError as e:
            self._finish(None, b"", e)
        else:
            self._finish(up, first, None)

    def _failed(self, e: ConnectFailed) -> None:
        self.up = None
        if self.pooled and e.nothing_received:
            self.pooled = False
            self._connect()
        else:
            self._finish(None, b"", e)

    def _connect(self) -> None:
        self._task = self.pool.loop.create_task(self._connect_and_send())

    async def _connect_and_send(self) -> None:
        try:
            up = await self.pool._connect(self.target)
        except ConnectFailed as e:
            self._task = None
            self._finish(None, b"", e)
            return
        self._task = None
        if self.done is None:      # cancelled while connecting
            up.close()
            return
        self._send(up)

    def _finish(self, up: Upstream | None, first: bytes, error: TransportError | None) -> None:
        done = self.done
        self.done = None
        if done is not None:
            done(up, first, error)
        elif up is not None:
            up.close()


class UpstreamPool:
    """Keep-alive connections per instance (LIFO reuse; idle ones expire)."""

    def __init__(self, connect_timeout: float | None, first_byte_timeout: float | None,
                 idle_timeout: float | None, *, keepalive_secs: float = KEEPALIVE_SECS,
                 max_idle: int = MAX_IDLE_PER_TARGET,
                 tls: ssl_mod.SSLContext | None = None) -> None:
        """``tls``: the client context for TLS targets (:func:`kvrouter.http.tls.client_context`;
        default: verify against the system CAs, built at the first TLS connection)."""
        self.loop = asyncio.get_running_loop()
        self._tls = tls
        self.connect_timeout = connect_timeout or None
        self.first_byte_timeout = first_byte_timeout or None
        self.idle_timeout = idle_timeout or None
        self.keepalive_secs = keepalive_secs
        self.max_idle = max_idle
        self._deadlines = (_Deadlines(self.loop, self.first_byte_timeout)
                           if self.first_byte_timeout else None)
        self._idle: dict[str, collections.deque[Upstream]] = {}
        self._live: set[Upstream] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def request(self, target: Target, data: bytes, done: Answered) -> Exchange:
        """Send ``data`` (a complete request) to ``target``; ``done(up, first, error)`` is
        called once, with the connection and the first body bytes or with the failure
        (:class:`ConnectFailed`, :class:`FirstByteTimeout`, :class:`BodyFailed`)."""
        exchange = Exchange(self, target, data, done)
        exchange.start()
        return exchange

    async def open(self, target: Target, data: bytes) -> tuple[Upstream, bytes]:
        """:meth:`request` as a coroutine: returns the connection and the first body bytes
        (``b""`` for an empty body), or raises the failure."""
        fut = self.loop.create_future()

        def done(up: Upstream | None, first: bytes, error: TransportError | None) -> None:
            if fut.done():      # cancelled, and answered before the cancel reached the exchange
                if up is not None:
                    up.close()
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result((up, first))

        exchange = self.request(target, data, done)
        try:
            up, first = await fut
        except asyncio.CancelledError:
            exchange.cancel()
            # answered before the cancel: the connection is only in ``fut``, nobody else closes it
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result()[0].close()
            raise
        more = up._parts          # body bytes that arrived while this coroutine waited
        if more:
            up._parts = []
            first = b"".join((first, *more))
        return up, first

    async def _connect(self, target: Target) -> Upstream:
        loop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, up = await loop.create_connection(
                    lambda: Upstream(self, target), target.host, target.port,
                    ssl=self._tls_context() if target.tls else None)
        except TimeoutError:
            raise ConnectFailed(f"connect timeout after {self.connect_timeout:g}s") from None
        except (OSError, ssl_mod.SSLError) as e:
            raise ConnectFailed(_reason(e, "connect failed")) from None
        return up

    def _tls_context(self) -> ssl_mod.SSLContext:
        if self._tls is None:
            self._tls = ssl_mod.create_default_context()
        return self._tls

    def _take(self, key: str) -> Upstream | None:
        idle = self._idle.get(key)
        while idle:
            up = idle.pop()
            if not up.closed and not up.transport.is_closing():
                return up
        return None

    def _put(self, up: Upstream) -> None:
        idle = self._idle.get(up.target.key)
        if idle is None:
            idle = self._idle[up.target.key] = collections.deque()
        if len(idle) >= self.max_idle:
            idle.popleft().close()
        up.idle_since = self.loop.time()
        idle.append(up)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_secs / 2, self._sweep)

    def _lost(self, up: Upstream) -> None:
        self._live.discard(up)
        idle = self._idle.get(up.target.key)
        if idle and not up._active:
            try:
                idle.remove(up)
            except ValueError:
                pass

    def _sweep(self) -> None:
        """Close connections idle longer than ``keepalive_secs`` (oldest first)."""
        self._sweeper = None
        cutoff = self.loop.time() - self.keepalive_secs
        any_left = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since < cutoff:
                idle.popleft().close()
            any_left = any_left or bool(idle)
        if any_left:
            self._sweeper = self.loop.call_later(self.keepalive_secs / 2, self._sweep)

    def forget(self, key: str) -> None:
        """Close the idle connections of a removed instance."""
        for up in self._idle.pop(key, ()):
            up.close()

    def close(self) -> None:
        if self._deadlines is not None:
            self._deadlines.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle.clear()
        for up in list(self._live):
            up.close()
