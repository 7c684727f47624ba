"""Remote metrics snapshot of one instance, as scraped from its ``/metrics`` (contract §6.3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsSnapshot:
    running: float
    waiting: float
    taken_at: float                          # time.monotonic() when the scrape started
    available_gpu_block_num: float | None = None
    max_batch_size: float | None = None
    gpu_cache_usage_perc: float | None = None
