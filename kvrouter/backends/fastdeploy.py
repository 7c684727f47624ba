"""FastDeploy's PD protocol (contract §5.4, §5.6): ``request_id``, ``disaggregate_info``,
``pd_reschedule`` detection and prefill in-body errors."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from kvrouter import errors
from kvrouter.instance import InstanceInfo


def loads(raw: bytes) -> Any:
    """Parse JSON exactly: orjson, or the stdlib for integers beyond 64 bits."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, key order kept, integers exact, no HTML escaping."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def base_request_id(body: dict) -> str:
    """The client's ``request_id``, or a fresh UUID4 when absent, null or empty."""
    rid = body.get("request_id")
    if rid is None or rid == "":
        return str(uuid.uuid4())
    if not isinstance(rid, str):
        raise errors.invalid_value("request_id must be a string")
    return rid


def attempt_request_id(base: str, attempt: int) -> str:
    return base if attempt == 0 else f"{base}-retry{attempt}"


def _port_int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def flat_protocol(p: InstanceInfo, d: InstanceInfo) -> str:
    """``ipc`` iff same host, both list ipc, and tp(P) == tp(D) or tp(D) == 1 (fd-router's rule)."""
    if (p.host and p.host == d.host and "ipc" in p.transfer_protocol
            and "ipc" in d.transfer_protocol and (p.tp == d.tp or d.tp == 1)):
        return "ipc"
    return "rdma"


def nested_protocol(p: InstanceInfo, d: InstanceInfo) -> str:
    if p.host and p.host == d.host and "ipc" in p.transfer_protocol and "ipc" in d.transfer_protocol:
        return "ipc"
    return "rdma"


def can_pair(p: InstanceInfo, d: InstanceInfo) -> bool:
    """D can reach P: ipc possible, or both list rdma (the pair filter of §5.4)."""
    return flat_protocol(p, d) == "ipc" or (
        "rdma" in p.transfer_protocol and "rdma" in d.transfer_protocol)


def _record(x: InstanceInfo, role: str) -> dict:
    return {
        "role": role, "host_ip": x.host, "port": x.port,
        "connector_port": x.connector_port or "0",
        "engine_worker_queue_port": x.engine_worker_queue_port or "0",
        "transfer_protocol": list(x.transfer_protocol), "rdma_ports": list(x.rdma_ports),
        "device_ids": list(x.device_ids),
    }


def disaggregate_info(p: InstanceInfo, d: InstanceInfo, fmt: str) -> dict:
    if fmt == "nested":
        proto = nested_protocol(p, d)
        if proto == "ipc":
            cache = {"ipc": {"ip": d.host, "port": d.engine_worker_queue_port or "0",
                             "device_ids": list(d.device_ids)}}
        else:
            cache = {"rdma": {"ip": d.host, "port": d.connector_port or "0",
                              "rdma_port": list(d.rdma_ports)}}
        return {"prefill": _record(p, "PREFILL"), "decode": _record(d, "DECODE"),
                "role": "decode", "transfer_protocol": proto, "cache_info": cache}
    return {
        "prefill_ip": p.host,
        "decode_ip": d.host,
        "prefill_connector_port": _port_int(p.connector_port),
        "decode_connector_port": _port_int(d.connector_port),
        "decode_device_ids": list(d.device_ids),
        "decode_rdma_ports": list(d.rdma_ports),
        "transfer_protocol": flat_protocol(p, d),
        "decode_tp_size": d.tp,
    }


def reschedule_tokens(raw: bytes) -> list[int] | None:
    """Tokens generated so far if a non-stream decode answer asks to be rescheduled, else None."""
    if b"pd_reschedule" not in raw and b"PD Error" not in raw:
        return None
    try:
        obj = loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict) and "PD Error" in str(err.get("message", "")):
        return []
    choices = obj.get("choices")
    if not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("finish_reason") != "pd_reschedule":
        return None
    msg = choice.get("message")
    ids = (msg.get("completion_token_ids") if isinstance(msg, dict) else None) \
        or choice.get("completion_token_ids") or []
    return [t for t in ids if isinstance(t, int)]


def in_body_error(raw: bytes, sse: bool) -> str | None:
    """The message of an error a prefill reported inside a 2xx body, if any."""
    if b'"error"' not in raw and b'"detail"' not in raw:
        return None
    if sse:
        for line in raw.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and b'"error"' in line:
                try:
                    obj = loads(line[5:].strip())
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("error"):
                    return _message(obj["error"])
        return None
    try:
        obj = loads(raw)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key in ("error", "detail"):
            if obj.get(key):
                return _message(obj[key])
    return None


def _message(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)
