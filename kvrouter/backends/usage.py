"""Token usage in engines' answers: read without parsing, and asked for in streams.

The measured prefix-cache hit rate is the instances' own count: ``usage.prompt_tokens`` and
``usage.prompt_tokens_details.cached_tokens`` of their answers. Non-stream answers carry usage;
OpenAI-style streams carry it only when the request sets ``stream_options.include_usage``, in
one extra event (``"choices": []``) before ``data: [DONE]``. So that every stream is measured
without changing what its client receives, the router works per engine
(:class:`~kvrouter.backends.engines.StreamUsage`):

- ``ask`` (FastDeploy, vLLM, SGLang: each adds that one event and changes nothing else): a
  stream request that leaves usage off is sent with ``include_usage`` set
  (:func:`with_usage`), and the relay reads the usage event and leaves it out
  (:func:`take_usage_events`);
- ``timings`` (llama.cpp): its chat streams end with ``timings`` (``prompt_n`` tokens computed,
  ``cache_n`` taken from the cache), which say the same (:func:`timings_of`). Asking would move
  ``timings`` into the usage event, so nothing is asked.

Other engines' streams are measured only when the client asks for usage itself. In PD mode
the prefill's answer is measured: it is never relayed, so its body always asks
(:func:`prefill_usage`).
"""

from __future__ import annotations

import re
from typing import Any

from kvrouter.backends.base import dumps

USAGE_KEY = b'"prompt_tokens"'
CACHED_KEY = b'"cached_tokens"'
TIMINGS_KEY = b'"cache_n"'
_COMPUTED_KEY = b'"prompt_n"'
#: what :func:`with_usage` appends to a body that has no ``stream_options``
ASK = b',"stream_options":{"include_usage":true}}'
_NUMBER = re.compile(rb"\s*:\s*(\d+)")
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_EVENT_END = b"\n\n"


def _last_int(raw: bytes, key: bytes) -> int | None:
    """The integer value of the last ``"key": <int>`` in JSON bytes (a quoted name followed
    by a colon can only be an object key: inside JSON strings quotes are escaped)."""
    pos = raw.rfind(key)
    while pos >= 0:
        m = _NUMBER.match(raw, pos + len(key))
        if m:
            return int(m.group(1))
        pos = raw.rfind(key, 0, pos)
    return None


def usage_of(raw: bytes) -> tuple[int | None, int | None]:
    """``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens`` of a body (the
    last ones in it: for SSE the last usage event), found without parsing the JSON."""
    prompt = _last_int(raw, USAGE_KEY)
    if prompt is None:
        return None, None
    return prompt, _last_int(raw, CACHED_KEY)


def timings_of(raw: bytes) -> tuple[int | None, int | None]:
    """Prompt and cached tokens from llama.cpp's last ``timings`` in ``raw``: ``prompt_n``
    tokens computed plus ``cache_n`` from the cache."""
    cached = _last_int(raw, TIMINGS_KEY)
    computed = _last_int(raw, _COMPUTED_KEY)
    if cached is None or computed is None:
        return None, None
    return computed + cached, cached


def with_usage(raw: bytes, body: dict[str, Any]) -> bytes | None:
    """``raw`` (the request body, parsed as ``body``) asking for stream usage, or ``None`` if
    it is not a stream or already gets usage: ``include_usage`` set, or
    ``continuous_usage_stats`` (vLLM reports per-event usage only with ``include_usage``,
    FastDeploy with either: asking would add usage to every event). A body without
    ``stream_options`` is extended in place (no serialisation)."""
    if body.get("stream") is not True:
        return None
    opts = body.get("stream_options")
    if opts is None:
        if "stream_options" not in body:
            end = raw.rstrip()
            if end.endswith(b"}"):
                return end[:-1] + ASK
        opts = {}
    elif not isinstance(opts, dict) or opts.get("include_usage") \
            or opts.get("continuous_usage_stats"):
        return None
    return dumps(body | {"stream_options": opts | {"include_usage": True}})


def prefill_usage(raw: bytes, body: dict[str, Any]) -> bytes:
    """A PD prefill's body ``raw`` (made from ``body``) asking for stream usage: its answer is
    drained by the router, never relayed, so it may always carry usage. Only a body without
    ``stream_options`` is extended, so that :func:`decode_like` can undo it."""
    if body.get("stream") is True and "stream_options" not in body and raw.endswith(b"}"):
        return raw[:-1] + ASK
    return raw


def decode_like(prefill_body: bytes, body: dict[str, Any]) -> bytes:
    """The decode's body for a :func:`prefill_usage` prefill body (same ``body``): the bytes
    it was made from."""
    if body.get("stream") is True and "stream_options" not in body \
            and prefill_body.endswith(ASK):
        return prefill_body[:-len(ASK)] + b"}"
    return prefill_body


def take_usage_events(data: bytes) -> tuple[bytes, tuple[int | None, int | None], bool]:
    """``data`` (whole SSE events) without its usage-only events (``"choices": []``), the last
    usage any event carried, and whether an event with choices carried usage: then the engine
    reports usage unasked (vLLM's ``--enable-force-include-usage``), its usage event is its
    own, and ``data`` is returned whole."""
    usage: tuple[int | None, int | None] = (None, None)
    out = data
    pos = out.find(USAGE_KEY)
    while pos >= 0:
        start = out.rfind(_EVENT_END, 0, pos)
        start = 0 if start < 0 else start + 2
        end = out.find(_EVENT_END, pos)
        end = len(out) if end < 0 else end + 2
        event = out[start:end]
        found = usage_of(event)
        if found[0] is not None:
            usage = found
        if _NO_CHOICES.search(event):
            out = out[:start] + out[end:]
            pos = out.find(USAGE_KEY, start)
        elif found[0] is not None:
            return data, usage_of(data), True
        else:
            pos = out.find(USAGE_KEY, end)
    return out, usage, False
