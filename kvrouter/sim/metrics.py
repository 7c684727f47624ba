"""Prometheus text of a simulated instance, with FastDeploy's exact ``fastdeploy:*`` names, or
another engine's (``render(..., engine=...)``).

The FastDeploy text mimics what ``prometheus_client`` prints for a real instance: ``# HELP``/
``# TYPE`` lines, unlabeled gauges with float values (``fastdeploy:num_requests_running 3.0``),
counters with a ``_total`` sample, histograms with ``_bucket``/``_count``/``_sum``. The other
engines' pages carry the series kvrouter and peer routers read, under their names and labels
(/work/shared/research/real-engines.md): vLLM's ``vllm:*`` labelled ``{engine,model_name}``,
SGLang's ``sglang:*`` labelled ``{model_name,tp_rank}``, llama.cpp's unlabelled ``llamacpp:*``
with integral values printed as integers. All are computed from the same FastDeploy gauges and
counters of the engine model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
                 5000.0, 10000.0, 20000.0, 50000.0, 100000.0)

GAUGES: dict[str, str] = {
    "fastdeploy:num_requests_running": "Number of requests currently running",
    "fastdeploy:num_requests_waiting": "Number of requests currently waiting",
    "fastdeploy:batch_size": "Real batch size during inference",
    "fastdeploy:max_batch_size": "Maximum batch size determined when service started",
    "fastdeploy:available_batch_size": "Number of requests that can still be inserted",
    "fastdeploy:available_gpu_block_num": "Number of available gpu blocks in cache",
    "fastdeploy:free_gpu_block_num": "Number of free blocks in GPU cache",
    "fastdeploy:max_gpu_block_num": "Number of total blocks determined when service started",
    "fastdeploy:gpu_cache_usage_perc": "GPU KV-cache usage. 1 means 100 percent usage",
    "fastdeploy:available_gpu_resource": "Available blocks percentage",
    "fastdeploy:first_token_latency": "Latest time to first token in seconds",
    "fastdeploy:infer_latency": "Latest time to generate one token in seconds",
    "fastdeploy:hit_req_rate": "Request-level prefix cache hit rate",
    "fastdeploy:hit_token_rate": "Token-level prefix cache hit rate",
    "fastdeploy:cpu_hit_token_rate": "Token-level CPU prefix cache hit rate",
    "fastdeploy:gpu_hit_token_rate": "Token-level GPU prefix cache hit rate",
    "fastdeploy:cache_config_info": "Information of the engine's CacheConfig",
}

COUNTERS: dict[str, str] = {
    "fastdeploy:requests_number": "Total number of requests received",
    "fastdeploy:request_success_total": "Total number of successfully processed requests",
    "fastdeploy:prompt_tokens_total": "Total number of prompt tokens processed",
    "fastdeploy:generation_tokens_total": "Total number of generation tokens processed",
    "fastdeploy:prefix_cache_token_num": "Total number of cached tokens",
    "fastdeploy:prefix_gpu_cache_token_num": "Total number of cached tokens on GPU",
    "fastdeploy:prefix_cpu_cache_token_num": "Total number of cached tokens on CPU",
    "fastdeploy:prefix_ssd_cache_token_num": "Total number of cached tokens on SSD",
    "fastdeploy:send_cache_failed_num": "Total number of failures of sending cache",
}

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "fastdeploy:time_to_first_token_seconds": ("Time to first token in seconds", LATENCY_BUCKETS),
    "fastdeploy:time_per_output_token_seconds": ("Time per output token in seconds",
                                                 LATENCY_BUCKETS),
    "fastdeploy:e2e_request_latency_seconds": ("End-to-end request latency in seconds",
                                               LATENCY_BUCKETS),
    "fastdeploy:request_queue_time_seconds": ("Time spent in the waiting queue", LATENCY_BUCKETS),
    "fastdeploy:request_inference_time_seconds": ("Time spent running", LATENCY_BUCKETS),
    "fastdeploy:request_prefill_time_seconds": ("Time spent in prefill", LATENCY_BUCKETS),
    "fastdeploy:request_decode_time_seconds": ("Time spent in decode", LATENCY_BUCKETS),
    "fastdeploy:request_prompt_tokens": ("Number of prefill tokens processed", TOKEN_BUCKETS),
    "fastdeploy:request_generation_tokens": ("Number of generation tokens processed",
                                             TOKEN_BUCKETS),
    "fastdeploy:request_params_max_tokens": ("Histogram of max_tokens parameter", TOKEN_BUCKETS),
}


def fmt_value(value: float) -> str:
    """Float formatting of prometheus_client (``3.0``, ``+Inf``, ``NaN``)."""
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets: tuple[float, ...] = tuple(sorted(buckets))
        self.counts: list[int] = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def samples(self, name: str, labels: str = "") -> list[tuple[str, str]]:
        sep = "," if labels else ""
        out: list[tuple[str, str, float]] = [
            (f"{name}_bucket", f'{{{labels}{sep}le="{fmt_value(b)}"}}', self.counts[i])
            for i, b in enumerate(self.buckets)]
        out.append((f"{name}_bucket", f'{{{labels}{sep}le="+Inf"}}', self.count))
        lab = f"{{{labels}}}" if labels else ""
        out.append((f"{name}_count", lab, self.count))
        out.append((f"{name}_sum", lab, self.sum))
        return [(n + lbl, fmt_value(v)) for n, lbl, v in out]


@dataclass
class EngineStats:
    """Counters and histograms an engine model keeps (gauge names of
    docs/fastdeploy.md#instance-surface)."""

    counters: dict[str, float] = field(default_factory=lambda: {name: 0.0 for name in COUNTERS})
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram(b) for name, (_, b) in HISTOGRAMS.items()})

    def inc(self, name: str, by: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + by

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)


