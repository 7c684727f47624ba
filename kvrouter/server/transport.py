"""The narrow transport interface between the proxy and the instances.

The proxy only needs: open a request to an instance and get its status and headers, then read
the body chunk by chunk. Failures are classified so the proxy can decide on retries (§5.8):
:class:`ConnectFailed` happens before any response status (safe to retry elsewhere),
:class:`FirstByteTimeout` when the instance stays silent, :class:`BodyFailed` mid-body.
This implementation uses one pooled aiohttp ``ClientSession``; a faster data plane can replace
it behind the same interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade",
})


class TransportError(Exception):
    """Base of the classified failures; ``str(err)`` is a short reason."""


class ConnectFailed(TransportError):
    """No response status was received: refused, unreachable, DNS, connect timeout, early reset."""


class FirstByteTimeout(TransportError):
    """The instance sent no response body byte within the first-byte timeout."""


class BodyFailed(TransportError):
    """The body broke off after the status line (reset or idle timeout)."""

    def __init__(self, reason: str, idle_timeout: bool = False):
        super().__init__(reason)
        self.idle_timeout = idle_timeout


def forward_headers(headers: Mapping[str, str], host: str, *, identity: bool = False) -> CIMultiDict:
    """Client → instance headers (§5.2): drop hop-by-hop, Content-Length and Host."""
    drop = set(HOP_BY_HOP)
    conn = headers.get("Connection")
    if conn:
        drop.update(t.strip().lower() for t in conn.split(","))
    out = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk in ("content-length", "host"):
            continue
        out.add(k, v)
    out["Host"] = host
    if identity:
        out["Accept-Encoding"] = "identity"
    return out


def response_headers(headers: CIMultiDictProxy) -> CIMultiDict:
    """Instance → client headers (§5.2): drop hop-by-hop and Content-Length."""
    drop = set(HOP_BY_HOP)
    conn = headers.get("Connection")
    if conn:
        drop.update(t.strip().lower() for t in conn.split(","))
    out = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk == "content-length":
            continue
        out.add(k, v)
    return out


class UpstreamResponse:
    """An open response from an instance: status, headers and a chunk reader."""

    def __init__(self, resp: aiohttp.ClientResponse, idle_timeout: float | None):
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self._idle = idle_timeout or None

    @property
    def is_sse(self) -> bool:
        return self.headers.get("Content-Type", "").startswith("text/event-stream")

    async def read_chunk(self) -> bytes:
        """Next body chunk as it arrived (``b""`` at EOF), within the stream-idle timeout."""
        return await self._read(self._idle)

    async def _read(self, limit: float | None) -> bytes:
        try:
            async with asyncio.timeout(limit):
                return await self._resp.content.readany()
        except TimeoutError:
            raise BodyFailed(f"no data for {limit:g}s", idle_timeout=True) from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise BodyFailed(_reason(e)) from None

    async def read_all(self, limit: int) -> bytes:
        """The whole remaining body, up to ``limit`` bytes (raises BodyFailed beyond)."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BodyFailed(f"body exceeds {limit} bytes")
        return b"".join(parts)

    def close(self) -> None:
        """Drop the connection (used to cancel a leg; the instance sees a disconnect)."""
        self._resp.close()

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._resp.release()


class Transport:
    """Pooled keep-alive HTTP/1.1 connections to instances."""

    def __init__(self, connect_timeout: float, first_byte_timeout: float, idle_timeout: float):
        self.connect_timeout = connect_timeout or None
        self.first_byte_timeout = first_byte_timeout or None
        self.idle_timeout = idle_timeout or None
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def open(self, url: str, body: bytes, headers: CIMultiDict,
                   method: str = "POST") -> tuple[UpstreamResponse, bytes]:
        """Send a request; return the response and its first body chunk (``b""`` if empty).

        The first-byte timeout covers sending, the status line and the first body chunk.
        """
        resp = None
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                try:
                    raw = await self.session.request(method, url, data=body, headers=headers,
                                                     allow_redirects=False)
                except (aiohttp.ClientError, OSError) as e:
                    raise ConnectFailed(_reason(e)) from None
                resp = UpstreamResponse(raw, self.idle_timeout)
                first = await resp._read(None)
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise FirstByteTimeout(f"no response within {self.first_byte_timeout:g}s") from None
        except BodyFailed:
            resp.close()
            raise
        return resp, first

    async def get(self, url: str, timeout: float, headers: Mapping[str, str] | None = None,
                  method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        """A small control-plane call (probe, scrape, fan-out): status and whole body."""
        async with asyncio.timeout(timeout):
            async with self.session.request(method, url, headers=headers, data=body,
                                            allow_redirects=False) as resp:
                return resp.status, await resp.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text
