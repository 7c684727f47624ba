"""Control-plane HTTP calls to instances (probes, ``/metrics`` scrapes, ``/v1/models``, the
abort fan-out, a remote tokenizer) through one pooled aiohttp ``ClientSession``.

The data plane (inference requests) does not come through here: it uses the upstream pool of
:mod:`kvrouter.http.upstream`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

import aiohttp

MAX_BODY = 16 << 20         # bytes of a control-plane answer (probes, /metrics, models)

class Transport:
    """Small request/response calls to instances over pooled keep-alive connections.

    ``tls``: the client context for ``https://`` instances
    (:func:`kvrouter.http.tls.client_context`; ``None``: aiohttp's, the system CAs).
    """

    def __init__(self, connect_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        # Every call has its own total timeout; only the connect timeout is shared.
        self.connect_timeout = connect_timeout or None
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10,
                                               ssl=self.tls if self.tls is not None else True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def get(self, url: str, timeout: float, headers: Mapping[str, str] | None = None,
                  method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        """A small control-plane call (probe, scrape, fan-out): status and whole body (at most
        :data:`MAX_BODY` bytes: an instance cannot make the router buffer without bound)."""
        async with asyncio.timeout(timeout):
            async with self.session.request(method, url, headers=headers, data=body,
                                            allow_redirects=False) as resp:
                parts: list[bytes] = []
                size = 0
                async for part in resp.content.iter_chunked(1 << 16):
                    size += len(part)
                    if size > MAX_BODY:
                        raise ValueError(f"{url} answered more than {MAX_BODY >> 20} MiB")
                    parts.append(part)
                return resp.status, b"".join(parts)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
