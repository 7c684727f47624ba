"""``kvrouter demo``: kvrouter in front of a simulated FastDeploy cluster, one run per policy.

Each run starts a fresh router process and a fresh ``kvrouter sim`` process (instances register
themselves by heartbeat, as FastDeploy's do), replays the same shared-prefix workload through
the router over HTTP, prints a table, and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import yaml


@dataclass
class RunResult:
    policy: str
    requests: int
    failed: int
    seconds: float
    ttft_p50: float
    ttft_p99: float
    hit_rate: float
    per_instance: dict[str, int]

    @property
    def throughput(self) -> float:
        return (self.requests - self.failed) / self.seconds if self.seconds else 0.0


def make_workload(n: int, groups: int, seed: int, context_chars: int) -> list[dict]:
    """Shared-prefix chat requests: ``groups`` long system prompts, short user questions."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "router", "token", "prefill",
             "decode", "batch", "block", "model", "tensor", "shard", "queue"]
    contexts = []
    for g in range(groups):
        text = " ".join(rng.choice(words) for _ in range(context_chars // 6))
        contexts.append(f"[document {g}] {text}")
    out = []
    for i in range(n):
        g = rng.randrange(groups)
        question = " ".join(rng.choice(words) for _ in range(12))
        out.append({"model": "default", "stream": True, "max_tokens": 16,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "system", "content": contexts[g]},
                                 {"role": "user", "content": f"q{i}: {question}?"}]})
    return out


async def _spawn(*args: str, marker: str, count: int = 1,
                 timeout: float = 30) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start a kvrouter process and wait for ``count`` stdout lines starting with ``marker``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while len(lines) < count:
            raw = await proc.stdout.readline()
            if not raw:
                raise RuntimeError(f"kvrouter {args[0]} exited early")
            if raw.decode().startswith(marker):
                lines.append(raw.decode().strip())
    asyncio.ensure_future(_drain(proc.stdout))
    return proc, lines


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_policy(policy: str, args: argparse.Namespace, workload: list[dict],
                     workdir: Path) -> RunResult:
    cfg = {"scheduler": {"policy": policy, "prefill-policy": policy, "stats-interval-secs": 0,
                         "cache-block-size": 64},
           "manager": {"health-check-interval-secs": 5}, "log": {"level": "warn"}}
    cfg_path = workdir / f"config-{policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    mode = ["--splitwise"] if args.pd else []
    router, lines = await _spawn("--port", "0", "--config_path", str(cfg_path), *mode,
                                 marker="Starting server on ")
    port = lines[0].rsplit(":", 1)[1]
    base = f"http://127.0.0.1:{port}"
    procs = [router]
    try:
        roles = [("prefill", args.instances // 2), ("decode", args.instances - args.instances // 2)] \
            if args.pd else [("mixed", args.instances)]
        for role, n in roles:
            sim, _ = await _spawn("sim", "--instances", str(n), "--role", role, "--router",
                                  f"127.0.0.1:{port}", "--time-scale", str(args.time_scale),
                                  "--heartbeat-period", "2", "--first-heartbeat-delay", "0",
                                  marker="sim instance", count=n)
            procs.append(sim)
        async with aiohttp.ClientSession() as s:
            async with asyncio.timeout(30):
                while True:
                    async with s.get(base + "/health") as r:
                        if (await r.json())["ready"] and sum(
                                (await r.json())["routable"].values()) == args.instances:
                            break
                    await asyncio.sleep(0.2)
            return await _replay(s, base, policy, workload, args.concurrency)
    finally:
        for p in reversed(procs):
            await _stop(p)


async def _replay(s: aiohttp.ClientSession, base: str, policy: str, workload: list[dict],
                  concurrency: int) -> RunResult:
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    prompt = cached = failed = 0
    per_instance: dict[str, int] = {}
    done = 0

    async def one(body: dict) -> None:
        nonlocal prompt, cached, failed, done
        async with sem:
            t0 = time.perf_counter()
            try:
                async with s.post(base + "/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        failed += 1
                        return
                    url = r.headers.get("X-Router-Mixed-URL") or r.headers.get(
                        "X-Router-Prefill-URL", "?")
                    per_instance[url] = per_instance.get(url, 0) + 1
                    first = True
                    async for line in r.content:
                        if first and line.startswith(b"data:"):
                            ttfts.append(time.perf_counter() - t0)
                            first = False
                        if b'"usage"' in line and b'"choices":[]' in line:
                            usage = json.loads(line[5:])["usage"]
                            prompt += usage["prompt_tokens"]
                            cached += usage["prompt_tokens_details"]["cached_tokens"]
            except aiohttp.ClientError:
                failed += 1
            finally:
                done += 1
                progress(policy, done, len(workload))

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in workload))
    seconds = time.perf_counter() - started
    ttfts.sort()
    pct = (lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan"))
    return RunResult(policy, len(workload), failed, seconds, pct(0.5), pct(0.99),
                     cached / prompt if prompt else 0.0, per_instance)


def progress(label: str, done: int, total: int, width: int = 30) -> None:
    """A one-line progress bar on a terminal; a single line at the end otherwise."""
    if sys.stderr.isatty():
        filled = width * done // total
        print(f"\r  {label:<16} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
    elif done == total:
        print(f"  {label:<16} {done}/{total} requests done", file=sys.stderr)


def render_table(results: list[RunResult]) -> str:
    head = (f"{'policy':<16} {'ok':>5} {'fail':>5} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'hit rate':>9}  spread")
    rows = [head, "-" * len(head)]
    for r in results:
        spread = "/".join(str(v) for _, v in sorted(r.per_instance.items()))
        rows.append(f"{r.policy:<16} {r.requests - r.failed:>5} {r.failed:>5} "
                    f"{r.throughput:>7.1f} {r.ttft_p50 * 1e3:>7.0f}ms {r.ttft_p99 * 1e3:>7.0f}ms "
                    f"{r.hit_rate:>8.1%}  {spread}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvrouter demo", description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="round_robin,request_num,cache_aware")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8, help="shared contexts in the workload")
    ap.add_argument("--context-chars", type=int, default=8000)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--pd", action="store_true", help="prefill/decode deployment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = ap.parse_args(argv)
    if args.pd and args.instances < 2:
        ap.error("--pd needs at least 2 instances")
    workload = make_workload(args.requests, args.groups, args.seed, args.context_chars)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    print(f"kvrouter demo: {args.instances} simulated instances "
          f"({'PD' if args.pd else 'mixed'}), {args.requests} requests, "
          f"{args.groups} shared contexts, concurrency {args.concurrency}", file=sys.stderr)

    async def run_all() -> list[RunResult]:
        with tempfile.TemporaryDirectory(prefix="kvrouter-demo-") as tmp:
            return [await run_policy(p, args, workload, Path(tmp)) for p in policies]

    results = asyncio.run(run_all())
    print(render_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [asdict(r) | {"throughput": r.throughput} for r in results], indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(r.failed == 0 for r in results) else 1
