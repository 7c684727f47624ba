"""Routing-decision benchmark: the cost of one decision and the size of the prefix index.

No HTTP and no background tasks: a real :class:`~kvrouter.router.Router` is built from a
:class:`~kvrouter.config.RouterConfig`, ``instances`` mixed instances are registered through the
registry API (the ``/v1/models`` fetch that registration would start is detached), each gets a
fixed, nearly balanced load (``R`` of 2 or 3, varied ``T``, prefill work and decoding counts:
``cache_aware`` then always takes its scoring path, the imbalance fallback being cheaper), and
the prefix index is filled to ``cache-max-blocks`` entries from many distinct prompts.

The workload is ``groups`` shared prefixes (``shared_fraction`` of ``prompt_tokens`` code
points, e.g. 6k of 8k) each followed by a unique suffix, sent as chat requests
(``system``: the shared prefix, ``user``: the suffix); no tokenizer is configured, so tokens
are code points and the rendered prompt is exactly ``prompt_tokens`` long. The fill records
each group on 1–3 "home" instances, so matches are non-trivial.

Per policy it measures, over ``iterations`` requests:

* ``p50_us`` / ``p99_us``: :meth:`Router.select` (the decision: policy, index match and record,
  metrics), in CPU time of the thread (``time.thread_time_ns``), which time slices given to
  other processes do not inflate on a shared machine; ``wall_p50_us`` / ``wall_p99_us``: the
  same in wall-clock time;
* ``view_p50_us`` / ``view_p99_us``: :meth:`Router.request_view` (render, tokens, hashes), CPU
  time.

and, once per run (the fill does not depend on the policy), the index memory: the fill's
record calls are replayed into a fresh :class:`PrefixIndex` under ``tracemalloc`` (fresh hash
objects per call, as requests bring them), giving ``index_bytes_per_entry`` (per
(block, instance) entry, the unit of ``cache-max-blocks``), ``index_entries``,
``index_distinct_blocks`` and ``index_bytes_per_block`` (per distinct block hash).

:func:`request_overhead` is the per-request micro-measure behind the "router CPU per request"
numbers: body parse + view + select + lease, ``request_num`` on a tiny chat body against
``cache_aware`` on the ~2 KB chat body of ``kvrouter bench overhead`` (2 instances).

``python -m kvrouter.bench.decision [--instances N] [--prompt-tokens N] [--iterations N]
[--policies a,b] [--cache-max-blocks N] [--overhead] [--json FILE]`` prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
import tracemalloc
from array import array
from collections.abc import Sequence

import orjson

from kvrouter.config import RouterConfig
from kvrouter.instance import InstanceInfo, Role
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.view import build_request_view
from kvrouter.router import Router
from kvrouter.sim.cluster.summary import percentile

__all__ = ["DEFAULT_POLICIES", "main", "request_overhead", "run"]

DEFAULT_POLICIES = ("request_num", "cache_aware", "sglang_cache_aware", "kv_cost")
CHAT = "/v1/chat/completions"
_ROLES = (Role.MIXED,)
_WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had",
    "not", "but", "what", "all", "were", "when", "we", "there", "can", "an", "your", "which",
    "their", "said", "if", "do", "will", "each", "about", "how", "up", "out", "them", "then",
    "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her", "two",
    "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who",
    "now", "people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may",
    "water", "long", "little", "very", "after", "words", "called", "just", "where", "most", "know",
)


def _text(rng: random.Random, n: int) -> str:
    """``n`` code points of random words (mostly ASCII, one accented letter now and then)."""
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(_WORDS)
        if rng.random() < 0.02:
            w += "é"
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


class _Workload:
    """Chat bodies whose rendered prompt is ``system:<prefix>\\nuser:<suffix>\\n``."""

    def __init__(self, prompt_tokens: int, groups: int, shared_fraction: float, seed: int):
        self.rng = random.Random(seed)
        total = max(16, int(prompt_tokens))
        shared = min(total - 8, max(8, int(total * shared_fraction)))
        self.prefix_len = shared - len("system:\n")
        self.suffix_len = total - shared - len("user:\n")
        self.prefixes = [_text(self.rng, self.prefix_len) for _ in range(max(1, groups))]
        self._pool = _text(self.rng, 64 * 1024 + self.suffix_len)
        self._n = 0

    def body(self, group: int | None = None) -> tuple[int, dict]:
        g = self.rng.randrange(len(self.prefixes)) if group is None else group
        self._n += 1
        tag = f"#{self._n} "
        off = self.rng.randrange(len(self._pool) - self.suffix_len)
        suffix = (tag + self._pool[off:off + self.suffix_len])[: self.suffix_len]
        return g, {"model": "m", "messages": [
            {"role": "system", "content": self.prefixes[g]},
            {"role": "user", "content": suffix}]}


def _make_router(policy: str, cache_max_blocks: int) -> Router:
    cfg = RouterConfig()
    cfg.scheduler.policy = policy
    cfg.scheduler.cache_max_blocks = cache_max_blocks
    router = Router(cfg)
    # Registration would start a /v1/models fetch (an HTTP task): not wanted here.
    router.registry.on_added.clear()
    return router


def _register(router: Router, n: int, rng: random.Random) -> list:
    for i in range(n):
        router.registry.add(InstanceInfo(role=Role.MIXED, host=f"10.{(i >> 16) & 255}."
                                         f"{(i >> 8) & 255}.{i & 255}", scheme="http",
                                         port=str(8000 + i % 7)))
    cands = router.registry.candidates(Role.MIXED)
    for inst in cands:
        # R of 2 or 3 (balanced: cache_aware scores), varied T, prefill work, decoding legs
        for j in range(2 + rng.randrange(2)):
            lease = inst.load.acquire(rng.randrange(500, 20_000))
            if j == 0 and rng.random() < 0.5:
                lease.release_tokens()            # one leg already decoding
    return cands


def _us(ns: list[int], q: float) -> float:
    """Percentile ``q`` (0..100) of nanosecond samples, in µs (0 when there are none)."""
    return percentile(ns, q) / 1000.0 if ns else 0.0


def _hash_bytes(hashes: Sequence[int]) -> bytes:
    return array("Q", hashes).tobytes()


def _distinct_blocks(index: PrefixIndex) -> int:
    fn = getattr(index, "distinct_blocks", None)
    if fn is not None:
        return int(fn())
    entries = getattr(index, "_entries", None)    # the former OrderedDict layout
    if entries is None:
        return 0
    mask = (1 << 64) - 1
    return len({key & mask for key in entries})


def index_memory(stream: list[tuple[bytes, str, float]], cache_max_blocks: int,
                 ttl_secs: float) -> dict:
    """Replay ``(le64 hashes, identity, time)`` record calls into a fresh index under
    tracemalloc; bytes per (block, instance) entry and per distinct block."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(cache_max_blocks, ttl_secs)
        for raw, ident, t in stream:
            index.record(array("Q", raw).tolist(), ident, t)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    entries = index.size
    distinct = _distinct_blocks(index)
    return {
        "index_entries": entries,
        "index_distinct_blocks": distinct,
        "index_bytes": used,
        "index_bytes_per_entry": round(used / entries, 1) if entries else 0.0,
        "index_bytes_per_block": round(used / distinct, 1) if distinct else 0.0,
    }


