"""Seeded workload generators for the virtual-time cluster (W1-W5).

Every generator returns a list of :class:`WorkloadRequest` sorted by arrival time, with
token-id prompts, and is a pure function of its arguments: the same ``seed`` always gives the
same list (``random.Random`` seeded with a string, no global state, no clock).

Named workloads (``make_workload(spec, rate=..., n=..., seed=..., **params)``):

``b2b``
    llm-d "B2B" shared long context (anchor A1): ``groups`` customers, each with one
    ``context``-token document; ``users`` users per customer; every request is the customer's
    context followed by a fresh ``question``-token question and asks for ``output`` tokens.
    The customer of a request is drawn with popularity ∝ 1 / rank**``zipf`` (0 = uniform, the
    llm-d setup); the user uniformly. ``session_id`` = ``b2b-g<group>-u<user>``.
    Defaults: groups 150, context 6000, users 5, question 1200, output 128, zipf 0.
``multigroup``
    SGLang ``generated-shared-prefix`` style (anchor A6), skewed: ``groups`` system prompts
    whose sizes are spread geometrically from ``prefix_max`` down to ``prefix_min`` (group 0
    is the largest and the most popular); popularity ∝ 1 / rank**``zipf``; each request is its
    group's system prompt plus a fresh ``question``-token question. ``session_id`` is None.
    Defaults: groups 8, prefix_min 1024, prefix_max 4096, zipf 1.0, question 128, output 256.
``multiturn``
    Chat sessions (W3 shape, anchor N1): sessions start as a Poisson process at
    ``rate / turns`` per second; every session has ``turns`` turns; turn *k*'s prompt is a
    shared ``system``-token system prompt, then every earlier user message and answer, then a
    new user message of ``user`` tokens (±50 %, uniform); answers are ``output`` tokens (the
    history carries fixed pseudo-random answer tokens of that length, standing for the
    re-sent assistant text). The next turn arrives ``think`` seconds (exponential mean) after
    the previous one *arrived* (open loop: think time includes the response time).
    ``session_id`` = ``chat-<n>``. Defaults: system 1024, turns 8, user 200, output 200,
    think 10.0.
``nosharing``
    Control (W5): independent random prompts of ``prompt_min``..``prompt_max`` tokens
    (uniform), ``output`` tokens each; no two prompts share a first token block in practice.
    Defaults: prompt_min 512, prompt_max 1536, output 128.
``trace:PATH``
    Mooncake FAST'25 trace replay: one JSON object a line with ``timestamp`` (ms),
    ``input_length``, ``output_length`` and ``hash_ids`` (one per 512-token block). Each hash
    id becomes a fixed pseudo-random block of 512 tokens (the same id always gives the same
    block, for every seed); the last block is cut to ``input_length`` mod 512. Arrival =
    ``timestamp / 1000 / speed``; ``n`` limits replay to the first ``n`` lines; ``rate`` is
    ignored. ``max_output`` (optional) caps ``output_length``. ``session_id`` is None.

All synthetic workloads use Poisson arrivals at ``rate`` requests per second (``multiturn``:
the request rate is ``rate`` on average; sessions start at ``rate / turns``), starting at the
first inter-arrival gap. Token ids are in 0..65535.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvrouter.admission import Priority
from kvrouter.prefix.hashing import block_hashes

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "WORKLOADS",
    "WorkloadRequest",
    "b2b",
    "make_workload",
    "multigroup",
    "multiturn",
    "nosharing",
    "trace",
    "trace_block",
    "unified_cache_bound",
]

TRACE_BLOCK_TOKENS = 512


@dataclass(slots=True)
class WorkloadRequest:
    """One request of a workload: when it arrives and what it asks."""

    arrival: float                 # seconds from the start
    prompt_tokens: list[int]       # token ids
    max_tokens: int                # output tokens to generate
    session_id: str | None = None
    #: the admission queue's class and fair-share key (``x-kvrouter-priority``, the API key)
    priority: Priority = Priority.DEFAULT
    tenant: str = "default"


# ---------------------------------------------------------------------------------- helpers
def _u16(data: bytes) -> list[int]:
    """``data`` read as little-endian 16-bit token ids (the same on every platform)."""
    arr = array("H", data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tolist()


def _tokens(rng: random.Random, n: int) -> list[int]:
    """``n`` pseudo-random token ids in 0..65535 (fast: one ``randbytes`` call)."""
    if n <= 0:
        return []
    return _u16(rng.randbytes(2 * n))


def _rng(*key: object) -> random.Random:
    """A generator seeded by a string key (stable across processes and Python runs)."""
    return random.Random(":".join(str(k) for k in key))


def _poisson_arrivals(rng: random.Random, rate: float, n: int) -> list[float]:
    if rate <= 0:
        raise ValueError("rate must be > 0")
    t = 0.0
    out: list[float] = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _zipf_weights(k: int, s: float) -> list[float]:
    return [1.0 / (r + 1) ** s for r in range(k)]


def _check(n: int) -> None:
    if n < 0:
        raise ValueError("n must be >= 0")


# ------------------------------------------------------------------------------- generators
def b2b(*, rate: float, n: int, seed: int, groups: int = 150, context: int = 6000,
        users: int = 5, question: int = 1200, output: int = 128,
        zipf: float = 0.0) -> list[WorkloadRequest]:
    """llm-d B2B shared-context groups (see the module docstring)."""
    _check(n)
    rng = _rng("b2b", seed)
    contexts = [_tokens(_rng("b2b-ctx", seed, g), context) for g in range(groups)]
    weights = _zipf_weights(groups, zipf)
    arrivals = _poisson_arrivals(rng, rate, n)
    picks = rng.choices(range(groups), weights=weights, k=n)
    out: list[WorkloadRequest] = []
    for t, g in zip(arrivals, picks, strict=True):
        u = rng.randrange(users)
        out.append(WorkloadRequest(t, contexts[g] + _tokens(rng, question), output,
                                   f"b2b-g{g}-u{u}"))
    return out


def multigroup(*, rate: float, n: int, seed: int, groups: int = 8, prefix_min: int = 1024,
               prefix_max: int = 4096, zipf: float = 1.0, question: int = 128,
               output: int = 256) -> list[WorkloadRequest]:
    """SGLang-style shared system prompts of different sizes, skewed popularity."""
    _check(n)
    if groups < 1 or prefix_min < 0 or prefix_max < prefix_min:
        raise ValueError("need groups >= 1 and 0 <= prefix_min <= prefix_max")
    rng = _rng("multigroup", seed)
    if groups == 1:
        sizes = [prefix_max]
    else:
        lo, hi = max(prefix_min, 1), max(prefix_max, 1)
        sizes = [round(hi * (lo / hi) ** (g / (groups - 1))) for g in range(groups)]
    prefixes = [_tokens(_rng("multigroup-sys", seed, g), sizes[g]) for g in range(groups)]
    arrivals = _poisson_arrivals(rng, rate, n)
    picks = rng.choices(range(groups), weights=_zipf_weights(groups, zipf), k=n)
    return [WorkloadRequest(t, prefixes[g] + _tokens(rng, question), output)
            for t, g in zip(arrivals, picks, strict=True)]


def multiturn(*, rate: float, n: int, seed: int, system: int = 1024, turns: int = 8,
              user: int = 200, output: int = 200, think: float = 10.0) -> list[WorkloadRequest]:
    """Chat sessions with growing history and think time between turns."""
    _check(n)
    if turns < 1:
        raise ValueError("turns must be >= 1")
    rng = _rng("multiturn", seed)
    sys_prompt = _tokens(_rng("multiturn-sys", seed), system)
    n_sessions = -(-n // turns)
    starts = _poisson_arrivals(rng, rate / turns, n_sessions)
    out: list[WorkloadRequest] = []
    lo, hi = max(1, user // 2), max(1, user + user // 2)
    for s, start in enumerate(starts):
        history = list(sys_prompt)
        t = start
        for k in range(turns):
            if k:
                t += rng.expovariate(1.0 / think) if think > 0 else 0.0
            history = history + _tokens(rng, rng.randint(lo, hi))
            out.append(WorkloadRequest(t, history, output, f"chat-{s}"))
            history = history + _tokens(rng, output)   # the answer, re-sent next turn
    out.sort(key=lambda r: r.arrival)   # stable: ties keep generation order
    return out[:n]


def nosharing(*, rate: float, n: int, seed: int, prompt_min: int = 512, prompt_max: int = 1536,
              output: int = 128) -> list[WorkloadRequest]:
    """Independent random prompts (no shared prefixes)."""
    _check(n)
    rng = _rng("nosharing", seed)
    arrivals = _poisson_arrivals(rng, rate, n)
    return [WorkloadRequest(t, _tokens(rng, rng.randint(prompt_min, prompt_max)), output)
            for t in arrivals]


_TRACE_BLOCK_CACHE: OrderedDict[int, list[int]] = OrderedDict()
_TRACE_BLOCK_CACHE_MAX = 65536


def trace_block(hash_id: int) -> list[int]:
    """The fixed 512-token block standing for a trace ``hash_id`` (same for every seed):
    SHAKE-128 of ``mooncake-block:<id>`` read as 16-bit token ids (little-endian)."""
    block = _TRACE_BLOCK_CACHE.get(hash_id)
    if block is None:
        block = _u16(hashlib.shake_128(b"mooncake-block:%d" % hash_id)
                     .digest(2 * TRACE_BLOCK_TOKENS))
        _TRACE_BLOCK_CACHE[hash_id] = block
        if len(_TRACE_BLOCK_CACHE) > _TRACE_BLOCK_CACHE_MAX:
            _TRACE_BLOCK_CACHE.popitem(last=False)
    return block


def trace(path: str, *, n: int | None = None, speed: float = 1.0,
          max_output: int | None = None) -> list[WorkloadRequest]:
    """Replay a Mooncake-format JSONL trace (see the module docstring)."""
    if speed <= 0:
        raise ValueError("speed must be > 0")
    out: list[WorkloadRequest] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if n is not None and len(out) >= n:
                break
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            length = int(rec["input_length"])
            prompt: list[int] = []
            for h in rec["hash_ids"]:
                if len(prompt) >= length:
                    break
                prompt.extend(trace_block(int(h)))
            if len(prompt) < length:   # more tokens than blocks: pad deterministically
                prompt.extend(_tokens(_rng("mooncake-pad", len(out)), length - len(prompt)))
            del prompt[length:]
            out_len = max(1, int(rec["output_length"]))
            if max_output is not None:
                out_len = min(out_len, max_output)
            out.append(WorkloadRequest(float(rec["timestamp"]) / 1000.0 / speed, prompt,
                                       out_len))
    out.sort(key=lambda r: r.arrival)
    return out


Generator = Callable[..., list[WorkloadRequest]]

#: Synthetic generators by name (``trace:PATH`` is handled by :func:`make_workload`).
WORKLOADS: dict[str, Generator] = {
    "b2b": b2b,
    "multigroup": multigroup,
    "multiturn": multiturn,
    "nosharing": nosharing,
}


def make_workload(spec: str, *, rate: float | None, n: int | None, seed: int,
                  speed: float = 1.0, **params: object) -> list[WorkloadRequest]:
    """Build a workload from its name (``b2b``, ``multigroup``, ``multiturn``, ``nosharing``)
    or ``trace:PATH``. ``rate`` (requests/s) and ``n`` are required for the synthetic ones;
    ``speed`` only applies to traces. Unknown ``params`` raise ``TypeError``."""
    if spec.startswith("trace:"):
        return trace(spec[len("trace:"):], n=n, speed=speed, **params)  # type: ignore[arg-type]
    gen = WORKLOADS.get(spec)
    if gen is None:
        raise ValueError(f"unknown workload '{spec}' (valid: {', '.join(WORKLOADS)}, trace:PATH)")
    if rate is None or n is None:
        raise ValueError(f"workload '{spec}' needs rate and n")
    return gen(rate=rate, n=n, seed=seed, **params)


# ------------------------------------------------------------------------ unified-cache bound
def unified_cache_bound(workload: Sequence[WorkloadRequest], capacity_blocks: int,
                        block_size: int = 16) -> float:
    """Token hit rate of one LRU prefix cache of ``capacity_blocks`` blocks of ``block_size``
    tokens replaying ``workload`` in arrival order (the G1 upper bound: no router over
    instances whose caches add up to that capacity can do better, up to timing effects).

    Per request: the hit is the longest chain of its full blocks present in the cache
    (``block_size`` tokens each); then every full block of the prompt is inserted or
    refreshed, deepest first, so that ancestors are more recent than descendants and
    eviction (least recently used first) trims chains from the tail; the cache is then cut
    back to ``capacity_blocks``. Returns Σ hit tokens / Σ prompt tokens (0 if empty).
    """
    if capacity_blocks < 0 or block_size < 1:
        raise ValueError("need capacity_blocks >= 0 and block_size >= 1")
    lru: OrderedDict[int, None] = OrderedDict()
    hit_tokens = 0
    total = 0
    for req in sorted(workload, key=lambda r: r.arrival):
        total += len(req.prompt_tokens)
        hashes = block_hashes(req.prompt_tokens, block_size)
        hit = 0
        for h in hashes:
            if h not in lru:
                break
            hit += 1
        hit_tokens += hit * block_size
        if capacity_blocks == 0:
            continue
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hit_tokens / total if total else 0.0
