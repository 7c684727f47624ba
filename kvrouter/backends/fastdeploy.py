"""FastDeploy's PD protocol: both legs get the same body at once, carrying the
``request_id`` and a ``disaggregate_info`` that tells the prefill where to push the KV cache;
a non-stream decode answer may ask to be rescheduled (``pd_reschedule``); a prefill may report
an error inside a 2xx body. ``docs/fastdeploy.md`` describes the protocol."""

from __future__ import annotations

from typing import Any, ClassVar

from kvrouter.backends.base import EngineAdapter, PdAttempt, dumps, loads
from kvrouter.backends.usage import decode_like, prefill_usage
from kvrouter.instance import InstanceInfo


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
    if (p.host and p.host == d.host and "ipc" in p.transfer_protocol
            and "ipc" in d.transfer_protocol):
        return "ipc"
    return "rdma"


def can_pair(p: InstanceInfo, d: InstanceInfo) -> bool:
    """D can reach P: ipc possible, or both list rdma (the pair filter of
    docs/fastdeploy.md#pd-dispatch)."""
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


class FastDeployAdapter(EngineAdapter):
    """FastDeploy instances (mixed, or PD with ``disaggregate_info``)."""

    name: ClassVar[str] = "fastdeploy"
    concurrent_pd: ClassVar[bool] = True
    reschedules: ClassVar[bool] = True

    def __init__(self, info_format: str = "flat") -> None:
        self.info_format = info_format   # server.disaggregate-info-format

    def can_pair(self, prefill: InstanceInfo, decode: InstanceInfo) -> bool:
        return can_pair(prefill, decode)

    def prefill_body(self, body: dict, attempt: PdAttempt) -> bytes:
        body["request_id"] = attempt.request_id
        body["disaggregate_info"] = disaggregate_info(attempt.prefill, attempt.decode,
                                                      self.info_format)
        return prefill_usage(dumps(body), body)

    def decode_body(self, body: dict, attempt: PdAttempt, prefill_body: bytes,
                    prefill_answer: bytes | None) -> bytes:
        return decode_like(prefill_body, body)

    def prefill_error(self, raw: bytes, sse: bool) -> str | None:
        return in_body_error(raw, sse)

    def reschedule_tokens(self, answer: bytes) -> list[int] | None:
        return reschedule_tokens(answer)

    def continue_with(self, body: dict, tokens: list[int]) -> None:
        body["completion_token_ids"] = list(body.get("completion_token_ids") or []) + tokens


def _message(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)
