"""What a cluster run returns: per-request outcomes, per-core statistics, the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvrouter.sim.cluster.summary import summarize

__all__ = ["ClusterResult", "CoreStats", "RequestResult"]


@dataclass(slots=True)
class RequestResult:
    """The outcome of one workload request (times in virtual seconds)."""

    index: int                        # position in the workload
    request_id: str
    arrival: float
    instance: str                     # URL of the mixed (or, in PD, decode) instance
    prompt_tokens: int
    max_tokens: int
    session_id: str | None = None
    prefill_instance: str | None = None   # PD only
    strategy: str = ""                # Selection.strategy of the (prefill) decision
    ttft: float | None = None         # first client-visible token − arrival
    itls: list[float] = field(default_factory=list)   # gaps between successive tokens
    end: float | None = None          # last token (or abort) time
    output_tokens: int = 0
    cached_tokens: int = 0            # true prefix-cache hit at the (prefill) core
    queue_time: float | None = None   # first scheduled − arrival at the (prefill) core
    transfer_time: float = 0.0        # PD KV transfer (modelled)
    preemptions: int = 0
    finish_reason: str | None = None  # the core's reason ("length"), or the error below
    error: str | None = None          # None: completed; else "timeout", "abort",
                                      # "pd_reschedule", "length" (can never fit), "rejected",
                                      # or the admission queue's reason (``rejected``)
    router_wait: float = 0.0          # time in the router's admission queue (in ``ttft``)
    rejected: str | None = None       # answered by the admission queue without an instance
                                      # (a ``Reject`` value: queue_full, queue_timeout, ...)

    @property
    def ok(self) -> bool:
        return self.end is not None and self.error is None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.arrival

    @property
    def mean_itl(self) -> float | None:
        return sum(self.itls) / len(self.itls) if self.itls else None


@dataclass(slots=True)
class CoreStats:
    """What one core did (for utilisation identities)."""

    url: str
    role: str
    steps: int = 0
    busy_time: float = 0.0            # Σ step durations
    prefill_tokens: int = 0           # Σ Step.prefill_tokens
    decode_tokens: int = 0            # Σ Step.decode_tokens
    token_events: int = 0             # TokenEvents delivered
    requests: int = 0                 # requests added
    occupied_time: float = 0.0        # time with >= 1 routed request not yet ended


@dataclass
class ClusterResult:
    results: list[RequestResult]
    policy: str
    instances: list[str]              # URLs (prefill first in PD)
    pd: tuple[int, int] | None
    start: float                      # first arrival
    end: float                        # last event that changed a request
    core_stats: list[CoreStats]
    in_system_integral: float         # ∫ (requests arrived and not ended) dt
    router_inflight_integral: float   # ∫ Σ_instances Load.requests dt (router counters;
                                      # PD counts the prefill and decode legs separately)
    samples: list[tuple[float, int, float]] = field(default_factory=list)
    """``(t, requests in system, Σ core running + waiting gauges)`` every ``sample_interval``."""
    final_load: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Router ``Load`` (requests, tokens) per instance URL at the end (all zero when every
    lease was released)."""
    admission: bool = False           # requests went through the admission queue
    rejections: dict[str, int] = field(default_factory=dict)
    """Requests the admission queue answered without an instance, by ``Reject`` value."""
    queue_peak: int = 0               # most requests waiting in the admission queue at once

    @property
    def rejected(self) -> int:
        return sum(self.rejections.values())

    @property
    def span(self) -> float:
        return self.end - self.start

    def summary(self) -> dict[str, Any]:
        return summarize(self.results)

