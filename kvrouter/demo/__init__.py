"""``kvrouter demo``: kvrouter in front of a simulated FastDeploy cluster, one run per policy.

For each policy: a fresh router process and fresh ``kvrouter sim`` instances (which register
themselves by heartbeat, as FastDeploy's do), the same seeded shared-prefix workload replayed
through the router over HTTP, then a table, a PNG plot, a Markdown report (and optional JSON).
Everything started is stopped at the end.

``--engine llamacpp`` runs the same comparison on real engines: llama.cpp's ``llama-server``
with a tiny model (``kvrouter/demo/llamacpp.py``).

``--replicas N`` compares, per policy, one router with N router replicas sharing state through
a fresh ``redis-server`` (the instances register at the first) and N independent routers
(each given the instances in a ``register.yaml``), both behind a round-robin client: request i
goes to router i mod N.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from kvrouter.demo import llamacpp, report
from kvrouter.demo.processes import ClusterSpec, backend_token_totals, metric_totals, start_cluster
from kvrouter.demo.redisproc import MISSING, RedisServer, redis_server_binary
from kvrouter.demo.replay import ClientResult, progress_bar, replay
from kvrouter.policies import policy_names
from kvrouter.sim.core.params import PRESETS
from kvrouter.sim.workloads import WORKLOADS, make_workload


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvrouter demo", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("sim", "llamacpp"), default="sim",
                    help="sim: simulated FastDeploy instances; llamacpp: real llama.cpp "
                         "llama-servers with a tiny model (built on first use, ~6-12 minutes "
                         "on 2 cores, cached after)")
    ap.add_argument("--policies", help="comma list of policies to compare (PD: the prefill "
                    f"policy; default {DEFAULTS['sim']['policies']}, llamacpp: "
                    f"{DEFAULTS['llamacpp']['policies']})")
    ap.add_argument("--pd", action="store_true", help="prefill/decode: half prefill, half decode")
    ap.add_argument("--instances", type=int, help=f"default {DEFAULTS['sim']['instances']}, "
                    f"llamacpp: {DEFAULTS['llamacpp']['instances']}")
    ap.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="also run N router replicas sharing state through Redis (needs "
                         "redis-server) and N independent routers, each behind a round-robin "
                         "client (mixed mode; default 1: one router)")
    ap.add_argument("--workload", default="b2b", help="b2b, multigroup, multiturn, nosharing "
                    "or trace:PATH (see kvrouter/sim/workloads.py; default b2b)")
    ap.add_argument("--requests", type=int, help=f"default {DEFAULTS['sim']['requests']}, "
                    f"llamacpp: {DEFAULTS['llamacpp']['requests']}")
    ap.add_argument("--rate", type=float, help="requests per model second (default "
                    f"{DEFAULTS['sim']['rate']:g}; llamacpp: per second, default "
                    f"{DEFAULTS['llamacpp']['rate']:g})")
    ap.add_argument("--preset", default="llama3-8b-h100",
                    help="simulated engine model (see kvrouter sim --help; default "
                         "llama3-8b-h100)")
    ap.add_argument("--kv-blocks", type=int, default=192,
                    help="KV blocks (64 tokens) per instance: small, so that placement matters "
                         "(default 192)")
    ap.add_argument("--time-scale", type=float, default=0.5,
                    help="real seconds per model second (default 0.5)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the workload and the engines' jitter (default 0)")
    ap.add_argument("--out", default="kvrouter-demo",
                    help="directory for the PNG and report (default kvrouter-demo)")
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    return ap


#: per engine, the defaults of the flags that default to None
DEFAULTS: dict[str, dict[str, Any]] = {
    "sim": {"policies": "round_robin,cache_aware,sglang_cache_aware,kv_cost", "instances": 4,
            "requests": 360, "rate": 24.0},
    "llamacpp": llamacpp.DEFAULTS,
}


# sized for a 2-core machine and a run under 2 minutes
WORKLOAD_PARAMS: dict[str, dict[str, Any]] = {
    "b2b": {"groups": 12, "context": 3000, "users": 4, "question": 200, "output": 16},
    "multigroup": {"groups": 8, "prefix_min": 1024, "prefix_max": 4096, "question": 128,
                   "output": 16},
    "multiturn": {"system": 1024, "turns": 6, "user": 200, "output": 16, "think": 2.0},
    "nosharing": {"prompt_min": 512, "prompt_max": 3000, "output": 16},
}


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--policies``, ``--workload`` or a count, naming the valid
    values; ``None`` when nothing is."""
    valid = policy_names()
    unknown = [p.strip() for p in args.policies.split(",") if p.strip() not in valid]
    if unknown or not args.policies.strip():
        return (f"--policies: unknown policy {', '.join(repr(p) for p in unknown) or '(none)'} "
                f"(valid: {', '.join(valid)})")
    if not args.workload.startswith("trace:") and args.workload not in WORKLOADS:
        return (f"--workload: unknown workload {args.workload!r} "
                f"(valid: {', '.join(WORKLOADS)}, trace:PATH)")
    if args.workload.startswith("trace:") and not Path(args.workload[6:]).is_file():
        return f"--workload: no such trace file: {args.workload[6:]!r}"
    if args.preset not in PRESETS:
        return f"--preset: unknown preset {args.preset!r} (valid: {', '.join(sorted(PRESETS))})"
    for flag, value in (("--instances", args.instances), ("--kv-blocks", args.kv_blocks)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.time_scale <= 0:
        return f"--time-scale must be > 0, got {args.time_scale:g}"
    return None


def main(argv: list[str]) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.engine].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.requests < 1 or args.rate <= 0:
        ap.error("--requests must be >= 1 and --rate > 0")
    usage_error = _usage_error(args)
    if usage_error:         # one line, before anything starts (no traceback)
        ap.exit(2, f"kvrouter demo: error: {usage_error}\n")
    if args.engine == "llamacpp":
        llamacpp.check(ap, args)
        return llamacpp.run(args, argv)
    if args.pd and args.instances < 2:
        parser().error("--pd needs at least 2 instances")
    if args.replicas < 1 or (args.replicas > 1 and args.pd):
        parser().error("--replicas: N >= 1, in mixed mode")
    if args.replicas > 1 and redis_server_binary() is None:
        print(f"kvrouter demo --replicas: {MISSING}", file=sys.stderr)
        return 1
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    name = args.workload.split(":", 1)[0]
    workload = make_workload(args.workload, rate=args.rate, n=args.requests, seed=args.seed,
                             **WORKLOAD_PARAMS.get(name, {}))
    pd = (args.instances // 2, args.instances - args.instances // 2) if args.pd else None
    setup = {
        "deployment": f"PD {pd[0]} prefill + {pd[1]} decode" if pd else
                      f"mixed, {args.instances} instances",
        "workload": f"{args.workload} {WORKLOAD_PARAMS.get(name, {})}, {len(workload)} requests "
                    f"at {args.rate:g} req/s (model time), seed {args.seed}",
        "engine": f"{args.preset}, {args.kv_blocks} KV blocks of 64 tokens per instance, "
                  f"time scale {args.time_scale:g}",
    }
    n = args.replicas
    if n > 1:
        setup["routers"] = (f"per policy: 1 router; {n} replicas sharing state through Redis; "
                            f"{n} independent routers (request i → router i mod {n})")
    setups = [("", "")] + ([(f" ×{n} redis", "redis"), (f" ×{n} no-redis", "none")]
                           if n > 1 else [])
    print("kvrouter demo: " + "; ".join(setup.values()), file=sys.stderr)

    async def run_one(policy: str, label: str, mode: str, tmp: Path) -> report.PolicySummary:
        async with AsyncExitStack() as stack:
            redis_url = ""
            if mode == "redis":            # a fresh, empty Redis per run
                server = RedisServer(tmp / f"redis-{policy}")
                await server.start()
                stack.push_async_callback(server.stop)
                redis_url = server.url
            spec = ClusterSpec(policy, args.instances, pd, args.preset, args.time_scale,
                               sim_args=["--num-gpu-blocks", str(args.kv_blocks),
                                         "--seed", str(args.seed)],
                               routers=n if mode else 1, redis_url=redis_url)
            cluster = await start_cluster(spec, tmp, stack)
            results, seconds = await replay(cluster.urls, workload, time_scale=args.time_scale,
                                            progress=progress_bar(policy + label))
            return await _summary(policy + label, results, seconds, cluster.urls,
                                  cluster.visible_after, args.time_scale)

    async def run_all() -> list[report.PolicySummary]:
        rows = []
        with tempfile.TemporaryDirectory(prefix="kvrouter-demo-") as tmp:
            for policy in policies:
                for label, mode in setups:
                    rows.append(await run_one(policy, label, mode, Path(tmp)))
        return rows

    rows = asyncio.run(run_all())
    print(report.table(rows))
    if n > 1:
        print(comparison(rows, policies, n))
    report.write_all(rows, setup, Path(args.out), f"kvrouter demo: {setup['deployment']}, {name}",
                     "kvrouter demo " + shlex.join(argv), args.json)
    return 0 if all(r.failed == 0 for r in rows) else 1


async def _summary(label: str, results: list[ClientResult], seconds: float, urls: list[str],
                   visible_after: float | None, time_scale: float) -> report.PolicySummary:
    """A run's row: the instances' usage totals summed over the routers (each counts its own
    requests), and with several routers each one's hit rate."""
    totals = [await backend_token_totals(url) for url in urls]
    prompt, cached = sum(t[0] for t in totals), sum(t[1] for t in totals)
    extra: dict[str, Any] = {}
    if len(urls) > 1:
        extra["router_hit_rates"] = [c / p if p else 0.0 for p, c in totals]
    if visible_after is not None:
        commands = [await metric_totals(url, ("kvrouter_redis_commands_total",))
                    for url in urls]
        extra["redis_commands_per_request"] = (
            sum(c["kvrouter_redis_commands_total"] for c in commands) / max(1, len(results)))
        extra["registration_visible_ms"] = 1e3 * visible_after
    return report.summarize(label, results, seconds, time_scale, prompt, cached, **extra)


def comparison(rows: list[report.PolicySummary], policies: list[str], n: int) -> str:
    """Per policy: the hit rate of one router, of n replicas with Redis, of n without."""
    by_label = {r.policy: r for r in rows}
    out = [f"hit rate at the instances: 1 router / {n} replicas with Redis / "
           f"{n} independent routers"]
    for policy in policies:
        one, shared, alone = (by_label[policy + label].hit_rate for label in
                              ("", f" ×{n} redis", f" ×{n} no-redis"))
        out.append(f"  {policy:<18} {one:6.1%} / {shared:6.1%} / {alone:6.1%}   "
                   f"(replicas: {shared - one:+.1%} vs one router)")
    return "\n".join(out)
