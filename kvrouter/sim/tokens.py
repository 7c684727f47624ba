"""Deterministic toy tokenizer and detokenizer of the simulator.

Prompt tokens: the rendered prompt cut into chunks of ``chars_per_token`` characters, each
mapped to a stable id (CRC32), so equal prefixes give equal leading tokens in every process.
Output tokens: token ``i`` of an answer has id ``OUTPUT_TOKEN_BASE + i`` and text ``tok<i>``
(preceded by a space except for ``i == 0``), so a whole answer reads ``tok0 tok1 tok2``.
"""

from __future__ import annotations

import zlib
from typing import Any

OUTPUT_TOKEN_BASE = 1000


def content_text(content: Any) -> str:
    """Text of a chat message ``content`` (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    out.append(str(part.get("text", "")))
                else:
                    out.append(f"<{part.get('type', 'part')}>")
            else:
                out.append(str(part))
        return "".join(out)
    return str(content)


def render_chat(messages: list[Any]) -> str:
    """``<role>:<content>\\n`` per message (roles matter, like a chat template)."""
    lines: list[str] = []
    for msg in messages:
        if isinstance(msg, dict):
            lines.append(f"{msg.get('role', '')}:{content_text(msg.get('content'))}\n")
        else:
            lines.append(f"{msg}\n")
    return "".join(lines)


def tokenize(text: str, chars_per_token: int = 4) -> list[int]:
    step = max(1, chars_per_token)
    return [zlib.crc32(text[i:i + step].encode("utf-8")) & 0xFFFFF
            for i in range(0, len(text), step)]


def output_token_id(index: int) -> int:
    return OUTPUT_TOKEN_BASE + index


def output_token_text(index: int) -> str:
    return f"tok{index}" if index == 0 else f" tok{index}"


def index_of_token(token_id: int) -> int:
    """Inverse of :func:`output_token_id` (for hand-offs carrying ``first_token``)."""
    return max(0, token_id - OUTPUT_TOKEN_BASE)
