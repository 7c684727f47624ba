"""The simulated inference engine core: scheduler, KV cache, timing.

    core = make_engine_core("qwen3-32b-tp2-h100", seed=1, block_size=16)
    core.add_request(CoreRequest("r1", prompt_tokens=[...], max_tokens=64), now=0.0)
    step = core.next_step(0.0)                 # None: nothing runnable (see next_wakeup())
    events = core.finish_step(step, 0.0 + step.duration)

The core never reads a clock; a driver owns time (:mod:`.virtual` for virtual time, the HTTP
simulator's :class:`kvrouter.sim.engine.RealtimeEngine` for real time).
"""

from __future__ import annotations

from typing import Any

from kvrouter.sim.core.api import (
    PHASE_DECODE,
    PHASE_FULL,
    PHASE_PREFILL,
    CoreRequest,
    EngineCoreAPI,
    Step,
    TokenEvent,
)
from kvrouter.sim.core.engine import EngineCore
from kvrouter.sim.core.kvcache import KVCache
from kvrouter.sim.core.params import (
    DEFAULT_PRESET,
    PRESETS,
    TIMING_MODELS,
    EngineParams,
    make_params,
)
from kvrouter.sim.core.timing import BatchEntry, Jitter, TimingModel, make_timing


def make_engine_core(preset_or_params: str | EngineParams = DEFAULT_PRESET, seed: int = 0,
                     **overrides: Any) -> EngineCore:
    """An :class:`EngineCore` for a preset name or given params, with field overrides."""
    return EngineCore(make_params(preset_or_params, **overrides), seed=seed)


__all__ = [
    "DEFAULT_PRESET",
    "PHASE_DECODE",
    "PHASE_FULL",
    "PHASE_PREFILL",
    "PRESETS",
    "TIMING_MODELS",
    "BatchEntry",
    "CoreRequest",
    "EngineCore",
    "EngineCoreAPI",
    "EngineParams",
    "Jitter",
    "KVCache",
    "Step",
    "TimingModel",
    "TokenEvent",
    "make_engine_core",
    "make_params",
    "make_timing",
]
