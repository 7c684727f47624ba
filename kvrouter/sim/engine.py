"""Engine model of the simulator, behind a small interface.

The HTTP layer (:mod:`kvrouter.sim.instance`) only uses :class:`Engine`:

* ``generate(req)`` — async iterator of :class:`TokenOut`; before the first token is yielded
  the engine has filled ``req.cached_tokens``. Closing the iterator early (client gone,
  handler cancelled) frees the request's slot and blocks.
* ``abort(ids)`` / ``abort_all()`` — finish running or waiting requests with ``"abort"``.
* ``gauges()`` — the gauge values of docs/fastdeploy.md#instance-surface; ``stats`` — counters
  and histograms.

:class:`RealtimeEngine` runs the engine core of :mod:`kvrouter.sim.core` in real
time: one asyncio task per instance plans a step (``next_step``), sleeps ``duration ×
time_scale``, applies it (``finish_step``) and hands the token events to the waiting HTTP
handlers. The core keeps *model* time: a model clock that follows the wall clock divided by
``time_scale`` (it may lag by up to ``max_lag`` real seconds, so that sub-millisecond steps,
which asyncio cannot sleep precisely, still add up to the modelled time on average). With
``time_scale == 0`` the clock is purely virtual: steps take no real time and model time only
advances by step durations (and by waits, converted with a scale of ``MIN_SCALE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kvrouter.sim.core.api import CoreRequest, TokenEvent
from kvrouter.sim.core.engine import EngineCore
from kvrouter.sim.metrics import EngineStats
from kvrouter.sim.tokens import index_of_token, output_token_id, output_token_text

log = logging.getLogger("kvrouter.sim")

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
    @property
    def stats(self) -> EngineStats: ...

    def generate(self, req: GenRequest) -> AsyncGenerator[TokenOut, None]: ...

    def abort(self, request_ids: Iterable[str]) -> list[tuple[str, int]]: ...

    def abort_all(self) -> list[tuple[str, int]]: ...

    def gauges(self) -> dict[str, float]: ...


def output_length(req: GenRequest, natural_tokens: int) -> tuple[int, str]:
    """Tokens to generate and the finish reason when they are all out."""
    if req.phase == "prefill":
        return 1, ("length" if req.max_tokens == 1 else "stop")
    if req.ignore_eos and req.max_tokens is not None:
        return req.max_tokens, "length"
    if req.max_tokens is not None and req.max_tokens <= natural_tokens:
        return req.max_tokens, "length"
    return natural_tokens, "stop"


class _Stream:
    __slots__ = ("aborted", "core_req", "emitted", "gen", "queue")

    def __init__(self, gen: GenRequest, core_req: CoreRequest) -> None:
        self.gen = gen
        self.core_req = core_req
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.emitted = 0
        self.aborted = False


class RealtimeEngine:
    """:class:`Engine` over an :class:`~kvrouter.sim.core.engine.EngineCore`, in real time.

    Knob overrides (real seconds) become pacing holds of the core for that request: a TTFT
    override holds its prefill that long after admission, an ITL override keeps that gap
    between its tokens; the request keeps its slot and blocks meanwhile, and the modelled step
    times still apply on top. A decode-phase request waits ``transfer_delay`` model seconds
    after admission (its KV transfer) before its first decode step.
    """

    #: smallest time scale used for the model clock (``time_scale=0`` runs as fast as possible)
    MIN_SCALE = 1e-6

    def __init__(self, core: EngineCore, *, time_scale: float = 0.1, output_tokens: int = 16,
                 max_lag: float = 0.02, truth_limit: int = 10_000) -> None:
        self.core = core
        self.time_scale = time_scale
        self.scale = max(float(time_scale), self.MIN_SCALE)
        self.virtual = time_scale <= 0
        self.output_tokens = output_tokens
        self.max_lag = max_lag
        self._stats = EngineStats()
        self._streams: dict[str, _Stream] = {}           # core request id -> stream
        self._by_public: dict[str, list[str]] = {}       # public request id -> core ids
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._vclock = 0.0
        self._busy = False
        self._last_ttft = 0.0
        self._last_itl = 0.0
        self.truth: deque[dict[str, Any]] = deque(maxlen=truth_limit)

    # -- clock and driver -----------------------------------------------------------------------
    def model_now(self) -> float:
        """Model seconds since the driver started (never decreasing)."""
        if self._loop is None or self.virtual:
            return self._vclock
        real = (self._loop.time() - self._t0) / self.scale
        if self._busy:
            real -= self.max_lag / self.scale
        t = max(self._vclock, real)
        self._vclock = t
        return t

    def _ensure_driver(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        if self._loop is not loop:
            self._loop = loop
            self._t0 = loop.time() - self._vclock * self.scale
        self._wake = asyncio.Event()
        self._busy = False
        self._task = loop.create_task(self._drive(), name="sim-engine-driver")

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _drive(self) -> None:
        core, loop = self.core, asyncio.get_running_loop()
        assert self._wake is not None
        wake = self._wake
        try:
            while True:
                t = self.model_now()
                step = core.next_step(t)
                if step is None:
                    self._busy = False
                    wake_at = core.next_wakeup()
                    wake.clear()
                    if wake_at is None:
                        await wake.wait()
                        continue
                    timeout = max(0.0, (wake_at - t) * self.scale)
                    try:
                        await asyncio.wait_for(wake.wait(), timeout)
                    except TimeoutError:
                        self._vclock = max(self._vclock, wake_at)
                    continue
                self._busy = True
                end = t + step.duration
                delay = 0.0 if self.virtual else self._t0 + end * self.scale - loop.time()
                await asyncio.sleep(max(0.0, delay))
                end = max(end, self._vclock)
                self._vclock = end
                for ev in core.finish_step(step, end):
                    stream = self._streams.get(ev.request_id)
                    if stream is not None:
                        stream.queue.put_nowait(ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - a bug in the core must not hang every request
            log.exception("sim engine driver failed; aborting its requests")
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(
                    TokenEvent(stream.core_req.request_id, -1, -1, True, "abort"))

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- Engine interface -------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """Counters and histograms; token counters come from the core."""
        c, core = self._stats.counters, self.core
        c["fastdeploy:prompt_tokens_total"] = float(core.prompt_tokens_total)
        c["fastdeploy:prefix_cache_token_num"] = float(core.cached_tokens_total)
        c["fastdeploy:prefix_gpu_cache_token_num"] = float(core.cached_tokens_total)
        c["fastdeploy:generation_tokens_total"] = float(core.generation_tokens_total)
        return self._stats

    async def generate(self, req: GenRequest) -> AsyncGenerator[TokenOut, None]:
        self._ensure_driver()
        loop = asyncio.get_running_loop()
        stats = self._stats
        n_out, natural = output_length(req, self.output_tokens)
        limit = n_out if req.reschedule_after is None else max(1, min(n_out, req.reschedule_after))
        hold_first = 0.0
        if req.ttft_override is not None and req.phase != "decode":
            hold_first = max(0.0, req.ttft_override) / self.scale
        hold_between = 0.0
        if req.itl_override is not None:
            hold_between = max(0.0, req.itl_override) / self.scale
        uid = f"{req.request_id}#{next(self._ids)}"
        creq = CoreRequest(
            request_id=uid, prompt_tokens=list(req.prompt_token_ids) or [0], max_tokens=limit,
            phase=req.phase, transfer_time=max(0.0, req.transfer_delay),
            start_index=req.start_index, hold_first=hold_first, hold_between=hold_between)
        stream = _Stream(req, creq)
        self._streams[uid] = stream
        self._by_public.setdefault(req.request_id, []).append(uid)
        req.arrival = loop.time()
        stats.inc("fastdeploy:requests_number")
        if req.max_tokens is not None:
            stats.observe("fastdeploy:request_params_max_tokens", req.max_tokens)
        self.core.add_request(creq, self.model_now())
        self._kick()
        prev_t = req.arrival
        prefill_done: float | None = None
        try:
            while True:
                ev = await stream.queue.get()
                if ev.index < 0:   # ended without a token (abort, pd_reschedule, ...)
                    req.finish_reason = "abort" if stream.aborted else (ev.finish_reason or "abort")
                    break
                now = loop.time()
                if stream.emitted == 0:
                    req.cached_tokens = creq.cached_tokens
                    req.first_token_at = now
                    prefill_done = now
                    if creq.first_scheduled_at is not None:
                        queued = (creq.first_scheduled_at - creq.arrival) * self.scale
                        req.admitted_at = req.arrival + queued
                        stats.observe("fastdeploy:request_queue_time_seconds",
                                      req.admitted_at - req.arrival)
                        stats.observe("fastdeploy:request_prefill_time_seconds",
                                      now - req.admitted_at)
                    self._last_ttft = now - req.arrival
                    stats.observe("fastdeploy:time_to_first_token_seconds", self._last_ttft)
                    index = ev.index if req.first_token_id is None \
                        else index_of_token(req.first_token_id)
                else:
                    self._last_itl = now - prev_t
                    stats.observe("fastdeploy:time_per_output_token_seconds", self._last_itl)
                    index = ev.index
                prev_t = now
                stream.emitted += 1
                token_id = output_token_id(index)
                req.generated.append(token_id)
                finish: str | None = None
                if ev.finished:
                    if req.reschedule_after is not None and stream.emitted >= req.reschedule_after:
                        finish = "pd_reschedule"
                    else:
                        finish = natural
                    req.finish_reason = finish
                yield TokenOut(index, token_id, output_token_text(index), finish)
                if finish is not None:
                    break
                if stream.aborted:
                    req.finish_reason = "abort"
                    break
        finally:
            self._close_stream(stream)
            end = loop.time()
            if req.finish_reason is None:
                req.finish_reason = "abort"
            if req.finish_reason in ("stop", "length"):
                stats.inc("fastdeploy:request_success_total")
            stats.observe("fastdeploy:e2e_request_latency_seconds", end - req.arrival)
            if creq.first_scheduled_at is not None:
                stats.observe("fastdeploy:request_prompt_tokens", len(req.prompt_token_ids))
                admitted = req.admitted_at if req.admitted_at is not None else req.arrival
                stats.observe("fastdeploy:request_inference_time_seconds", end - admitted)
            if prefill_done is not None:
                stats.observe("fastdeploy:request_decode_time_seconds", end - prefill_done)
            stats.observe("fastdeploy:request_generation_tokens", stream.emitted)
            self._record(stream, end)

    def _close_stream(self, stream: _Stream) -> None:
        uid = stream.core_req.request_id
        core = self.core
        if core.request(uid) is not None:
            if stream.gen.phase == "prefill" and stream.core_req.finished_at is not None \
                    and stream.core_req.finish_reason != "abort":
                core.release_prefill(uid)        # the hand-off is done: free the held blocks
            else:
                core.abort(uid, self.model_now())
            self._kick()
        self._streams.pop(uid, None)
        ids = self._by_public.get(stream.gen.request_id)
        if ids is not None:
            with contextlib.suppress(ValueError):
                ids.remove(uid)
            if not ids:
                del self._by_public[stream.gen.request_id]

    def _record(self, stream: _Stream, end_real: float) -> None:
        c, g = stream.core_req, stream.gen

        def since_arrival(t: float | None) -> float | None:
            return None if t is None else t - c.arrival

        self.truth.append({
            "request_id": g.request_id, "core_id": c.request_id, "phase": c.phase,
            "prompt_tokens": len(g.prompt_token_ids), "cached_tokens": c.cached_tokens,
            "output_tokens": stream.emitted, "preemptions": c.preemptions,
            "finish_reason": g.finish_reason, "transfer_time": c.transfer_time,
            "arrival": c.arrival, "queue_time": since_arrival(c.first_scheduled_at),
            "ttft": since_arrival(c.first_token_at), "e2e": since_arrival(c.finished_at),
            "ttft_real": None if g.first_token_at is None else g.first_token_at - g.arrival,
            "e2e_real": end_real - g.arrival,
        })

    def release_prefill(self, request_id: str, gen: GenRequest | None = None) -> None:
        """The prefill's hand-off was sent: free the held blocks of ``request_id`` now (only
        those of ``gen`` when given)."""
        for uid in list(self._by_public.get(request_id, ())):
            stream = self._streams.get(uid)
            if stream is not None and (gen is None or stream.gen is gen) \
                    and stream.core_req.phase == "prefill" \
                    and stream.core_req.finished_at is not None:
                self.core.release_prefill(uid)
        self._kick()

    def _abort_uids(self, uids: list[str]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        now = self.model_now()
        for uid in uids:
            stream = self._streams.get(uid)
            if stream is None or stream.aborted or stream.gen.finish_reason is not None:
                continue
            stream.aborted = True
            self.core.abort(uid, now)
            stream.queue.put_nowait(TokenEvent(uid, -1, -1, True, "abort"))
            out.append((stream.gen.request_id, stream.emitted))
        self._kick()
        return out

    def abort(self, request_ids: Iterable[str]) -> list[tuple[str, int]]:
        uids: list[str] = []
        for rid in request_ids:
            uids.extend(self._by_public.get(rid, ()))
        return self._abort_uids(uids)

    def abort_all(self) -> list[tuple[str, int]]:
        return self._abort_uids(list(self._streams))

    def gauges(self) -> dict[str, float]:
        """The gauges of docs/fastdeploy.md#instance-surface, from the core. Free/available blocks
        both count empty *and* cached-free blocks (an allocation can take either); ``running``
        includes requests waiting for their KV transfer or a pacing hold; held prefill blocks
        are used but not running."""
        g = self.core.gauges()
        running = g["running"]
        total = g["num_gpu_blocks"]
        free = g["available_blocks"]
        max_seqs = g["max_num_seqs"]
        return {
            "fastdeploy:num_requests_running": running,
            "fastdeploy:num_requests_waiting": g["waiting"],
            "fastdeploy:batch_size": running,
            "fastdeploy:max_batch_size": max_seqs,
            "fastdeploy:available_batch_size": max(0.0, max_seqs - running),
            "fastdeploy:available_gpu_block_num": free,
            "fastdeploy:free_gpu_block_num": g["free_blocks"],
            "fastdeploy:max_gpu_block_num": total,
            "fastdeploy:gpu_cache_usage_perc": g["kv_usage_perc"],
            "fastdeploy:available_gpu_resource": free / total if total else 0.0,
            "fastdeploy:first_token_latency": self._last_ttft,
            "fastdeploy:infer_latency": self._last_itl,
            "fastdeploy:hit_req_rate": g["hit_req_rate"],
            "fastdeploy:hit_token_rate": g["hit_token_rate"],
            "fastdeploy:cpu_hit_token_rate": 0.0,
            "fastdeploy:gpu_hit_token_rate": g["hit_token_rate"],
            "fastdeploy:cache_config_info": 1.0,
        }

    def requests_truth(self) -> list[dict[str, Any]]:
        return list(self.truth)
