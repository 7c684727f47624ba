"""``kvrouter demo``: kvrouter in front of a simulated FastDeploy cluster, one run per policy.

For each policy: a fresh router process and fresh ``kvrouter sim`` instances (which register
themselves by heartbeat, as FastDeploy's do), the same seeded shared-prefix workload replayed
through the router over HTTP, then a table, a PNG plot, a Markdown report (and optional JSON).
Everything started is stopped at the end.
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

from kvrouter.demo import report
from kvrouter.demo.processes import ClusterSpec, backend_token_totals, start_cluster
from kvrouter.demo.replay import progress_bar, replay
from kvrouter.sim.workloads import make_workload


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvrouter demo", description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="round_robin,cache_aware,sglang_cache_aware,kv_cost",
                    help="comma list of policies to compare (PD: the prefill policy)")
    ap.add_argument("--pd", action="store_true", help="prefill/decode: half prefill, half decode")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--workload", default="b2b", help="b2b, multigroup, multiturn, nosharing "
                    "or trace:PATH (see kvrouter/sim/workloads.py)")
    ap.add_argument("--requests", type=int, default=360)
    ap.add_argument("--rate", type=float, default=24.0, help="requests per model second")
    ap.add_argument("--preset", default="llama3-8b-h100")
    ap.add_argument("--kv-blocks", type=int, default=192,
                    help="KV blocks (64 tokens) per instance: small, so that placement matters")
    ap.add_argument("--time-scale", type=float, default=0.5, help="real seconds per model second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="kvrouter-demo", help="directory for the PNG and report")
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    return ap


# sized for a 2-core machine and a run under 2 minutes
WORKLOAD_PARAMS: dict[str, dict[str, Any]] = {
    "b2b": {"groups": 12, "context": 3000, "users": 4, "question": 200, "output": 16},
    "multigroup": {"groups": 8, "prefix_min": 1024, "prefix_max": 4096, "question": 128,
                   "output": 16},
    "multiturn": {"system": 1024, "turns": 6, "user": 200, "output": 16, "think": 2.0},
    "nosharing": {"prompt_min": 512, "prompt_max": 3000, "output": 16},
}


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.pd and args.instances < 2:
        parser().error("--pd needs at least 2 instances")
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
    print("kvrouter demo: " + "; ".join(setup.values()), file=sys.stderr)

    async def run_all() -> list[report.PolicySummary]:
        rows = []
        with tempfile.TemporaryDirectory(prefix="kvrouter-demo-") as tmp:
            for policy in policies:
                spec = ClusterSpec(policy, args.instances, pd, args.preset, args.time_scale,
                                   sim_args=["--num-gpu-blocks", str(args.kv_blocks),
                                             "--seed", str(args.seed)])
                async with AsyncExitStack() as stack:
                    cluster = await start_cluster(spec, Path(tmp), stack)
                    results, seconds = await replay(cluster.url, workload,
                                                    time_scale=args.time_scale,
                                                    progress=progress_bar(policy))
                    prompt, cached = await backend_token_totals(cluster.url)
                rows.append(report.summarize(policy, results, seconds, args.time_scale,
                                             prompt, cached))
        return rows

    rows = asyncio.run(run_all())
    print(report.table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "demo.png", out / "demo.md"
    report.plot(rows, png, f"kvrouter demo: {setup['deployment']}, {name}")
    command = "kvrouter demo " + shlex.join(argv)
    md.write_text(report.markdown(rows, setup, command.strip(), png.name))
    print(f"wrote {png} and {md}", file=sys.stderr)
    if args.json:
        report.write_json(rows, Path(args.json))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(r.failed == 0 for r in rows) else 1
