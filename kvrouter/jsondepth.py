"""The nesting limit of JSON read from clients and instances, checked before any parser runs.

Without it, what orjson accepts (up to 1024 levels) breaks later steps: ``orjson.dumps`` stops
at 254 levels and its stdlib fallback, like the stdlib parser (used for numbers orjson cannot
hold and for registrations), recurses once per level into a ``RecursionError``, a 500. One
limit far above any real request and below 254 keeps every later parse, re-serialisation and
prompt rendering on bounded paths.
"""

from __future__ import annotations

import numpy as np

MAX_DEPTH = 128

_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")   # +1 / -1 as int8


def check_depth(raw: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise ``ValueError`` if ``raw`` nests arrays and objects deeper than ``limit``.

    A request has fewer brackets than the limit, which one ``find`` per bracket establishes
    (memchr speed; counting every byte costs twice a parse). Otherwise the strings are cut
    out (escaped backslashes and quotes first, so the rest splits on quotes) and the running
    depth is summed: exact for valid JSON, and for invalid JSON exact up to its first syntax
    error, beyond which no parser goes.
    """
    if len(raw) <= limit or not _more_openers(raw, limit):
        return
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(raw.split(b'"')[::2]).translate(_STEP, _NOT_BRACKET)
    if outside.count(b"\x01") <= limit:
        return
    if np.frombuffer(outside, dtype=np.int8).cumsum(dtype=np.int64).max() > limit:
        raise ValueError(f"JSON nested deeper than {limit} levels")


def _more_openers(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` holds more than ``limit`` ``[`` and ``{`` in all (one ``find`` each,
    up to the limit: cheaper than counting every byte when there are few)."""
    seen = 0
    for opener in (b"[", b"{"):
        i = raw.find(opener)
        while i >= 0:
            seen += 1
            if seen > limit:
                return True
            i = raw.find(opener, i + 1)
    return False