@dataclass
class HttpStats:
    """``http_requests_total{method,path,status_code}`` and the duration histogram."""

    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.durations.get((method, path))
        if hist is None:
            hist = self.durations[(method, path)] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


Family = tuple[str, str, str, list[tuple[str, str]]]   # name, help, type, samples

#: the engines whose pages :func:`render` writes
ENGINE_PAGES = ("fastdeploy", "vllm", "sglang", "llamacpp")


def render(gauges: Mapping[str, float], stats: EngineStats, http: HttpStats,
           override: Mapping[str, float | str | None] | None = None,
           engine: str = "fastdeploy", model_name: str = "default") -> str:
    """Exposition text of ``engine``'s page. ``override`` maps a *sample* name (e.g.
    ``fastdeploy:num_requests_running`` or ``fastdeploy:requests_number_total``, labels
    included for a labelled one) to a value; ``None`` drops the sample; a string is written
    verbatim; names not present are appended as bare samples."""
    if engine == "fastdeploy":
        families = _fastdeploy_families(gauges, stats, http)
    elif engine == "vllm":
        families = _vllm_families(gauges, stats, f'engine="0",model_name="{_esc(model_name)}"')
    elif engine == "sglang":
        families = _sglang_families(gauges, stats, f'model_name="{_esc(model_name)}",tp_rank="0"')
    elif engine == "llamacpp":
        families = _llamacpp_families(gauges, stats)
    else:
        raise ValueError(f"no metrics page for engine {engine!r}")
    return _write(families, override)


def _fastdeploy_families(gauges: Mapping[str, float], stats: EngineStats,
                         http: HttpStats) -> list[Family]:
    families: list[Family] = []
    for name, help_ in GAUGES.items():
        families.append((name, help_, "gauge", [(name, fmt_value(gauges.get(name, 0.0)))]))
    for name, help_ in COUNTERS.items():
        sample = name if name.endswith("_total") else f"{name}_total"
        value = fmt_value(stats.counters.get(name, 0.0))
        families.append((name, help_, "counter", [(sample, value)]))
    for name, (help_, _) in HISTOGRAMS.items():
        families.append((name, help_, "histogram", stats.histograms[name].samples(name)))
    req_samples = [
        (f'http_requests_total{{method="{_esc(m)}",path="{_esc(p)}",status_code="{s}"}}',
         fmt_value(n))
        for (m, p, s), n in sorted(http.requests.items())]
    families.append(("http_requests_total",
                     "Total number of requests by method, status and handler.",
                     "counter", req_samples))
    dur_samples: list[tuple[str, str]] = []
    for (m, p), hist in sorted(http.durations.items()):
        dur_samples.extend(hist.samples("http_request_duration_seconds",
                                        f'method="{_esc(m)}",path="{_esc(p)}"'))
    families.append(("http_request_duration_seconds", "Latency with only few buckets by handler.",
                     "histogram", dur_samples))
    return families


def _labelled(name: str, labels: str, value: float) -> tuple[str, str]:
    return (f"{name}{{{labels}}}", fmt_value(value))


