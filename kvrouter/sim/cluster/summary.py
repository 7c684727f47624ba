"""Aggregate metrics of a cluster run (``summarize``) and the percentile they use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrouter.sim.cluster.results import RequestResult

__all__ = ["percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(ttfts: Sequence[float], itls: Sequence[float]) -> dict[str, float]:
    """TTFT mean/p50/p90/p99 and ITL mean/p50/p99 (seconds; NaN when empty)."""
    return {
        "ttft_mean": sum(ttfts) / len(ttfts) if ttfts else math.nan,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99),
        "itl_mean": sum(itls) / len(itls) if itls else math.nan,
        "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
    }


def summarize(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Aggregate metrics of one run.

    ``throughput`` = output tokens of completed requests / (last end − first arrival);
    percentiles over completed requests (ITLs pooled over all their token gaps);
    ``token_hit_rate`` = Σ cached / Σ prompt tokens of the requests that reached a core
    (including aborted and timed-out ones); ``per_instance`` counts routed requests.
    ``rejected``: requests the admission queue answered without an instance (not in
    ``failed``, which counts the routed ones that did not complete).
    """
    done = [r for r in results if r.ok]
    rejected = sum(1 for r in results if r.rejected is not None)
    failed = len(results) - len(done) - rejected
    ttfts = [r.ttft for r in done if r.ttft is not None]
    itls = [x for r in done for x in r.itls]
    e2es = [r.e2e for r in done if r.e2e is not None]
    start = min((r.arrival for r in results), default=0.0)
    end = max((r.end for r in results if r.end is not None), default=start)
    span = end - start
    out_tokens = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in results if r.rejected is None)
    cached = sum(r.cached_tokens for r in results)
    per_instance: dict[str, int] = {}
    per_prefill: dict[str, int] = {}
    for r in results:
        if r.rejected is not None:
            continue
        per_instance[r.instance] = per_instance.get(r.instance, 0) + 1
        if r.prefill_instance is not None:
            per_prefill[r.prefill_instance] = per_prefill.get(r.prefill_instance, 0) + 1
    out: dict[str, Any] = {
        "requests": len(results),
        "completed": len(done),
        "failed": failed,
        "rejected": rejected,
        "duration": span,
        "throughput": out_tokens / span if span > 0 else 0.0,
        "request_throughput": len(done) / span if span > 0 else 0.0,
        **latency_stats(ttfts, itls),
        "e2e_p50": percentile(e2es, 50),
        "e2e_p99": percentile(e2es, 99),
        "queue_time_mean": (sum(r.queue_time for r in done if r.queue_time is not None)
                            / max(1, sum(1 for r in done if r.queue_time is not None))),
        "token_hit_rate": cached / prompt if prompt else 0.0,
        "preemptions": sum(r.preemptions for r in results),
        "per_instance": dict(sorted(per_instance.items())),
    }
    if per_prefill:
        out["per_prefill_instance"] = dict(sorted(per_prefill.items()))
    return out

