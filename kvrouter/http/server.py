"""The HTTP/1.1 server connection: an asyncio ``Protocol`` over httptools' request parser.

One :class:`HttpConnection` per client connection. Requests are parsed as bytes arrive and
handled one at a time, in order (pipelined requests wait in a queue; while one waits, reading
pauses so a client cannot make the router buffer without bound; those answered inside their
handler are taken one after the other by :meth:`HttpConnection._dispatch`'s loop). The
server's handler runs a request in a task or drives it by callbacks (:data:`Handler`); it
answers through the connection, either with a complete response (:meth:`HttpConnection.send`)
or a streamed one (:meth:`start_stream`, :meth:`write`, :meth:`finish`).

Covered: keep-alive; HTTP/1.0 (keep-alive only when asked; streamed responses are
close-delimited, never chunked); chunked request bodies; the body limit (413 before the body is
read when ``Content-Length`` says so, the rest of the upload discarded, then a lingering close);
``Expect: 100-continue``; write backpressure and client disconnects, forwarded to whoever
:meth:`HttpConnection.attach` ed itself to the active request (the upstream being relayed, the
request's owner), or else the handler task is cancelled. Malformed requests get a 400 and the
connection is closed.

Limits (:class:`Limits`): a request target over ``max_url`` gets 414, a head over ``max_head``
bytes or ``max_headers`` fields 431, a head not complete ``header_timeout`` after its first
byte 408, and so does a body that received nothing for ``header_timeout`` (its clock starts
when the head is complete, each read restarts it), each answered at once and the connection
closed; over ``max_connections`` open connections, new ones get 503 and are closed unread.
llhttp itself sets no bound: the head is checked once complete, and after each read that ends
inside it (httptools buffers an unfinished header line), never per header field.

Graceful shutdown: :meth:`Listener.stop_accepting`, then :meth:`HttpServer.drain`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Protocol

import httptools
import orjson

from kvrouter.http.request import Request
from kvrouter.http.response import JSON, Response, date_header, status_line
from kvrouter.http.sockets import listening_sockets, set_nodelay

log = logging.getLogger("kvrouter.http")

#: Answers one request: either returns an awaitable (run in a task) or, having taken the request
#: over with callbacks, ``None``, and then calls :meth:`HttpConnection.handler_done` itself.
Handler = Callable[[Request], "Awaitable[None] | None"]


class Flow(Protocol):
    """What the connection pauses while the client does not read: the upstream being relayed."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_SECS = 2.0          # keep draining an over-limit upload this long before closing
ACCEPT_BATCH = 256         # connections accepted per readiness of a listening socket
DRAIN_IDLE_SECS = 0.5      # while draining, a connection idle this long is closed
DRAIN_POLL_SECS = 0.1      # while draining, idle connections and the end are checked this often
TLS_HANDSHAKE_SECS = 10.0  # a TLS client that has not completed its handshake by then is cut

# response framing modes
NONE, DONE, RAW, CHUNKED, CLOSE = 0, 1, 2, 3, 4
#: the size lines of chunks shorter than this, made once (an SSE event is one chunk; joining
#: a ready line costs a fifth less than formatting it for every event)
_SMALL_CHUNK = 1024
_CHUNK_SIZES = [b"%x\r\n" % n for n in range(_SMALL_CHUNK)]

#: the ``Connection`` header of an answer, by (HTTP/1.0 request, keep-alive)
_KEEP = {(False, True): b"", (False, False): b"Connection: close\r\n",
         (True, True): b"Connection: keep-alive\r\n", (True, False): b"Connection: close\r\n"}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may send or hold (the ``server.*`` keys of the same meaning). Without
    them llhttp accepts a request head of any size, and a client that sends a head byte by
    byte, or opens connections without end, holds the router's memory and descriptors."""

    max_url: int = 8 << 10          # request-target bytes; beyond → 414
    max_head: int = 32 << 10        # request line + header bytes; beyond → 431
    max_headers: int = 100          # header fields; beyond → 431
    header_timeout: float = 20.0    # a request head started must be complete by then, and a
                                    # body must not stall (no byte) this long, else 408
    keepalive: float = 75.0         # an idle connection is closed after this long
    max_connections: int = 10_000   # open client connections; beyond, new ones get 503 and close


