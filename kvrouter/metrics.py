"""Prometheus metrics of the router: fd-router's names kept, kvrouter's added
(docs/fastdeploy.md#metrics).

Counters and histograms are updated as events happen; gauges of per-instance state are read
from the registry at scrape time by :class:`StateCollector`, so a removed instance's series
disappear with it and nothing is updated on the hot path that a scrape can compute.

The per-instance label of the ``kvrouter_*`` families is ``url`` (the instance's URL): a label
named ``instance`` would clash with the target label Prometheus adds to every series.
"""

from __future__ import annotations

import math
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvrouter import __version__
from kvrouter.registry import HEALTHY, UNHEALTHY
from kvrouter.tally import Tally

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


_C = TypeVar("_C")


class Family(Generic[_C]):
    """A labelled family: ``labels(*values)`` returns a cached child (values as given)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._metrics: dict[tuple[str, ...], _C] = {}
        self._cache: dict[tuple, _C] = {}
        self._self: _C | None = None if self._labelnames else self._child()
        if registry is not None:
            registry.register(self)

    @property
    def name(self) -> str:
        return self._name

    def _child(self) -> _C:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def _no_labels(self) -> ValueError:
        return ValueError(f"{self._name}: labels {self._labelnames} expected")

    def labels(self, *values) -> _C:
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

    def _series(self) -> list[tuple[tuple[str, ...], _C]]:
        if self._self is not None:
            return [((), self._self)]
        return list(self._metrics.items())

    def describe(self):
        return [self._family()]


class CounterChild:
    """One series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class FastCounter(Family[CounterChild]):
    """A counter (exposed as ``<name>_total``)."""

    def _child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        child = self._self
        if child is None:
            raise self._no_labels()
        child.inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self):
        fam = self._family()
        for key, child in self._series():
            fam.add_metric(list(key), child.value)
        return [fam]