async def _fill(router: Router, work: _Workload, cands: list, cache_max_blocks: int,
                rng: random.Random, stream: list | None) -> None:
    """Record distinct prompts on their groups' home instances until the index is full."""
    homes = [rng.sample(cands, min(len(cands), 1 + rng.randrange(3)))
             for _ in work.prefixes]
    index = router.index
    block_size = router.cfg.scheduler.cache_block_size
    limit = 50 + 8 * cache_max_blocks // max(1, (work.suffix_len + 6) // 64)
    t = time.monotonic()
    for _ in range(limit):
        if index.size >= cache_max_blocks or index.evictions["capacity"]:
            break                                 # full (eviction may keep a little slack)
        g, body = work.body()
        view = await build_request_view(body, CHAT, router.tokenizer, block_size,
                                        need_prefix=True)
        if not view.hashes:
            break
        ident = rng.choice(homes[g]).identity
        index.record(view.hashes, ident, t)
        if stream is not None:
            stream.append((_hash_bytes(view.hashes), ident, t))


async def _measure(policy: str, instances: int, prompt_tokens: int, iterations: int,
                   cache_max_blocks: int, groups: int, shared_fraction: float, seed: int,
                   stream: list | None) -> dict:
    rng = random.Random(seed)
    router = _make_router(policy, cache_max_blocks)
    cands = _register(router, instances, rng)
    work = _Workload(prompt_tokens, groups, shared_fraction, seed)
    await _fill(router, work, cands, cache_max_blocks, rng, stream)
    select, request_view = router.select, router.request_view
    view_ns: list[int] = []
    sel_ns: list[int] = []
    wall_ns: list[int] = []
    strategies: dict[str, int] = {}
    hit = looked = 0
    cpu, perf = time.thread_time_ns, time.perf_counter_ns
    warm = min(50, max(1, iterations // 10))
    for i in range(warm + iterations):
        _, body = work.body()
        t0 = cpu()
        view = await request_view(body, CHAT, _ROLES)
        t1 = cpu()
        w1 = perf()
        sel = select(Role.MIXED, view)
        w2 = perf()
        t2 = cpu()
        sel.instance.load.acquire(view.token_estimate, prefill=sel.prefill_estimate).release()
        if i >= warm:
            view_ns.append(t1 - t0)
            sel_ns.append(t2 - t1)
            wall_ns.append(w2 - w1)
            strategies[sel.strategy] = strategies.get(sel.strategy, 0) + 1
            hit += sel.hit_blocks
            looked += sel.lookup_blocks
    await router.close()
    return {
        "policy": policy,
        "instances": instances,
        "prompt_tokens": prompt_tokens,
        "iterations": iterations,
        "p50_us": round(_us(sel_ns, 50), 1),
        "p99_us": round(_us(sel_ns, 99), 1),
        "view_p50_us": round(_us(view_ns, 50), 1),
        "view_p99_us": round(_us(view_ns, 99), 1),
        "wall_p50_us": round(_us(wall_ns, 50), 1),
        "wall_p99_us": round(_us(wall_ns, 99), 1),
        "predicted_hit_rate": round(hit / looked, 3) if looked else 0.0,
        "strategies": strategies,
        "index_size_after": router.index.size,
    }


def run(instances: int = 1000, prompt_tokens: int = 8192,
        policies: Sequence[str] = DEFAULT_POLICIES, iterations: int = 2000, *,
        cache_max_blocks: int = 200_000, groups: int = 50, shared_fraction: float = 0.75,
        seed: int = 0) -> list[dict]:
    """One row per policy (see the module docstring for the fields)."""
    rows: list[dict] = []
    stream: list[tuple[bytes, str, float]] = []
    for k, policy in enumerate(policies):
        row = asyncio.run(_measure(policy, instances, prompt_tokens, iterations,
                                   cache_max_blocks, groups, shared_fraction, seed,
                                   stream if k == 0 else None))
        rows.append(row)
    mem = index_memory(stream, cache_max_blocks, RouterConfig().scheduler.eviction_duration_mins
                       * 60) if stream else {}
    for row in rows:
        row.update(mem)
    return rows


# --------------------------------------------------------------------------- per request
_OVERHEAD_PREFIX = ("You are a careful assistant. " * 52)[:1500]


def _overhead_bodies(kind: str, n: int) -> list[bytes]:
    if kind == "tiny":
        body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "Say hi."}],
                             "max_tokens": 4, "stream": False})
        return [body] * n
    out = []
    for i in range(n):
        suffix = (f"q{i} " * 60)[:500]
        out.append(orjson.dumps({"model": "mock", "messages": [
            {"role": "system", "content": _OVERHEAD_PREFIX},
            {"role": "user", "content": suffix}], "max_tokens": 4}))
    return out


