"""The remote metrics snapshot of one instance: what the policies read from its ``/metrics``.

Engine-neutral: each engine's gauge names are mapped onto these fields by its entry in
:mod:`kvrouter.backends.engines`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsSnapshot:
    running: float                           # requests in the running batch
    waiting: float                           # requests queued for admission
    taken_at: float                          # time.monotonic() when the scrape started
    available_gpu_block_num: float | None = None   # free KV-cache blocks
    max_batch_size: float | None = None      # the engine's batch cap (a static setting)
    gpu_cache_usage_perc: float | None = None      # KV-cache usage, a fraction (1 = full)
