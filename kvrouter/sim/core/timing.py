"""Step-time models of the engine core.

A step processes a batch of :class:`BatchEntry` (new tokens of one request on top of the
tokens already in its KV cache). Each model maps a batch to a deterministic duration in
seconds; :class:`Jitter` multiplies it by a seeded log-normal factor.

``roofline`` (default, BLIS-style basis functions)::

    n_i, c_i   new tokens and cached context of request i in this step
    attn       = Σ n_i · (c_i + n_i / 2)                  causal attention, tokens × context
    FLOPs      = 2·P·n + 4·L·d_model·attn                 per side (prefill | decode)
    T_comp     = FLOPs_prefill / (F·TP·MFU_prefill) + FLOPs_decode / (F·TP·MFU_decode)
    T_mem      = (W_bytes + Σ (c_i + n_i)·kv_bytes_per_token) / (BW·TP·eta_mem)
    T_tp       = 2·L·latency, TP > 1 (+ 2·L·n·d_model·2 B·2(TP−1)/TP / NVLink BW
                 if nvlink_bw is set)
    T_step     = max(T_comp, T_mem) + step_overhead + T_tp

``mocker-poly`` (Dynamo mocker's ``PerfModel::Polynomial``):
prefill ms = 16.50142 + 1.518344e-2·T + 4.209989e-7·T² over the new prefill tokens T of the
step, decode ms = max(1, 5.74 + 54.01·u − 25.74·u²) with u the KV usage; a step that has both
lasts prefill + decode.

``linear`` (llm-d-inference-sim style): a step with prefill tokens lasts
``prefill_overhead + prefill_per_token · T``; a decode-only step lasts ``itl``; a mixed step
the larger of the two; everything times a load factor growing linearly from 1 (one running
request) to ``linear_load_factor`` (``max_num_seqs`` running).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvrouter.sim.core.params import EngineParams


@dataclass(frozen=True, slots=True)
class BatchEntry:
    new_tokens: int      # tokens computed for this request in the step
    context: int         # tokens already in its KV cache before the step
    decode: bool         # True: one generated token; False: a prefill (or recompute) chunk


class TimingModel(Protocol):
    name: str

    def step_time(self, batch: Sequence[BatchEntry], kv_usage: float) -> float:
        """Deterministic duration (seconds) of one step over ``batch``; ``kv_usage`` in 0..1."""
        ...


class RooflineModel:
    name = "roofline"

    def __init__(self, p: EngineParams) -> None:
        self.p = p
        self._two_p = 2.0 * p.n_params
        self._attn_coef = 4.0 * p.n_layers * p.d_model
        self._prefill_rate = p.gpu_flops * p.tp * p.mfu_prefill
        self._decode_rate = p.gpu_flops * p.tp * p.mfu_decode
        self._mem_rate = p.gpu_hbm_bw * p.tp * p.eta_mem
        self._weights = p.weight_bytes
        self._kv_tok = p.kv_bytes_per_token
        if p.tp > 1:
            ring = 2.0 * (p.tp - 1) / p.tp
            self._ar_fixed = 2 * p.n_layers * p.allreduce_latency
            self._ar_per_token = (2 * p.n_layers * p.d_model * 2 * ring / p.nvlink_bw
                                  if p.nvlink_bw else 0.0)
        else:
            self._ar_fixed = self._ar_per_token = 0.0

    def breakdown(self, batch: Sequence[BatchEntry]) -> dict[str, float]:
        """The terms of :meth:`step_time` (seconds), for reports and tests."""
        pre_tok = dec_tok = 0
        pre_attn = dec_attn = 0.0
        kv_read = 0
        for e in batch:
            n, c = e.new_tokens, e.context
            a = n * (c + n / 2.0)
            if e.decode:
                dec_tok += n
                dec_attn += a
            else:
                pre_tok += n
                pre_attn += a
            kv_read += c + n
        t_comp = ((self._two_p * pre_tok + self._attn_coef * pre_attn) / self._prefill_rate
                  + (self._two_p * dec_tok + self._attn_coef * dec_attn) / self._decode_rate)
        t_mem = (self._weights + kv_read * self._kv_tok) / self._mem_rate
        tokens = pre_tok + dec_tok
        t_tp = self._ar_fixed + self._ar_per_token * tokens if tokens else 0.0
        return {"compute": t_comp, "memory": t_mem, "overhead": self.p.step_overhead,
                "tp_allreduce": t_tp}

    def step_time(self, batch: Sequence[BatchEntry], kv_usage: float = 0.0) -> float:
        if not batch:
            return 0.0
        b = self.breakdown(batch)
        return max(b["compute"], b["memory"]) + b["overhead"] + b["tp_allreduce"]


def _poly_ms(coef: tuple[float, float, float], x: float) -> float:
    return coef[0] + coef[1] * x + coef[2] * x * x


class MockerPolyModel:
    name = "mocker-poly"

    def __init__(self, p: EngineParams) -> None:
        self.p = p

    def step_time(self, batch: Sequence[BatchEntry], kv_usage: float = 0.0) -> float:
        prefill = sum(e.new_tokens for e in batch if not e.decode)
        decodes = any(e.decode for e in batch)
        ms = 0.0
        if prefill:
            ms += _poly_ms(self.p.poly_prefill_ms, prefill)
        if decodes:
            ms += max(self.p.poly_decode_floor_ms, _poly_ms(self.p.poly_decode_ms, kv_usage))
        return ms / 1e3


class LinearModel:
    name = "linear"

    def __init__(self, p: EngineParams) -> None:
        self.p = p

    def step_time(self, batch: Sequence[BatchEntry], kv_usage: float = 0.0) -> float:
        if not batch:
            return 0.0
        p = self.p
        prefill = sum(e.new_tokens for e in batch if not e.decode)
        t = p.linear_prefill_overhead + p.linear_prefill_per_token * prefill if prefill else 0.0
        if any(e.decode for e in batch):
            t = max(t, p.linear_itl)
        if p.linear_load_factor != 1.0 and p.max_num_seqs > 1:
            frac = min(1.0, (len(batch) - 1) / (p.max_num_seqs - 1))
            t *= 1.0 + (p.linear_load_factor - 1.0) * frac
        return t


def make_timing(p: EngineParams) -> TimingModel:
    if p.timing == "roofline":
        return RooflineModel(p)
    if p.timing == "mocker-poly":
        return MockerPolyModel(p)
    if p.timing == "linear":
        return LinearModel(p)
    raise ValueError(f"unknown timing model {p.timing!r}")


class Jitter:
    """Mean-one log-normal multiplier ``exp(N(−σ²/2, σ))`` from a seeded ``random.Random``."""

    def __init__(self, sigma: float, seed: int = 0) -> None:
        self.sigma = float(sigma)
        self.rng = random.Random(seed)
        self._mu = -0.5 * self.sigma * self.sigma

    def sample(self) -> float:
        if self.sigma <= 0:
            return 1.0
        return math.exp(self.rng.gauss(self._mu, self.sigma))
