"""Relaying an instance's response to the client, byte for byte (contract §5.7).

Chunks are written as they arrive (``write`` awaits the client's drain, so a slow client slows
the read from the instance instead of growing a buffer). Usage counters are read off the relay
path without touching the bytes sent.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from kvrouter.backends.fastdeploy import loads
from kvrouter.server.transport import BodyFailed, UpstreamResponse, response_headers

log = logging.getLogger("kvrouter.relay")

INTERRUPTED = (b'data: {"error":{"message":"upstream stream interrupted: %s","type":"backend_error",'
               b'"code":"stream_interrupted"}}\n\n' b"data: [DONE]\n\n")
USAGE_SCAN_LIMIT = 1 << 20


class RelayOutcome:
    """What happened during a relay, for accounting."""

    __slots__ = ("first_byte_at", "failure", "client_gone", "prompt_tokens", "cached_tokens")

    def __init__(self) -> None:
        self.first_byte_at: float | None = None
        self.failure: BodyFailed | None = None
        self.client_gone = False
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None


async def relay(request: web.Request, up: UpstreamResponse, first: bytes,
                extra_headers: dict[str, str], *, eof: bool = False
                ) -> tuple[web.StreamResponse, RelayOutcome]:
    """Send ``up``'s status, headers and body to the client.

    ``first`` is the body read so far (at least the first chunk); ``eof`` says it is the whole
    body (a buffered PD non-stream answer), so nothing more is read from ``up``.
    """
    out = RelayOutcome()
    headers = response_headers(up.headers)
    headers.update(extra_headers)
    resp = web.StreamResponse(status=up.status, headers=headers)
    sse = up.is_sse
    scan = UsageScan(sse)
    try:
        await resp.prepare(request)
        chunk = first
        tail = b""
        while chunk:
            await resp.write(chunk)
            if out.first_byte_at is None:
                out.first_byte_at = time.perf_counter()
            scan.feed(chunk)
            tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
            if eof:
                break
            try:
                chunk = await up.read_chunk()
            except BodyFailed as e:
                out.failure = e
                break
        if out.failure is None:
            await resp.write_eof()
            up.release()
        else:
            up.close()
            log.warning("backend %s body failed mid-relay: %s", request.path, out.failure)
            if sse and tail == b"\n\n":
                await resp.write(INTERRUPTED % str(out.failure).replace('"', "'").encode())
                await resp.write_eof()
            elif request.transport is not None:
                request.transport.abort()  # no clean terminator: the client sees a broken body
    except (ConnectionError, RuntimeError):  # the client went away mid-relay
        out.client_gone = True
        up.close()
    out.prompt_tokens, out.cached_tokens = scan.result()
    return resp, out


class UsageScan:
    """Finds ``usage.prompt_tokens`` and ``cached_tokens`` in a relayed body."""

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.parts: list[bytes] = []
        self.size = 0
        self.usage: dict | None = None

    def feed(self, chunk: bytes) -> None:
        if self.sse:
            if b'"prompt_tokens"' in chunk:
                for line in chunk.split(b"\n"):
                    if b'"prompt_tokens"' in line and line.startswith(b"data:"):
                        self._take(line[5:])
        elif self.size < USAGE_SCAN_LIMIT:
            self.parts.append(chunk)
            self.size += len(chunk)

    def _take(self, raw: bytes) -> None:
        try:
            obj = loads(raw)
        except ValueError:
            return
        if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]

    def result(self) -> tuple[int | None, int | None]:
        if not self.sse and self.parts and self.size < USAGE_SCAN_LIMIT:
            self._take(b"".join(self.parts))
        u = self.usage
        if not u:
            return None, None
        details = u.get("prompt_tokens_details") or {}
        prompt = u.get("prompt_tokens")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return (prompt if isinstance(prompt, int) else None,
                cached if isinstance(cached, int) else None)
