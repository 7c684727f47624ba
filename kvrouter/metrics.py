"""Prometheus metrics of the router (contract §9): fd-router's names kept, kvrouter's added.

Counters and histograms are updated as events happen; gauges of per-instance state are read
from the registry at scrape time by :class:`StateCollector`, so a removed instance's series
disappear with it and nothing is updated on the hot path that a scrape can compute.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from kvrouter.registry import HEALTHY, UNHEALTHY

if TYPE_CHECKING:
    from kvrouter.prefix.index import PrefixIndex
    from kvrouter.registry import Registry

try:  # no *_created series: keep the exposition close to fd-router's
    from prometheus_client import disable_created_metrics
    disable_created_metrics()
except ImportError:  # pragma: no cover
    pass

# -- counters and histograms for the request path ------------------------------------------------
# prometheus_client's own classes cost ~1-3 µs per ``labels()`` call and take a lock per update;
# the router updates ~10 series per request on one thread. These keep the same exposition (names,
# HELP, labels, ``_total``/``_bucket``/``_sum``/``_count``) with cached children and plain adds.


class _Family:
    """A labelled family: ``labels(*values)`` returns a cached child (values as given)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._metrics: dict[tuple[str, ...], object] = {}
        self._cache: dict[tuple, object] = {}
        self._self = None if self._labelnames else self._child()
        if registry is not None:
            registry.register(self)

    def _child(self):
        raise NotImplementedError

    def labels(self, *values):
        child = self._cache.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
            key = tuple(str(v) for v in values)
            child = self._metrics.get(key)
            if child is None:
                child = self._metrics[key] = self._child()
            self._cache[values] = child
        return child

    def remove(self, *values) -> None:
        self._metrics.pop(tuple(str(v) for v in values), None)
        self._cache.clear()

    def _series(self):
        if self._self is not None:
            return [((), self._self)]
        return list(self._metrics.items())

    def describe(self):
        return [self._family()]


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class FastCounter(_Family):
    """A counter (exposed as ``<name>_total``)."""

    def _child(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, amount: float = 1) -> None:
        self._self.inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self):
        fam = self._family()
        for key, child in self._series():
            fam.add_metric(list(key), child.value)
        return [fam]


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class FastHistogram(_Family):
    """A histogram with fixed upper bounds (``+Inf`` appended)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = (), registry: CollectorRegistry | None = None
                 ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramValue:
        return _HistogramValue(self._bounds)

    def observe(self, amount: float) -> None:
        self._self.observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self):
        fam = self._family()
        for key, child in self._series():
            acc, buckets = 0, []
            for le, n in zip(self._les, child.counts):
                acc += n
                buckets.append((le, acc))
            fam.add_metric(list(key), buckets, child.sum)
        return [fam]


Counter = FastCounter
Histogram = FastHistogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.25)


class RouterMetrics:
    """Every metric the router exposes, in one private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # fd-router names; labels declared alphabetically, as fd-router emits them
        self.inference_requests = Counter(
            "inference_requests", "Inference requests by worker and status.",
            ["decode_worker", "mixed_worker", "prefill_worker", "status_code"], registry=r)
        self.http_requests = Counter(
            "http_requests", "Router HTTP requests.", ["endpoint", "method", "status_code"],
            registry=r)
        self.http_duration = Histogram(
            "http_request_duration_seconds", "Router HTTP request duration.",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hit = Counter("router_cache_hit", "Session requests routed to the session's "
                                 "previous instance.", registry=r)
        self.cache_request = Counter("router_cache_request", "Cache-aware session requests.",
                                     registry=r)
        # kvrouter additions
        self.ttft = Histogram("kvrouter_request_ttft_seconds", "Receipt to first body byte.",
                              ["endpoint", "mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("kvrouter_request_duration_seconds", "Receipt to end of relay.",
                                  ["endpoint", "mode", "stream"], buckets=LATENCY_BUCKETS,
                                  registry=r)
        self.decision = Histogram("kvrouter_schedule_decision_seconds", "Time spent choosing.",
                                  ["role", "policy"], buckets=DECISION_BUCKETS, registry=r)
        self.selections = Counter("kvrouter_selections", "Instance selections.",
                                  ["role", "policy", "instance", "strategy"], registry=r)
        self.errors = Counter("kvrouter_errors", "Errors by kind.", ["kind"], registry=r)
        self.retries = Counter("kvrouter_retries", "Retries by reason.", ["reason"], registry=r)
        self.lookup_blocks = Counter("kvrouter_prefix_lookup_blocks", "Prefix blocks looked up.",
                                     ["role"], registry=r)
        self.hit_blocks = Counter("kvrouter_prefix_hit_blocks",
                                  "Prefix blocks predicted to hit.", ["role"], registry=r)
        self.backend_prompt_tokens = Counter(
            "kvrouter_backend_prompt_tokens", "Prompt tokens reported by instances.",
            ["instance"], registry=r)
        self.backend_cached_tokens = Counter(
            "kvrouter_backend_cached_tokens", "Cached prompt tokens reported by instances.",
            ["instance"], registry=r)
        self.scrapes = Counter("kvrouter_metrics_scrape", "Metrics scrapes.",
                               ["instance", "result"], registry=r)
        self.health_checks = Counter("kvrouter_health_checks", "Health probes.",
                                     ["instance", "result"], registry=r)
        self._per_instance = (self.selections, self.backend_prompt_tokens,
                              self.backend_cached_tokens, self.scrapes, self.health_checks)

    def attach_state(self, registry: Registry, index: PrefixIndex) -> None:
        self.registry.register(StateCollector(registry, index))

    def forget_instance(self, url: str) -> None:
        """Delete every labelled series of a removed instance."""
        for metric in self._per_instance:
            names = metric._labelnames
            pos = names.index("instance")
            for key in list(metric._metrics):
                if key[pos] == url:
                    metric.remove(*key)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector:
    """Gauges computed from registry and prefix-index state at scrape time."""

    def __init__(self, registry: Registry, index: PrefixIndex) -> None:
        self._reg = registry
        self._index = index

    def describe(self):
        return []

    def collect(self):
        reqs = GaugeMetricFamily("kvrouter_instance_in_flight_requests",
                                 "Local in-flight requests R.", labels=["instance", "role"])
        toks = GaugeMetricFamily("kvrouter_instance_in_flight_tokens",
                                 "Local in-flight tokens T.", labels=["instance", "role"])
        state = GaugeMetricFamily("kvrouter_instance_state", "1 for the current state.",
                                  labels=["instance", "role", "state"])
        counts = GaugeMetricFamily("kvrouter_instances", "Instances by role and state.",
                                   labels=["role", "state"])
        age = GaugeMetricFamily("kvrouter_metrics_snapshot_age_seconds",
                                "Age of the latest metrics snapshot.", labels=["instance"])
        tally: dict[tuple[str, str], int] = {}
        now = time.monotonic()
        for inst in self._reg.all():
            role = inst.role.value
            st = "paused" if inst.paused and inst.state == HEALTHY else inst.state
            reqs.add_metric([inst.url, role], inst.load.requests)
            toks.add_metric([inst.url, role], inst.load.tokens)
            for s in (HEALTHY, UNHEALTHY, "paused"):
                state.add_metric([inst.url, role, s], 1.0 if s == st else 0.0)
            tally[(role, st)] = tally.get((role, st), 0) + 1
            if inst.snapshot is not None:
                age.add_metric([inst.url], now - inst.snapshot.taken_at)
        for (role, st), n in sorted(tally.items()):
            counts.add_metric([role, st], n)
        blocks = GaugeMetricFamily("kvrouter_prefix_index_blocks",
                                   "(block, instance) entries in the prefix index.")
        blocks.add_metric([], self._index.size)
        evictions = _counter_family("kvrouter_prefix_evictions", "Prefix index evictions.",
                                    "reason", self._index.evictions)
        return [reqs, toks, state, counts, age, blocks, evictions]


def _counter_family(name: str, doc: str, label: str, values: dict[str, int]):
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([k], v)
    return fam
