"""Relaying an instance's response to the client, byte for byte.

The status and the filtered headers are written once, together with the first body bytes; the
rest of the body is pushed from the instance's connection straight to the client's as it
arrives (no task wake-up, no parsing per chunk). Framing towards the client: a non-SSE body
with a ``Content-Length`` keeps it (raw bytes); otherwise chunked (HTTP/1.1 clients) or
close-delimited (HTTP/1.0 clients). A slow client pauses reading from the instance; a client
that goes away closes the instance connection.

Honest streams: an OpenAI-style SSE stream must end with ``data: [DONE]``. One that ends
without it (the instance closed cleanly mid-answer) or breaks off after a complete event is
ended by the router with a ``stream_interrupted`` error event and ``data: [DONE]``, so the
client knows the answer is incomplete; one that breaks mid-event is aborted (the client sees a
broken connection), since no event can be appended to a half-written one (unless the relay
passes whole events only, below: then the half event is dropped and the stream ended the same
way).

Per chunk the relay keeps only what it needs: the last body bytes (at least
:data:`TAIL_BYTES`, for the two checks above) and,
when asked, usage: an SSE chunk is searched for ``"prompt_tokens"`` (a substring test; for
llama.cpp also ``"cache_n"``), a non-SSE body (up to 1 MiB) once at the end; the numbers are
read next to the keys, no JSON is parsed (:mod:`kvrouter.backends.usage`). When the router
asked for the stream's usage itself, a :class:`~kvrouter.backends.usage.UsageTaker` reads the
usage event and leaves it out: the relay then passes whole events only (a choice's last event
waits for the next one). Everything the accounting needs goes into the request's
:class:`Outcome`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvrouter.backends.usage import TIMINGS_KEY, USAGE_KEY, UsageTaker, timings_of, usage_of
from kvrouter.http.headers import end_to_end
from kvrouter.http.server import HttpConnection
from kvrouter.http.upstream import BodyFailed, Upstream
from kvrouter.server.accounting import Outcome

log = logging.getLogger("kvrouter.relay")

INTERRUPTED = (b'data: {"error":{"message":"upstream stream interrupted: %s",'
               b'"type":"backend_error","code":"stream_interrupted"}}\n\n' b"data: [DONE]\n\n")
DONE = b"data: [DONE]"
TAIL_BYTES = 32                  # enough to see ``data: [DONE]`` and the blank line after it
USAGE_SCAN_LIMIT = 1 << 20
_NO_BODY = frozenset({204, 304})


def response_head(headers: list[tuple[bytes, bytes]], extra: bytes
                  ) -> tuple[bytes, int | None, bool]:
    """Instance → client header lines (the end-to-end ones, without ``Content-Length``;
    ``extra`` router lines appended), the instance's ``Content-Length`` and whether the body
    is SSE."""
    lines: list[bytes] = []
    length: int | None = None
    sse = False
    for n, name, value in end_to_end(headers):
        if n == b"content-length":
            try:
                length = int(value)
            except ValueError:
                pass
            continue
        if n == b"content-type":
            sse = value.lstrip().lower().startswith(b"text/event-stream")
        lines.append(name + b": " + value + b"\r\n")
    lines.append(extra)
    return b"".join(lines), length, sse


class Relay:
    """One relayed response: a body sink for :meth:`Upstream.relay` that writes to the client
    and fills the :class:`Outcome`; ``on_done()`` is called once, when it is over."""

    __slots__ = ("conn", "on_done", "outcome", "parts", "scan", "size", "sse", "tail", "taker",
                 "timings", "up")

    def __init__(self, conn: HttpConnection, up: Upstream, sse: bool, scan: bool,
                 outcome: Outcome, *, timings: bool = False) -> None:
        self.conn = conn
        self.up = up
        self.sse = sse
        self.scan = scan
        self.timings = timings      # llama.cpp: read its ``timings`` too
        self.outcome = outcome
        self.tail = b""
        self.parts: list[bytes] = []
        self.size = 0
        self.taker: UsageTaker | None = None    # takes out the usage event the router asked for
        self.on_done: Callable[[], None] | None = None

    # -- body sink (called by the instance connection) -----------------------------------------
    def chunk(self, data: bytes) -> None:
        taker = self.taker
        if taker is not None:
            data = taker.feed(data)
            if taker.usage[0] is not None or taker.passing:
                self._took(taker)
            if not data:
                return
        self.conn.write(data)
        self.tail = data if len(data) >= TAIL_BYTES else (self.tail + data)[-2 * TAIL_BYTES:]
        if self.scan:
            self._observe(data)

    def end(self) -> None:
        conn = self.conn
        conn.detach()
        self.up.release()
        taker = self.taker
        if taker is not None:         # what was held, an unterminated last event included
            self.taker = None
            self.chunk(taker.flush())
        if self.sse and 200 <= self.outcome.status < 300 and not self._done_sent():
            self.outcome.interrupted = True
            log.warning("backend %s ended a stream without %s", self.up.target.key, DONE.decode())
            if self.tail[-2:] != b"\n\n":
                conn.write(b"\n\n")       # close the last, unterminated, event
            conn.write(INTERRUPTED % b"the stream ended without [DONE]")
        conn.finish()
        self._resolve()

    def fail(self, exc: BodyFailed) -> None:
        self.outcome.failure = exc
        conn = self.conn
        conn.detach()
        self.up.close()
        log.warning("backend %s body failed mid-relay: %s", self.up.target.key, exc)
        taker = self.taker
        if taker is not None:         # the whole events held; an unfinished one is dropped
            self.taker = None
            self.chunk(taker.whole())
        if self.sse and self.tail[-2:] == b"\n\n" and not conn.closed:
            self.outcome.interrupted = True
            conn.write(INTERRUPTED % str(exc).replace('"', "'").encode())
            conn.finish()
        else:
            conn.abort()  # no clean terminator: the client sees a broken body
        self._resolve()

    def client_lost(self) -> None:
        self.outcome.client_gone = True
        self.up.close()
        self._resolve()

    # -- helpers -------------------------------------------------------------------------------
    def _resolve(self) -> None:
        done = self.on_done
        if done is not None:
            self.on_done = None
            self.conn.detach()
            self._complete()
            done()

    def _complete(self) -> None:
        outcome = self.outcome
        if outcome.first_byte_at is None and self.tail:
            outcome.first_byte_at = time.perf_counter()
        if self.scan and not self.sse and self.parts and self.size < USAGE_SCAN_LIMIT:
            parts = self.parts
            outcome.prompt_tokens, outcome.cached_tokens = usage_of(
                parts[0] if len(parts) == 1 else b"".join(parts))
        self.parts = []

    def _done_sent(self) -> bool:
        return self.tail.rstrip().endswith(DONE)

    def _observe(self, data: bytes) -> None:
        if self.sse:
            if USAGE_KEY in data:
                prompt, cached = usage_of(data)
            elif self.timings and TIMINGS_KEY in data:
                prompt, cached = timings_of(data)
            else:
                return
            if prompt is not None:
                self.outcome.prompt_tokens, self.outcome.cached_tokens = prompt, cached
        elif self.size < USAGE_SCAN_LIMIT:
            self.parts.append(data)
            self.size += len(data)

    def _took(self, taker: UsageTaker) -> None:
        """The usage the taker read goes into the outcome; once it is passing, so is the
        relay (usage scanned as without a taker)."""
        prompt, cached = taker.usage
        if prompt is not None:
            self.outcome.prompt_tokens, self.outcome.cached_tokens = prompt, cached
        if taker.passing:
            self.taker = None
            self.scan = True


def start_relay(conn: HttpConnection, up: Upstream, first: bytes, extra: bytes,
                outcome: Outcome, on_done: Callable[[], None], *, scan_usage: bool = True,
                asked_usage: bool = False, timings: bool = False) -> None:
    """Send ``up``'s status, headers and body to the client; ``on_done()`` is called once the
    body has been relayed, the instance failed or the client left (maybe before this
    returns). ``first`` is the body read so far; if ``up`` has already received its whole
    body, nothing more is read. ``asked_usage``: the router asked for the stream's usage
    (its event is left out); ``timings``: llama.cpp's ``timings`` count as usage."""
    head, length, sse = response_head(up.headers, extra)
    r = Relay(conn, up, sse, scan_usage, outcome, timings=timings)
    status = outcome.status = up.status
    if first:
        outcome.first_byte_at = time.perf_counter()
    if sse:
        length = None  # the stream_interrupted event may have to be appended
        if asked_usage and 200 <= status < 300:
            taker = r.taker = UsageTaker()
            r.scan = False          # the usage event is read where it is taken out
            if first:
                first = taker.feed(first)
                r._took(taker)
    conn.start_stream(status, head, length, first, no_body=status in _NO_BODY or status < 200)
    if first:
        r.tail = first
        if r.scan:
            r._observe(first)
    r.on_done = on_done
    if conn.closed:
        r.client_lost()
    elif up.done:
        r.end()             # the whole answer came with its head
    else:
        conn.attach(r.client_lost, up)
        up.relay(r)
