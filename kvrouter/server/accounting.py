"""Accounting of finished inference requests: the last step of the request path."""

from __future__ import annotations

import time

from kvrouter.http.upstream import BodyFailed
from kvrouter.metrics import CounterChild, HistogramChild
from kvrouter.router import Router
from kvrouter.server.forward import InstanceRef

#: Seconds of per-second totals kept for the dashboard's charts (:data:`TRAFFIC`).
TRAFFIC_SECS = 300
# the fields of a :class:`Traffic` bucket
SEC, REQUESTS, ERRORS, TTFT_N, TTFT_SUM, TTFT_MAX, DURATION_SUM, PROMPT_TOKENS = range(8)


class Traffic:
    """Per-second totals of the requests that ended in the last :data:`TRAFFIC_SECS` seconds:
    requests, failures (an answer ≥ 400 or a body broken off), stream TTFT (count, sum, max),
    duration sum, prompt tokens the instances reported. A ring of buckets indexed by the
    second (``time.perf_counter()``), each cleared when its second comes round again: O(1) per
    request, kept always (the dashboard's charts have a history when it opens)."""

    __slots__ = ("buckets", "current")

    def __init__(self) -> None:
        self.buckets = [[-1, 0, 0, 0, 0.0, 0.0, 0.0, 0] for _ in range(TRAFFIC_SECS)]
        self.current = self.buckets[0]     # the bucket of the latest request's second

    def add(self, now: float, duration: float, ttft: float | None, failed: bool,
            prompt_tokens: int | None) -> None:
        sec = int(now)
        b = self.current
        if b[SEC] != sec:
            b = self.current = self.buckets[sec % TRAFFIC_SECS]
            if b[SEC] != sec:
                b[:] = (sec, 0, 0, 0, 0.0, 0.0, 0.0, 0)
        b[REQUESTS] += 1
        b[DURATION_SUM] += duration
        if failed:
            b[ERRORS] += 1
        if ttft is not None:
            b[TTFT_N] += 1
            b[TTFT_SUM] += ttft
            if ttft > b[TTFT_MAX]:
                b[TTFT_MAX] = ttft
        if prompt_tokens:
            b[PROMPT_TOKENS] += prompt_tokens

    def last(self, now: float) -> list[list]:
        """The buckets of the :data:`TRAFFIC_SECS` seconds up to ``now`` (perf_counter),
        oldest first; a second without requests is an empty bucket."""
        end = int(now)
        out = []
        for sec in range(end - TRAFFIC_SECS + 1, end + 1):
            b = self.buckets[sec % TRAFFIC_SECS]
            out.append(list(b) if b[SEC] == sec else [sec, 0, 0, 0, 0.0, 0.0, 0.0, 0])
        return out


#: the kinds of finished requests that count in the same series: (endpoint, stream, status,
#: mixed, prefill and decode instance), and those series (requests, duration)
EndKey = tuple[str, bool, int, InstanceRef | None, InstanceRef | None, InstanceRef | None]
Ended = tuple[CounterChild, HistogramChild]

#: This process's traffic (one router per process; each worker process has its own).
TRAFFIC = Traffic()


class Outcome:
    """How an answer reached the client, filled in while it is relayed."""

    __slots__ = ("cached_tokens", "client_gone", "failure", "first_byte_at", "interrupted",
                 "prompt_tokens", "status")

    def __init__(self) -> None:
        self.status = 0
        self.first_byte_at: float | None = None
        self.failure: BodyFailed | None = None   # the instance's body broke off mid-relay
        self.client_gone = False
        self.interrupted = False                 # ended with the stream_interrupted event
        self.prompt_tokens: int | None = None    # usage the answer reported
        self.cached_tokens: int | None = None


def account(router: Router, endpoint: str, received: float, outcome: Outcome, stream: bool, *,
            mixed: InstanceRef | None = None, prefill: InstanceRef | None = None,
            decode: InstanceRef | None = None) -> None:
    """Metrics of one finished inference request.

    Usage seen in a mixed answer counts for that instance; in PD mode the prefill's own answer
    is counted where it is drained (the decode's ``cached_tokens`` is always 0).
    """
    m = router.metrics
    status = outcome.status
    key = (endpoint, stream, status, mixed, prefill, decode)
    ended = m.ended.get(key)
    if ended is None:
        ended = _ended(router, key)
    ended[0].value += 1
    now = time.perf_counter()
    ended[1].observe(now - received)
    ttft = None
    if stream and outcome.first_byte_at is not None:
        ttft = outcome.first_byte_at - received
        m.ttft.labels(endpoint, router.mode).observe(ttft)
    TRAFFIC.add(now, now - received, ttft, status >= 400 or outcome.failure is not None,
                outcome.prompt_tokens)
    if status >= 400:
        m.errors.labels("backend_status").inc()
    if outcome.failure is not None and outcome.failure.idle_timeout:
        m.errors.labels("stream_idle_timeout").inc()
    if outcome.client_gone:
        m.errors.labels("client_disconnect").inc()
    if outcome.interrupted:
        m.errors.labels("stream_interrupted").inc()
    if mixed is not None and outcome.prompt_tokens is not None:
        count_usage(router, mixed, outcome.prompt_tokens, outcome.cached_tokens)


def _ended(router: Router, key: EndKey) -> Ended:
    """The series one kind of finished request counts in (cached in ``metrics.ended``, which
    forgetting an instance clears)."""
    m = router.metrics
    endpoint, stream, status, mixed, prefill, decode = key
    if len(m.ended) >= 4096:
        m.ended.clear()
    ended = m.ended[key] = (
        m.inference_requests.labels(decode.url if decode else "", mixed.url if mixed else "",
                                    prefill.url if prefill else "", status),
        m.duration.labels(endpoint, router.mode, "true" if stream else "false"))
    return ended


def count_usage(router: Router, ref: InstanceRef, prompt: int, cached: int | None) -> None:
    """The instance-reported prompt and cached tokens (skipped once it was removed, so its
    series stay deleted)."""
    if router.registry.get(ref.identity) is ref.inst:
        children = ref.usage_children
        if children is None:
            m = router.metrics
            children = ref.usage_children = (m.backend_prompt_tokens.labels(ref.url),
                                              m.backend_cached_tokens.labels(ref.url))
        children[0].inc(prompt)
        children[1].inc(cached or 0)
