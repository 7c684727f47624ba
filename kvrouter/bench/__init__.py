"""``kvrouter bench``: benchmarks.

``kvrouter bench policies …`` compares routing policies on a simulated cluster, in virtual
time or live through a real router (:mod:`kvrouter.bench.policies`, ``bench/README.md``).
``kvrouter bench overhead …`` measures the router's own cost (CPU per request and per relayed
SSE event, added latency, RSS) next to direct, nginx and peer routers
(:mod:`kvrouter.bench.overhead`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["BENCHMARKS", "main"]

#: Benchmark name → ``"module:function"``; the function gets the remaining argv.
BENCHMARKS: dict[str, str] = {
    "policies": "kvrouter.bench.policies:main",
    "overhead": "kvrouter.bench.overhead:main",
}

_USAGE = """usage: kvrouter bench {%s} [options]

benchmarks:
  policies   routing policies on a simulated cluster (virtual time, or --live)
  overhead   router CPU, latency, SSE relay and RSS vs direct, nginx and peer routers (wrk)

run 'kvrouter bench <benchmark> --help' for its options"""


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    usage = _USAGE % ",".join(BENCHMARKS)
    if not args or args[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    target = BENCHMARKS.get(args[0])
    if target is None:
        print(usage, file=sys.stderr)
        print(f"kvrouter bench: error: unknown benchmark '{args[0]}'", file=sys.stderr)
        return 2
    module_name, _, func_name = target.partition(":")
    command = getattr(importlib.import_module(module_name), func_name)
    return int(command(args[1:]) or 0)