async def _per_request(policy: str, bodies: list[bytes], instances: int) -> float:
    router = _make_router(policy, 200_000)
    _register(router, instances, random.Random(1))
    select, request_view = router.select, router.request_view
    loads = orjson.loads
    for raw in bodies[:200]:                     # warm-up
        view = await request_view(loads(raw), CHAT, _ROLES)
        select(Role.MIXED, view).instance.load.acquire(view.token_estimate).release()
    t0 = time.process_time_ns()
    for raw in bodies:
        view = await request_view(loads(raw), CHAT, _ROLES)
        select(Role.MIXED, view).instance.load.acquire(view.token_estimate).release()
    dt = time.process_time_ns() - t0
    await router.close()
    return dt / len(bodies) / 1000.0


def request_overhead(requests: int = 20_000, instances: int = 2, rounds: int = 5) -> dict:
    """Routing CPU per request (body parse + view + select + lease): ``request_num`` with a
    tiny chat body vs ``cache_aware`` with ~2 KB chat bodies (1.5 KB shared system prompt +
    500 unique characters), alternating ``rounds`` times; the best round of each counts."""
    tiny = _overhead_bodies("tiny", requests)
    big = _overhead_bodies("chat2k", requests)
    rn: list[float] = []
    ca: list[float] = []
    for _ in range(rounds):
        rn.append(asyncio.run(_per_request("request_num", tiny, instances)))
        ca.append(asyncio.run(_per_request("cache_aware", big, instances)))
    return {"instances": instances, "requests": requests,
            "request_num_us": round(min(rn), 2), "cache_aware_us": round(min(ca), 2),
            "extra_us": round(min(ca) - min(rn), 2)}


