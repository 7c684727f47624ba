"""The engine core: vLLM-V1 / FastDeploy-like continuous batching over a block KV cache.

Scheduling, once per :meth:`EngineCore.next_step`:

1. **Running requests**, oldest admission first. Each gets ``total − computed`` new tokens
   (a decode: exactly one; a chunked or recomputed prefill: the rest of it), capped by what is
   left of the step budget ``max_num_batched_tokens``. If its KV needs another block and none is
   free, the newest running request is preempted (recompute: its blocks are freed, it goes back
   to the front of the waiting queue, ``preemptions += 1``); if that is the request itself, it
   waits too. A request held by a pacing time (``ready_at``, see below) is skipped this step.
2. **Waiting requests**, FCFS, while budget and ``max_num_seqs`` allow and nothing was
   preempted this step. Admission matches the prompt's chained block hashes against the cache
   (full blocks only, at least one prompt token is always recomputed), then needs free blocks
   for the rest of the prompt while keeping ``watermark`` of the cache free (the watermark is
   waived when no other request holds blocks); the head of the queue blocks the others.
   All prompt blocks are allocated at admission; decode tokens add blocks one at a time.
3. The step's duration comes from the timing model (:mod:`.timing`) times a seeded log-normal
   jitter. Prompt tokens found in the cache are never prefilled.

:meth:`EngineCore.finish_step` applies the step: computed tokens advance, newly completed full
prompt blocks get their hashes (they can be hit from then on, not during the step that computes
them), and every request whose known tokens are all computed samples one output token.

Roles (``CoreRequest.phase``):

* ``full`` — prefill, then decode until ``max_tokens``.
* ``prefill`` — prefill, emit one token with ``finished=True``, then keep the blocks (not
  counted as running) until :meth:`EngineCore.release_prefill` (the KV transfer is done).
* ``decode`` — no prefix cache; blocks for the whole prompt at admission, then wait
  ``transfer_time`` (the KV arrives) before the first decode step, which emits output index
  ``start_index``. A decode request is never recomputed: if it is chosen for preemption it ends
  with ``finish_reason="pd_reschedule"`` (FastDeploy's decode answer when out of blocks), which
  the driver sees as a ``TokenEvent`` with ``index=-1``.

Driver pacing knobs: ``hold_first`` delays the prefill after admission, ``hold_between`` keeps a
minimum gap between two output tokens; the held request keeps its slot and blocks, and
:meth:`EngineCore.next_wakeup` reports when it becomes runnable.

Requests whose context can never fit the cache end with ``finish_reason="length"`` (index -1).
Everything is deterministic for a seed and a call sequence: the core never reads a clock.
"""

from __future__ import annotations

from collections import deque

from kvrouter.prefix.hashing import block_hashes
from kvrouter.sim.core.api import (
    PHASE_DECODE,
    PHASE_PREFILL,
    CoreRequest,
    Step,
    TokenEvent,
)
from kvrouter.sim.core.kvcache import KVCache
from kvrouter.sim.core.params import EngineParams
from kvrouter.sim.core.timing import BatchEntry, Jitter, TimingModel, make_timing
from kvrouter.sim.tokens import output_token_id

WAITING, RUNNING, HELD, DONE = "waiting", "running", "held", "done"


