"""Parameters of the simulated engine: model shape, GPU, efficiencies, scheduler, timing.

Every number below comes from public model cards, datasheets and the published simulators
named next to it:

* **GPU (H100 SXM)**: 989 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB (NVIDIA H100 datasheet).
  With TP > 1 every layer adds two all-reduces of 5 µs each (NCCL small-message latency, an
  assumption to calibrate). Their volume term (NVLink 900 GB/s bidirectional, ~450 GB/s one
  way) is off by default: the MFU values are end-to-end figures that already include it.
* **Efficiencies**: ``mfu_prefill`` 0.45 and ``mfu_decode`` 0.30 are the "from published
  benchmarks" values BLIS's roofline mode uses; ``eta_mem`` 0.7 and ``step_overhead`` 2 ms
  are assumptions to calibrate (Dynamo mocker's decode floor is 5.74 ms).
* **Models**: Llama-3.1-8B (8.03 B params, 32 layers, d_model 4096, 8 KV heads × 128),
  Qwen3-32B (32.8 B, 64 layers, d_model 5120, 8 KV heads × 128), Llama-3.1-70B (70.6 B,
  80 layers, d_model 8192, 8 KV heads × 128) — the Hugging Face ``config.json`` of each model.
  BF16 weights and KV cache (2 bytes).
* **Scheduler**: vLLM V1 / FastDeploy defaults — ``max_num_seqs`` 256,
  ``max_num_batched_tokens`` 8192, chunked prefill on, watermark 1 %; block size 64
  (FastDeploy ``--block-size`` default; vLLM's is 16).
* **KV capacity**: Qwen3-32B TP2 uses the 307,328 KV tokens per pod llm-d measured ("KV-Cache
  Wins You Can See", 2025-09-24). The others are derived from the memory budget:
  ``TP × (gpu_mem × gpu_mem_util − activation_reserve) − weights``, divided by the KV bytes
  per token (2 × layers × kv_heads × head_dim × dtype_bytes). ``activation_reserve`` (4 GB per
  GPU: the profiling run's activation peak + CUDA graphs) is our assumption; with it the 8B
  preset lands near the "~400k tokens (0.9 util)" vLLM reports for it.
* **Timing models**: ``roofline`` (default), ``mocker-poly`` (Dynamo
  mocker's built-in polynomials: prefill ms = 16.50142 + 1.518344e-2·T + 4.209989e-7·T²,
  decode ms = 5.74 + 54.01·u − 25.74·u²), ``linear`` (llm-d-inference-sim style: prefill
  overhead + per-token time, fixed ITL, optional load factor).
* **PD link**: 50 GB/s for a 400 Gb/s RDMA NIC, 300 GB/s intra-node (IPC/NVLink).

Derived with the ``roofline`` model (ms; jitter off) next to the reference table (in
parentheses), which keeps only the linear term (prefill = 2·P·T / (F·TP·MFU)); attention, the
2 ms step overhead and the TP all-reduce latency put the full model above it, most for long
prompts (tok/s: prefill throughput; KV/tok: KV bytes per token; KV cap: KV cache capacity in
tokens)::

    preset               KV/tok   tok/s  1k/8k prompt       decode B=1/32/128 (ctx 2k)       KV cap
    llama3-8b-h100       128 KiB  27.7k  38.7/328 (36/289)  9.0/12.4/23.2 (8.9/12.4/23.2)    396,270
    qwen3-32b-tp2-h100   256 KiB  13.6k  77.1/639 (74/590)  16.7/20.2/30.9 (16.0/19.6/30.3)  307,328
    llama3-70b-tp4-h100  320 KiB  12.6k  82.9/685 (79/635)  17.9/20.1/26.8 (17.1/19.3/26.0)  399,169

``make_params(preset, **overrides)`` or ``params.replace(**overrides)`` change any field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TIMING_MODELS = ("roofline", "mocker-poly", "linear")

GB = 1e9


@dataclass(frozen=True)
class EngineParams:
    """Everything the engine core needs; times in seconds, sizes in bytes, rates per second."""

    name: str = "custom"

    # --- model -----------------------------------------------------------------------
    n_params: float = 8.03e9          # parameters (weights read once per step)
    n_layers: int = 32
    d_model: int = 4096
    n_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2              # KV cache element size (BF16)
    weight_bytes_per_param: float = 2.0   # BF16 weights (1.0 for FP8)
    tp: int = 1                       # tensor-parallel degree

    # --- GPU (per device) ----------------------------------------------------------------
    gpu_flops: float = 989e12         # dense BF16 FLOP/s (H100 SXM datasheet)
    gpu_hbm_bw: float = 3.35e12       # bytes/s (H100 SXM datasheet)
    gpu_mem: float = 80 * GB          # bytes (H100 SXM datasheet)
    gpu_mem_util: float = 0.9         # vLLM --gpu-memory-utilization default
    activation_reserve: float = 4 * GB  # per GPU, our assumption (profiling peak + CUDA graphs)
    allreduce_latency: float = 5e-6   # seconds per all-reduce (NCCL small messages; assumption)
    nvlink_bw: float | None = None    # one-way bytes/s for an all-reduce volume term (None: off,
                                      # the end-to-end MFU already pays for it; H100: ~450e9)

    # --- efficiencies (BLIS roofline mode) --------------------------------------------------
    mfu_prefill: float = 0.45
    mfu_decode: float = 0.30
    eta_mem: float = 0.7
    step_overhead: float = 0.002      # seconds per step (scheduler, launch, sampling)

    # --- scheduler -------------------------------------------------------------------------
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 64
    num_gpu_blocks: int | None = None     # None: from kv_capacity_tokens or the memory budget
    kv_capacity_tokens: int | None = None  # a measured capacity (tokens), e.g. llm-d's 307,328
    watermark: float = 0.01               # fraction of blocks kept free at admission
    enable_prefix_caching: bool = True
    max_cached_free_blocks: int | None = None  # cap of the cached-free LRU pool (None: unbounded)

    # --- timing ------------------------------------------------------------------------------
    timing: str = "roofline"
    jitter_sigma: float = 0.03        # log-normal step-time noise (published range: 0.03-0.05)
    # mocker-poly: milliseconds, coefficients (c0, c1, c2) of c0 + c1·x + c2·x²
    poly_prefill_ms: tuple[float, float, float] = (16.50142, 1.518344e-2, 4.209989e-7)
    poly_decode_ms: tuple[float, float, float] = (5.74, 54.01, -25.74)
    poly_decode_floor_ms: float = 1.0
    # linear (llm-d-inference-sim style): seconds
    linear_prefill_overhead: float = 0.05
    linear_prefill_per_token: float = 0.0002
    linear_itl: float = 0.02
    linear_load_factor: float = 1.0   # step-time multiplier at max_num_seqs running (1 = none)

    # --- PD KV transfer ------------------------------------------------------------------------
    pd_rdma_bw: float = 50 * GB       # 400 Gb/s NIC
    pd_ipc_bw: float = 300 * GB       # intra-node
    pd_rdma_setup: float = 0.01       # seconds per transfer (assumption)
    pd_ipc_setup: float = 0.002

    def __post_init__(self) -> None:
        if self.timing not in TIMING_MODELS:
            raise ValueError(f"unknown timing model {self.timing!r}; "
                             f"expected one of {TIMING_MODELS}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tp", "n_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError("num_gpu_blocks must be >= 1")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")
        if self.jitter_sigma < 0:
            raise ValueError("jitter_sigma must be >= 0")

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) × layers × kv_heads × head_dim × dtype bytes (whole model, all TP ranks)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.n_params * self.weight_bytes_per_param

    @property
    def kv_budget_bytes(self) -> float:
        """Memory left for the KV cache on all TP ranks after weights and activations."""
        per_gpu = self.gpu_mem * self.gpu_mem_util - self.activation_reserve
        return max(0.0, self.tp * per_gpu - self.weight_bytes)

    @property
    def kv_capacity(self) -> int:
        """KV capacity in tokens (measured if given, else from the memory budget)."""
        if self.kv_capacity_tokens is not None:
            return int(self.kv_capacity_tokens)
        return int(self.kv_budget_bytes // self.kv_bytes_per_token)

    @property
    def total_blocks(self) -> int:
        """``num_gpu_blocks`` if set, else the capacity in tokens divided by the block size."""
        if self.num_gpu_blocks is not None:
            return int(self.num_gpu_blocks)
        return max(1, self.kv_capacity // self.block_size)

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.total_blocks)

    def transfer_time(self, tokens: int, protocol: str = "rdma") -> float:
        """Modelled PD KV transfer: setup + tokens × KV bytes per token / link bandwidth."""
        if protocol == "ipc":
            return self.pd_ipc_setup + tokens * self.kv_bytes_per_token / self.pd_ipc_bw
        return self.pd_rdma_setup + tokens * self.kv_bytes_per_token / self.pd_rdma_bw

    def replace(self, **overrides: Any) -> EngineParams:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **overrides)


_H100: dict[str, Any] = {"gpu_flops": 989e12, "gpu_hbm_bw": 3.35e12, "gpu_mem": 80 * GB}

PRESETS: dict[str, EngineParams] = {
    # Llama-3.1-8B on one H100: ~27.7k prefill tok/s, decode 8.9/12.4/23.2 ms (B=1/32/128),
    # ~396k KV tokens from the memory budget.
    "llama3-8b-h100": EngineParams(
        name="llama3-8b-h100", n_params=8.03e9, n_layers=32, d_model=4096, n_kv_heads=8,
        head_dim=128, tp=1, **_H100),
    # Qwen3-32B on two H100 (llm-d anchor A1): ~13.6k prefill tok/s, decode 16.0/19.6/30.3 ms,
    # 307,328 KV tokens as measured by llm-d.
    "qwen3-32b-tp2-h100": EngineParams(
        name="qwen3-32b-tp2-h100", n_params=32.8e9, n_layers=64, d_model=5120, n_kv_heads=8,
        head_dim=128, tp=2, kv_capacity_tokens=307_328, **_H100),
    # Llama-3.1-70B on four H100: ~12.6k prefill tok/s, decode 17.1/19.3/26.0 ms,
    # KV capacity from the memory budget (~399k tokens).
    "llama3-70b-tp4-h100": EngineParams(
        name="llama3-70b-tp4-h100", n_params=70.6e9, n_layers=80, d_model=8192, n_kv_heads=8,
        head_dim=128, tp=4, **_H100),
}

DEFAULT_PRESET = "llama3-8b-h100"


def make_params(preset: str | EngineParams = DEFAULT_PRESET, **overrides: Any) -> EngineParams:
    """A preset (by name) or given params, with ``overrides`` applied."""
    if isinstance(preset, EngineParams):
        base = preset
    else:
        try:
            base = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; "
                             f"expected one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
