"""A minimal virtual-time driver for one engine core (tests, quick calibration checks).

:func:`run_virtual` feeds timed arrivals into a core and runs it on a simulated clock until
every request has ended (or ``until``). Prefill-phase requests are released
``release_after`` seconds after their token (the modelled KV hand-off). The cluster simulator
(:mod:`kvrouter.sim.cluster`) has its own event loop over many cores; this one is deliberately
small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvrouter.sim.core.api import (
    PHASE_PREFILL,
    CoreRequest,
    EngineCoreAPI,
    Step,
    TokenEvent,
)


@dataclass
class VirtualRun:
    end: float = 0.0
    events: list[tuple[float, TokenEvent]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def run_virtual(core: EngineCoreAPI, arrivals: Iterable[tuple[float, CoreRequest]], *,
                start: float = 0.0, until: float | None = None, release_after: float = 0.0,
                on_event: Callable[[float, TokenEvent], None] | None = None,
                max_steps: int = 10_000_000) -> VirtualRun:
    pending = sorted(arrivals, key=lambda a: a[0])
    phases = {req.request_id: req.phase for _, req in pending}
    releases: list[tuple[float, str]] = []
    run = VirtualRun()
    t = start
    k = 0
    for _ in range(max_steps):
        while k < len(pending) and pending[k][0] <= t:
            core.add_request(pending[k][1], pending[k][0])
            k += 1
        releases.sort()
        while releases and releases[0][0] <= t:
            core.release_prefill(releases.pop(0)[1])
        if until is not None and t >= until:
            break
        step = core.next_step(t)
        if step is None:
            candidates = [x for x in (core.next_wakeup(),
                                      pending[k][0] if k < len(pending) else None,
                                      releases[0][0] if releases else None) if x is not None]
            if not candidates:
                break
            t = max(t, min(candidates))
            continue
        end = t + step.duration
        while k < len(pending) and pending[k][0] <= end:     # arrivals during the step
            core.add_request(pending[k][1], pending[k][0])
            k += 1
        events = core.finish_step(step, end)
        run.steps.append(step)
        t = end
        for ev in events:
            run.events.append((t, ev))
            if on_event is not None:
                on_event(t, ev)
            if ev.finished and ev.index >= 0 and phases.get(ev.request_id) == PHASE_PREFILL:
                releases.append((t + release_after, ev.request_id))
    run.end = t
    return run