class _Seq:
    """Scheduler state of one request."""

    __slots__ = (
        "admitted",
        "base",
        "blocks",
        "computed",
        "hashes",
        "prompt_len",
        "published",
        "ready_at",
        "req",
        "state",
    )

    def __init__(self, req: CoreRequest, hashes: list[int]) -> None:
        self.req = req
        self.prompt_len = max(1, len(req.prompt_tokens))
        self.base = 1 if req.phase == PHASE_DECODE else 0   # a decode knows its first token
        self.hashes = hashes
        self.blocks: list[int] = []
        self.computed = 0          # tokens whose KV is in the cache
        self.published = 0         # prompt blocks that carry their hash
        self.state = WAITING
        self.ready_at = 0.0
        self.admitted = False

    @property
    def total(self) -> int:
        """Tokens known so far (prompt + sampled outputs); all must be computed to sample."""
        return self.prompt_len + self.base + self.req.output_tokens


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class EngineCore:
    """Implements :class:`kvrouter.sim.core.api.EngineCoreAPI`."""

    def __init__(self, params: EngineParams, seed: int = 0, *,
                 timing: TimingModel | None = None) -> None:
        self.params = params
        self.seed = seed
        self.block_size = params.block_size
        self.kv = KVCache(params.total_blocks, params.block_size,
                          enable_prefix_caching=params.enable_prefix_caching,
                          max_cached_free=params.max_cached_free_blocks)
        self.timing: TimingModel = timing or make_timing(params)
        self.jitter = Jitter(params.jitter_sigma, seed)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.held: dict[str, _Seq] = {}
        self.seqs: dict[str, _Seq] = {}
        self.now = 0.0
        self._plan: list[tuple[_Seq, int]] = []
        self._inflight: Step | None = None
        self._notices: list[TokenEvent] = []
        # counters
        self.requests_total = 0
        self.admitted_total = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.hit_requests_total = 0
        self.preemptions_total = 0
        self.pd_reschedules_total = 0
        self.finished_total = 0
        self.aborted_total = 0
        self.generation_tokens_total = 0
        self.prefill_tokens_total = 0
        self.recomputed_tokens_total = 0
        self.steps_total = 0
        self.busy_seconds = 0.0

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, req: CoreRequest, now: float) -> None:
        if req.request_id in self.seqs:
            raise ValueError(f"request {req.request_id!r} is already in the engine")
        bs = self.block_size
        seq = _Seq(req, [])
        need = _ceil_div(seq.prompt_len + 1, bs)
        if need > self.kv.num_blocks:
            raise ValueError(f"request {req.request_id!r} needs {need} KV blocks, the engine has "
                             f"{self.kv.num_blocks}")
        if self.kv.enable_prefix_caching and req.phase != PHASE_DECODE:
            seq.hashes = block_hashes(req.prompt_tokens, bs)
        req.arrival = now
        req.max_tokens = max(1, int(req.max_tokens))
        self.seqs[req.request_id] = seq
        self.waiting.append(seq)
        self.requests_total += 1

    def abort(self, request_id: str, now: float) -> bool:
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        if seq.state == WAITING:
            self.waiting.remove(seq)
        elif seq.state == RUNNING:
            self.running.remove(seq)
        self._end(seq, "abort", now)
        self.aborted_total += 1
        return True

    def release_prefill(self, request_id: str) -> None:
        """A prefill request's KV has been transferred: free its blocks (no-op otherwise)."""
        seq = self.held.get(request_id)
        if seq is not None:
            self._end(seq, seq.req.finish_reason or "length", seq.req.finished_at or self.now)

    def _end(self, seq: _Seq, reason: str, now: float) -> None:
        """Free everything of ``seq`` (already out of the waiting/running lists)."""
        if seq.blocks:
            self.kv.free(seq.blocks)
            seq.blocks = []
        self.held.pop(seq.req.request_id, None)
        self.seqs.pop(seq.req.request_id, None)
        seq.state = DONE
        req = seq.req
        if req.finish_reason is None or reason == "abort":
            req.finish_reason = reason
        if req.finished_at is None or reason == "abort":
            req.finished_at = now

    def _notice_end(self, seq: _Seq, reason: str, now: float) -> None:
        """End ``seq`` without a token and tell the driver (a ``TokenEvent`` with index -1)."""
        self._end(seq, reason, now)
        seq.req.finish_reason = reason
        self._notices.append(TokenEvent(seq.req.request_id, -1, -1, True, reason))

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, victim: _Seq, now: float) -> None:
        self.running.remove(victim)
        if victim.req.phase == PHASE_DECODE:
            self.pd_reschedules_total += 1
            self._notice_end(victim, "pd_reschedule", now)
            return
        if victim.blocks:
            self.kv.free(victim.blocks)
            victim.blocks = []
        victim.computed = 0
        victim.published = 0
        victim.ready_at = 0.0
        victim.state = WAITING
        victim.req.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(victim)

    def _admit(self, seq: _Seq, now: float) -> bool:
        """Try to give ``seq`` its blocks (prefix hits + new ones); True when admitted."""
        req, kv, bs = seq.req, self.kv, self.block_size
        if req.phase == PHASE_DECODE:
            matched: list[int] = []
            kv_tokens = seq.prompt_len                 # the transferred prompt KV
        else:
            matched = kv.match(seq.hashes, (seq.total - 1) // bs) if seq.hashes else []
            kv_tokens = seq.total
        n_new = _ceil_div(kv_tokens, bs) - len(matched)
        others = bool(self.running) or bool(self.held)
        reserve = self.params.watermark_blocks if others else 0
        if kv.free_after_touch(matched) - n_new < reserve:
            return False
        kv.touch(matched)
        seq.blocks = matched + kv.allocate(n_new)
        seq.published = len(matched)
        seq.state = RUNNING
        if req.phase == PHASE_DECODE:
            seq.computed = seq.prompt_len
        else:
            seq.computed = len(matched) * bs
        if not seq.admitted:
            seq.admitted = True
            self.admitted_total += 1
            req.first_scheduled_at = now
            self.prompt_tokens_total += len(req.prompt_tokens)
            if req.phase != PHASE_DECODE:
                req.cached_tokens = seq.computed
                self.cached_tokens_total += seq.computed
                if seq.computed:
                    self.hit_requests_total += 1
            if req.phase == PHASE_DECODE:
                seq.ready_at = now + max(0.0, req.transfer_time)
            elif req.hold_first > 0:
                seq.ready_at = now + req.hold_first
        else:
            self.recomputed_tokens_total += seq.total - seq.computed
        return True

    def next_step(self, now: float) -> Step | None:
        if self._inflight is not None:
            raise RuntimeError("next_step called before finish_step of the previous step")
        self.now = now
        p, kv, bs = self.params, self.kv, self.block_size
        budget = p.max_num_batched_tokens
        plan: list[tuple[_Seq, int]] = []
        preempted = False

        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.ready_at > now:
                i += 1
                continue
            n = min(seq.total - seq.computed, budget)
            if n <= 0:
                i += 1
                continue
            need = _ceil_div(seq.computed + n, bs) - len(seq.blocks)
            if need > 0:
                while kv.num_free < need:
                    victim = running[-1]
                    if victim is seq and len(running) == 1 and not self.held:
                        # alone and still out of blocks: the context can never fit
                        running.pop()
                        self._notice_end(seq, "length", now)
                        break
                    self._preempt(victim, now)
                    preempted = True
                    if victim is seq:
                        break
                if seq.state != RUNNING:
                    continue          # seq itself left the running list; i now points past it
                seq.blocks += kv.allocate(need)
            plan.append((seq, n))
            budget -= n
            i += 1

        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < p.max_num_seqs:
                seq = waiting[0]
                if _ceil_div(seq.total if seq.req.phase != PHASE_DECODE else seq.prompt_len, bs) \
                        > kv.num_blocks:
                    waiting.popleft()
                    self._notice_end(seq, "length", now)
                    continue
                if not self._admit(seq, now):
                    break
                waiting.popleft()
                running.append(seq)
                if seq.ready_at > now:
                    continue
                n = min(seq.total - seq.computed, budget)
                if n > 0:
                    plan.append((seq, n))
                    budget -= n

        if not plan:
            if not self._notices:
                return None
            step = Step(duration=0.0, start=now, kv_usage=kv.usage)
            self._plan, self._inflight = [], step
            return step

        entries: list[BatchEntry] = []
        prefill_tokens = decode_tokens = 0
        for seq, n in plan:
            is_decode = n == 1 and seq.computed >= seq.prompt_len
            entries.append(BatchEntry(n, seq.computed, is_decode))
            if is_decode:
                decode_tokens += n
            else:
                prefill_tokens += n
        usage = kv.usage
        duration = self.timing.step_time(entries, usage) * self.jitter.sample()
        step = Step(duration=duration, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                    request_ids=[s.req.request_id for s, _ in plan], start=now,
                    batch_size=len(plan), kv_usage=usage)
        self._plan, self._inflight = plan, step
        return step

    def next_wakeup(self) -> float | None:
        """Earliest time a held request (KV transfer, pacing) becomes runnable, or None."""
        if self._notices:
            return self.now
        times = [s.ready_at for s in self.running if s.ready_at > self.now]
        return min(times) if times else None

    def finish_step(self, step: Step, now: float) -> list[TokenEvent]:
        if step is not self._inflight:
            raise RuntimeError("finish_step got a step that is not in flight")
        plan, self._plan, self._inflight = self._plan, [], None
        self.now = now
        events, self._notices = self._notices, []
        bs, kv = self.block_size, self.kv
        ended = False
        for seq, n in plan:
            if seq.state != RUNNING:
                continue                       # aborted while the step ran
            before = seq.computed
            seq.computed += n
            if before < seq.prompt_len:
                self.prefill_tokens_total += min(seq.computed, seq.prompt_len) - before
            if seq.hashes and seq.published < len(seq.hashes):
                full = min(min(seq.computed, seq.prompt_len) // bs, len(seq.hashes))
                for j in range(seq.published, full):
                    kv.publish(seq.blocks[j], seq.hashes[j])
                seq.published = max(seq.published, full)
            if seq.computed < seq.total:
                continue                       # a prefill chunk: no token yet
            req = seq.req
            index = req.start_index + req.output_tokens
            req.output_tokens += 1
            self.generation_tokens_total += 1
            if req.first_token_at is None:
                req.first_token_at = now
            finished = req.phase == PHASE_PREFILL or req.output_tokens >= req.max_tokens
            if finished:
                req.finish_reason = "length"
                req.finished_at = now
                self.finished_total += 1
                ended = True
                if req.phase == PHASE_PREFILL:
                    seq.state = HELD
                    self.held[req.request_id] = seq
                else:
                    self._end(seq, "length", now)
            elif req.hold_between > 0:
                seq.ready_at = now + req.hold_between
            events.append(TokenEvent(req.request_id, index, output_token_id(index), finished,
                                     "length" if finished else None))
        if ended:
            self.running = [s for s in self.running if s.state == RUNNING]
        if plan:
            self.steps_total += 1
            self.busy_seconds += step.duration
        return events

    # ------------------------------------------------------------------ introspection
    @property
    def idle(self) -> bool:
        """Nothing waiting, running or held."""
        return not self.seqs

    def cached_prefix_tokens(self, tokens: list[int]) -> int:
        """Prompt tokens a full-phase request with ``tokens`` would find in the cache right now
        (full blocks, at least one token left to compute); read-only, ground truth for oracles."""
        if not self.kv.enable_prefix_caching or not tokens:
            return 0
        bs = self.block_size
        limit = (len(tokens) - 1) // bs
        if limit <= 0:
            return 0
        return len(self.kv.match(block_hashes(tokens[:limit * bs], bs), limit)) * bs

    def request(self, request_id: str) -> CoreRequest | None:
        seq = self.seqs.get(request_id)
        return seq.req if seq is not None else None

    def gauges(self) -> dict[str, float]:
        kv = self.kv
        return {
            "running": float(len(self.running)),
            "waiting": float(len(self.waiting)),
            "held": float(len(self.held)),
            "max_num_seqs": float(self.params.max_num_seqs),
            "num_gpu_blocks": float(kv.num_blocks),
            "free_blocks": float(kv.num_free),
            "available_blocks": float(kv.num_free),
            "empty_blocks": float(kv.num_empty),
            "cached_free_blocks": float(kv.num_cached_free),
            "used_blocks": float(kv.num_used),
            "kv_usage_perc": kv.usage,
            "cached_blocks": float(len(kv.table)),
            "requests_total": float(self.requests_total),
            "admitted_total": float(self.admitted_total),
            "prompt_tokens_total": float(self.prompt_tokens_total),
            "cached_tokens_total": float(self.cached_tokens_total),
            "hit_requests_total": float(self.hit_requests_total),
            "hit_token_rate": (self.cached_tokens_total / self.prompt_tokens_total
                               if self.prompt_tokens_total else 0.0),
            "hit_req_rate": (self.hit_requests_total / self.admitted_total
                             if self.admitted_total else 0.0),
            "prefill_tokens_total": float(self.prefill_tokens_total),
            "recomputed_tokens_total": float(self.recomputed_tokens_total),
            "generation_tokens_total": float(self.generation_tokens_total),
            "preemptions_total": float(self.preemptions_total),
            "pd_reschedules_total": float(self.pd_reschedules_total),
            "finished_total": float(self.finished_total),
            "aborted_total": float(self.aborted_total),
            "evictions_total": float(kv.evictions),
            "steps_total": float(self.steps_total),
            "busy_seconds": self.busy_seconds,
        }
