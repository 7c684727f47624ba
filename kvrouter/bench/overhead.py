"""``kvrouter bench overhead``: what the router itself costs, next to other routers.

Targets, side by side, all in front of the same fast mock backend
(:mod:`kvrouter.bench.mockbackend`, ``--instances`` ports of one process):

* ``direct``: wrk straight to one backend port (the baseline of the added latency);
* ``kvrouter``: this checkout (``python -m kvrouter`` with a generated ``config.yaml`` and
  ``register.yaml``), or each ``--variant NAME=PYTHONPATH``, once per ``--workers`` count
  (label ``kvrouter×2``); policy ``request_num``, ``cache_aware`` for the 2 KB test; with
  ``--redis URL`` (or ``auto``: a ``redis-server`` started for the run) also once as a
  router replica sharing its state through that Redis (label ``kvrouter+redis``, one worker;
  ``state.redis-url`` in its config, a fresh ``state.key-prefix`` per start);
* every ``--peer NAME=CMD``: a command template as in ``bench policies --router-cmd``
  (``{port}``, ``{workers}``, ``{workers_comma}``, ``{prometheus_port}``), whatever policy it
  names, started and awaited by :mod:`kvrouter.bench.external`;
* ``nginx`` (the floor), when it is on PATH or given by ``--nginx``: a generated config, one
  worker, upstream keepalive, no buffering, no access log.

Tests (``--tests``): ``c1`` tiny non-stream chat at 1 connection (p50/p99; added vs direct),
``c64`` the same at 64 connections (req/s, router CPU µs/request, user+sys and sys),
``ca64`` ~2 KB prompts at 64 connections, ``sse`` ``--streams`` concurrent streams of 50 events
20 ms apart (CPU µs per relayed event, stream duration p50/p99, peak RSS). CPU and RSS are the
router's whole process tree (children included). Each round runs every target in turn (the order
rotates per round); the table shows medians over ``--repeat`` rounds. Then the routing-decision
microbenchmark (:mod:`kvrouter.bench.decision`) runs in-process. Loopback only; every process
runs in its own process group and is stopped at the end; ``--deadline`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter import __version__
from kvrouter.bench.external import free_port, launch_external
from kvrouter.bench.overhead_report import check_targets, table
from kvrouter.bench.wrk import (
    EVENTS_PER_STREAM,
    STREAM_SECONDS,
    ProcTree,
    run_wrk,
    stream_bytes,
    write_lua,
)

__all__ = ["main", "parser"]

TESTS = ("c1", "c64", "ca64", "sse")


@dataclass
class Target:
    label: str
    kind: str                       # direct | kvrouter | peer | nginx
    command: str = ""               # peer: the command template; nginx: the binary
    pythonpath: str | None = None   # kvrouter variant
    workers: int = 1
    redis: bool = False             # kvrouter: a replica sharing state through --redis


class UsageError(ValueError):
    pass


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvrouter bench overhead",
        description="Router overhead: CPU per request and per relayed SSE event, added latency, "
                    "throughput and RSS of kvrouter vs direct, nginx and peer routers.")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=CMD",
                    help="an external router command template ({port} {workers} "
                         "{workers_comma} {prometheus_port}); repeatable")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHONPATH",
                    help="a kvrouter checkout to compare (repeatable; default: this one)")
    ap.add_argument("--workers", default="1", metavar="N,N",
                    help="kvrouter --workers counts, one row each (default 1)")
    ap.add_argument("--redis", default=None, metavar="URL|auto",
                    help="also run each kvrouter variant as a replica sharing its state "
                         "through this Redis (auto: start a redis-server for the run)")
    ap.add_argument("--nginx", default=None, metavar="PATH",
                    help="nginx binary for the floor row (default: nginx on PATH, if any)")
    ap.add_argument("--no-nginx", action="store_true", help="no nginx row")
    ap.add_argument("--tests", default=",".join(TESTS), help="comma list of " + ",".join(TESTS))
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per test (default 5)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; medians are shown (default 1)")
    ap.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams (1000)")
    ap.add_argument("--instances", type=int, default=2, help="backend ports (default 2)")
    ap.add_argument("--pin", action="store_true",
                    help="router on the first CPU, wrk and the backend on the second")
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="hard limit on the whole run, seconds (default 900)")
    ap.add_argument("--decision-instances", type=int, default=1000,
                    help="decision benchmark: candidate instances (default 1000)")
    ap.add_argument("--decision-prompt-tokens", type=int, default=8192,
                    help="decision benchmark: prompt length in tokens (default 8192)")
    ap.add_argument("--decision-iterations", type=int, default=2000,
                    help="decision benchmark: decisions timed per policy (default 2000)")
    ap.add_argument("--no-decision", action="store_true", help="skip the decision benchmark")
    ap.add_argument("--reference", default=None, metavar="NAME",
                    help="peer whose added latency kvrouter's must not exceed "
                         "(default: the first peer named *vllm*)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write all numbers as JSON")
    ap.add_argument("--workdir", default=None, help="configs and logs (default: a temp dir)")
    return ap


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise UsageError(f"{what} wants NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_targets(args: argparse.Namespace) -> list[Target]:
    """The targets of the command line, validated (UsageError on a bad option)."""
    try:
        workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        raise UsageError(f"--workers wants a comma list of integers, got {args.workers!r}"
                         ) from None
    if not workers or workers[0] < 1:
        raise UsageError("--workers counts must be >= 1")
    bad = set(args.tests.split(",")) - set(TESTS)
    if bad or not args.tests:
        raise UsageError(f"--tests: unknown {sorted(bad)}; choose from {','.join(TESTS)}")
    for name in ("duration", "repeat", "streams", "instances", "deadline"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be > 0")
    targets = [Target("direct", "direct")]
    variants = [_pair(v, "--variant") for v in args.variant] or [("kvrouter", "")]
    for name, path in variants:
        if path and not Path(path).is_dir():
            raise UsageError(f"--variant {name}: {path} is not a directory")
        for w in workers:
            targets.append(Target(name if w == 1 else f"{name}×{w}", "kvrouter",
                                  pythonpath=str(Path(path).resolve()) if path else None,
                                  workers=w))
        if args.redis:
            targets.append(Target(f"{name}+redis", "kvrouter",
                                  pythonpath=str(Path(path).resolve()) if path else None,
                                  redis=True))
    if not args.no_nginx:
        nginx = args.nginx or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if args.nginx and not (shutil.which(args.nginx)):
            raise UsageError(f"--nginx {args.nginx}: not an executable")
        if nginx:
            targets.append(Target("nginx", "nginx", command=nginx))
    for text in args.peer:
        name, cmd = _pair(text, "--peer")
        targets.append(Target(name, "peer", command=cmd))
    labels = [t.label for t in targets]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise UsageError(f"duplicate target names: {sorted(dup)}")
    return targets


def _preflight(args: argparse.Namespace, targets: list[Target]) -> None:
    if shutil.which("wrk") is None:
        raise UsageError("wrk not found on PATH; install it (apt-get install wrk)")
    if args.pin and (shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2):
        raise UsageError("--pin needs taskset and at least 2 CPUs")
    checked: set[str | None] = set()
    for t in targets:
        if t.kind == "kvrouter" and t.workers > 1 and t.pythonpath not in checked:
            checked.add(t.pythonpath)
            out = subprocess.run([sys.executable, "-m", "kvrouter", "--help"], env=_env(t),
                                 capture_output=True, text=True, timeout=60, check=False)
            if "--workers" not in out.stdout:
                where = t.pythonpath or "the installed one"
                raise UsageError(f"--workers {args.workers}: this kvrouter ({where}) has no "
                                 f"--workers flag yet")


def _env(t: Target) -> dict[str, str]:
    env = dict(os.environ)
    if t.pythonpath:
        env["PYTHONPATH"] = t.pythonpath
    return env


def _raise_nofile(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * streams + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Ctx:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.lua = write_lua(workdir)
        self.tests = [t for t in TESTS if t in args.tests.split(",")]
        cpus = sorted(os.sched_getaffinity(0))
        self.router_cpu: str | None = str(cpus[0]) if args.pin else None
        self.load_cpu: str | None = str(cpus[1]) if args.pin else None
        self.ports: list[int] = []
        self.deadline = 0.0
        self.redis_url = ""          # --redis (the started server's URL for auto)
        self.starts = 0              # kvrouter starts (a fresh Redis key prefix each)
        self.records: list[dict] = []
        self.errors: list[str] = []

    def taskset(self, cpu: str | None) -> str:
        return f"taskset -c {cpu} " if cpu is not None else ""

    @property
    def workers(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def time_left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kvrouter_files(ctx: Ctx, policy: str, redis: bool = False) -> Path:
    reg = ctx.dir / "register.yaml"
    reg.write_text("instances:\n" + "".join(
        f"  - {{role: mixed, host_ip: 127.0.0.1, port: {p}}}\n" for p in ctx.ports))
    cfg = ctx.dir / f"kvrouter-{policy}{'-redis' if redis else ''}.yaml"
    state = ""
    if redis:
        ctx.starts += 1
        state = (f"state:\n  redis-url: {json.dumps(ctx.redis_url)}\n"
                 f"  key-prefix: bench{os.getpid()}-{ctx.starts}\n")
    cfg.write_text(f"server:\n  host: 127.0.0.1\nscheduler:\n  policy: {policy}\n"
                   f"  stats-interval-secs: 0\nmanager:\n  register-path: {reg}\n"
                   f"  health-check-interval-secs: 60\n{state}")
    return cfg


def _nginx_conf(ctx: Ctx, port: int) -> Path:
    d = ctx.dir / f"nginx-{port}"
    d.mkdir(exist_ok=True)
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in ctx.ports)
    temps = "".join(f"  {k}_temp_path {d}/{k};\n"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {4 * ctx.args.streams + 1024};
events {{ worker_connections {4 * ctx.args.streams + 512}; }}
http {{
  access_log off;
{temps}  upstream backends {{
{servers}    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
    return conf


async def _start(ctx: Ctx, t: Target, policy: str, stack: AsyncExitStack) -> tuple[str, int]:
    """Start the router of ``t``; its URL and pid."""
    safe = "".join(c if c.isalnum() else "_" for c in t.label)
    log_path = ctx.dir / f"{safe}-{policy}.log"
    pin = ctx.taskset(ctx.router_cpu)
    if t.kind == "kvrouter":
        cfg = _kvrouter_files(ctx, policy, t.redis)
        env = f"env PYTHONPATH={shlex.quote(t.pythonpath)} " if t.pythonpath else ""
        extra = f" --workers {t.workers}" if t.workers > 1 else ""
        cmd = (f"{pin}{env}{shlex.quote(sys.executable)} -m kvrouter --port {{port}} "
               f"--config_path {shlex.quote(str(cfg))}{extra}")
        return await launch_external(cmd, ctx.workers, stack, log_path, 60)
    if t.kind == "nginx":
        port = free_port()
        conf = _nginx_conf(ctx, port)
        cmd = (f"{pin}{shlex.quote(t.command)} -p {shlex.quote(str(conf.parent))} -e "
               f"{shlex.quote(str(conf.parent / 'error.log'))} -c {shlex.quote(str(conf))}")
        return await launch_external(cmd, ctx.workers, stack, log_path, 30, port=port)
    return await launch_external(pin + t.command, ctx.workers, stack, log_path, 120)


async def _measure(tree: ProcTree | None, run) -> tuple[dict, float, float, list[float]]:
    """Run ``run()`` (a wrk coroutine) while sampling ``tree``: (result, CPU user+sys s,
    sys s, [peak RSS MB, peak PSS MB])."""
    if tree is None:
        return await run, 0.0, 0.0, [0.0, 0.0]
    peak = [tree.rss_mb(), tree.pss_mb()]

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.25)
            peak[0] = max(peak[0], tree.rss_mb())
            peak[1] = max(peak[1], tree.pss_mb())

    sampler = asyncio.create_task(sample())
    c0 = tree.cpu()
    try:
        res = await run
    finally:
        sampler.cancel()
    c1 = tree.cpu()
    return res, c1.total - c0.total, c1.system - c0.system, peak


async def _test(ctx: Ctx, t: Target, test: str, url: str, tree: ProcTree | None) -> dict:
    a = ctx.args
    chat = url + "/v1/chat/completions"
    cpu = ctx.load_cpu
    if test in ("c1", "c64", "ca64"):
        conns = 1 if test == "c1" else 64
        lua = ctx.lua["prompt2k" if test == "ca64" else "tiny"]
        await run_wrk(chat, lua, conns, 1, cpu=cpu)   # warm-up
        res, secs, sys_s, rss = await _measure(tree, run_wrk(chat, lua, conns, a.duration,
                                                             cpu=cpu))
        n = max(res["requests"], 1)
        out = {"rps": res["rps"], "p50_us": res["p50_us"], "p90_us": res["p90_us"],
               "p99_us": res["p99_us"], "requests": res["requests"], "errors": res["errors"]}
        if tree is not None:
            out.update(cpu_us_per_req=round(secs / n * 1e6, 2),
                       sys_us_per_req=round(sys_s / n * 1e6, 2),
                       router_cores=round(secs / (res["duration_us"] / 1e6), 3),
                       peak_rss_mb=round(rss[0], 1), peak_pss_mb=round(rss[1], 1))
        return out
    # the size of one stream through this target, fetched alongside the load (one stream more)
    probe = asyncio.create_task(stream_bytes(chat))
    try:
        res, secs, sys_s, rss = await _measure(
            tree, run_wrk(chat, ctx.lua["stream"], a.streams, a.duration, timeout="30s", cpu=cpu))
    finally:
        per_stream = await probe
    dur = res["duration_us"] / 1e6
    events = res["bytes"] / per_stream * EVENTS_PER_STREAM
    out = {"streams_done": res["requests"], "bytes_per_stream": per_stream,
           "events": round(events), "events_per_s": round(events / dur),
           "ideal_events_per_s": round(a.streams * EVENTS_PER_STREAM / STREAM_SECONDS),
           "stream_p50_ms": res["p50_us"] / 1e3, "stream_p99_ms": res["p99_us"] / 1e3,
           "errors": res["errors"]}
    if tree is not None:
        out.update(cpu_us_per_event=round(secs / max(events, 1) * 1e6, 3),
                   sys_us_per_event=round(sys_s / max(events, 1) * 1e6, 3),
                   router_cores=round(secs / dur, 3), peak_rss_mb=round(rss[0], 1),
                   peak_pss_mb=round(rss[1], 1))
    await asyncio.sleep(1.0)   # the backend finishes the streams wrk abandoned
    return out


async def _run_target(ctx: Ctx, t: Target, rnd: int) -> None:
    groups: list[tuple[str, list[str]]]
    if t.kind == "kvrouter":
        groups = [("request_num", [x for x in ctx.tests if x != "ca64"]),
                  ("cache_aware", [x for x in ctx.tests if x == "ca64"])]
    else:
        groups = [("", list(ctx.tests))]
    budget = ctx.args.duration + (ctx.args.duration + 25 if "sse" in ctx.tests else 10)
    for policy, tests in groups:
        if not tests:
            continue
        async with AsyncExitStack() as stack:
            if t.kind == "direct":
                url, tree = ctx.workers[0], None
            else:
                try:
                    url, pid = await _start(ctx, t, policy or "own", stack)
                except (RuntimeError, OSError) as exc:
                    ctx.errors.append(f"round {rnd} {t.label}: {exc}")
                    log(f"  {t.label}: did not start: {exc}")
                    return
                tree = ProcTree(pid)
                await asyncio.sleep(0.5)
                if policy != "cache_aware":
                    ctx.records.append({"target": t.label, "round": rnd, "test": "idle",
                                        "rss_idle_mb": round(tree.rss_mb(), 1),
                                        "pss_idle_mb": round(tree.pss_mb(), 1)})
            for test in tests:
                if ctx.time_left() < budget:
                    ctx.errors.append(f"round {rnd} {t.label} {test}: skipped (deadline)")
                    log(f"  {t.label} {test}: skipped, --deadline near")
                    continue
                try:
                    rec = await _test(ctx, t, test, url, tree)
                except (RuntimeError, OSError, TimeoutError, ValueError) as exc:
                    ctx.errors.append(f"round {rnd} {t.label} {test}: {exc}")
                    log(f"  {t.label} {test}: failed: {exc}")
                    continue
                ctx.records.append({"target": t.label, "round": rnd, "test": test, **rec})
                log(f"  {t.label:16s} {test:5s} " + " ".join(
                    f"{k}={v}" for k, v in rec.items() if k in _SHOWN))


_SHOWN = ("rps", "p50_us", "p99_us", "cpu_us_per_req", "events_per_s", "cpu_us_per_event",
          "stream_p99_ms", "peak_rss_mb", "errors")


def summarize(records: list[dict], targets: list[Target]) -> dict[str, dict[str, dict]]:
    """target → test → metric → median over the rounds; c1 also gets ``added_p50_us`` and
    ``added_p99_us`` (vs direct's medians)."""
    out: dict[str, dict[str, dict]] = {}
    for t in targets:
        for test in ("idle", *TESTS):
            rows = [r for r in records if r["target"] == t.label and r["test"] == test]
            if not rows:
                continue
            keys = [k for k in rows[0] if k not in ("target", "round", "test")]
            out.setdefault(t.label, {})[test] = {
                k: round(statistics.median(r[k] for r in rows if k in r), 3) for k in keys}
            out[t.label][test]["rounds"] = len(rows)
    base = out.get("direct", {}).get("c1")
    for label, tests in out.items():
        if base and "c1" in tests and label != "direct":
            tests["c1"]["added_p50_us"] = round(tests["c1"]["p50_us"] - base["p50_us"], 1)
            tests["c1"]["added_p99_us"] = round(tests["c1"]["p99_us"] - base["p99_us"], 1)
    return out


def _decision(args: argparse.Namespace) -> list[dict] | None:
    try:
        from kvrouter.bench import decision
    except ImportError as exc:
        if exc.name != "kvrouter.bench.decision":
            raise
        log("decision: skipped (kvrouter.bench.decision not available)")
        return None
    log(f"decision: {args.decision_instances} instances, {args.decision_prompt_tokens}-token "
        f"prompt, {args.decision_iterations} iterations")
    return list(decision.run(instances=args.decision_instances,
                             prompt_tokens=args.decision_prompt_tokens,
                             iterations=args.decision_iterations))


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0][:120] if out.returncode == 0 and text else None


