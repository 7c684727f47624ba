"""SGLang's PD protocol (bootstrap hand-off, as sglang-router drives it).

Both legs get the same body at once, with ``bootstrap_host`` (the prefill's host),
``bootstrap_port`` (the prefill's bootstrap server, from its registration) and a random
``bootstrap_room`` that pairs the two sides; the prefill pushes the KV cache to the decode, whose
answer goes to the client.
"""

from __future__ import annotations

import random
from typing import ClassVar

from kvrouter.backends.base import EngineAdapter, PdAttempt, dumps
from kvrouter.backends.usage import decode_like, prefill_usage

_ROOM_BITS = (1 << 63) - 1


class SglangAdapter(EngineAdapter):
    """SGLang instances (mixed, or PD with ``--disaggregation-mode``)."""

    name: ClassVar[str] = "sglang"
    concurrent_pd: ClassVar[bool] = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def prefill_body(self, body: dict, attempt: PdAttempt) -> bytes:
        p = attempt.prefill
        sent = dict(body)
        sent["bootstrap_host"] = p.host
        sent["bootstrap_port"] = int(p.bootstrap_port) if p.bootstrap_port else None
        sent["bootstrap_room"] = self._rng.getrandbits(63) & _ROOM_BITS
        return prefill_usage(dumps(sent), body)

    def decode_body(self, body: dict, attempt: PdAttempt, prefill_body: bytes,
                    prefill_answer: bytes | None) -> bytes:
        return decode_like(prefill_body, body)   # the same room for both legs
