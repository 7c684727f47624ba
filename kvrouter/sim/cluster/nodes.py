"""Per-core and per-request state of the simulation, and read-only access to the cores.

``cached_prefix_tokens`` is the simulator's ground truth of a core's prefix cache (used by the
oracle and the PD transfer size); ``gauge`` reads the snapshot fields from a core's gauges.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvrouter.load import Lease
from kvrouter.prefix.hashing import block_hashes
from kvrouter.registry import Instance
from kvrouter.sim.cluster.results import CoreStats, RequestResult
from kvrouter.sim.core import CoreRequest, EngineCoreAPI
from kvrouter.sim.workloads import WorkloadRequest

__all__ = [
    "GAUGES",
    "CoreFactory",
    "Flight",
    "Node",
    "cached_prefix_tokens",
    "calibrate_prefill",
    "core_param",
    "gauge",
]

CoreFactory = Callable[[int], EngineCoreAPI]   # index → a fresh core

# Gauge names tried, in order, for the snapshot fields (vLLM / FastDeploy / bare).
GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("fastdeploy:num_requests_running", "vllm:num_requests_running",
                "num_requests_running", "running"),
    "waiting": ("fastdeploy:num_requests_waiting", "vllm:num_requests_waiting",
                "num_requests_waiting", "waiting"),
    "available_gpu_block_num": ("fastdeploy:available_gpu_block_num",
                                "available_gpu_block_num", "available_blocks", "free_blocks"),
    "max_batch_size": ("fastdeploy:max_batch_size", "max_batch_size", "max_num_seqs"),
    "gpu_cache_usage_perc": ("fastdeploy:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
                             "gpu_cache_usage_perc", "kv_cache_usage_perc", "kv_usage_perc"),
}



# ---------------------------------------------------------------------------- core access
def cached_prefix_tokens(core: Any, tokens: list[int],
                         hashes: dict[int, list[int]] | None = None) -> int | None:
    """Prompt tokens of ``tokens`` the core would serve from its prefix cache right now (no
    side effects), or ``None`` when the core offers no way to ask.

    Not part of ``EngineCoreAPI`` (the simulator's ground truth, used by the oracle and the PD
    transfer size): a ``cached_prefix_tokens(tokens)`` method if the core has one, else a
    read-only ``core.kv.match`` of the kvrouter block hashes at ``core.block_size`` (the
    :class:`~kvrouter.sim.core.engine.EngineCore` layout), capped like its admission (the
    last prompt token is always computed). ``hashes`` memoises the hashes per block size.
    """
    fn = getattr(core, "cached_prefix_tokens", None)
    if callable(fn):
        return int(fn(tokens))
    kv = getattr(core, "kv", None)
    bs = getattr(core, "block_size", None)
    match = getattr(kv, "match", None)
    if not callable(match) or not isinstance(bs, int) or bs < 1:
        return None
    if not getattr(kv, "enable_prefix_caching", True) or len(tokens) < 1:
        return 0
    hs = hashes.get(bs) if hashes is not None else None
    if hs is None:
        hs = block_hashes(tokens, bs)
        if hashes is not None:
            hashes[bs] = hs
    return len(match(hs, (len(tokens) - 1) // bs)) * bs


def core_param(core: Any, name: str) -> float | None:
    """A positive number ``core.params.<name>`` (or ``core.<name>``), else None."""
    for holder in (getattr(core, "params", None), core):
        v = getattr(holder, name, None) if holder is not None else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return None


def gauge(g: dict[str, float], field_name: str) -> float | None:
    for key in GAUGES[field_name]:
        if key in g:
            return float(g[key])
    return None


@dataclass(eq=False)
class Node:
    index: int
    inst: Instance
    core: EngineCoreAPI
    role: str                          # "mixed" | "prefill" | "decode"
    stats: CoreStats
    busy: bool = False
    wake_at: float | None = None
    inflight: int = 0                  # requests on this core (router view of the sim)
    occupied_since: float = 0.0
    pending_prefill: int = 0           # uncached prompt tokens not yet prefilled (oracle)
    sec_per_prefill_token: float = 0.0
    handoffs: dict[str, Flight] = field(default_factory=dict)  # decode: waiting for xfer


@dataclass(eq=False)
class Flight:
    req: WorkloadRequest
    res: RequestResult
    node: Node                        # mixed or decode
    lease: Lease
    creq: CoreRequest | None = None    # on node
    pnode: Node | None = None
    p_lease: Lease | None = None
    p_creq: CoreRequest | None = None
    p_released: bool = False
    prefill_estimate: int = 0          # oracle bookkeeping
    last_token_at: float | None = None
    done: bool = False


def calibrate_prefill(core_factory: CoreFactory, index: int) -> float:
    """Seconds per prefill token of a core, from one planned step on a throwaway core."""
    core = core_factory(index)
    rng = random.Random(f"calibrate:{index}")
    n = 2048
    core.add_request(CoreRequest("calibrate", [rng.randrange(65536) for _ in range(n)], 1), 0.0)
    step = core.next_step(0.0)
    if step is None or step.prefill_tokens <= 0:
        return 1e-4
    return step.duration / step.prefill_tokens

