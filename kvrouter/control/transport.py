"""Control-plane HTTP calls to instances (probes, ``/metrics`` scrapes, ``/v1/models``, the
abort fan-out, a remote tokenizer) through one pooled aiohttp ``ClientSession``.

The data plane (inference requests) does not come through here: it uses the upstream pool of
:mod:`kvrouter.http.upstream`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp


class Transport:
    """Small request/response calls to instances over pooled keep-alive connections."""

    def __init__(self, connect_timeout: float) -> None:
        # Every call has its own total timeout; only the connect timeout is shared.
        self.connect_timeout = connect_timeout or None
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