class HistogramChild:
    """One series of a histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class FastHistogram(Family[HistogramChild]):
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

    def _child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def observe(self, amount: float) -> None:
        child = self._self
        if child is None:
            raise self._no_labels()
        child.observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self):
        fam = self._family()
        for key, child in self._series():
            acc, buckets = 0, []
            for le, n in zip(self._les, child.counts, strict=True):
                acc += n
                buckets.append((le, acc))
            fam.add_metric(list(key), buckets, child.sum)
        return [fam]


Counter = FastCounter
Histogram = FastHistogram

#: the routes whose requests the ``[stats]`` line counts
INFERENCE_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
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
        self.ttft = Histogram(
            "kvrouter_request_ttft_seconds", "Seconds from receiving an inference request to "
            "sending the first byte of the instance's answer body to the client.",
            ["endpoint", "mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(
            "kvrouter_request_duration_seconds", "Seconds from receiving an inference request "
            "to the end of its answer.", ["endpoint", "mode", "stream"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.decision = Histogram(
            "kvrouter_schedule_decision_seconds", "Seconds a routing policy took to choose an "
            "instance.", ["role", "policy"], buckets=DECISION_BUCKETS, registry=r)
        self.selections = Counter(
            "kvrouter_selections", "Instances chosen by the routing policy, by how the choice "
            "was made (strategy).", ["role", "policy", "url", "strategy"], registry=r)
        self.errors = Counter("kvrouter_errors", "Failures by kind: error answers, failed "
                              "connections to instances (also those retried elsewhere), broken "
                              "or abandoned streams.", ["kind"], registry=r)
        self.retries = Counter("kvrouter_retries", "Requests sent again to another instance, "
                               "by reason.", ["reason"], registry=r)
        self.lookup_blocks = Counter(
            "kvrouter_prefix_lookup_blocks", "Prompt blocks the cache-aware policies looked up "
            "in the prefix index.", ["role"], registry=r)
        self.hit_blocks = Counter(
            "kvrouter_prefix_hit_blocks", "Prompt blocks the prefix index predicted to be "
            "cached on the chosen instance.", ["role"], registry=r)
        self.backend_prompt_tokens = Counter(
            "kvrouter_backend_prompt_tokens", "Prompt tokens the instances reported in their "
            "answers' usage.", ["url"], registry=r)
        self.backend_cached_tokens = Counter(
            "kvrouter_backend_cached_tokens", "Prompt tokens the instances reported as served "
            "from their prefix cache.", ["url"], registry=r)
        self.scrapes = Counter("kvrouter_metrics_scrape", "Scrapes of the instances' /metrics "
                               "pages, by result.", ["url", "result"], registry=r)
        self.health_checks = Counter("kvrouter_health_checks", "Health probes of the "
                                     "instances, by result.", ["url", "result"], registry=r)
        self.client_requests = Counter(
            "kvrouter_client_requests", "Requests by the name of the client key that "
            "authenticated them (auth.*; never the key itself).", ["key"], registry=r)
        self.outlier_ejections = Counter(
            "kvrouter_outlier_ejections", "Instances ejected by outlier detection.",
            ["url", "reason"], registry=r)
        self.queue_wait = Histogram(
            "kvrouter_queue_wait_seconds", "Time requests waited in the admission queue for "
            "an instance with headroom (0 for a request admitted at arrival).", ["priority"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_rejections = Counter(
            "kvrouter_queue_rejections", "Requests the admission queue answered without an "
            "instance, by reason.", ["reason"], registry=r)
        self.connections_refused = Counter(
            "kvrouter_http_connections_refused", "Client connections closed at once because "
            "server.max-connections were open (per process).", registry=r)
        self._per_instance = (self.selections, self.backend_prompt_tokens,
                              self.backend_cached_tokens, self.scrapes, self.health_checks,
                              self.outlier_ejections)
        #: the children a finished inference request counts in, by the kind of request
        #: (:func:`kvrouter.server.accounting.account`); cleared with a removed instance
        self.ended: dict[tuple, tuple[CounterChild, HistogramChild]] = {}
        # neither is summed over worker processes (not a Family: see summed_families)
        r.register(_BuildInfo())
        ProcessCollector(registry=r)

    def attach_state(self, registry: Registry, index: PrefixIndex) -> None:
        self.registry.register(StateCollector(registry, index))

    def attach_queue(self, depth: Callable[[str], int], names: list[str]) -> None:
        """``kvrouter_queue_depth{priority}``: requests waiting now, read at scrape time."""
        self.registry.register(_LabelledGauge(
            "kvrouter_queue_depth", "Requests waiting in the admission queue.", "priority",
            names, depth))

    def attach_outliers(self, ejected: Callable[[], int]) -> None:
        """``kvrouter_outlier_ejected_instances``: ``ejected()`` at scrape time."""
        self.registry.register(_Gauge("kvrouter_outlier_ejected_instances",
                                      "Instances ejected by outlier detection now.", ejected))

    def forget_instance(self, url: str) -> None:
        """Delete every labelled series of a removed instance."""
        self.ended.clear()
        for metric in self._per_instance:
            pos = metric._labelnames.index("url")
            for key in list(metric._metrics):
                if key[pos] == url:
                    metric.remove(*key)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- several routers' counters (kvrouter.shared) ---------------------------------------------
    def stats_totals(self) -> StatsTotals:
        """This router's running totals of the counters the ``[stats]`` line reports."""
        ended = sum(c.value for key, c in self.http_requests._metrics.items()
                    if key[0] in INFERENCE_ENDPOINTS)
        return StatsTotals(requests=ended, **{
            f.name: counter_total(getattr(self, f.metadata["counter"]))
            for f in fields(StatsTotals) if "counter" in f.metadata})

    def summed_families(self) -> list[Family]:
        """The counter and histogram families updated by events, which several routers'
        answers sum. (The gauges computed from the registry already show shared values, the
        prefix-index series describe one router's copy of the index, and ``process_*`` and
        ``kvrouter_build_info`` the process that answers: a sum of start times or memory
        sizes would mean nothing.)"""
        return [v for v in vars(self).values() if isinstance(v, Family)]

    def counter_samples(self) -> CounterSamples:
        """The samples of :meth:`summed_families`, as JSON-ready lists (what another router
        adds to its answer with :meth:`render_merged`)."""
        out: CounterSamples = {}
        for family in self.summed_families():
            for metric in family.collect():
                out[metric.name] = [[s.name, s.labels, s.value] for s in metric.samples]
        return out

    def render_merged(self, others: Sequence[CounterSamples],
                      extra: Iterable[Metric] = ()) -> bytes:
        """This router's exposition with ``others``' :meth:`counter_samples` added to the
        summed families, and ``extra`` metrics appended."""
        summed = {f.name for f in self.summed_families()}
        merged = []
        for metric in self.registry.collect():
            if metric.name in summed and others:
                metric = _merge(metric, others)
            merged.append(metric)
        merged.extend(extra)
        return generate_latest(_Collected(merged))


#: ``{family name: [[sample name, labels, value], …]}``
CounterSamples = dict[str, list[list]]


