"""Engine model of the simulator, behind a small interface.

The HTTP layer (:mod:`kvrouter.sim.instance`) only uses :class:`Engine`:

* ``generate(req)`` — async iterator of :class:`TokenOut`; before the first token is yielded
  the engine has filled ``req.cached_tokens``. Closing the iterator early (client gone,
  handler cancelled) frees the request's slot and blocks.
* ``abort(ids)`` / ``abort_all()`` — finish running or waiting requests with ``"abort"``.
* ``gauges()`` — the §8.2 gauge values; ``stats`` — counters and histograms.

:class:`SimpleEngine` is the timing/capacity model of this release: ``max_num_seqs`` running
slots and a FIFO waiting queue; KV blocks of ``block_size`` tokens, admission needs
``ceil(prompt / block_size)`` free blocks and contexts grow one block at a time; an LRU prefix
cache over chained hashes of full prompt blocks; TTFT = base + per-token × uncached prompt
tokens; one output token every ``itl``; every time multiplied by ``time_scale``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kvrouter.sim.metrics import EngineStats
from kvrouter.sim.tokens import index_of_token, output_token_id, output_token_text

Phase = Literal["full", "prefill", "decode"]


@dataclass
class GenRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int | None = None      # client limit (max_tokens / max_completion_tokens)
    ignore_eos: bool = False           # True: generate max_tokens, not the natural length
    start_index: int = 0               # output tokens already generated elsewhere (PD retry)
    phase: Phase = "full"              # prefill: stop after one token; decode: no prefill compute
    first_token_id: int | None = None  # decode: the token handed over by the prefill
    transfer_delay: float = 0.0        # decode: modelled KV transfer, model seconds
    ttft_override: float | None = None  # real seconds
    itl_override: float | None = None   # real seconds
    reschedule_after: int | None = None  # finish with "pd_reschedule" after this many tokens
    # Filled in by the engine:
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None


@dataclass(frozen=True)
class TokenOut:
    index: int            # position in the whole answer (start_index based)
    token_id: int
    text: str
    finish_reason: str | None  # set on the last token only


class Engine(Protocol):
    stats: EngineStats

    def generate(self, req: GenRequest) -> AsyncIterator[TokenOut]: ...

    def abort(self, request_ids: Iterable[str]) -> list[tuple[str, int]]: ...

    def abort_all(self) -> list[tuple[str, int]]: ...

    def gauges(self) -> dict[str, float]: ...


@dataclass
class EngineParams:
    max_num_seqs: int = 8
    block_size: int = 64
    num_gpu_blocks: int = 4096
    enable_prefix_caching: bool = True
    prefix_cache_blocks: int | None = None
    output_tokens: int = 16
    ttft_base: float = 0.05
    prefill_per_token: float = 0.0002
    itl: float = 0.02
    time_scale: float = 0.1


class PrefixCache:
    """LRU set of chained block hashes (full blocks only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
        hashes: list[bytes] = []
        prev = b"\x00" * 8
        for start in range(0, len(tokens) - block_size + 1, block_size):
            block = tokens[start:start + block_size]
            data = prev + struct.pack(f"<{len(block)}Q", *(t & 0xFFFFFFFFFFFFFFFF for t in block))
            prev = hashlib.blake2b(data, digest_size=8).digest()
            hashes.append(prev)
        return hashes

    def match(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lru)


class _Seq:
    __slots__ = ("req", "blocks", "need", "admitted", "waiter", "aborted", "state")

    def __init__(self, req: GenRequest, need: int) -> None:
        self.req = req
        self.need = need
        self.blocks = 0
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[None] | None = None
        self.aborted = False
        self.state = "waiting"


class SimpleEngine:
    def __init__(self, params: EngineParams) -> None:
        self.p = params
        self.stats = EngineStats()
        self.free_blocks = params.num_gpu_blocks
        self.waiting: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}
        self.by_id: dict[str, list[_Seq]] = {}
        cap = params.prefix_cache_blocks if params.prefix_cache_blocks is not None else params.num_gpu_blocks
        self.prefix = PrefixCache(cap)
        self._hit_reqs = 0
        self._reqs = 0
        self._hit_tokens = 0
        self._prompt_tokens = 0
        self._last_ttft = 0.0
        self._last_itl = 0.0

    # -- helpers -----------------------------------------------------------------------
    def _scaled(self, model_seconds: float) -> float:
        return max(0.0, model_seconds * self.p.time_scale)

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.p.block_size))

    def _schedule(self) -> None:
        while self.waiting and len(self.running) < self.p.max_num_seqs:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                continue
            if seq.need > self.free_blocks:
                break  # strict FIFO: the head waits for blocks
            self.waiting.popleft()
            self.free_blocks -= seq.need
            seq.blocks = seq.need
            seq.state = "running"
            self.running[id(seq)] = seq
            if not seq.admitted.done():
                seq.admitted.set_result(None)

    async def _sleep(self, seq: _Seq, seconds: float) -> None:
        if seq.aborted:
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        seq.waiter = fut
        handle = loop.call_later(seconds, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            handle.cancel()
            seq.waiter = None

    def _release(self, seq: _Seq) -> None:
        if seq.state == "running":
            self.running.pop(id(seq), None)
            self.free_blocks += seq.blocks
            seq.blocks = 0
        elif seq.state == "waiting":
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.state = "done"
        lst = self.by_id.get(seq.req.request_id)
        if lst is not None:
            if seq in lst:
                lst.remove(seq)
            if not lst:
                del self.by_id[seq.req.request_id]
        self._schedule()

    def _output_len(self, req: GenRequest) -> tuple[int, str]:
        if req.phase == "prefill":
            return 1, ("length" if req.max_tokens == 1 else "stop")
        if req.ignore_eos and req.max_tokens is not None:
            return req.max_tokens, "length"
        n = self.p.output_tokens
        if req.max_tokens is not None and req.max_tokens <= n:
            return req.max_tokens, "length"
        return n, "stop"

    # -- Engine interface ----------------------------------------------------------------
    async def generate(self, req: GenRequest) -> AsyncIterator[TokenOut]:
        loop = asyncio.get_running_loop()
        req.arrival = loop.time()
        n_prompt = len(req.prompt_token_ids)
        seq = _Seq(req, self.blocks_for(n_prompt))
        self.by_id.setdefault(req.request_id, []).append(seq)
        self.stats.inc("fastdeploy:requests_number")
        if req.max_tokens is not None:
            self.stats.observe("fastdeploy:request_params_max_tokens", req.max_tokens)
        self.waiting.append(seq)
        self._schedule()
        emitted = 0
        try:
            if seq.state == "waiting":
                await seq.admitted
            if seq.aborted:
                req.finish_reason = "abort"
                return
            req.admitted_at = loop.time()
            self.stats.observe("fastdeploy:request_queue_time_seconds", req.admitted_at - req.arrival)

            # Prefill (or KV transfer on a decode instance).
            use_cache = self.p.enable_prefix_caching and req.phase != "decode"
            hashes = PrefixCache.block_hashes(req.prompt_token_ids, self.p.block_size) if use_cache else []
            matched = self.prefix.match(hashes) if use_cache else 0
            req.cached_tokens = matched * self.p.block_size
            uncached = max(0, n_prompt - req.cached_tokens)
            self._reqs += 1
            self._prompt_tokens += n_prompt
            self._hit_tokens += req.cached_tokens
            if req.cached_tokens:
                self._hit_reqs += 1
            self.stats.inc("fastdeploy:prompt_tokens_total", n_prompt)
            self.stats.inc("fastdeploy:prefix_cache_token_num", req.cached_tokens)
            self.stats.inc("fastdeploy:prefix_gpu_cache_token_num", req.cached_tokens)
            self.stats.observe("fastdeploy:request_prompt_tokens", n_prompt)
            if req.phase == "decode":
                delay = self._scaled(req.transfer_delay)
            elif req.ttft_override is not None:
                delay = req.ttft_override
            else:
                delay = self._scaled(self.p.ttft_base + self.p.prefill_per_token * uncached)
            await self._sleep(seq, delay)
            if use_cache:
                self.prefix.insert(hashes)
            prefill_done = loop.time()
            self.stats.observe("fastdeploy:request_prefill_time_seconds", prefill_done - req.admitted_at)

            # Decode.
            n_out, natural_reason = self._output_len(req)
            itl = req.itl_override if req.itl_override is not None else self._scaled(self.p.itl)
            prev_t = prefill_done
            for k in range(n_out):
                if k > 0:
                    await self._sleep(seq, itl)
                if seq.aborted:
                    req.finish_reason = "abort"
                    break
                context = n_prompt + k + 1
                if context > seq.blocks * self.p.block_size:
                    if self.free_blocks > 0:
                        self.free_blocks -= 1
                        seq.blocks += 1
                    elif req.phase == "decode":
                        req.finish_reason = "pd_reschedule"
                        break
                index = req.start_index + k
                if k == 0 and req.first_token_id is not None:
                    index = index_of_token(req.first_token_id)
                token_id = output_token_id(index)
                req.generated.append(token_id)
                now = loop.time()
                if k == 0:
                    req.first_token_at = now
                    self._last_ttft = now - req.arrival
                    self.stats.observe("fastdeploy:time_to_first_token_seconds", self._last_ttft)
                else:
                    self._last_itl = now - prev_t
                    self.stats.observe("fastdeploy:time_per_output_token_seconds", self._last_itl)
                prev_t = now
                self.stats.inc("fastdeploy:generation_tokens_total")
                emitted += 1
                finish: str | None = None
                if req.reschedule_after is not None and emitted >= req.reschedule_after:
                    finish = "pd_reschedule"
                elif k == n_out - 1:
                    finish = natural_reason
                if finish is not None:
                    req.finish_reason = finish
                yield TokenOut(index, token_id, output_token_text(index), finish)
                if finish is not None:
                    break
                if seq.aborted:
                    req.finish_reason = "abort"
                    break
            end = loop.time()
            if req.finish_reason in ("stop", "length"):
                self.stats.inc("fastdeploy:request_success_total")
            self.stats.observe("fastdeploy:e2e_request_latency_seconds", end - req.arrival)
            self.stats.observe("fastdeploy:request_inference_time_seconds", end - req.admitted_at)
            self.stats.observe("fastdeploy:request_decode_time_seconds", end - prefill_done)
            self.stats.observe("fastdeploy:request_generation_tokens", emitted)
        finally:
            self._release(seq)

    def _abort_seqs(self, seqs: list[_Seq]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for seq in seqs:
            if seq.aborted or seq.state == "done":
                continue
            seq.aborted = True
            out.append((seq.req.request_id, len(seq.req.generated)))
            if seq.state == "waiting":
                self._release(seq)
                seq.state = "done"
                if not seq.admitted.done():
                    seq.admitted.set_result(None)
            elif seq.waiter is not None and not seq.waiter.done():
                seq.waiter.set_result(None)
        return out

    def abort(self, request_ids: Iterable[str]) -> list[tuple[str, int]]:
        seqs: list[_Seq] = []
        for rid in request_ids:
            seqs.extend(self.by_id.get(rid, ()))
        return self._abort_seqs(seqs)

    def abort_all(self) -> list[tuple[str, int]]:
        return self._abort_seqs([s for lst in self.by_id.values() for s in lst])

    def gauges(self) -> dict[str, float]:
        p = self.p
        running = float(len(self.running))
        waiting = float(len(self.waiting))
        total = float(p.num_gpu_blocks)
        free = float(self.free_blocks)
        hit_token_rate = self._hit_tokens / self._prompt_tokens if self._prompt_tokens else 0.0
        return {
            "fastdeploy:num_requests_running": running,
            "fastdeploy:num_requests_waiting": waiting,
            "fastdeploy:batch_size": running,
            "fastdeploy:max_batch_size": float(p.max_num_seqs),
            "fastdeploy:available_batch_size": float(p.max_num_seqs) - running,
            "fastdeploy:available_gpu_block_num": free,
            "fastdeploy:free_gpu_block_num": free,
            "fastdeploy:max_gpu_block_num": total,
            "fastdeploy:gpu_cache_usage_perc": (total - free) / total if total else 0.0,
            "fastdeploy:available_gpu_resource": free / total if total else 0.0,
            "fastdeploy:first_token_latency": self._last_ttft,
            "fastdeploy:infer_latency": self._last_itl,
            "fastdeploy:hit_req_rate": self._hit_reqs / self._reqs if self._reqs else 0.0,
            "fastdeploy:hit_token_rate": hit_token_rate,
            "fastdeploy:cpu_hit_token_rate": 0.0,
            "fastdeploy:gpu_hit_token_rate": hit_token_rate,
            "fastdeploy:cache_config_info": 1.0,
        }

