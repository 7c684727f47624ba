"""The control-plane side of the engine seam: what differs between engine families outside the
request path.

For each engine family one :class:`EngineControl` says which ``/metrics`` gauges carry what the
policies read (the :class:`MetricsSnapshot`), how its tokenize endpoint is called, where its
abort endpoint is and how it takes request ids, and how its streams report token usage. The
table :data:`ENGINES` is keyed by the same name as the engine's
:class:`~kvrouter.backends.base.EngineAdapter` (the data-plane side).

Each instance names its engine (``engine`` in its registration, :data:`DEFAULT_ENGINE` when a
``POST /register`` payload does not); a ``register.yaml`` entry without one is recognised from
the metric names of its first ``/metrics`` page (:func:`detect_engine`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import orjson

from kvrouter.backends.prometheus import sum_gauges
from kvrouter.backends.snapshot import MetricsSnapshot

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "FALLBACK_ENGINE",
    "FASTDEPLOY",
    "AbortApi",
    "EngineControl",
    "MetricNames",
    "StreamUsage",
    "TokenizeApi",
    "detect_engine",
    "metric_names",
    "parse_metrics",
]


def _first(sums: Mapping[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = sums.get(name)
        if value is not None:
            return value
    return None


@dataclass(frozen=True, slots=True)
class MetricNames:
    """The ``/metrics`` gauges that fill each :class:`MetricsSnapshot` field.

    Each field lists names in order of preference: the first one the page carries is used (all
    its series summed). ``running`` and ``waiting`` are required: a page without them gives
    no snapshot. An empty tuple: the engine has no such gauge (the field stays ``None``).
    """

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    free_blocks: tuple[str, ...] = ()   # → available_gpu_block_num
    max_batch: tuple[str, ...] = ()     # → max_batch_size
    kv_usage: tuple[str, ...] = ()      # → gpu_cache_usage_perc (a fraction, 1 = full)
    wanted: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = chain(self.running, self.waiting, self.free_blocks, self.max_batch,
                      self.kv_usage)
        object.__setattr__(self, "wanted", frozenset(names))

    @property
    def prefix(self) -> str:
        """The namespace of the engine's metric names (``vllm:``), by which a page is
        recognised."""
        return self.running[0].partition(":")[0] + ":"

    def snapshot(self, text: str, taken_at: float) -> MetricsSnapshot | None:
        """The snapshot a ``/metrics`` page carries, or ``None`` if it lacks a required gauge."""
        sums = sum_gauges(text, self.wanted)
        running = _first(sums, self.running)
        waiting = _first(sums, self.waiting)
        if running is None or waiting is None:
            return None
        return MetricsSnapshot(
            running=running,
            waiting=waiting,
            taken_at=taken_at,
            available_gpu_block_num=_first(sums, self.free_blocks),
            max_batch_size=_first(sums, self.max_batch),
            gpu_cache_usage_perc=_first(sums, self.kv_usage),
        )


@dataclass(frozen=True, slots=True)
class TokenizeApi:
    """An engine's tokenize endpoint: ``POST {path}`` with a JSON object holding the text in
    each of ``text_fields``, answered with a JSON object whose ``tokens_field`` lists the ids."""

    path: str
    text_fields: tuple[str, ...]
    tokens_field: str

    def request_body(self, text: str) -> bytes:
        return orjson.dumps(dict.fromkeys(self.text_fields, text))

    def tokens(self, answer: Any) -> list[int] | None:
        """The ids of a parsed answer, or ``None`` unless they are a non-empty list of ints."""
        ids = answer.get(self.tokens_field) if isinstance(answer, dict) else None
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            return None
        return ids


@dataclass(frozen=True, slots=True)
class AbortApi:
    """An engine's abort endpoint: ``POST {path}`` with the request ids in ``ids_field`` (a list,
    or a single id per call when ``one_per_call``); ``{all_field: true}`` aborts everything
    (``all_field`` ``None``: the engine cannot)."""

    path: str
    ids_field: str
    one_per_call: bool = False
    all_field: str | None = None

    def bodies(self, req_ids: Sequence[str], abort_all: bool = False) -> list[dict]:
        """The request bodies to send (none if the engine cannot do what is asked)."""
        if abort_all:
            return [{self.all_field: True}] if self.all_field else []
        if self.one_per_call:
            return [{self.ids_field: rid} for rid in req_ids]
        return [{self.ids_field: list(req_ids)}] if req_ids else []


@dataclass(frozen=True, slots=True)
class StreamUsage:
    """How the router measures the prefix-cache hits of an engine's streams whose client did
    not ask for usage (:mod:`kvrouter.backends.usage`)."""

    #: ask for ``include_usage`` and leave the usage event out of the relay: the engine adds
    #: that one event for it and changes nothing else
    ask: bool = False
    #: the last event carries llama.cpp's ``timings`` (``prompt_n``, ``cache_n``)
    timings: bool = False


@dataclass(frozen=True, slots=True)
class EngineControl:
    """The control-plane facts of one engine family (``None``: the engine has no such thing)."""

    name: str
    metrics: MetricNames | None
    tokenize: TokenizeApi | None
    abort: AbortApi | None
    usage: StreamUsage = StreamUsage()


FASTDEPLOY = EngineControl(
    name="fastdeploy",
    metrics=MetricNames(
        running=("fastdeploy:num_requests_running",),
        waiting=("fastdeploy:num_requests_waiting",),
        # older releases serve the block count without the prefix
        free_blocks=("fastdeploy:available_gpu_block_num", "available_gpu_block_num"),
        max_batch=("fastdeploy:max_batch_size",),
        kv_usage=("fastdeploy:gpu_cache_usage_perc",),
    ),
    # the prompt under every name a FastDeploy-style tokenizer service reads
    tokenize=TokenizeApi("/tokenize", ("text", "prompt", "message"), "input_ids"),
    abort=AbortApi("/v1/abort_requests", "req_ids", all_field="abort_all"),
    usage=StreamUsage(ask=True),
)

VLLM = EngineControl(
    name="vllm",
    metrics=MetricNames(
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),  # new, old name
    ),
    tokenize=TokenizeApi("/tokenize", ("prompt",), "tokens"),
    # ids are the engine's own (``X-Request-Id`` with the endpoint's prefix); no abort-all
    abort=AbortApi("/inference/v1/abort_requests", "request_ids"),
    # cached_tokens only with --enable-prompt-tokens-details, in whole blocks
    usage=StreamUsage(ask=True),
)

SGLANG = EngineControl(
    name="sglang",
    metrics=MetricNames(
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
    ),
    tokenize=TokenizeApi("/tokenize", ("prompt",), "tokens"),
    abort=AbortApi("/abort_request", "rid", one_per_call=True, all_field="abort_all"),
    usage=StreamUsage(ask=True),        # cached_tokens only with --enable-cache-report
)

LLAMA_CPP = EngineControl(
    name="llamacpp",                      # llama.cpp's llama-server, started with --metrics
    metrics=MetricNames(
        running=("llamacpp:requests_processing",),
        waiting=("llamacpp:requests_deferred",),   # no KV-usage or block gauge
    ),
    tokenize=TokenizeApi("/tokenize", ("content",), "tokens"),
    abort=None,
    usage=StreamUsage(timings=True),
)

LLAMA_CPP_PYTHON = EngineControl(
    name="llama-cpp-python",              # python -m llama_cpp.server: no /metrics, no /health
    metrics=None,
    tokenize=TokenizeApi("/extras/tokenize", ("input",), "tokens"),
    abort=None,                           # no usage in streams, no cached_tokens at all
)

OPENAI = EngineControl(
    name="openai",                        # any other OpenAI-compatible server
    metrics=None,
    tokenize=None,
    abort=None,
)

ENGINES: Mapping[str, EngineControl] = {
    e.name: e for e in (FASTDEPLOY, VLLM, SGLANG, LLAMA_CPP, LLAMA_CPP_PYTHON, OPENAI)}
DEFAULT_ENGINE = FASTDEPLOY.name
#: what an instance whose ``/metrics`` shows no known engine is taken for: an OpenAI server
FALLBACK_ENGINE = OPENAI.name


def metric_names(text: str) -> list[str]:
    """The distinct sample names of a Prometheus page, in page order (labels, values and
    comments left out)."""
    seen: dict[str, None] = {}
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line or line[0] == "#":
            continue
        end = len(line)
        for stop in ("{", " ", "\t"):
            i = line.find(stop)
            if i != -1 and i < end:
                end = i
        seen[line[:end]] = None
    return list(seen)


def detect_engine(names: Sequence[str]) -> EngineControl | None:
    """The engine whose metric namespace (``fastdeploy:``, ``vllm:``, ``sglang:``,
    ``llamacpp:``) the names use, or ``None``; the first in table order wins."""
    for engine in ENGINES.values():
        if engine.metrics is not None:
            prefix = engine.metrics.prefix
            if any(n.startswith(prefix) for n in names):
                return engine
    return None


def parse_metrics(text: str, taken_at: float,
                  engine: EngineControl = FASTDEPLOY) -> MetricsSnapshot | None:
    """The snapshot an ``engine``'s ``/metrics`` page carries, or ``None`` (the page lacks a
    required gauge, or the engine serves no usable metrics)."""
    return engine.metrics.snapshot(text, taken_at) if engine.metrics is not None else None
