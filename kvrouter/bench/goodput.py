"""The service-level objective of the policy benchmark and the goodput derived from it.

A request **meets the SLO** when it completed, its TTFT is at most ``ttft`` seconds and its
*mean* inter-token latency — (time of its last token − time of its first token) / (output
tokens − 1), the per-request TPOT of DistServe and Dynamo's goodput — is at most ``itl``
seconds (a request with a single output token has no ITL and is judged on TTFT alone). Failed
and timed-out requests miss it. **Attainment** at one rate = requests meeting the SLO / all
requests of the workload.

**Goodput** over a sweep = the highest swept rate *r* such that the attainment is at least
``attainment`` at *r* and at every lower swept rate (the first miss caps it: a noisy pass
above a failing rate does not count). ``note`` says how to read it: ``"ok"`` (a lower and a
higher rate bracket it), ``"at_least"`` (even the highest swept rate met the SLO: the true
goodput is at least that), ``"below_sweep"`` (the lowest swept rate already missed it:
goodput is reported as 0 and is below that rate).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Slo", "attainment", "goodput", "meets"]


@dataclass(frozen=True)
class Slo:
    ttft: float = 2.0          # seconds (model time)
    itl: float = 0.100         # seconds, per-request mean inter-token latency
    attainment: float = 0.90   # fraction of requests that must meet both


def meets(ok: bool, ttft: float | None, mean_itl: float | None, slo: Slo) -> bool:
    """Whether one request met the SLO (``mean_itl`` None: at most one output token)."""
    if not ok or ttft is None or ttft > slo.ttft:
        return False
    return mean_itl is None or mean_itl <= slo.itl


def attainment(outcomes: Iterable[tuple[bool, float | None, float | None]], slo: Slo) -> float:
    """Fraction of ``(ok, ttft, mean_itl)`` outcomes meeting the SLO (0 when there are none)."""
    total = hits = 0
    for ok, ttft, itl in outcomes:
        total += 1
        hits += meets(ok, ttft, itl, slo)
    return hits / total if total else 0.0


def goodput(points: Sequence[tuple[float, float]], slo: Slo) -> tuple[float, str]:
    """``(goodput, note)`` from ``(rate, attainment)`` points (see the module docstring)."""
    best = 0.0
    ordered = sorted(points)
    for i, (rate, att) in enumerate(ordered):
        if att < slo.attainment:
            return best, ("below_sweep" if i == 0 else "ok")
        best = rate
    return best, ("at_least" if ordered else "below_sweep")
