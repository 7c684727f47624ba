"""vLLM's PD protocol (the ``kv_transfer_params`` two-stage hand-off of its disaggregated
connectors, as vllm-router drives it).

The prefill gets the request with ``max_tokens: 1``, ``stream: false`` and
``kv_transfer_params: {do_remote_decode: true, …}``, and answers with the
``kv_transfer_params`` the decode needs to pull the KV cache; the decode then gets the
client's request plus those parameters, and its answer goes to the client.

Both legs carry the attempt's request id in ``X-Request-Id``, which vLLM takes as its own
(``chatcmpl-<id>``/``cmpl-<id>``: the id its abort endpoint and its answers use). When both
instances registered a ``kv_zmq_address`` they run the P2pNcclConnector, which finds its peer
in that id (the format of vLLM's ``examples/online_serving/disaggregated_serving_p2p_nccl_xpyd``
proxy): ``___prefill_addr_<P>___decode_addr_<D>_<suffix>``. That connector ignores
``kv_transfer_params`` and answers none (the prefill pushes the KV cache to the decode's
address, or keeps it for the decode to fetch, under the request id), so the prefill gets none.
"""

from __future__ import annotations

from typing import ClassVar

from kvrouter.backends.base import EngineAdapter, PdAttempt, dumps, loads
from kvrouter.instance import InstanceInfo

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                  "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                  "remote_port": None}
# The connector reads the decode's address with ``___decode_addr_(.*):(\d+)`` (greedy: the
# last ``:<digits>``) and the prefill's with ``___prefill_addr_(.*):(\d+)___``, and keys its
# tensors ``<id>#<layer>``: the suffix after the addresses (the router's request id) must hold
# no ``:`` or ``#``, nor start with ``__``, so these four are percent-encoded.
_SUFFIX_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "#": "%23", "_": "%5F"})


class VllmAdapter(EngineAdapter):
    """vLLM instances (mixed, or PD with a KV connector)."""

    name: ClassVar[str] = "vllm"
    concurrent_pd: ClassVar[bool] = False

    def must_pair(self, prefill: InstanceInfo, decode: InstanceInfo) -> bool:
        """A P2pNcclConnector prefill sends its KV cache only to the decode its request id
        names, which needs the same connector: both instances have a ``kv_zmq_address``, or
        neither has."""
        return (prefill.kv_zmq_address is None) == (decode.kv_zmq_address is None)

    def leg_headers(self, attempt: PdAttempt) -> dict[str, str]:
        return {"X-Request-Id": engine_request_id(attempt)}

    def prefill_body(self, body: dict, attempt: PdAttempt) -> bytes:
        prefill = {k: v for k, v in body.items() if k not in ("stream_options", "request_id")}
        prefill["stream"] = False
        prefill["max_tokens"] = 1
        prefill["min_tokens"] = 1           # as vllm-router sends: the prefill emits one token
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        if not _p2p(attempt):
            prefill["kv_transfer_params"] = PREFILL_PARAMS
        return dumps(prefill)

    def decode_body(self, body: dict, attempt: PdAttempt, prefill_body: bytes,
                    prefill_answer: bytes | None) -> bytes:
        decode = {k: v for k, v in body.items() if k != "request_id"}
        params = _transfer_params(prefill_answer)
        if params is not None:
            decode["kv_transfer_params"] = params
        return dumps(decode)


def _p2p(attempt: PdAttempt) -> bool:
    return (attempt.prefill.kv_zmq_address is not None
            and attempt.decode.kv_zmq_address is not None)


def engine_request_id(attempt: PdAttempt) -> str:
    """The ``X-Request-Id`` of both legs: the attempt's request id, or with P2pNcclConnector
    on both sides the id naming their ZMQ addresses, with the request id as its suffix."""
    if not _p2p(attempt):
        return attempt.request_id
    suffix = attempt.request_id.translate(_SUFFIX_ESCAPES)
    return (f"___prefill_addr_{attempt.prefill.kv_zmq_address}"
            f"___decode_addr_{attempt.decode.kv_zmq_address}_{suffix}")


def _transfer_params(answer: bytes | None) -> dict | None:
    """The ``kv_transfer_params`` of a prefill's JSON answer (absent: the decode computes the
    prompt itself, as vllm-router does)."""
    if not answer or b"kv_transfer_params" not in answer:
        return None
    try:
        obj = loads(answer)
    except ValueError:
        return None
    params = obj.get("kv_transfer_params") if isinstance(obj, dict) else None
    return params if isinstance(params, dict) else None
