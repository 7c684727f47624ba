"""Accounting of finished inference requests: the last step of the request path."""

from __future__ import annotations

import time

from kvrouter.http.upstream import BodyFailed
from kvrouter.router import Router
from kvrouter.server.forward import InstanceRef


class Outcome:
    """How an answer reached the client, filled in while it is relayed."""

    __slots__ = ("cached_tokens", "client_gone", "failure", "first_byte_at", "prompt_tokens",
                 "status")

    def __init__(self) -> None:
        self.status = 0
        self.first_byte_at: float | None = None
        self.failure: BodyFailed | None = None   # the instance's body broke off mid-relay
        self.client_gone = False
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
    m.inference_requests.labels(decode.url if decode else "", mixed.url if mixed else "",
                                prefill.url if prefill else "", status).inc()
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