@dataclass(slots=True)
class StatsTotals(Tally):
    """Running totals of the counters behind the ``[stats]`` line (summed over label sets)."""

    # each the total of the RouterMetrics counter its metadata names
    cache_hits: float = field(default=0.0, metadata={"counter": "cache_hit"})
    cache_requests: float = field(default=0.0, metadata={"counter": "cache_request"})
    hit_blocks: float = field(default=0.0, metadata={"counter": "hit_blocks"})
    lookup_blocks: float = field(default=0.0, metadata={"counter": "lookup_blocks"})
    cached_tokens: float = field(default=0.0, metadata={"counter": "backend_cached_tokens"})
    prompt_tokens: float = field(default=0.0, metadata={"counter": "backend_prompt_tokens"})
    requests: float = 0.0       # inference requests that ended (any status)


def counter_total(metric: Family) -> float:
    """Sum of a counter over all its label sets."""
    return sum(s.value for fam in metric.collect() for s in fam.samples
               if s.name.endswith("_total"))


def _merge(metric: Metric, others: Sequence[CounterSamples]) -> Metric:
    """``metric`` with the samples of the same name in ``others`` added (by name + labels)."""
    acc: dict[tuple, list] = {}
    for s in metric.samples:
        acc[(s.name, tuple(sorted(s.labels.items())))] = [s.labels, s.value]
    for dump in others:
        for name, labels, value in dump.get(metric.name, ()):
            key = (name, tuple(sorted(labels.items())))
            slot = acc.get(key)
            if slot is None:
                acc[key] = [labels, value]
            else:
                slot[1] += value
    out = Metric(metric.name, metric.documentation, metric.type)
    for (name, _), (labels, value) in acc.items():
        out.add_sample(name, labels, value)
    return out


class _Collected:
    """A fixed list of metrics as a collector (for ``generate_latest``)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class _BuildInfo:
    """``kvrouter_build_info{version,python} 1``: which kvrouter and Python answer."""

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily("kvrouter_build_info", "Always 1; the labels name the kvrouter "
                                "and Python versions of the process that answered.",
                                labels=["version", "python"])
        fam.add_metric([__version__, platform.python_version()], 1.0)
        return [fam]


class _Gauge:
    """One unlabelled gauge read from a function at scrape time."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily(self._name, self._doc)
        fam.add_metric([], self._read())
        return [fam]


class _LabelledGauge:
    """One gauge with one label, read per label value at scrape time."""

    def __init__(self, name: str, doc: str, label: str, values: list[str],
                 read: Callable[[str], float]) -> None:
        self._name, self._doc, self._label = name, doc, label
        self._values, self._read = values, read

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily(self._name, self._doc, labels=[self._label])
        for v in self._values:
            fam.add_metric([v], self._read(v))
        return [fam]


class StateCollector:
    """Gauges computed from registry and prefix-index state at scrape time."""

    def __init__(self, registry: Registry, index: PrefixIndex) -> None:
        self._reg = registry
        self._index = index

    def describe(self):
        return []

    def collect(self):
        reqs = GaugeMetricFamily(
            "kvrouter_instance_in_flight_requests", "Requests sent to the instance whose "
            "answer has not ended yet.", labels=["url", "role"])
        toks = GaugeMetricFamily(
            "kvrouter_instance_in_flight_tokens", "Estimated prompt tokens of the requests "
            "sent to the instance that it has not started answering yet (a request's tokens "
            "are released at the first byte of its answer).", labels=["url", "role"])
        state = GaugeMetricFamily("kvrouter_instance_state", "1 for the instance's current "
                                  "state, 0 for the others.", labels=["url", "role", "state"])
        counts = GaugeMetricFamily("kvrouter_instances", "Known instances, by role and state.",
                                   labels=["role", "state"])
        age = GaugeMetricFamily("kvrouter_metrics_snapshot_age_seconds",
                                "Seconds since the instance's /metrics page was last read.",
                                labels=["url"])
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
        blocks = GaugeMetricFamily("kvrouter_prefix_index_blocks", "Entries in this "
                                   "process's prefix index (one per prompt block and instance).")
        blocks.add_metric([], self._index.size)
        evictions = _counter_family("kvrouter_prefix_evictions", "Entries removed from the "
                                    "prefix index, by reason.", "reason", self._index.evictions)
        return [reqs, toks, state, counts, age, blocks, evictions]


def _counter_family(name: str, doc: str, label: str, values: dict[str, int]):
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([k], v)
    return fam
