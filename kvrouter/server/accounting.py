"""Accounting of finished inference requests: the last step of the request path."""

from __future__ import annotations

import time

from kvrouter.registry import Instance
from kvrouter.router import Router
from kvrouter.server.relay import RelayOutcome


def account(router: Router, endpoint: str, received: float, status: int, outcome: RelayOutcome,
            body: dict, *, mixed: Instance | None = None, prefill: Instance | None = None,
            decode: Instance | None = None) -> None:
    """Metrics of one finished inference request.

    Usage seen in a mixed answer counts for that instance; in PD mode the prefill's own answer
    is counted where it is drained (the decode's ``cached_tokens`` is always 0).
    """
    m = router.metrics
    m.inference_requests.labels(decode.url if decode else "", mixed.url if mixed else "",
                                prefill.url if prefill else "", str(status)).inc()
    stream = body.get("stream") is True
    m.duration.labels(endpoint, router.mode, "true" if stream else "false").observe(
        time.perf_counter() - received)
    if stream and outcome.first_byte_at is not None:
        m.ttft.labels(endpoint, router.mode).observe(outcome.first_byte_at - received)
    if status >= 400:
        m.errors.labels("backend_status").inc()
    if outcome.failure is not None and outcome.failure.idle_timeout:
        m.errors.labels("stream_idle_timeout").inc()
    if outcome.client_gone:
        m.errors.labels("client_disconnect").inc()
    if mixed is not None and outcome.prompt_tokens is not None:
        count_usage(router, mixed, outcome.prompt_tokens, outcome.cached_tokens)


def count_usage(router: Router, inst: Instance, prompt: int, cached: int | None) -> None:
    """The instance-reported prompt and cached tokens (skipped once it was removed, so its
    series stay deleted)."""
    if router.registry.get(inst.identity) is inst:
        router.metrics.backend_prompt_tokens.labels(inst.url).inc(prompt)
        router.metrics.backend_cached_tokens.labels(inst.url).inc(cached or 0)
