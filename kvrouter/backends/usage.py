"""Token usage in engines' answers: read without parsing, and asked for in streams.

The measured prefix-cache hit rate is the instances' own count: ``usage.prompt_tokens`` and
``usage.prompt_tokens_details.cached_tokens`` of their answers. Non-stream answers carry usage;
OpenAI-style streams carry it only when the request sets ``stream_options.include_usage``, in
one extra event (``"choices": []``) before ``data: [DONE]``. So that every stream is measured
without changing what its client receives, the router works per engine
(:class:`~kvrouter.backends.engines.StreamUsage`):

- ``ask`` (FastDeploy, vLLM, SGLang: each adds that one event; vLLM also moves its
  ``system_fingerprint`` from the last event into it): a stream request with one choice that
  leaves usage off is sent with ``include_usage`` set (:func:`with_usage`), and the relay
  reads the usage event, leaves it out and moves what it took from the event before back
  (:class:`UsageTaker`);
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

from kvrouter.backends.base import dumps, loads

USAGE_KEY = b'"prompt_tokens"'
CACHED_KEY = b'"cached_tokens"'
TIMINGS_KEY = b'"cache_n"'
_COMPUTED_KEY = b'"prompt_n"'
#: what :func:`with_usage` appends to a body that has no ``stream_options``
ASK = b',"stream_options":{"include_usage":true}}'
_NUMBER = re.compile(rb"\s*:\s*(\d+)")
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_EVENT_END = b"\n\n"
_FINISHED = b'"finish_reason":"'          # a choice's last event (compact JSON)
_USAGE_EVENT_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage"})
HOLD_LIMIT = 1 << 20             # bytes of one unfinished event held while usage is taken out


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
    if body.get("stream") is not True or body.get("n") not in (None, 1):
        return None         # n > 1: every choice's last event would wait for the last one
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


class UsageTaker:
    """Takes the usage event the router asked for out of one SSE stream, fed as it arrives.

    What it passes on is whole events only: the start of an unfinished event waits for its end
    (up to :data:`HOLD_LIMIT` bytes, beyond which the stream is not what was expected and
    everything is passed on as it is), and an event that finishes a choice waits for the next
    one: asking for usage moves some engines' last fields (vLLM's ``system_fingerprint``) from
    that event into the usage event, and they are moved back. An engine found to send usage
    unasked (usage on an event with choices, vLLM's ``--enable-force-include-usage``) keeps its
    usage event. Once :attr:`passing`, the caller passes the rest on unchanged.
    """

    __slots__ = ("last", "partial", "passing", "usage")

    def __init__(self) -> None:
        self.partial = b""      # the start of an unfinished event
        self.last = b""         # a finishing event, held until the next one
        self.passing = False
        self.usage: tuple[int | None, int | None] = (None, None)

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (and of what was held) to pass on now."""
        if self.partial:
            data = self.partial + data
        if data.endswith(_EVENT_END):
            self.partial = b""
        else:
            cut = data.rfind(_EVENT_END) + 2
            cut = cut if cut > 1 else 0
            if len(data) - cut > HOLD_LIMIT:
                self.passing = True
                out, self.last, self.partial = self.last + data, b"", b""
                return out
            self.partial = data[cut:]
            data = data[:cut]
        if self.last:
            data = self.last + data
            self.last = b""
        if USAGE_KEY in data:
            data = self._take(data)
            if self.passing:
                out, self.partial = data + self.partial, b""
                return out
        if data:
            start = _last_event(data)
            if data.find(_FINISHED, start) >= 0:
                self.last = data[start:]
                return data[:start]
        return data

    def flush(self) -> bytes:
        """Everything held (the stream ended)."""
        out, self.last, self.partial = self.last + self.partial, b"", b""
        return out

    def whole(self) -> bytes:
        """The whole events held (the stream broke: an unfinished event is dropped)."""
        out, self.last, self.partial = self.last, b"", b""
        return out

    def _take(self, data: bytes) -> bytes:
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
                self.usage = found
            if _NO_CHOICES.search(event):
                head = _restored(out[:start], event)
                out = head + out[end:]
                pos = out.find(USAGE_KEY, len(head))
            elif found[0] is not None:
                self.passing = True
                self.usage = usage_of(data)
                return data
            else:
                pos = out.find(USAGE_KEY, end)
        return out


def _last_event(events: bytes) -> int:
    """Where the last of ``events`` (whole SSE events) starts."""
    i = events.rfind(_EVENT_END, 0, len(events) - 2)
    return 0 if i < 0 else i + 2


def _restored(before: bytes, usage_event: bytes) -> bytes:
    """``before`` (whole events) with the fields that the usage event carries besides the
    usual ones put back at the end of its last event, if that one finished a choice and lacks
    them: where the engine sends them when usage is not asked for."""
    start = _last_event(before)
    last = before[start:]
    if last.find(_FINISHED) < 0:
        return before
    try:
        doc = loads(usage_event.strip()[len(b"data:"):])
    except ValueError:
        return before
    if not isinstance(doc, dict):
        return before
    moved = b"".join(b"," + dumps(k) + b":" + dumps(v) for k, v in doc.items()
                     if k not in _USAGE_EVENT_KEYS and dumps(k) + b":" not in last)
    close = last.rfind(b"}")
    if not moved or close < 0:
        return before
    return before[:start] + last[:close] + moved + last[close:]
