"""The simulated P→D hand-off (docs/fastdeploy.md#pd-dispatch and #instance-surface).

* :func:`parse_disaggregate_info` validates the flat or nested ``disaggregate_info`` and finds
  the decode's connector address (flat: ``decode_ip``/``decode_connector_port``; nested:
  ``cache_info.rdma.{ip,port}``, or ``cache_info.ipc.ip`` with ``decode.connector_port``).
* A decode's connector is a tiny HTTP endpoint, ``POST /handoff`` with the JSON
  ``{request_id, first_token, prompt_tokens, transfer_protocol}``; :class:`HandoffStore`
  matches it with the decode's own HTTP request in either order (early hand-offs are kept
  for ``ttl`` seconds).
* :func:`send_handoff` is the prefill side; it fails fast when the connector is unreachable.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

PROTOCOLS = ("ipc", "rdma")


class DisaggError(ValueError):
    """Malformed ``disaggregate_info`` (→ 400)."""


class HandoffError(RuntimeError):
    """The prefill could not hand the request to the decode's connector."""


class HandoffAborted(Exception):
    """A decode's wait was ended by ``/v1/abort_requests`` or shutdown."""


@dataclass(frozen=True)
class DisaggTarget:
    decode_ip: str
    decode_port: int
    transfer_protocol: str  # "ipc" | "rdma"


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise DisaggError(f"invalid {what}: {value!r}")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.strip().isdigit():
        port = int(value.strip())
    else:
        raise DisaggError(f"invalid {what}: {value!r}")
    if not 1 <= port <= 65535:
        raise DisaggError(f"invalid {what}: {value!r}")
    return port


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DisaggError(f"invalid {what}: {value!r}")
    return value.strip().strip("[]")


def parse_disaggregate_info(info: Any) -> DisaggTarget:
    if not isinstance(info, dict):
        raise DisaggError("disaggregate_info must be an object")
    proto = info.get("transfer_protocol")
    if proto not in PROTOCOLS:
        raise DisaggError(f"invalid transfer_protocol: {proto!r}")
    if "cache_info" in info:
        cache_info = info["cache_info"]
        if not isinstance(cache_info, dict):
            raise DisaggError("cache_info must be an object")
        if isinstance(cache_info.get("rdma"), dict):
            rdma = cache_info["rdma"]
            return DisaggTarget(_ip(rdma.get("ip"), "cache_info.rdma.ip"),
                                _port(rdma.get("port"), "cache_info.rdma.port"), proto)
        if isinstance(cache_info.get("ipc"), dict):
            decode = info.get("decode")
            if not isinstance(decode, dict):
                raise DisaggError("nested disaggregate_info needs a decode object")
            return DisaggTarget(_ip(cache_info["ipc"].get("ip"), "cache_info.ipc.ip"),
                                _port(decode.get("connector_port"), "decode.connector_port"), proto)
        raise DisaggError("cache_info needs an ipc or rdma object")
    if "decode_ip" in info:
        return DisaggTarget(_ip(info.get("decode_ip"), "decode_ip"),
                            _port(info.get("decode_connector_port"), "decode_connector_port"),
                            proto)
    raise DisaggError("disaggregate_info has neither decode_ip nor cache_info")


def transfer_delay(protocol: str, prompt_tokens: int, *, ipc_base: float, ipc_per_token: float,
                   rdma_base: float, rdma_per_token: float) -> float:
    """Modelled KV transfer time in model seconds (ipc faster than rdma)."""
    if protocol == "ipc":
        return ipc_base + ipc_per_token * prompt_tokens
    return rdma_base + rdma_per_token * prompt_tokens


class HandoffStore:
    """Matches hand-offs with waiting decode requests by ``request_id``."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._early: dict[str, tuple[float, dict[str, Any]]] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def _purge(self) -> None:
        cutoff = time.monotonic() - self.ttl
        for rid in [r for r, (t, _) in self._early.items() if t < cutoff]:
            del self._early[rid]

    def deliver(self, payload: dict[str, Any]) -> None:
        self._purge()
        rid = str(payload.get("request_id"))
        fut = self._waiters.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)
        else:
            self._early[rid] = (time.monotonic(), payload)

    async def wait(self, request_id: str, timeout: float) -> dict[str, Any]:
        """The hand-off for ``request_id``; raises ``asyncio.TimeoutError`` or
        :class:`HandoffAborted`."""
        self._purge()
        early = self._early.pop(request_id, None)
        if early is not None:
            return early[1]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if self._waiters.get(request_id) is fut:
                del self._waiters[request_id]

    def abort(self, request_id: str) -> bool:
        fut = self._waiters.pop(request_id, None)
        if fut is None or fut.done():
            return False
        fut.set_exception(HandoffAborted(request_id))
        return True

    def abort_all(self) -> list[str]:
        ids = list(self._waiters)
        for rid in ids:
            self.abort(rid)
        return ids

    def waiting(self) -> int:
        return len(self._waiters)


def connector_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/handoff"


async def send_handoff(session: aiohttp.ClientSession, target: DisaggTarget,
                       payload: dict[str, Any], *, timeout: float) -> None:
    url = connector_url(target.decode_ip, target.decode_port)
    try:
        client_timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout)
        async with session.post(url, json=payload, timeout=client_timeout) as resp:
            await resp.read()
            if resp.status != 200:
                raise HandoffError(f"decode connector {url} answered {resp.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise HandoffError(f"decode connector {url} unreachable: {exc!r}") from exc
