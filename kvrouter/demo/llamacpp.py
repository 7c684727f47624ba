"""``kvrouter demo --engine llamacpp``: the demo on real engines.

llama.cpp's ``llama-server`` serves a tiny random-weight llama model with the real Llama-2
vocabulary; ``scripts/real_engine.sh`` builds the server from the source vendored in the
``llama-cpp-python`` sdist and writes the model, into a cache outside the repository.

Per policy: N fresh ``llama-server`` processes (fresh processes, so that every policy starts
with empty prompt caches and replays the very same prompts), a fresh router in mixed mode with
them in its ``register.yaml`` (``engine: llamacpp``), then the shared-prefix workload replayed
through the router. Each server has 4 slots and no host-RAM prompt cache (``--cache-ram 0``):
what it can reuse is what its slots still hold, so placement decides the hit rate, which is
read from the engines' own ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kvrouter.demo import report
from kvrouter.demo.processes import backend_token_totals, spawn, stop
from kvrouter.demo.replay import progress_bar, replay
from kvrouter.sim.workloads import make_workload

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "real_engine.sh"
SLOTS = 4             # llama-server -np: requests decoded together, and prompts it keeps
SLOT_CTX = 4096       # tokens per slot (-c is SLOTS × SLOT_CTX)
MAX_INSTANCES = 16    # each server maps the 80 MB model and holds a 64 MB KV cache

#: defaults of the flags whose sim defaults do not fit 2 tiny engines on 2 cores: about 20 s
#: per policy once the engine is built
DEFAULTS: dict[str, Any] = {"policies": "round_robin,cache_aware,kv_cost", "instances": 2,
                            "requests": 20, "rate": 1.0}

#: workloads sized for prompts of ≤ SLOT_CTX tokens, a prefill of ~1 ms per token on one core
#: and a load that leaves the servers idle part of the time (a saturated server holds several
#: copies of a hot prefix and evicts the others). b2b has twice as many groups (8) as a server
#: has slots (4): spread over every server they thrash the slots, 4 per server stay cached.
WORKLOAD_PARAMS: dict[str, dict[str, Any]] = {
    "b2b": {"groups": 8, "context": 400, "users": 4, "question": 16, "output": 8},
    "multigroup": {"groups": 8, "prefix_min": 200, "prefix_max": 800, "question": 16,
                   "output": 8},
    "multiturn": {"system": 300, "turns": 4, "user": 64, "output": 8, "think": 1.0},
    "nosharing": {"prompt_min": 100, "prompt_max": 600, "output": 8},
}


class EngineError(RuntimeError):
    """The engine could not be installed or started (the message says why)."""


def cache_dir() -> str:
    """Where ``scripts/real_engine.sh`` keeps the build (for the messages only)."""
    return os.environ.get("KVROUTER_ENGINE_CACHE") or "~/.cache/kvrouter/real-engines"


def ensure_engine() -> tuple[str, str]:
    """``(llama-server, model.gguf)`` from the cache, installed there first if missing."""
    if not SCRIPT.is_file():
        raise EngineError(f"{SCRIPT} not found: --engine llamacpp runs from a source checkout "
                          "of kvrouter")
    env = dict(os.environ, PYTHON=sys.executable)   # the model step needs gguf and numpy
    found = subprocess.run(["bash", str(SCRIPT), "path"], capture_output=True, text=True,
                           env=env)
    if found.returncode != 0:
        print(f"kvrouter demo --engine llamacpp: installing the engine into {cache_dir()}:\n"
              "  - llama.cpp's llama-server, built from the source vendored in the "
              "llama-cpp-python sdist (downloaded from PyPI; needs cmake and a C++ compiler). "
              "The first build takes ~6-12 minutes on 2 cores; later runs reuse it.\n"
              "  - a tiny random-weight llama model (dim 256, 4 layers, 80 MB) with the "
              "real Llama-2 vocabulary (seconds).", file=sys.stderr, flush=True)
        # the script's progress lines go to our stderr
        found = subprocess.run(["bash", str(SCRIPT), "all"], stdout=subprocess.PIPE,
                               text=True, env=env)
        if found.returncode != 0:
            raise EngineError(f"`{SCRIPT} all` failed (exit {found.returncode}); its messages "
                              "are above")
    binary, model = found.stdout.split()[-2:]
    return binary, model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(binary: str, model: str, alias: str, threads: int, log_path: Path,
                       stack: AsyncExitStack, timeout: float = 60.0) -> int:
    """One ``llama-server`` on a free loopback port, ready (``/health`` 200); stopped by its
    PID when ``stack`` closes. Returns its port."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "-m", model, "-a", alias, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(SLOTS * SLOT_CTX), "-np", str(SLOTS), "-t", str(threads),
            "--cache-ram", "0", "--metrics", "--no-ui",
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    stack.push_async_callback(stop, proc)
    url = f"http://127.0.0.1:{port}/health"
    async with aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.returncode is None and loop.time() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return port
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise EngineError(f"llama-server on port {port} "
                      + (f"exited ({proc.returncode})" if proc.returncode is not None
                         else f"not ready after {timeout:g} s") + f"; its log ends with:\n{tail}")


