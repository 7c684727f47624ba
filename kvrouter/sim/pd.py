"""The simulated P→D hand-off (docs/fastdeploy.md#pd-dispatch and #instance-surface).

* :func:`parse_disaggregate_info` validates the flat or nested ``disaggregate_info`` and finds
  the decode's connector address (flat: ``decode_ip``/``decode_connector_port``; nested:
  ``cache_info.rdma.{ip,port}``, or ``cache_info.ipc.ip`` with ``decode.connector_port``).
* A decode's connector is a tiny HTTP endpoint, ``POST /handoff`` with the JSON
  ``{request_id, first_token, prompt_tokens, transfer_protocol}``; :class:`HandoffStore`
  matches it with the decode's own HTTP request in either order (early hand-offs are kept
  for ``ttl`` seconds).
* :func:`send_handoff` is the prefill side; it fails fast when the connector is unreachable.

vLLM and SGLang hand-offs (``SimConfig.engine``) go the other way: the decode pulls the KV from
the prefill's connector port (vLLM: ``remote_host``/``remote_port`` of ``kv_transfer_params``,
the NIXL side channel; SGLang: ``bootstrap_host``/``bootstrap_port``, the bootstrap server),
``POST /kv/pull`` with ``{"key"}``: the prefill's ``remote_block_ids`` (vLLM, answered at once)
or ``"room:<bootstrap_room>"`` (SGLang, held until the prefill has run, since both legs start
together). The prefill keeps each finished prefill's KV in a :class:`HandoffStore` by that key
for ``handoff_ttl`` seconds; one pull takes it. :func:`parse_kv_source` validates the decode's
side of either protocol.

A vLLM pair with ``kv_connector="P2pNcclConnector"`` ignores ``kv_transfer_params``: each leg
finds its peer in its ``X-Request-Id`` (:func:`p2p_peer`, the connector's own patterns), the
prefill keeps the KV under that id (:func:`p2p_key`) and the decode pulls it from the prefill
the id names (the connector's ``send_type: GET``). The real connector fails (its engine
stops) on an id without the addresses; the sim answers 400.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from orjson import loads as orjson_loads

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


MAX_ROOM = (1 << 63) - 1


@dataclass(frozen=True)
class KvSource:
    """Where a vLLM/SGLang decode pulls its prompt's KV from, and under which key."""

    host: str
    port: int
    key: str
    wait: bool            # SGLang: the prefill may still be running; vLLM: it has answered
    engine_id: str | None = None   # vLLM: the prefill engine that must hold the blocks


def block_key(block_ids: list[int]) -> str:
    return "blocks:" + ",".join(map(str, block_ids))


def room_key(room: int) -> str:
    return f"room:{room}"


def parse_room(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROOM:
        raise DisaggError(f"invalid bootstrap_room: {value!r}")
    return value


# vLLM P2pNcclConnector.parse_request_id: a prefill reads the decode's address, a decode the
# prefill's (greedy, as there: the last ``:<digits>`` that fits)
_P2P_DECODE_ADDR = re.compile(r"___decode_addr_(.*):(\d+)")
_P2P_PREFILL_ADDR = re.compile(r"___prefill_addr_(.*):(\d+)___")


def p2p_peer(request_id: str | None, *, prefill: bool) -> tuple[str, int]:
    """The ``(host, port)`` a P2pNcclConnector instance reads from its request id: the
    decode's on a prefill, the prefill's on a decode (an IPv6 host without its brackets)."""
    match = (_P2P_DECODE_ADDR if prefill else _P2P_PREFILL_ADDR).search(request_id or "")
    if match is None:
        raise DisaggError(f"Request id {request_id!r} does not contain hostname and port")
    return _ip(match.group(1), "host"), _port(match.group(2), "port")


def p2p_key(request_id: str) -> str:
    return "p2p:" + request_id


def parse_kv_source(engine: str, data: dict[str, Any], max_blocks: int) -> KvSource | None:
    """The decode's KV source in a request body, ``None`` when it has to compute the prompt
    itself (vLLM: no ``kv_transfer_params.do_remote_prefill``; SGLang: no
    ``bootstrap_room``). Raises :class:`DisaggError` (→ 400) on malformed fields."""
    if engine == "vllm":
        params = data.get("kv_transfer_params")
        if params is None:
            return None
        if not isinstance(params, dict):
            raise DisaggError("kv_transfer_params must be an object")
        if params.get("do_remote_prefill") is not True:
            return None
        ids = params.get("remote_block_ids")
        if (not isinstance(ids, list) or not ids or len(ids) > max_blocks
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids)):
            raise DisaggError(f"remote_block_ids must be 1 to {max_blocks} integers")
        engine_id = params.get("remote_engine_id")
        if not isinstance(engine_id, str) or not engine_id or len(engine_id) > 256:
            raise DisaggError(f"invalid remote_engine_id: {engine_id!r}")
        return KvSource(_ip(params.get("remote_host"), "remote_host"),
                        _port(params.get("remote_port"), "remote_port"), block_key(ids),
                        wait=False, engine_id=engine_id)
    if engine == "sglang":
        if data.get("bootstrap_room") is None:
            return None
        room = parse_room(data.get("bootstrap_room"))
        return KvSource(_ip(data.get("bootstrap_host"), "bootstrap_host"),
                        _port(data.get("bootstrap_port"), "bootstrap_port"), room_key(room),
                        wait=True)
    return None


async def pull_kv(session: aiohttp.ClientSession, source: KvSource, *,
                  timeout: float) -> dict[str, Any]:
    """The prefill's KV record for ``source.key`` (``{first_token, prompt_tokens,
    engine_id}``); raises :class:`HandoffError` when it is unreachable or has none, and
    ``TimeoutError`` when it did not answer within ``timeout``."""
    url = connector_url(source.host, source.port).removesuffix("/handoff") + "/kv/pull"
    try:
        async with session.post(url, json={"key": source.key},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise HandoffError(f"prefill {url} answered {resp.status}: {raw[:200]!r}")
            record = orjson_loads(raw)
    except TimeoutError:
        raise
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise HandoffError(f"prefill {url} unreachable: {exc!r}") from exc
    if not isinstance(record, dict):
        raise HandoffError(f"prefill {url} answered a non-object")
    if source.engine_id is not None and record.get("engine_id") != source.engine_id:
        raise HandoffError(f"prefill {url} is engine {record.get('engine_id')!r}, "
                           f"not {source.engine_id!r}")
    return record
