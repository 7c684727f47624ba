"""Accounting of finished inference requests: the last step of the request path."""

from __future__ import annotations

import time

from kvrouter.router import Router
from kvrouter.server.relay import RelayOutcome


def account(router: Router, endpoint: str, received: float, status: int, outcome: RelayOutcome,
            body: dict, *, mixed: str = "", prefill: str = "", decode: str = "") -> None:
    """Metrics of one finished inference request."""
    m = router.metrics
    m.inference_requests.labels(decode, mixed, prefill, str(status)).inc()
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
    url = mixed or prefill
    if outcome.prompt_tokens is not None and url:
        m.backend_prompt_tokens.labels(url).inc(outcome.prompt_tokens)
        m.backend_cached_tokens.labels(url).inc(outcome.cached_tokens or 0)