def _environment(args: argparse.Namespace, targets: list[Target], argv: list[str]) -> dict:
    env: dict[str, Any] = {
        "command": "kvrouter bench overhead " + shlex.join(argv),
        "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
        "platform": platform.platform(), "python": platform.python_version(),
        "kvrouter": __version__, "wrk": _version(["wrk", "-v"])}
    for t in targets:
        if t.kind == "nginx":
            env["nginx"] = _version([t.command, "-v"])
        elif t.kind == "peer":
            exe = shlex.split(t.command)[0]
            env[f"peer:{t.label}"] = {"command": t.command, "version": _version([exe, "--version"])}
    return env


async def run(args: argparse.Namespace, targets: list[Target], workdir: Path) -> dict:
    ctx = Ctx(args, workdir)
    loop = asyncio.get_running_loop()
    ctx.deadline = loop.time() + args.deadline
    ctx.ports = [free_port() for _ in range(args.instances)]
    async with AsyncExitStack() as stack:
        ctx.redis_url = args.redis or ""
        if args.redis == "auto":
            from kvrouter.demo.redisproc import RedisServer

            server = RedisServer(workdir / "redis")
            await server.start()
            stack.push_async_callback(server.stop)
            ctx.redis_url = server.url
        pin = ctx.taskset(ctx.load_cpu)
        others = "".join(f",{p}" for p in ctx.ports[1:])
        await launch_external(f"{pin}{shlex.quote(sys.executable)} -m kvrouter.bench.mockbackend "
                              f"--ports {{port}}{others} --delay-ms 20 --chunks 50", [], stack,
                              workdir / "backend.log", 30, port=ctx.ports[0])
        for rnd in range(args.repeat):
            k = rnd % len(targets)
            log(f"round {rnd + 1}/{args.repeat}")
            for t in targets[k:] + targets[:k]:
                await _run_target(ctx, t, rnd)
    summary = summarize(ctx.records, targets)
    return {"summary": summary, "records": ctx.records, "decision": None, "errors": ctx.errors,
            "targets": [{"label": t.label, "kind": t.kind, "command": t.command,
                         "pythonpath": t.pythonpath, "workers": t.workers, "redis": t.redis}
                        for t in targets]}


