"""Rendering a request body into the cache key used for prefix routing
(docs/fastdeploy.md#cache-aware-routing).

The rendered prompt is what the engine's KV prefix cache effectively sees: identical leading
messages (roles, tool definitions and attachments included) give identical leading text.

* chat: optional ``tools:<canonical JSON>\\n``, then for every message
  ``<role>:<content><canonical JSON of tool_calls, if any>\\n``. Text parts are concatenated;
  any other part becomes ``<type:sha256(url or data)[:16]>``. Whitespace is kept as sent.
* completions: a string ``prompt`` as is; a list → its first element.
* token-id prompts (``prompt_token_ids``, a list of ints, a list of lists of ints) render to the
  ids themselves, which are then used directly as tokens.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

__all__ = ["canonical_json", "extract_session_id", "render_prompt"]


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text (non-ASCII kept as is)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        # orjson refuses integers beyond 64 bits; the stdlib handles anything JSON can hold.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_int(x: Any) -> bool:
    return type(x) is int  # bools are not token ids


def _token_ids(value: Any) -> list[int] | None:
    """``value`` as a token-id list: a non-empty list of ints, or the first of a list of them."""
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    if _is_int(first):
        return value if all(_is_int(t) for t in value) else None
    if isinstance(first, list) and first and all(_is_int(t) for t in first):
        return first
    return None


def _attachment_digest(part: dict, kind: str) -> str:
    """``sha256(url or data)[:16]`` of a non-text content part."""
    payload = part.get(kind)
    source: Any = None
    if isinstance(payload, dict):
        source = payload.get("url")
        if source is None:
            source = payload.get("data")
    elif isinstance(payload, str):
        source = payload
    if source is None:
        source = part.get("url", part.get("data"))
    if source is None:
        source = canonical_json(part)  # unknown shape: still deterministic
    elif not isinstance(source, str):
        source = canonical_json(source)
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _render_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind == "text" or (kind is None and isinstance(part.get("text"), str)):
                    text = part.get("text")
                    pieces.append(text if isinstance(text, str) else "")
                else:
                    kind_s = kind if isinstance(kind, str) else "part"
                    pieces.append(f"<{kind_s}:{_attachment_digest(part, kind_s)}>")
            else:
                pieces.append(canonical_json(part))
        return "".join(pieces)
    return canonical_json(content)


def _render_chat(body: dict) -> str:
    out: list[str] = []
    tools = body.get("tools")
    if tools is not None:
        out.append("tools:")
        out.append(canonical_json(tools))
        out.append("\n")
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                out.append(":")
                out.append(canonical_json(msg))
                out.append("\n")
                continue
            role = msg.get("role")
            out.append(role if isinstance(role, str) else ("" if role is None else str(role)))
            out.append(":")
            out.append(_render_content(msg.get("content")))
            tool_calls = msg.get("tool_calls")
            if tool_calls is not None:
                out.append(canonical_json(tool_calls))
            out.append("\n")
    return "".join(out)


def _render_completion(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, list):
        if not prompt:
            return ""
        first = prompt[0]
        return first if isinstance(first, str) else canonical_json(first)
    if prompt is None:
        return ""
    return canonical_json(prompt)


def render_prompt(body: dict, endpoint: str) -> str | list[int]:
    """The cache key of a request: rendered text, or the token ids of a token-id prompt.

    ``endpoint`` is the path the client called (``/v1/chat/completions`` or
    ``/v1/completions``); any value containing ``chat`` selects chat rendering.
    ``prompt_token_ids`` (as sent to FastDeploy) wins on either endpoint.
    """
    ids = _token_ids(body.get("prompt_token_ids"))
    if ids is not None:
        return ids
    if "chat" in endpoint:
        return _render_chat(body)
    return _render_completion(body)


def extract_session_id(body: dict) -> str | None:
    """Top-level non-empty string ``session_id``, else a non-empty ``extra_body.session_id``."""
    sid = body.get("session_id")
    if isinstance(sid, str) and sid:
        return sid
    extra = body.get("extra_body")
    if isinstance(extra, dict):
        sid = extra.get("session_id")
        if isinstance(sid, str) and sid:
            return sid
    return None
