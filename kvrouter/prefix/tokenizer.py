"""Turning a rendered prompt into tokens for prefix hashing and load estimates.

Precedence: ``tokenizer-path`` (local HF ``tokenizer.json``) > ``tokenizer-url`` (a remote
tokenize endpoint, called the way the engine's entry in :mod:`kvrouter.backends.engines` says)
> one token per Unicode code point. Token-id prompts are used as they
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

from kvrouter.backends.engines import DEFAULT_ENGINE, ENGINES, TokenizeApi

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig

__all__ = [
    "CodePointTokenizer",
    "LocalTokenizer",
    "RemoteTokenizer",
    "Tokenizer",
    "TokenizerError",
    "code_points",
    "make_tokenizer",
    "normalize_tokenizer_url",
    "tokenize_api",
]

log = logging.getLogger("kvrouter.tokenizer")

WARN_INTERVAL_SECS = 30.0
# Local encodes of prompts longer than this run in a worker thread, off the event loop.
_THREAD_THRESHOLD_CHARS = 16_384
_BIG_ENDIAN = sys.byteorder == "big"


class TokenizerError(Exception):
    """A configured tokenizer cannot be used (raised at startup only)."""


class _Failed(Exception):
    """A remote tokenizer call failed (the message says why)."""


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
        except Exception as exc:  # any load failure is a config error
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
        except Exception as exc:  # never fail a request over tokenization
            log.warning("local tokenizer failed, using code points: %s", exc)
            return None


def tokenize_api(engine: str = DEFAULT_ENGINE) -> TokenizeApi:
    """How ``engine``'s tokenize endpoint is called; :class:`TokenizerError` if it has none."""
    api = ENGINES[engine].tokenize
    if api is None:
        raise TokenizerError(f"engine {engine!r} has no tokenize endpoint: use tokenizer-path")
    return api


def normalize_tokenizer_url(url: str, default_path: str | None = None) -> str:
    """No scheme → ``http://``; an empty path or ``/`` → ``default_path`` (the default
    engine's tokenize path if not given)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path not in ("", "/"):
        path = parts.path
    else:
        path = default_path if default_path is not None else tokenize_api().path
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class RemoteTokenizer(Tokenizer):
    """A remote tokenize endpoint, called as ``api`` says (default: the default engine's).
    FastDeploy's: ``POST {"text":p,"prompt":p,"message":p}`` → ``{"input_ids":[…]}``; vLLM's
    and SGLang's ``{"prompt":p}`` → ``{"tokens":[…]}``; llama.cpp's ``{"content":p}`` →
    ``{"tokens":[…]}``."""

    kind = "remote"

    def __init__(
        self,
        url: str,
        timeout: float,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        api: TokenizeApi | None = None,
    ) -> None:
        self.api = api if api is not None else tokenize_api()
        self.url = normalize_tokenizer_url(url, self.api.path)
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
            return await self._request(text)
        except _Failed as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"timed out after {self.timeout:g}s"
        except Exception as exc:  # connection errors and the like
            reason = f"{type(exc).__name__}: {exc}"
        self._fail(reason)
        return None

    async def _request(self, text: str) -> list[int]:
        async with self._session().post(
            self.url,
            data=self.api.request_body(text),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        ) as resp:
            raw = await resp.read()
            if not 200 <= resp.status < 300:
                raise _Failed(f"HTTP {resp.status}")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Failed("response is not JSON") from None
        ids = self.api.tokens(doc)
        if ids is None:
            raise _Failed(f"response lacks a non-empty integer list {self.api.tokens_field!r}")
        return ids

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

    async def close(self) -> None:
        if self._own_session is not None and not self._own_session.closed:
            await self._own_session.close()
        self._own_session = None


def make_tokenizer(
    sched_cfg: SchedulerConfig,
    session_getter: Callable[[], aiohttp.ClientSession] | None = None,
    engine: str | None = None,
) -> Tokenizer:
    """The tokenizer the configuration asks for. A ``tokenizer-url`` is called the way
    ``engine``'s tokenize endpoint is (default: ``scheduler.tokenizer-engine``; the key is
    explicit rather than taken from a registered instance, since the URL need not be one and
    the tokenizer exists before any instance registers). Raises :class:`TokenizerError` if a
    ``tokenizer-path`` cannot be loaded, or a ``tokenizer-url`` is set for an engine without a
    tokenize endpoint."""
    if sched_cfg.tokenizer_path:
        return LocalTokenizer(sched_cfg.tokenizer_path)
    if sched_cfg.tokenizer_url:
        return RemoteTokenizer(
            sched_cfg.tokenizer_url, sched_cfg.tokenizer_timeout_secs, session_getter,
            tokenize_api(engine if engine is not None else sched_cfg.tokenizer_engine),
        )
    return CodePointTokenizer()
