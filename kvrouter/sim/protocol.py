"""FastDeploy-format response bodies and SSE events (docs/fastdeploy.md#instance-surface).

JSON is compact UTF-8 (as FastDeploy's pydantic ``model_dump_json``). Stream framing:
``data: <json>\\n\\n`` per event, except the first chat event (the role chunk), which is
``data: <json> \\n\\n`` (FastDeploy's extra space); the stream always ends ``data: [DONE]\\n\\n``.
The other simulated engines use the same bodies with plain ``data: <json>\\n\\n`` framing
(``ResponseContext.extra_space``), and llama.cpp puts ``usage`` in the last chunk of every
completions stream (``ResponseContext.usage_in_final``) and its ``timings`` on the last event
of every stream (``ResponseContext.timings``), vLLM its ``system_fingerprint``
(``ResponseContext.fingerprint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def sse_event(obj: Any, *, extra_space: bool = False) -> bytes:
    return b"data: " + dumps(obj) + (b" \n\n" if extra_space else b"\n\n")


def error_body(message: str, *, type_: str = "invalid_request_error",
               code: str | None = "invalid_value", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def too_many_requests_body(max_concurrency: int) -> dict[str, Any]:
    return {"detail": f"Too many requests,current max concurrency is {max_concurrency}"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "image_tokens": 0,
                                  "video_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
    }


def timings(cur_usage: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's ``timings`` for a usage: ``cache_n`` prompt tokens from the cache,
    ``prompt_n`` computed (the durations are left out)."""
    cached = cur_usage["prompt_tokens_details"]["cached_tokens"]
    return {"cache_n": cached, "prompt_n": cur_usage["prompt_tokens"] - cached,
            "predicted_n": cur_usage["completion_tokens"]}


@dataclass
class ResponseContext:
    kind: str                      # "chat" | "completion"
    id: str                        # chatcmpl-<request_id> / cmpl-<request_id>
    created: int
    model: str
    prompt_token_ids: list[int]
    return_token_ids: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    extra_space: bool = True       # FastDeploy's space after the first chat event
    usage_in_final: bool = False   # the finishing chunk carries usage (llama.cpp completions)
    #: llama.cpp's ``timings`` on the last event (the finishing one, or the usage event)
    timings: bool = False
    #: vLLM's ``system_fingerprint``, on the last event likewise
    fingerprint: str | None = None

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- stream --------------------------------------------------------------------------
    def first_chunk(self, cur_usage: dict[str, Any] | None) -> bytes | None:
        """Chat: the role chunk (with FastDeploy's extra space). Completions: a prompt-ids
        chunk only when ``return_token_ids`` is set, else nothing."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": "",
                                     "tool_calls": None, "prompt_token_ids": None,
                                     "completion_token_ids": None}
            if self.return_token_ids:
                delta["prompt_token_ids"] = list(self.prompt_token_ids)
            chunk = self._head(self.chunk_object) | {"choices": [{"index": 0, "delta": delta}]}
            if self.continuous_usage and cur_usage is not None:
                chunk["usage"] = cur_usage
            return sse_event(chunk, extra_space=self.extra_space)
        if self.return_token_ids:
            choice = {"index": 0, "text": "", "prompt_token_ids": list(self.prompt_token_ids),
                      "completion_token_ids": None}
            return sse_event(self._head(self.chunk_object) | {"choices": [choice]})
        return None

    def token_chunk(self, text: str, token_id: int | None, finish_reason: str | None,
                    arrival_time: float, cur_usage: dict[str, Any] | None) -> bytes:
        choice: dict[str, Any]
        ids = [] if token_id is None else [token_id]
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text, "completion_token_ids": ids},
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "prompt_token_ids": None,
                      "completion_token_ids": ids, "tool_calls": None, "reasoning_content": None,
                      "logprobs": None}
        if finish_reason is not None:
            choice["finish_reason"] = finish_reason
        choice["arrival_time"] = arrival_time
        chunk = self._head(self.chunk_object) | {"choices": [choice]}
        final = self.usage_in_final and finish_reason is not None
        if (self.continuous_usage or final) and cur_usage is not None:
            chunk["usage"] = cur_usage
        if (self.timings and finish_reason is not None and cur_usage is not None
                and (self.usage_in_final or not self.include_usage)):
            chunk["timings"] = timings(cur_usage)
        if self.fingerprint and finish_reason is not None and not self.include_usage:
            chunk["system_fingerprint"] = self.fingerprint
        return sse_event(chunk)

    def usage_chunk(self, final_usage: dict[str, Any]) -> bytes:
        chunk = self._head(self.chunk_object) | {"choices": [], "usage": final_usage}
        if self.timings:
            chunk["timings"] = timings(final_usage)
        if self.fingerprint:
            chunk["system_fingerprint"] = self.fingerprint
        return sse_event(chunk)

    @staticmethod
    def stream_error(message: str, code: str = "internal_error") -> bytes:
        return sse_event({"error": {"message": message, "type": "internal_error", "param": None,
                                    "code": code}})

    # -- non-stream ------------------------------------------------------------------------
    def full_response(self, text: str, token_ids: list[int], finish_reason: str | None,
                      final_usage: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = list(self.prompt_token_ids) if self.return_token_ids else None
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "multimodal_content": None,
                       "reasoning_content": None, "tool_calls": None,
                       "prompt_token_ids": prompt_ids, "completion_token_ids": list(token_ids),
                       "text_after_process": None, "raw_prediction": None, "prompt_tokens": None,
                       "completion_tokens": None}
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "prompt_token_ids": prompt_ids,
                      "completion_token_ids": list(token_ids), "text_after_process": None,
                      "raw_prediction": None, "prompt_tokens": None, "completion_tokens": None,
                      "arrival_time": None, "logprobs": None, "reasoning_content": None,
                      "finish_reason": finish_reason, "tool_calls": None}
            obj = "text_completion"
        return self._head(obj) | {"choices": [choice], "usage": final_usage}