async def start_router(policy: str, ports: list[int], workdir: Path,
                       stack: AsyncExitStack) -> str:
    """A router process in mixed mode with the servers in its ``register.yaml``; returns its
    URL once it routes to all of them."""
    register = workdir / f"register-{policy}.yaml"
    register.write_text(yaml.safe_dump({"instances": [
        {"role": "mixed", "host_ip": "127.0.0.1", "port": port, "engine": "llamacpp"}
        for port in ports]}))
    cfg = {"scheduler": {"policy": policy, "stats-interval-secs": 0},
           "manager": {"register-path": str(register), "health-check-interval-secs": 5},
           "log": {"level": "warn"}}
    cfg_path = workdir / f"router-{policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc, lines = await spawn("--port", "0", "--config_path", str(cfg_path),
                              marker="Starting server on ")
    stack.push_async_callback(stop, proc)
    url = "http://127.0.0.1:" + lines[0].rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as s, asyncio.timeout(30):
        while True:
            async with s.get(url + "/health") as r:
                health = await r.json()
            if health.get("ready") and health["routable"]["mixed"] == len(ports):
                return url
            await asyncio.sleep(0.05)


def threads_per_server(instances: int) -> int:
    """The cores shared out: the servers run at once, more threads than cores only thrash."""
    return max(1, (os.cpu_count() or 1) // instances)


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that make no sense on llama.cpp (a usage error, exit 2)."""
    if args.pd:
        ap.error("--pd: llama.cpp has no prefill/decode disaggregation (use --engine sim)")
    if args.replicas != 1:
        ap.error("--replicas: only with --engine sim")
    if not 1 <= args.instances <= MAX_INSTANCES:
        ap.error(f"--instances: 1 to {MAX_INSTANCES} llama-servers")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The demo on ``args.instances`` llama-servers, one fresh set per policy."""
    try:
        binary, model = ensure_engine()
    except EngineError as e:
        print(f"kvrouter demo: {e}", file=sys.stderr)
        return 1
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    name = args.workload.split(":", 1)[0]
    params = WORKLOAD_PARAMS.get(name, {})
    workload = make_workload(args.workload, rate=args.rate, n=args.requests, seed=args.seed,
                             **params)
    threads = threads_per_server(args.instances)
    setup = {
        "deployment": f"mixed, {args.instances} llama-server instances "
                      "(engine: llamacpp in register.yaml), a fresh set per policy",
        "workload": f"{args.workload} {params}, {len(workload)} requests at {args.rate:g} "
                    f"req/s, seed {args.seed}; prompts as English words (one token each)",
        "engine": f"llama.cpp llama-server ({binary}), tiny random-weight llama "
                  f"({Path(model).name}, Llama-2 vocabulary), {SLOTS} slots of {SLOT_CTX} "
                  f"tokens, --cache-ram 0, {threads} thread(s) each",
    }
    print("kvrouter demo: " + "; ".join(setup.values()), file=sys.stderr)

    async def run_one(policy: str, tmp: Path) -> report.PolicySummary:
        async with AsyncExitStack() as stack:
            logs = tmp / policy
            logs.mkdir()
            ports = await asyncio.gather(*(
                start_server(binary, model, f"tiny-{i}", threads,
                             logs / f"llama-server-{i}.log", stack)
                for i in range(args.instances)))
            url = await start_router(policy, list(ports), logs, stack)
            results, seconds = await replay(url, workload, time_scale=1.0,
                                            progress=progress_bar(policy),
                                            prompt_format="words")
            prompt, cached = await backend_token_totals(url)
            return report.summarize(policy, results, seconds, 1.0, prompt, cached)

    async def run_all() -> list[report.PolicySummary]:
        # SIGTERM as Ctrl-C: cancel (once), so that every process started is stopped on the
        # way out
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: task.cancelling() or task.cancel())
        with tempfile.TemporaryDirectory(prefix="kvrouter-demo-") as tmp:
            return [await run_one(policy, Path(tmp)) for policy in policies]

    try:
        rows = asyncio.run(run_all())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("kvrouter demo: interrupted; every process it started was stopped",
              file=sys.stderr)
        return 130
    except EngineError as e:
        print(f"kvrouter demo: {e}", file=sys.stderr)
        return 1
    print(report.table(rows))
    report.write_all(rows, setup, Path(args.out),
                     f"kvrouter demo: {args.instances} llama-servers, {name}",
                     "kvrouter demo " + shlex.join(argv), args.json, real_time=True)
    return 0 if all(r.failed == 0 for r in rows) else 1