def main(argv: list[str] | tuple[str, ...] = ()) -> int:
    argv = list(argv)
    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        targets = build_targets(args)
        _preflight(args, targets)
    except UsageError as exc:
        print(f"kvrouter bench overhead: error: {exc}", file=sys.stderr)
        return 2
    _raise_nofile(args.streams)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvr-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"targets: {', '.join(t.label for t in targets)}; tests: {args.tests}; "
        f"logs in {workdir}")
    env = _environment(args, targets, argv)

    async def bounded() -> dict:
        return await asyncio.wait_for(run(args, targets, workdir), args.deadline + 60)

    started = time.monotonic()
    try:
        report = asyncio.run(bounded())
    except TimeoutError:
        print(f"kvrouter bench overhead: failed: --deadline {args.deadline:g} s exceeded",
              file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"kvrouter bench overhead: failed: {exc}", file=sys.stderr)
        return 1
    if not args.no_decision:   # in-process, after the routers are gone (it runs its own loop)
        if time.monotonic() - started < args.deadline - 30:
            try:
                report["decision"] = _decision(args)
            except Exception as exc:  # report it, keep the other results
                report["errors"].append(f"decision: {exc!r}")
        else:
            report["errors"].append("decision: skipped (deadline)")
    report["environment"] = env
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("json",)}
    reference = args.reference or next(
        (t.label for t in targets if t.kind == "peer" and "vllm" in t.label.lower()), None)
    report["checks"] = check_targets(report, [t.label for t in targets if t.kind == "kvrouter"],
                                     reference, args)
    print(table(report, targets=[t.label for t in targets], args=args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        log(f"wrote {args.json}")
    log(env["command"])
    for err in report["errors"]:
        log(f"error: {err}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
