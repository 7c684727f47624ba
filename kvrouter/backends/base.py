"""The engine seam: what is specific to one engine family's wire protocol.

The request path (``kvrouter.server``) speaks plain OpenAI-style HTTP to every instance and asks
the instance's :class:`EngineAdapter` only where engines differ. For prefill/decode
disaggregation that is: the request id the engine correlates the two legs with, the body each
leg gets, whether the legs run at once (FastDeploy, SGLang: the decode waits for the KV cache
the prefill pushes) or one after the other (vLLM: the decode gets what the prefill answered),
which decode can pair with which prefill, and how an engine reports a failed prefill or asks
for a decode to be rescheduled. The control-plane side (``/metrics`` names, tokenizer and abort
endpoints) is in :mod:`kvrouter.backends.engines`.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from kvrouter import errors
from kvrouter.instance import InstanceInfo
from kvrouter.jsondepth import check_depth


def loads(raw: bytes) -> Any:
    """Parse JSON: orjson, or the stdlib where orjson refuses a number (an integer too large
    even for a double; orjson reads other integers beyond 64 bits as floats). ``ValueError``
    for invalid JSON and for nesting beyond ``kvrouter.jsondepth.MAX_DEPTH``, checked first, so
    neither parser (nor a later :func:`dumps`) recurses without bound. The stdlib path accepts
    nothing else orjson refuses: strict UTF-8, no NaN/Infinity, no infinite floats."""
    check_depth(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        doc = e.doc if isinstance(e.doc, str) else ""
        if doc[e.pos:e.pos + 1] not in _NUMBER_START:
            raise
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)


_NUMBER_START = frozenset("-0123456789")


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number is infinite: {text[:32]}")
    return value


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, key order kept, integers exact, no HTML escaping. A lone surrogate
    (which only the stdlib parser lets through) is written as its ``\\uXXXX`` escape."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits, or a lone surrogate
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class PdAttempt:
    """One try of a PD request on one (prefill, decode) pair."""

    request_id: str        # the id both legs carry (a retry gets a new one)
    prefill: InstanceInfo
    decode: InstanceInfo


class EngineAdapter:
    """PD dispatch for one engine family. Subclasses override what their engine does
    differently; the request path never names an engine."""

    name: ClassVar[str]
    #: both legs are sent at once (the decode pulls the KV cache the prefill pushes); else the
    #: decode is sent once the prefill answered, with :meth:`decode_body` given that answer
    concurrent_pd: ClassVar[bool] = True
    #: a whole non-stream decode answer may ask for a reschedule (:meth:`reschedule_tokens`):
    #: it is read before it is relayed
    reschedules: ClassVar[bool] = False

    def base_request_id(self, body: dict) -> str:
        """The id of a request across its legs and retries: the client's ``request_id``, or a
        fresh UUID4 when absent, null or empty. It is echoed in ``X-Router-Request-ID`` and
        logged, so anything but :data:`kvrouter.errors.REQUEST_ID_RE` is a 400 here, before
        any instance is chosen."""
        rid = body.get("request_id")
        if rid is None or rid == "":
            return str(uuid.uuid4())
        if not isinstance(rid, str):
            raise errors.invalid_value("request_id must be a string")
        if not errors.REQUEST_ID_RE.fullmatch(rid):
            raise errors.invalid_request_id()
        return rid

    def attempt_request_id(self, base: str, attempt: int) -> str:
        return base if attempt == 0 else f"{base}-retry{attempt}"

    def must_pair(self, prefill: InstanceInfo, decode: InstanceInfo) -> bool:
        """Whether ``decode`` can take the KV cache of ``prefill`` at all: a decode that
        cannot is never paired with it (the engine's decodes of another kind are no use)."""
        return True

    def can_pair(self, prefill: InstanceInfo, decode: InstanceInfo) -> bool:
        """Whether ``decode`` is a good match for ``prefill`` among those that :meth:`must_pair`:
        a preference, any of them is used when none is (fd-router's rule for FastDeploy's
        transfer protocols)."""
        return True

    def prefill_body(self, body: dict, attempt: PdAttempt) -> bytes:
        """The prefill leg's request body."""
        raise NotImplementedError

    def decode_body(self, body: dict, attempt: PdAttempt, prefill_body: bytes,
                    prefill_answer: bytes | None) -> bytes:
        """The decode leg's request body, given the prefill's (``prefill_answer`` is ``None``
        for concurrent PD)."""
        raise NotImplementedError

    def prefill_error(self, raw: bytes, sse: bool) -> str | None:
        """The message of an error a prefill reported inside a 2xx body, if any."""
        return None

    def reschedule_tokens(self, answer: bytes) -> list[int] | None:
        """Tokens generated so far if a whole non-stream decode answer asks for the request to
        be sent to another pair, else ``None``."""
        return None

    def continue_with(self, body: dict, tokens: list[int]) -> None:
        """Prepare ``body`` for the next attempt after a reschedule with ``tokens``."""

    def leg_headers(self, attempt: PdAttempt) -> dict[str, str]:
        """Header fields both legs of ``attempt`` carry, in place of the client's of the same
        names (an engine that takes the request id from a header, or pairs the legs by it)."""
        return {}
