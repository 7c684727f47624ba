"""Turning a rendered prompt into tokens for prefix hashing and load estimates (contract §6.4).

Precedence: ``tokenizer-path`` (local HF ``tokenizer.json``) > ``tokenizer-url`` (remote
``/tokenize`` endpoint) > one token per Unicode code point. Token-id prompts are used as they
are. A remote failure never fails the request: it is logged (rate-limited) and the code-point
fallback is used.

All tokenizers share one entry point, ``await tok.tokens_for(prompt)``, returning
``(tokens, real)`` where ``real`` says whether ``tokens`` are model tokens (``True``) or code
points (``False``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig

__all__ = [
    "Tokenizer",
    "CodePointTokenizer",
    "LocalTokenizer",
    "RemoteTokenizer",
    "TokenizerError",
    "code_points",
    "make_tokenizer",
    "normalize_tokenizer_url",
]

log = logging.getLogger("kvrouter.tokenizer")

WARN_INTERVAL_SECS = 30.0
# Local encodes of prompts longer than this run in a worker thread, off the event loop.
_THREAD_THRESHOLD_CHARS = 16_384
_BIG_ENDIAN = sys.byteorder == "big"


class TokenizerError(Exception):
    """A configured tokenizer cannot be used (raised at startup only)."""


def code_points(text: str) -> list[int]:
    """``[ord(c) for c in text]``, computed in C."""
    arr = array("I", text.encode("utf-32-le", "surrogatepass"))
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


class Tokenizer:
    """Prompt → tokens. ``kind`` is ``local``, ``remote`` or ``code_points``."""

    kind: str = "code_points"

    @property
    def real(self) -> bool:
        """Whether string prompts are turned into model tokens (when the tokenizer works)."""
        return self.kind != "code_points"

    async def tokens_for(self, prompt: str | list[int]) -> tuple[list[int], bool]:
        """``(tokens, real)``; token-id prompts are returned as they are (``real=True``)."""
        if not isinstance(prompt, str):
            return list(prompt), True
        if not prompt:
            return [], self.real
        tokens = await self._encode(prompt)
        if tokens is None:
            return code_points(prompt), False
        return tokens, True

    async def _encode(self, text: str) -> list[int] | None:
        """Model tokens of a non-empty string, or ``None`` to fall back to code points."""
        return None

    async def close(self) -> None:
        """Release resources owned by the tokenizer."""


class CodePointTokenizer(Tokenizer):
    """No tokenizer configured: one token per Unicode code point."""

    kind = "code_points"


class LocalTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library."""

    kind = "local"

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 - any load failure is a config error
            raise TokenizerError(f"cannot load tokenizer {path!r}: {exc}") from exc
        self.path = path

    def encode(self, text: str) -> list[int]:
        """Synchronous encode without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    async def _encode(self, text: str) -> list[int] | None:
        try:
            if len(text) > _THREAD_THRESHOLD_CHARS:
                return await asyncio.to_thread(self.encode, text)
            return self.encode(text)
        except Exception as exc:  # noqa: BLE001 - never fail a request over tokenization
            log.warning("local tokenizer failed, using code points: %s", exc)
            return None


def normalize_tokenizer_url(url: str) -> str:
    """No scheme → ``http://``; an empty path or ``/`` → ``/tokenize``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/tokenize"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class RemoteTokenizer(Tokenizer):
    """A remote tokenize endpoint: ``POST {"text":p,"prompt":p,"message":p}`` → ``input_ids``."""

    kind = "remote"

    def __init__(
        self,
        url: str,
        timeout: float,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.url = normalize_tokenizer_url(url)
        self.timeout = float(timeout)
        self._session_factory = session_factory
        self._own_session: aiohttp.ClientSession | None = None
        self._last_warn = -float("inf")
        self._suppressed = 0
        #: cumulative counts, for observability
        self.calls = 0
        self.failures = 0

    def _session(self) -> aiohttp.ClientSession:
        if self._session_factory is not None:
            return self._session_factory()
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    async def _encode(self, text: str) -> list[int] | None:
        self.calls += 1
        try:
            payload = orjson.dumps({"text": text, "prompt": text, "message": text})
            async with self._session().post(
                self.url,
                data=payload,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                raw = await resp.read()
                if not 200 <= resp.status < 300:
                    return self._fail(f"HTTP {resp.status}")
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return self._fail("response is not JSON")
            ids = doc.get("input_ids") if isinstance(doc, dict) else None
            if (
                not isinstance(ids, list)
                or not ids
                or not all(type(t) is int for t in ids)
            ):
                return self._fail("response lacks a non-empty integer list 'input_ids'")
            return ids
        except asyncio.TimeoutError:
            return self._fail(f"timed out after {self.timeout:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors and the like
            return self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        """Count and (at most once per 30 s) log a failure; the caller falls back."""
        self.failures += 1
        now = time.monotonic()
        if now - self._last_warn >= WARN_INTERVAL_SECS:
            extra = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
            log.warning(
                "remote tokenizer %s failed: %s; using code points%s", self.url, reason, extra
            )
            self._last_warn = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        return None

    async def close(self) -> None:
        if self._own_session is not None and not self._own_session.closed:
            await self._own_session.close()
        self._own_session = None


def make_tokenizer(
    sched_cfg: SchedulerConfig,
    session_getter: Callable[[], aiohttp.ClientSession] | None = None,
) -> Tokenizer:
    """The tokenizer the configuration asks for. Raises :class:`TokenizerError` if a
    ``tokenizer-path`` cannot be loaded."""
    if sched_cfg.tokenizer_path:
        return LocalTokenizer(sched_cfg.tokenizer_path)
    if sched_cfg.tokenizer_url:
        return RemoteTokenizer(
            sched_cfg.tokenizer_url, sched_cfg.tokenizer_timeout_secs, session_getter
        )
    return CodePointTokenizer()