DEFAULT_LIMITS = Limits()


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the current input."""


class _HeadLimit(Exception):
    """Raised inside a parser callback: the request head is over a :class:`Limits` bound."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_CODES = {400: "bad_request", 408: "request_timeout", 414: "uri_too_long",
          431: "headers_too_large", 503: "too_many_connections"}


def _error_bytes(message: str, status: int = 400) -> bytes:
    """A complete error answer that closes the connection (no request handler involved)."""
    body = orjson.dumps({"error": {"message": message, "code": _CODES[status], "type":
                                   "service_unavailable" if status == 503 else
                                   "invalid_request_error"}})
    return (status_line(status) + date_header() + b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


class HttpServer:
    """Protocol factory and registry of live connections. One timer (not one per connection)
    closes connections idle longer than ``keepalive_secs`` and answers 408 to those whose
    request head is not complete ``limits.header_timeout`` after it started, or whose request
    body received nothing for as long; during a :meth:`drain` it runs every
    :data:`DRAIN_POLL_SECS`."""

    def __init__(self, handler: Handler, *, max_body: int,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.handler = handler
        self.max_body = max_body
        self.limits = limits
        self.keepalive_secs = limits.keepalive
        self.connections: set[HttpConnection] = set()
        self.draining = False   # answers say ``Connection: close``; /health answers 503
        #: called for each connection closed at once because ``limits.max_connections`` are open
        self.on_refused: Callable[[], None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> HttpConnection:
        if self._sweeper is None and not self.draining:
            self._sweeper = asyncio.get_running_loop().call_later(self._period(), self._sweep)
        return HttpConnection(self)

    def _period(self) -> float:
        return min(self.keepalive_secs, self.limits.header_timeout) / 4

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self.sweep(loop.time())
        self._sweeper = loop.call_later(self._period(), self._sweep)

    def sweep(self, now: float) -> int:
        """Close idle connections, answer 408 to heads not complete in time and to stalled
        bodies; returns how many connections have a request, or a part of one, in progress."""
        idle = now - (DRAIN_IDLE_SECS if self.draining else self.keepalive_secs)
        read = now - self.limits.header_timeout
        return sum(conn.check(idle, read) for conn in list(self.connections))

    def running(self) -> int:
        """Requests being answered."""
        return sum(conn.active is not None for conn in self.connections)

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Graceful shutdown once the listening sockets are closed: requests in progress and
        those arriving on open connections are answered, with ``Connection: close``; idle
        connections are closed. Returns when no request is in progress, after ``grace``
        seconds, or (within :data:`DRAIN_POLL_SECS`) once ``hurry`` is set; the caller then
        closes what is left (:meth:`close_all`)."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while not hurry.is_set():
            t = loop.time()
            if not self.sweep(t) or t >= deadline:
                return
            await asyncio.sleep(min(DRAIN_POLL_SECS, deadline - t))

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.close()


class Listener:
    """Listening sockets whose connections are accepted in batches.

    libuv (hence uvloop's own servers) accepts one connection per event-loop iteration: behind
    a loop busy with thousands of streams, a burst of new connections waits seconds in the
    accept queue. Here every readiness accepts up to :data:`ACCEPT_BATCH` connections, each
    handed to ``loop.connect_accepted_socket``, with ``ssl`` (HTTPS) if given: a failed
    handshake closes that connection, logged at debug level only (scanners and plain-HTTP
    clients would otherwise fill the log).
    """

    def __init__(self, http: HttpServer, sockets: list[socket.socket],
                 ssl: SSLContext | None = None) -> None:
        self.http = http
        self.sockets = sockets
        self.ssl = ssl
        self.loop = asyncio.get_running_loop()
        self._opening = 0            # accepted, not yet connected (TLS: handshaking)
        self._warned = -60.0
        for sock in sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        loop = self.loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # out of descriptors or memory: back off, keep serving
                log.error("accept failed on %s: %s; pausing accepts for 1s",
                          sock.getsockname(), e)
                loop.remove_reader(sock.fileno())
                loop.call_later(1.0, self._resume, sock)
                return
            if len(self.http.connections) + self._opening >= self.http.limits.max_connections:
                self._refuse(conn)
                continue
            self._opening += 1
            if self.ssl is None:
                accepted = loop.connect_accepted_socket(self.http, conn)
            else:
                accepted = loop.connect_accepted_socket(
                    self.http, conn, ssl=self.ssl, ssl_handshake_timeout=TLS_HANDSHAKE_SECS)
            task = loop.create_task(accepted)
            task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task) -> None:
        self._opening -= 1
        _accepted(task)

    def _refuse(self, conn: socket.socket) -> None:
        """``max_connections`` are open: answer 503 without reading (plain HTTP only: a TLS
        client could not read it) and close."""
        if self.ssl is None:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(_error_bytes("Too many open connections", 503))
        conn.close()
        if self.http.on_refused is not None:
            self.http.on_refused()
        now = self.loop.time()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("%d client connections open (server.max-connections): new ones are "
                        "refused (kvrouter_http_connections_refused_total counts them)",
                        self.http.limits.max_connections)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()

    def stop_accepting(self) -> None:
        """Drain: take the connections already queued in the kernel (answered rather than
        reset), then close the listening sockets, so that new ones are refused."""
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._accept(sock)
        self.close()


async def shutdown(listener: Listener, http: HttpServer, grace: float,
                   hurry: asyncio.Event, grace_over: Callable[[], None] | None = None) -> None:
    """Graceful shutdown (SIGTERM): new connections are refused, the requests in progress
    have ``grace`` seconds to finish (less if ``hurry`` is set), then ``grace_over()`` may
    answer what still waits and every connection is closed. Logs one line as it starts and
    one as it ends."""
    listener.stop_accepting()
    loop = asyncio.get_running_loop()
    started = loop.time()
    log.info("draining: new connections refused; %d requests in progress, %d connections "
             "open; up to %gs", http.running(), len(http.connections), grace)
    await http.drain(grace, hurry)
    left = http.running()
    log.info("drained in %.1fs: %d requests still running%s", loop.time() - started, left,
             " (second signal)" if hurry.is_set() else " (grace over)" if left else "")
    if grace_over is not None:
        grace_over()
    http.close_all()


def _accepted(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("accepted connection failed: %r", task.exception())


def serve_sockets(handler: Handler, sockets: list[socket.socket], *, max_body: int,
                  ssl: SSLContext | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> tuple[Listener, HttpServer]:
    """Serve ``handler`` on listening sockets (HTTPS with ``ssl``)."""
    http = HttpServer(handler, max_body=max_body, limits=limits)
    return Listener(http, sockets, ssl), http


async def start_server(handler: Handler, host: str, port: int, *, max_body: int,
                       backlog: int = 2048,
                       ssl: SSLContext | None = None,
                       limits: Limits = DEFAULT_LIMITS) -> tuple[Listener, HttpServer]:
    """Bind ``host:port`` (every address ``host`` resolves to, as ``loop.create_server``
    does) and serve ``handler``; raises ``OSError`` if an address cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addrs = [(family, type_, proto, addr) for family, type_, proto, _, addr in dict.fromkeys(infos)]
    return serve_sockets(handler, listening_sockets(addrs, backlog=backlog), max_body=max_body,
                         ssl=ssl, limits=limits)


class HttpConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "_answered",
        "_body",
        "_body_size",
        "_clen",
        "_continue_pending",
        "_cur",
        "_discarding",
        "_dispatching",
        "_error",
        "_expect",
        "_flow",
        "_head_bytes",
        "_head_long",
        "_headers",
        "_limits",
        "_linger",
        "_on_lost",
        "_queue",
        "_read_len",
        "_read_paused",
        "_task",
        "_url",
        "active",
        "body_since",
        "closed",
        "head_since",
        "idle_since",
        "keep_alive",
        "loop",
        "mode",
        "parser",
        "peer",
        "server",
        "status",
        "transport",
        "write_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.closed = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._clen: bytes | None = None
        self._expect = False
        self._cur: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self.active: Request | None = None
        self._task: asyncio.Task | None = None
        self._dispatching = False   # inside _dispatch's loop
        self._answered = False      # the request it runs was answered inside its handler
        self._read_paused = False
        self._discarding = False
        self._linger: asyncio.TimerHandle | None = None
        self._error: bytes | None = None
        self._continue_pending = False
        self.mode = NONE
        self.status = 0        # of the response to the active request
        self.keep_alive = True
        self.write_paused = False
        self._flow: Flow | None = None
        self._on_lost: Callable[[], None] | None = None
        self.idle_since = self.loop.time()
        self._limits = server.limits
        # The request head being read (checked per read and once complete, not per header):
        # the bytes of the reads that were wholly inside it (-1: no head), whether it spans
        # several reads, when it began; and the size of the current read.
        self._head_bytes = -1
        self._head_long = False
        self.head_since = 0.0
        self._read_len = 0
        # the last read into a request body (from its head's completion; refreshed by every
        # read while it arrives): a body that stalls is timed from here, not from idleness
        self.body_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.server.connections.add(self)
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._read_len = len(data)
        in_head = self._head_bytes >= 0
        headers = self._headers
        try:
            self.parser.feed_data(data)
            if self._head_bytes >= 0:       # a head still incomplete: slow, or large
                self._long_head(len(data), in_head and headers is self._headers)
            elif self._cur is not None:     # a body still incomplete: its clock restarts
                self.body_since = self.loop.time()
        except httptools.HttpParserCallbackError as e:
            if self._discarding:
                return
            cause = e.__context__
            if isinstance(cause, _HeadLimit):
                log.debug("request head from %s refused: %s", self.peer, cause.message)
                self._fail(cause.message, cause.status)
                return
            log.error("HTTP request handling failed: %r", cause or e)
            self._fail(str(cause or e))
        except httptools.HttpParserUpgrade:
            self._fail("protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(str(e.args[0] if e.args else e))

    def eof_received(self) -> bool:
        return False  # the client closed its side: treat as a disconnect

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._queue.clear()
        if self.active is not None:
            cb = self._on_lost
            if cb is not None:
                self._on_lost = self._flow = None
                cb()
            elif self._task is not None:
                self._task.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._flow is not None:
            self._flow.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._flow is not None:
            self._flow.resume_reading()

    # -- the active request's owner -------------------------------------------------------------
    def attach(self, on_lost: Callable[[], None] | None, flow: Flow | None = None) -> None:
        """Take over the active request's events: ``on_lost()`` if the client goes away
        (instead of cancelling the handler task), ``flow`` paused while the client does not
        read (it is paused at once if writing is already paused)."""
        self._on_lost = on_lost
        self._flow = flow
        if flow is not None and self.write_paused:
            flow.pause_reading()

    def detach(self) -> None:
        """Stop forwarding the client's events (the owner is done with the connection)."""
        self._on_lost = self._flow = None

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._head_long = False
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        self._clen = None
        self._expect = False
        if (self.active is not None or self._queue) and not self._read_paused:
            self._read_paused = True          # pipelined: no more reading until our turn
            self.transport.pause_reading()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url:
            raise _HeadLimit(414, f"Request URL exceeds {self._limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        n = len(name)
        if n == 14:
            if name.lower() == b"content-length":
                self._clen = value
        elif n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect = True

    def on_headers_complete(self) -> None:
        self._head_bytes = -1
        limits = self._limits
        if len(self._headers) > limits.max_headers:
            raise _HeadLimit(431, f"More than {limits.max_headers} request headers")
        if (self._head_long or self._read_len > limits.max_head) \
                and self._head_size() > limits.max_head:
            raise _HeadLimit(431, f"Request headers exceed {limits.max_head} bytes")
        p = self.parser
        req = Request(self, p.get_method().decode("latin-1"), self._url, p.get_http_version(),
                      self._headers, p.should_keep_alive())
        self._cur = req
        if self._clen is not None and int(self._clen) > self.server.max_body:
            self._too_large(req)
        if self._expect and req.version == "1.1":
            if self.active is None and not self._queue:
                self.transport.write(CONTINUE)
            else:
                self._continue_pending = True

    def _head_size(self) -> int:
        """The request target and header fields (4 bytes of separators each), in bytes."""
        return len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._headers)

    def _long_head(self, size: int, inside: bool) -> None:
        """A read ended inside a request head: bound what the parser holds (it buffers an
        unfinished header line until it ends). ``inside``: the whole read belonged to that
        head (it had begun before, and no other request began in this read)."""
        self._head_long = True
        if inside:
            self._head_bytes += size
        else:   # it began in this read: its time starts now (read only for heads not complete)
            self.head_since = self.loop.time()
        limits = self._limits
        if len(self._headers) > limits.max_headers:
            self._fail(f"More than {limits.max_headers} request headers", 431)
        elif self._head_bytes > limits.max_head:
            self._fail(f"Request headers exceed {limits.max_head} bytes", 431)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > self.server.max_body and self._cur is not None:
            self._too_large(self._cur)

    def on_message_complete(self) -> None:
        req = self._cur
        self._cur = None
        self._continue_pending = False
        if req is None or self.closed or self.transport.is_closing():
            return   # answered and closing (a request handled at once said ``close``)
        body = self._body
        if body:
            req.body = body[0] if len(body) == 1 else b"".join(body)
        if self.active is None and not self._queue:
            self._dispatch(req)
        else:
            self._queue.append(req)

    # -- request lifecycle ---------------------------------------------------------------------
    def _too_large(self, req: Request) -> None:
        """Answer 413 (through the handler, which sees ``too_large``) and drop the rest."""
        req.too_large = True
        req.keep_alive = False
        self._cur = None
        self._body = []
        self._discarding = True
        if self.active is None and not self._queue:
            self._dispatch(req)
        else:
            self._queue.append(req)
        raise _Stop

    def _fail(self, reason: str, status: int = 400) -> None:
        """A malformed request: 400 (or 408, 414, 431 with ``reason`` as the message) after
        the answers to the requests read before it, then close."""
        self._discarding = True
        self._head_bytes = -1
        self._error = _error_bytes(f"Bad request: {reason}" if status == 400 else reason, status)
        if self.active is None and self.transport is not None:
            self.transport.write(self._error)
            self._linger_close()

    def _linger_close(self) -> None:
        """Close after the answer, but keep reading (and discarding) a little while, so that
        input the client is still sending does not reset the connection before it has read
        the answer."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self.loop.call_later(LINGER_SECS, transport.close)

    def _dispatch(self, req: Request) -> None:
        """Run ``req``'s handler, then the queued requests' while each is answered inside its
        handler (400, 401, 503…): :meth:`handler_done` called from there only says so, and
        this loop takes the next one. Dispatching it from the previous one's call stack
        recursed once per pipelined request, into Python's recursion limit (500s)."""
        self._dispatching = True
        try:
            while True:
                self.active = req
                self.mode = NONE
                self.status = 0
                self.keep_alive = req.keep_alive
                self._answered = False
                try:
                    pending = self.server.handler(req)
                except Exception:
                    self._internal_error(req)
                    self.handler_done()
                    pending = None
                if pending is not None:
                    self._task = self.loop.create_task(self._run(req, pending))
                if not (self._answered and self._queue):
                    break
                req = self._queue.popleft()
        finally:
            self._dispatching = False
        if self._read_paused and not self._queue:
            self._resume()

    async def _run(self, req: Request, pending: Awaitable[None]) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            pass  # client gone, or shutdown
        except Exception:
            self._internal_error(req)
        finally:
            self.handler_done()

    def _internal_error(self, req: Request) -> None:
        log.exception("unhandled error on %s %s", req.method, req.path)
        if self.mode == NONE and not self.closed:
            body = orjson.dumps({"error": {"message": "Internal server error",
                                           "type": "server_error", "code": "internal_error"}})
            self.send(500, body)
        else:
            self.abort()

    def handler_done(self) -> None:
        """The active request's handler is over: answer-less → abort; then the next one."""
        if self.mode == NONE and not self.closed:
            self.abort()
        self._task = None
        self.active = None
        self._flow = self._on_lost = None
        self.idle_since = self.loop.time()
        if self.closed:
            return
        transport = self.transport
        if self._error is not None and not self._queue:
            transport.write(self._error)
            self._linger_close()
            return
        if not self.keep_alive:
            if self._discarding:   # an upload is still arriving: let the client read the answer
                self._linger_close()
            else:
                transport.close()
            return
        if self._continue_pending and self._cur is not None:
            self._continue_pending = False
            transport.write(CONTINUE)
        if self._dispatching:
            self._answered = True   # answered inside its handler: _dispatch takes the next
        elif self._queue:
            self._dispatch(self._queue.popleft())
        elif self._read_paused:
            self._resume()

    def _resume(self) -> None:
        """Read again once no pipelined request waits: the head or body that was being read
        waited for the router, so its clock starts again."""
        self._read_paused = False
        self.head_since = self.body_since = self.loop.time()
        self.transport.resume_reading()

    # -- the server's timer ------------------------------------------------------------------
    def check(self, idle_cutoff: float, read_cutoff: float) -> bool:
        """The server timer's visit: 408 if a request head started before ``read_cutoff`` is
        not complete, or if a request body received nothing since then (a slow upload that
        keeps sending goes on); close if idle since before ``idle_cutoff``. True while a
        request, or a part of one, is in progress."""
        if self.active is not None:       # a pipelined request waits for it: the router's delay
            return True
        timeout = self._limits.header_timeout
        if self._head_bytes >= 0:
            if self.head_since >= read_cutoff:
                return True
            self._fail(f"Request headers not received within {timeout:g}s", 408)
            return False
        if self._cur is not None:
            if self.body_since >= read_cutoff:
                return True
            self._cur = None
            self._fail(f"Request body stalled: nothing received for {timeout:g}s", 408)
            return False
        if self.idle_since < idle_cutoff:
            self.close()
        return False

    # -- responses -----------------------------------------------------------------------------
    def _connection_header(self) -> bytes:
        if self.server.draining:
            self.keep_alive = False     # the router is stopping: the client moves elsewhere
        active = self.active
        return _KEEP[(active is not None and active.version == "1.0", self.keep_alive)]

    def send(self, status: int, body: bytes = b"", content_type: bytes = JSON,
             headers: bytes = b"") -> None:
        """A complete response with ``Content-Length``."""
        if self.closed or self.mode != NONE:
            return
        head_only = self.active is not None and self.active.method == "HEAD"
        data = b"".join((
            status_line(status), date_header(), b"Content-Type: ", content_type,
            b"\r\nContent-Length: %d\r\n" % len(body), headers, self._connection_header(),
            b"\r\n", b"" if head_only else body))
        self.mode = DONE
        self.status = status
        self.transport.write(data)

    def send_response(self, resp: Response) -> None:
        self.send(resp.status, resp.body, resp.content_type, resp.headers)

    def start_stream(self, status: int, headers: bytes, length: int | None,
                     first: bytes = b"", *, no_body: bool = False) -> None:
        """Send the status line and ``headers`` (complete lines), then ``first`` body bytes.

        ``length`` known → ``Content-Length`` and raw body bytes; unknown → chunked for
        HTTP/1.1 clients, close-delimited for HTTP/1.0 ones. ``no_body`` (1xx/204/304) sends no
        framing header. The framing chosen (:data:`RAW`, :data:`CHUNKED`, :data:`CLOSE`) is
        ``mode``, which :meth:`write` and :meth:`finish` follow.
        """
        if no_body:
            mode, framing = RAW, b""
        elif length is not None:
            mode, framing = RAW, b"Content-Length: %d\r\n" % length
        elif self.active is None or self.active.version != "1.0":
            mode, framing = CHUNKED, b"Transfer-Encoding: chunked\r\n"
        else:
            mode, framing = CLOSE, b""
            self.keep_alive = False
        self.mode = mode
        self.status = status
        if self.closed:
            return
        head = status_line(status) + headers + framing + self._connection_header() + b"\r\n"
        if first:
            head += (b"%x\r\n%b\r\n" % (len(first), first)) if mode == CHUNKED else first
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        """More body bytes of a streamed response (framed as chosen by :meth:`start_stream`)."""
        if self.closed or not data:
            return
        if self.mode == CHUNKED:
            n = len(data)
            self.transport.write(b"".join((_CHUNK_SIZES[n], data, b"\r\n")) if n < _SMALL_CHUNK
                                 else b"%x\r\n%b\r\n" % (n, data))
        else:
            self.transport.write(data)

    def finish(self) -> None:
        """End a streamed response cleanly."""
        if self.mode == CHUNKED and not self.closed:
            self.transport.write(b"0\r\n\r\n")
        self.mode = DONE

    def abort(self) -> None:
        """Drop the connection without a clean end: the client sees a broken response."""
        self.mode = DONE
        self.keep_alive = False
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Shutdown: stop the handler and close."""
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None and not self.closed:
            self.transport.close()
