"""The HTTP/1.1 server connection: an asyncio ``Protocol`` over httptools' request parser.

One :class:`HttpConnection` per client connection. Requests are parsed as bytes arrive and
handled one at a time, in order (pipelined requests wait in a queue; while one waits, reading
pauses so a client cannot make the router buffer without bound). Each request runs the
server's handler in its own task; the handler answers through the connection, either with a
complete response (:meth:`HttpConnection.send`) or a streamed one (:meth:`start_stream`,
:meth:`write`, :meth:`finish`).

Covered: keep-alive; HTTP/1.0 (keep-alive only when asked; streamed responses are
close-delimited, never chunked); chunked request bodies; the body limit (413 before the body is
read when ``Content-Length`` says so, the rest of the upload discarded, then a lingering close);
``Expect: 100-continue``; write backpressure and client disconnects, forwarded to whoever
:meth:`HttpConnection.attach` ed itself to the active request (the upstream being relayed, the
request's owner), or else the handler task is cancelled. Malformed requests get a 400 and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable
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
MAX_HEAD = 64 << 10        # request line + headers; beyond → 431
KEEPALIVE_SECS = 75.0      # an idle keep-alive connection is closed after this long
ACCEPT_BATCH = 256         # connections accepted per readiness of a listening socket

# response framing modes
NONE, DONE, RAW, CHUNKED, CLOSE = 0, 1, 2, 3, 4

_KEEP = {("1.1", True): b"", ("1.1", False): b"Connection: close\r\n",
         ("1.0", True): b"Connection: keep-alive\r\n", ("1.0", False): b"Connection: close\r\n"}


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the current input."""


def _bad_request_bytes(reason: str, status: int = 400) -> bytes:
    code = "bad_request" if status == 400 else "headers_too_large"
    body = orjson.dumps({"error": {"message": f"Bad request: {reason}",
                                   "type": "invalid_request_error", "code": code}})
    return (status_line(status) + date_header() + b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


class HttpServer:
    """Protocol factory and registry of live connections; closes keep-alive connections idle
    longer than ``keepalive_secs`` (checked by one timer)."""

    def __init__(self, handler: Handler, *, max_body: int,
                 keepalive_secs: float = KEEPALIVE_SECS) -> None:
        self.handler = handler
        self.max_body = max_body
        self.keepalive_secs = keepalive_secs
        self.connections: set[HttpConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> HttpConnection:
        if self._sweeper is None and self.keepalive_secs:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.keepalive_secs / 4, self._sweep)
        return HttpConnection(self)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.keepalive_secs
        for conn in [c for c in self.connections if c.active is None and c.idle_since < cutoff]:
            conn.close()
        self._sweeper = loop.call_later(self.keepalive_secs / 4, self._sweep)

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
    handed to ``loop.connect_accepted_socket``.
    """

    def __init__(self, http: HttpServer, sockets: list[socket.socket]) -> None:
        self.http = http
        self.sockets = sockets
        self.loop = asyncio.get_running_loop()
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
            task = loop.create_task(loop.connect_accepted_socket(self.http, conn))
            task.add_done_callback(_accepted)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()


def _accepted(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("accepted connection failed: %r", task.exception())


def serve_sockets(handler: Handler, sockets: list[socket.socket], *,
                  max_body: int) -> tuple[Listener, HttpServer]:
    """Serve ``handler`` on listening sockets."""
    http = HttpServer(handler, max_body=max_body)
    return Listener(http, sockets), http


async def start_server(handler: Handler, host: str, port: int, *, max_body: int,
                       backlog: int = 2048) -> tuple[Listener, HttpServer]:
    """Bind ``host:port`` (every address ``host`` resolves to, as ``loop.create_server``
    does) and serve ``handler``; raises ``OSError`` if an address cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addrs = [(family, type_, proto, addr) for family, type_, proto, _, addr in dict.fromkeys(infos)]
    return serve_sockets(handler, listening_sockets(addrs, backlog=backlog), max_body=max_body)


class HttpConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_clen",
        "_continue_pending",
        "_cur",
        "_discarding",
        "_error",
        "_expect",
        "_flow",
        "_head_bytes",
        "_headers",
        "_linger",
        "_on_lost",
        "_queue",
        "_read_paused",
        "_task",
        "_url",
        "active",
        "closed",
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
        self._head_bytes = -1  # bytes of a request head seen in earlier reads (-1: no head)

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
        in_head = self._head_bytes >= 0
        try:
            self.parser.feed_data(data)
            if in_head and self._head_bytes >= 0:  # all of ``data`` belonged to one head
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail("request line and headers exceed 64 KiB", 431)
        except httptools.HttpParserCallbackError as e:
            if self._discarding:
                return
            cause = e.__context__
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
        """A malformed request: 400 (or 431) after the answers to the requests read before
        it, then close."""
        self._discarding = True
        self._error = _bad_request_bytes(reason, status)
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
        self.active = req
        self.mode = NONE
        self.status = 0
        self.keep_alive = req.keep_alive
        try:
            pending = self.server.handler(req)
        except Exception:
            self._internal_error(req)
            self.handler_done()
            return
        if pending is not None:
            self._task = self.loop.create_task(self._run(req, pending))

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
        self._request_done()

    def _request_done(self) -> None:
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
        if self._queue:
            self._dispatch(self._queue.popleft())
        if self._read_paused and not self._queue:
            self._read_paused = False
            transport.resume_reading()

    # -- responses -----------------------------------------------------------------------------
    def _connection_header(self) -> bytes:
        return _KEEP[(self._version(), self.keep_alive)]

    def _version(self) -> str:
        """The HTTP version the answer is framed for (``1.0`` or ``1.1``)."""
        active = self.active
        return "1.0" if active is not None and active.version == "1.0" else "1.1"

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
                     first: bytes = b"", *, no_body: bool = False) -> int:
        """Send the status line and ``headers`` (complete lines), then ``first`` body bytes.

        ``length`` known → ``Content-Length`` and raw body bytes; unknown → chunked for
        HTTP/1.1 clients, close-delimited for HTTP/1.0 ones. ``no_body`` (1xx/204/304) sends no
        framing header. Returns the framing mode (:data:`RAW`, :data:`CHUNKED`, :data:`CLOSE`).
        """
        if no_body:
            mode, framing = RAW, b""
        elif length is not None:
            mode, framing = RAW, b"Content-Length: %d\r\n" % length
        elif self._version() != "1.0":
            mode, framing = CHUNKED, b"Transfer-Encoding: chunked\r\n"
        else:
            mode, framing = CLOSE, b""
            self.keep_alive = False
        self.mode = mode
        self.status = status
        if self.closed:
            return mode
        head = status_line(status) + headers + framing + self._connection_header() + b"\r\n"
        if first:
            head += (b"%x\r\n%b\r\n" % (len(first), first)) if mode == CHUNKED else first
        self.transport.write(head)
        return mode

    def write(self, data: bytes) -> None:
        """More body bytes of a streamed response (framed as chosen by :meth:`start_stream`)."""
        if self.closed or not data:
            return
        if self.mode == CHUNKED:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
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
