"""vLLM's PD protocol (the ``kv_transfer_params`` two-stage hand-off of its disaggregated
connectors, as vllm-router drives it).

The prefill gets the request with ``max_tokens: 1``, ``stream: false`` and
``kv_transfer_params: {do_remote_decode: true, …}``, and answers with the
``kv_transfer_params`` the decode needs to pull the KV cache; the decode then gets the
client's request plus those parameters, and its answer goes to the client.
"""

from __future__ import annotations

from typing import ClassVar

from kvrouter.backends.base import EngineAdapter, PdAttempt, dumps, loads

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                  "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                  "remote_port": None}


class VllmAdapter(EngineAdapter):
    """vLLM instances (mixed, or PD with a KV connector)."""

    name: ClassVar[str] = "vllm"
    concurrent_pd: ClassVar[bool] = False

    def prefill_body(self, body: dict, attempt: PdAttempt) -> bytes:
        prefill = {k: v for k, v in body.items() if k not in ("stream_options", "request_id")}
        prefill["stream"] = False
        prefill["max_tokens"] = 1
        prefill["min_tokens"] = 1           # as vllm-router sends: the prefill emits one token
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        prefill["kv_transfer_params"] = PREFILL_PARAMS
        return dumps(prefill)

    def decode_body(self, body: dict, attempt: PdAttempt, prefill_body: bytes,
                    prefill_answer: bytes | None) -> bytes:
        decode = {k: v for k, v in body.items() if k != "request_id"}
        params = _transfer_params(prefill_answer)
        if params is not None:
            decode["kv_transfer_params"] = params
        return dumps(decode)


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
