"""The engine core's interface, shared by its two drivers (virtual time and real time).

A driver owns the clock. It adds requests, asks for the next step, waits ``step.duration``
(simulated or real seconds), then finishes the step and delivers the token events. The core
itself never sleeps and never reads a clock, so the same code runs in a discrete-event
simulation and behind an HTTP server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

PHASE_FULL = "full"        # a mixed instance: prefill then decode
PHASE_PREFILL = "prefill"  # a PD prefill instance: prefill, one token, hold blocks until released
PHASE_DECODE = "decode"    # a PD decode instance: wait for the KV transfer, then decode


@dataclass(eq=False)
class CoreRequest:
    """One request inside an engine; the outcome fields are filled by the core."""

    request_id: str
    prompt_tokens: list[int]          # token ids; prefix caching hashes full blocks of these
    max_tokens: int
    phase: str = PHASE_FULL
    transfer_time: float = 0.0        # decode phase: seconds from admission until the KV arrived
    start_index: int = 0              # index of the first output token this core emits
    hold_first: float = 0.0           # seconds the prefill waits after admission (a TTFT override)
    hold_between: float = 0.0         # minimum seconds between two output tokens (an ITL override)
    # outcome (ground truth only the simulator knows)
    arrival: float = 0.0
    first_scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0            # prompt tokens served from the prefix cache (full blocks)
    output_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None  # "length" | "abort" | "pd_reschedule" (decode out of blocks)


@dataclass
class TokenEvent:
    request_id: str
    index: int                        # 0-based output token index (-1: no token, the request ended)
    token_id: int
    finished: bool
    finish_reason: str | None = None


@dataclass
class Step:
    """A planned engine step: its duration and what it computes (for the driver and reports)."""

    duration: float                   # seconds
    prefill_tokens: int = 0           # new (uncached) prompt tokens computed in this step
    decode_tokens: int = 0
    request_ids: list[str] = field(default_factory=list)
    start: float = 0.0                # the ``now`` the step was planned at
    batch_size: int = 0               # requests computed in the step
    kv_usage: float = 0.0             # KV usage (0..1) when planned


class EngineCoreAPI(Protocol):
    def add_request(self, req: CoreRequest, now: float) -> None: ...
    def abort(self, request_id: str, now: float) -> bool: ...
    def release_prefill(self, request_id: str) -> None: ...
    def next_step(self, now: float) -> Step | None: ...
    def next_wakeup(self) -> float | None: ...
    def finish_step(self, step: Step, now: float) -> list[TokenEvent]: ...
    def gauges(self) -> dict[str, float]: ...