def _vllm_families(g: Mapping[str, float], stats: EngineStats, labels: str) -> list[Family]:
    """vLLM (v1 engine): the scheduler gauges, prefix-cache and token counters, latency
    histograms."""
    c = stats.counters
    h = stats.histograms
    out: list[Family] = [
        (name, help_, "gauge", [_labelled(name, labels, g.get(src, 0.0))])
        for name, help_, src in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             "fastdeploy:num_requests_running"),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             "fastdeploy:num_requests_waiting"),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             "fastdeploy:gpu_cache_usage_perc"))]
    for name, help_, src in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
             "tokens.", "fastdeploy:prompt_tokens_total"),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             "fastdeploy:prefix_cache_token_num"),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.",
             "fastdeploy:prompt_tokens_total"),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             "fastdeploy:generation_tokens_total")):
        out.append((name, help_, "counter", [_labelled(f"{name}_total", labels, c.get(src, 0.0))]))
    for name, help_, src in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             "fastdeploy:time_to_first_token_seconds"),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             "fastdeploy:e2e_request_latency_seconds"),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for "
             "request.", "fastdeploy:request_queue_time_seconds")):
        out.append((name, help_, "histogram", h[src].samples(name, labels)))
    return out


def _sglang_families(g: Mapping[str, float], stats: EngineStats, labels: str) -> list[Family]:
    """SGLang: the scheduler gauges, token counters, latency histograms."""
    c = stats.counters
    h = stats.histograms
    out: list[Family] = [
        (name, help_, "gauge", [_labelled(name, labels, g.get(src, 0.0))])
        for name, help_, src in (
            ("sglang:num_running_reqs", "The number of running requests.",
             "fastdeploy:num_requests_running"),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
             "fastdeploy:num_requests_waiting"),
            ("sglang:token_usage", "The token usage.", "fastdeploy:gpu_cache_usage_perc"),
            ("sglang:cache_hit_rate", "The prefix cache hit rate.", "fastdeploy:hit_token_rate"))]
    for name, help_, src in (
            ("sglang:prompt_tokens", "Number of prefill tokens processed.",
             "fastdeploy:prompt_tokens_total"),
            ("sglang:generation_tokens", "Number of generation tokens processed.",
             "fastdeploy:generation_tokens_total"),
            ("sglang:cached_tokens", "Number of cached prompt tokens.",
             "fastdeploy:prefix_cache_token_num"),
            ("sglang:num_requests", "Number of requests processed.",
             "fastdeploy:requests_number")):
        out.append((name, help_, "counter", [_labelled(f"{name}_total", labels, c.get(src, 0.0))]))
    for name, help_, src in (
            ("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             "fastdeploy:time_to_first_token_seconds"),
            ("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in "
             "seconds", "fastdeploy:e2e_request_latency_seconds")):
        out.append((name, help_, "histogram", h[src].samples(name, labels)))
    return out


def _int_value(value: float) -> str:
    """llama.cpp prints whole numbers without a fraction (``llamacpp:requests_processing 4``)."""
    v = float(value)
    return str(int(v)) if math.isfinite(v) and v.is_integer() else fmt_value(v)


def _llamacpp_families(g: Mapping[str, float], stats: EngineStats) -> list[Family]:
    """llama-server with ``--metrics``: token counters and the slot gauges (no KV-usage or
    block gauge)."""
    c = stats.counters
    out: list[Family] = []
    for name, help_, src in (
            ("llamacpp:prompt_tokens_total", "Number of prompt tokens processed.",
             "fastdeploy:prompt_tokens_total"),
            ("llamacpp:prompt_tokens_cached_total", "Number of prompt tokens served from the "
             "cache.", "fastdeploy:prefix_cache_token_num"),
            ("llamacpp:tokens_predicted_total", "Number of generation tokens processed.",
             "fastdeploy:generation_tokens_total")):
        out.append((name, help_, "counter", [(name, _int_value(c.get(src, 0.0)))]))
    for name, help_, src in (
            ("llamacpp:requests_processing", "Number of requests processing.",
             "fastdeploy:num_requests_running"),
            ("llamacpp:requests_deferred", "Number of requests deferred.",
             "fastdeploy:num_requests_waiting")):
        out.append((name, help_, "gauge", [(name, _int_value(g.get(src, 0.0)))]))
    return out


def _write(families: list[Family], override: Mapping[str, float | str | None] | None) -> str:
    override = dict(override or {})
    lines: list[str] = []
    for name, help_, kind, samples in families:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for sample, value in samples:
            if sample in override:
                forced = override.pop(sample)
                if forced is None:
                    continue
                value = forced if isinstance(forced, str) else fmt_value(forced)
            lines.append(f"{sample} {value}")
    for sample, forced in override.items():
        if forced is not None:
            lines.append(f"{sample} {forced if isinstance(forced, str) else fmt_value(forced)}")
    return "\n".join(lines) + "\n"