# --------------------------------------------------------------------------- CLI
def _table(rows: list[dict]) -> str:
    head = (f"{'policy':<20}{'inst':>6}{'tokens':>8}{'p50 µs':>10}{'p99 µs':>10}"
            f"{'view p50':>10}{'view p99':>10}{'B/entry':>9}{'B/block':>9}{'entries':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['policy']:<20}{r['instances']:>6}{r['prompt_tokens']:>8}{r['p50_us']:>10.1f}"
            f"{r['p99_us']:>10.1f}{r['view_p50_us']:>10.1f}{r['view_p99_us']:>10.1f}"
            f"{r.get('index_bytes_per_entry', 0):>9.1f}{r.get('index_bytes_per_block', 0):>9.1f}"
            f"{r.get('index_entries', 0):>9}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvrouter.bench.decision",
                                 description="Routing decision cost and prefix-index memory.")
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--cache-max-blocks", type=int, default=200_000)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overhead", action="store_true",
                    help="also the per-request micro-measure (request_num vs cache_aware)")
    ap.add_argument("--overhead-only", action="store_true", help="only the micro-measure")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON lines")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    out: list[dict] = []
    if not args.overhead_only:
        rows = run(args.instances, args.prompt_tokens,
                   [p.strip() for p in args.policies.split(",") if p.strip()], args.iterations,
                   cache_max_blocks=args.cache_max_blocks, groups=args.groups, seed=args.seed)
        print(_table(rows))
        out.extend(rows)
    if args.overhead or args.overhead_only:
        ov = request_overhead()
        print(f"per request (parse+view+select+lease, {ov['instances']} instances): "
              f"request_num {ov['request_num_us']:.1f} µs, cache_aware (2 KB chat) "
              f"{ov['cache_aware_us']:.1f} µs, extra {ov['extra_us']:.1f} µs")
        out.append({"overhead": ov})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            for r in out:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
