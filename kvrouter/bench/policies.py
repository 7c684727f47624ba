"""``kvrouter bench policies``: routing policies compared on the same workload and cluster.

Virtual mode (default): per policy and rate, :func:`kvrouter.sim.cluster.run_cluster` replays
the workload in virtual time (deterministic per ``--seed``, seconds per run). Live mode
(``--live``): per policy and rate, a real router and real-time ``kvrouter sim`` processes, the
workload replayed over HTTP (:mod:`kvrouter.bench.live`); ``--router-cmd`` adds external
routers (sglang-router, vllm-router) in front of the same simulated instances.

Per policy and rate it reports the token hit rate measured at the instances, the bound of one
unified LRU cache of the cluster's total size on the same arrival order, TTFT p50/p90/p99,
inter-token latency p50/p99, output throughput and SLO attainment; with ``--sweep``, goodput
per policy (:mod:`kvrouter.bench.goodput`). Output: a table on stdout, ``--json OUT`` and two
PNG plots in ``--out``. See ``bench/README.md``.

``--admission on|off|both`` runs each policy with and/or without the router's admission queue
(:mod:`kvrouter.admission`: in virtual time the cluster drives the server's own queue; live,
the router's ``scheduler.*`` limits); requests it rejects count as missing the SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter.bench.external import default_label
from kvrouter.bench.goodput import Slo, attainment, goodput, meets
from kvrouter.config import SchedulerConfig
from kvrouter.policies import make_policy
from kvrouter.prefix.index import PrefixIndex
from kvrouter.sim.cluster import run_cluster, summarize
from kvrouter.sim.cluster.nodes import calibrate_prefill
from kvrouter.sim.core import make_engine_core
from kvrouter.sim.core.params import PRESETS, EngineParams, make_params
from kvrouter.sim.workloads import (
    WORKLOADS,
    WorkloadRequest,
    make_workload,
    unified_cache_bound,
)

__all__ = ["PolicySpec", "main", "parser", "run"]

#: Compared by default, in this order (names not (yet) known to ``make_policy`` are skipped).
DEFAULT_POLICIES = ("random", "round_robin", "request_num", "cache_aware",
                    "sglang_cache_aware", "kv_cost", "oracle")

DEFAULT_REQUESTS = {"virtual": 1000, "live": 60}


@dataclass(frozen=True)
class PolicySpec:
    """A row's routing: ``label`` (as given), the (prefill) policy and, in PD, the decode
    policy; or an external router command (live only)."""

    label: str
    policy: str
    decode_policy: str | None = None
    command: str | None = None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for options that have a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] \
                or action.help is None:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvrouter bench policies",
        description="Compare routing policies on a simulated cluster (virtual time, or live "
                    "through a real router with --live).",
        formatter_class=_HelpFormatter)
    w = ap.add_argument_group("workload")
    w.add_argument("--workload", default="b2b",
                   help=f"{', '.join(WORKLOADS)} or trace:PATH (Mooncake JSONL)")
    w.add_argument("--workload-param", action="append", default=[], metavar="K=V",
                   help="generator parameter, repeatable (e.g. groups=40 context=3000)")
    w.add_argument("--requests", type=int, default=None,
                   help="requests per run (default 1000 virtual, 60 live; a trace: its first "
                        "N lines, 0 = all)")
    w.add_argument("--rate", type=float, default=10.0,
                   help="request rate (req/s, model time) of a synthetic workload")
    w.add_argument("--sweep", default=None, metavar="LIST",
                   help="comma list of rates (a trace: of speeds); enables goodput")
    w.add_argument("--speed", type=float, default=1.0,
                   help="time-scale of a trace (2 = twice as fast)")
    w.add_argument("--seed", type=int, default=0, help="workload and simulation seed")
    c = ap.add_argument_group("cluster")
    c.add_argument("--policies", default=None,
                   help="comma list; PD: PREFILL[/DECODE] (default: "
                        f"{','.join(DEFAULT_POLICIES)}, those that exist)")
    c.add_argument("--instances", type=int, default=8, help="mixed instances")
    c.add_argument("--pd", default=None, metavar="P,D",
                   help="prefill/decode disaggregation with P prefill and D decode instances")
    c.add_argument("--decode-policy", default="request_num",
                   help="PD decode policy for policies given without /DECODE")
    c.add_argument("--preset", default="qwen3-32b-tp2-h100", choices=sorted(PRESETS),
                   help="engine preset of every instance")
    c.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per instance (default: the preset's capacity)")
    c.add_argument("--request-timeout", type=float, default=600.0,
                   help="model seconds before a request is given up (counted as failed)")
    a = ap.add_argument_group("admission queue (the router's scheduler.* limits)")
    a.add_argument("--admission", choices=("on", "off", "both"), default="off",
                   help="run each policy with the router's admission queue, without, or both")
    a.add_argument("--max-inflight", type=int, default=None, metavar="N",
                   help="in-flight requests per instance before requests wait in the router "
                        "(0 = twice the engine's reported batch; default: auto, as many "
                        "requests of the workload's mean size as the KV cache holds)")
    a.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="queued uncached prefill tokens per instance (0 = no limit; default: "
                        "auto, the engine's prefill work of half the TTFT SLO)")
    a.add_argument("--queue-size", type=int, default=1024, metavar="N",
                   help="requests waiting in the router; beyond, rejected at once")
    a.add_argument("--queue-timeout", type=float, default=None, metavar="S",
                   help="model seconds a request may wait in the router (default: a quarter "
                        "of the TTFT SLO)")
    s = ap.add_argument_group("SLO (goodput)")
    s.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    s.add_argument("--slo-itl", type=float, default=0.1, help="seconds, per-request mean ITL")
    s.add_argument("--slo-attainment", type=float, default=0.9,
                   help="fraction of requests that must meet the SLO")
    lv = ap.add_argument_group("live mode")
    lv.add_argument("--live", action="store_true",
                    help="through a real router over HTTP against real-time sim processes")
    lv.add_argument("--time-scale", type=float, default=0.5,
                    help="real seconds per model second")
    lv.add_argument("--router-cmd", action="append", default=[], metavar="CMD",
                    help="external router command with {port} and {workers} (repeatable; "
                         "also {workers_comma}, {prometheus_port})")
    lv.add_argument("--router-label", action="append", default=[], metavar="NAME",
                    help="row label of the matching --router-cmd")
    lv.add_argument("--prompt-format", choices=("auto", "ids", "text"), default="auto",
                    help="ids: prompt_token_ids; text: 4 hex digits per token; auto: ids for "
                         "kvrouter, text for external routers")
    lv.add_argument("--router-ready-timeout", type=float, default=120.0,
                    help="seconds an external router gets to become ready")
    o = ap.add_argument_group("output")
    o.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    o.add_argument("--out", default="bench-out", help="directory of the PNG plots")
    o.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return ap


# ------------------------------------------------------------------------------- helpers
def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            key, sep, val = part.partition("=")
            if not sep or not key:
                raise ValueError(f"--workload-param expects K=V, got {part!r}")
            out[key.replace("-", "_")] = _value(val)
    return out


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    if not vals or any(v <= 0 for v in vals):
        raise ValueError("--sweep needs positive numbers")
    return sorted(set(vals))


def policy_exists(name: str) -> bool:
    """Whether ``run_cluster`` accepts ``name`` (``oracle`` or a ``make_policy`` name)."""
    if name == "oracle":
        return True
    try:
        make_policy(name, "mixed", SchedulerConfig(), PrefixIndex(16, 60.0), random.Random(0))
    except ValueError:
        return False
    return True


def resolve_policies(text: str | None, pd: bool, decode_policy: str, live: bool,
                     warn: Any) -> list[PolicySpec]:
    """The policies to run (``text`` None: the defaults that exist; in PD the baseline is
    ``random/random``, FastDeploy's Python router)."""
    explicit = text is not None
    names = [p.strip() for p in (text or "").split(",") if p.strip()] if explicit else \
        [p for p in DEFAULT_POLICIES if policy_exists(p)]
    if not explicit:
        missing = [p for p in DEFAULT_POLICIES if p not in names]
        if missing:
            warn(f"policies not available (skipped): {', '.join(missing)}")
        if pd:
            names = ["random/random"] + [p for p in names if p != "random"]
    out: list[PolicySpec] = []
    for label in names:
        prefill, _, decode = label.partition("/")
        if decode and not pd:
            raise ValueError(f"'{label}': PREFILL/DECODE needs --pd")
        for name in (prefill, decode) if decode else (prefill,):
            if not policy_exists(name):
                raise ValueError(f"unknown policy '{name}'")
        if live and "oracle" in (prefill, decode):
            warn("the oracle exists only in virtual time (skipped in --live)")
            continue
        out.append(PolicySpec(label, prefill, (decode or decode_policy) if pd else None))
    return out


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission queue of the runs with ``--admission``: the server's ``scheduler.*``
    keys (per instance; times in model seconds)."""

    max_inflight: int
    max_prefill_tokens: int
    queue_size: int
    queue_timeout: float

    def scheduler_keys(self, time_scale: float = 1.0) -> dict[str, Any]:
        """The ``scheduler`` section keys (``time_scale``: real seconds per model second)."""
        return {"max-inflight-per-instance": self.max_inflight,
                "max-queued-prefill-tokens-per-instance": self.max_prefill_tokens,
                "queue-size": self.queue_size,
                "queue-timeout-secs": self.queue_timeout * time_scale}

    def as_dict(self) -> dict[str, Any]:
        return {"max_inflight": self.max_inflight,
                "max_prefill_tokens": self.max_prefill_tokens,
                "queue_size": self.queue_size, "queue_timeout": self.queue_timeout}


def admission_limits(args: argparse.Namespace, params: EngineParams, slo: Slo,
                     workload: Sequence[WorkloadRequest]) -> AdmissionLimits:
    """The given limits, or defaults for the simulated engine, the workload and the SLO
    (options left ``None``; bench/README.md "Admission" has the measurements behind them):

    * in flight: as many requests of the workload's mean size (prompt + output) as one
      instance's KV cache holds, at most ``max_num_seqs``. More only wait or get preempted
      inside the engine, and every prefill they bring stalls the running decodes (their ITL);
    * queued uncached prefill: the work the engine computes in half the TTFT SLO, so that
      its own queue leaves the rest of the SLO;
    * queue timeout: a quarter of the TTFT SLO. Under overload every request served has
      waited about that long (FCFS), which must leave room for its TTFT at the instance.
    """
    inflight = args.max_inflight
    if inflight is None:
        size = sum(len(r.prompt_tokens) + r.max_tokens for r in workload) / max(1, len(workload))
        kv_tokens = params.total_blocks * params.block_size
        inflight = max(1, min(params.max_num_seqs, int(kv_tokens // max(1.0, size))))
    prefill = args.max_prefill_tokens
    if prefill is None:
        sec_per_token = calibrate_prefill(lambda i: make_engine_core(params, seed=i), 0)
        prefill = max(params.block_size, round(slo.ttft / 2 / sec_per_token))
    timeout = args.queue_timeout if args.queue_timeout is not None else slo.ttft / 4
    if inflight < 0 or prefill < 0 or args.queue_size < 0 or timeout <= 0:
        raise ValueError("admission limits must be >= 0 and --queue-timeout > 0")
    return AdmissionLimits(inflight, prefill, args.queue_size, timeout)


@dataclass
class Point:
    """One offered load: the workload at one rate (synthetic) or speed (trace)."""

    rate: float                   # reported rate (req/s, model time)
    offered_rate: float           # (n − 1) / (last − first arrival)
    speed: float | None           # trace speed, None for synthetic workloads
    workload: list[WorkloadRequest]
    bound: float


def _offered(workload: Sequence[WorkloadRequest]) -> float:
    if len(workload) < 2:
        return 0.0
    span = workload[-1].arrival - workload[0].arrival
    return (len(workload) - 1) / span if span > 0 else math.inf


def make_points(args: argparse.Namespace, n: int | None, capacity_blocks: int,
                block_size: int) -> list[Point]:
    params = _params(args.workload_param)
    trace = args.workload.startswith("trace:")
    values = _floats(args.sweep) if args.sweep else [args.speed if trace else args.rate]
    points = []
    for v in values:
        if trace:
            wl = make_workload(args.workload, rate=None, n=n or None, seed=args.seed,
                               speed=v, **params)
        else:
            wl = make_workload(args.workload, rate=v, n=n, seed=args.seed, **params)
        if not wl:
            raise ValueError("the workload is empty")
        offered = _offered(wl)
        points.append(Point(offered if trace else v, offered, v if trace else None, wl,
                            unified_cache_bound(wl, capacity_blocks, block_size)))
    return points


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def slo_rps(met: int, duration: float) -> float:
    """Requests that met the SLO per second of the run (first arrival to last end): the
    goodput of one point, which a sweep's goodput (a rate) does not show past the knee."""
    return met / duration if duration > 0 else 0.0


def _virtual_metrics(res: Any, slo: Slo) -> dict[str, Any]:
    s = summarize(res.results)
    met = sum(meets(r.ok, r.ttft, r.mean_itl, slo) for r in res.results)
    return {
        "completed": s["completed"], "failed": s["failed"], "rejected": s["rejected"],
        "rejections": res.rejections, "queue_peak": res.queue_peak,
        "slo_rps": slo_rps(met, s["duration"]), "duration": s["duration"],
        "hit_rate": s["token_hit_rate"],
        "ttft_mean": s["ttft_mean"], "ttft_p50": s["ttft_p50"], "ttft_p90": s["ttft_p90"],
        "ttft_p99": s["ttft_p99"], "itl_mean": s["itl_mean"], "itl_p50": s["itl_p50"],
        "itl_p99": s["itl_p99"], "throughput_tok_s": s["throughput"],
        "request_throughput": s["request_throughput"],
        "slo_attainment": attainment(((r.ok, r.ttft, r.mean_itl) for r in res.results), slo),
        "per_instance": s.get("per_prefill_instance", s["per_instance"]),
        "preemptions": s["preemptions"],
    }


# ---------------------------------------------------------------------------- the runs
def run(args: argparse.Namespace, log: Any = None) -> list[dict[str, Any]]:
    """All rows (runs, then goodput objects with ``--sweep``) for parsed ``args``; external
    routers that did not start are listed in ``args._skipped``."""
    args._skipped = []
    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    mode = "live" if args.live else "virtual"
    pd: tuple[int, int] | None = None
    if args.pd:
        p, _, d = args.pd.partition(",")
        pd = (int(p), int(d))
        if pd[0] < 1 or pd[1] < 1:
            raise ValueError("--pd needs P >= 1 and D >= 1")
    instances = sum(pd) if pd else args.instances
    if instances < 1:
        raise ValueError("--instances must be >= 1")
    if args.router_cmd and not args.live:
        raise ValueError("--router-cmd needs --live")
    if args.router_cmd and pd:
        raise ValueError("--router-cmd is supported in mixed mode only (not with --pd)")
    if args.workload.startswith("trace:") and "--rate" in getattr(args, "_given", ()):
        raise ValueError("a trace's rate is set with --speed (or --sweep of speeds)")
    specs = resolve_policies(args.policies, pd is not None, args.decode_policy, args.live, say)
    labels = list(args.router_label) + [None] * len(args.router_cmd)
    for cmd, label in zip(args.router_cmd, labels, strict=False):
        specs.append(PolicySpec(label or default_label(cmd), "external", None, cmd))
    if not specs:
        raise ValueError("nothing to run (no policies)")

    overrides = {"num_gpu_blocks": args.kv_blocks} if args.kv_blocks else {}
    params = make_params(args.preset, **overrides)
    cache_instances = pd[0] if pd else instances
    capacity = cache_instances * params.total_blocks
    n = args.requests if args.requests is not None else DEFAULT_REQUESTS[mode]
    points = make_points(args, n, capacity, params.block_size)
    slo = Slo(args.slo_ttft, args.slo_itl, args.slo_attainment)
    trace = args.workload.startswith("trace:")
    admissions = {"off": [False], "on": [True], "both": [False, True]}[args.admission]
    limits = (admission_limits(args, params, slo, points[0].workload) if True in admissions
              else None)
    say(f"kvrouter bench policies ({mode}): {args.workload} "
        f"{_params(args.workload_param) or ''} {len(points[0].workload)} requests, "
        + (f"PD {pd[0]}P+{pd[1]}D" if pd else f"{instances} instances")
        + f" of {args.preset} ({params.total_blocks} KV blocks of {params.block_size} tokens "
          f"each), seed {args.seed}"
        + (f"; admission queue: {limits.as_dict()}" if limits is not None else ""))

    base = {"kind": "run", "mode": mode, "workload": args.workload,
            "instances": instances, "pd": list(pd) if pd else None, "preset": args.preset,
            "kv_blocks": params.total_blocks, "block_size": params.block_size,
            "seed": args.seed}
    rows: list[dict[str, Any]] = []

    def row_head(spec: PolicySpec, pt: Point, adm: bool) -> dict[str, Any]:
        head = {"policy": spec.label, "router": "kvrouter" if spec.command is None
                else "external", **base, "admission": adm,
                "rate": pt.rate, "offered_rate": pt.offered_rate, "speed": pt.speed,
                "requests": len(pt.workload), "hit_rate_bound": pt.bound}
        if adm and limits is not None:
            head["admission_limits"] = limits.as_dict()
        if pd:
            head["prefill_policy"] = spec.policy
            head["decode_policy"] = spec.decode_policy
        if spec.command is not None:
            head["router_cmd"] = spec.command
        return head

    if not args.live:
        for spec in specs:
            for adm in admissions:
                sched = limits.scheduler_keys() if adm and limits is not None else None
                for pt in points:
                    t0 = time.perf_counter()
                    res = run_cluster(pt.workload, policy=spec.policy,
                                      instances=0 if pd else instances, preset=args.preset,
                                      seed=args.seed, pd=pd, decode_policy=spec.decode_policy,
                                      core_overrides=overrides or None,
                                      request_timeout=args.request_timeout,
                                      scheduler_overrides=sched, admission=adm)
                    row = row_head(spec, pt, adm) | _virtual_metrics(res, slo)
                    row["wall_seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    say(_progress_line(row))
    else:
        rows.extend(asyncio.run(_run_live(args, specs, points, pd, instances, slo,
                                          row_head, say, args._skipped, admissions,
                                          limits)))

    if args.sweep:
        for spec, adm in [(spec, adm) for spec in specs for adm in admissions]:
            mine = [r for r in rows if r["policy"] == spec.label and r["admission"] == adm]
            if not mine:
                continue
            pts = [(r["rate"], r["slo_attainment"]) for r in mine]
            gp, note = goodput(pts, slo)
            rows.append({"kind": "goodput", "mode": mode, "policy": spec.label,
                         "admission": adm,
                         "router": "kvrouter" if spec.command is None else "external",
                         "workload": args.workload, "goodput": gp, "goodput_note": note,
                         "rate_unit": "effective req/s (trace speeds swept)" if trace
                         else "req/s",
                         "slo": {"ttft": slo.ttft, "itl": slo.itl,
                                 "attainment": slo.attainment},
                         "rates": [p[0] for p in sorted(pts)],
                         "attainment": [p[1] for p in sorted(pts)],
                         "slo_rps": [r["slo_rps"] for r in sorted(mine,
                                                                  key=lambda r: r["rate"])]})
    return [_clean(r) for r in rows]


async def _run_live(args: argparse.Namespace, specs: list[PolicySpec], points: list[Point],
                    pd: tuple[int, int] | None, instances: int, slo: Slo, row_head: Any,
                    say: Any, skipped: list[str], admissions: list[bool],
                    limits: AdmissionLimits | None) -> list[dict[str, Any]]:
    from kvrouter.bench.live import (
        LiveSetup,
        LiveTarget,
        live_metrics,
        router_log_path,
        run_live,
    )
    from kvrouter.demo.replay import progress_bar

    rows = []
    with tempfile.TemporaryDirectory(prefix="kvrouter-bench-") as tmp:
        setup = LiveSetup(instances, pd, args.preset, args.kv_blocks, args.time_scale,
                          args.seed, args.request_timeout * args.time_scale, Path(tmp),
                          args.router_ready_timeout)
        for spec, adm in [(spec, adm) for spec in specs for adm in admissions]:
            if adm and spec.command is not None:
                say(f"  {spec.label}: an external router has no kvrouter admission queue "
                    "(run without it only)")
                continue
            fmt = args.prompt_format
            if fmt == "auto":
                fmt = "ids" if spec.command is None else "text"
            # the router's queue: off = no headroom limit (no queue); on = the limits
            sched = (limits.scheduler_keys(args.time_scale) if adm and limits is not None
                     else {"queue-size": 0})
            target = LiveTarget(spec.label, None if spec.command else spec.policy,
                                spec.decode_policy or "request_num", spec.command, fmt,
                                router_config={"scheduler": sched})
            for pt in points:
                t0 = time.perf_counter()
                bar = None if args.quiet else progress_bar(
                    f"{spec.label}{' +adm' if adm else ''} @{pt.rate:g}")
                try:
                    out = await run_live(target, pt.workload, setup, progress=bar)
                except (RuntimeError, OSError) as exc:
                    if spec.command is None:
                        raise
                    # an external router that does not start is reported and skipped
                    say(f"  {spec.label}: skipped: {exc}")
                    skipped.append(spec.label)
                    log = router_log_path(setup, spec.label)
                    if log.exists():
                        tail = log.read_text(errors="replace")[-2000:]
                        say(f"  --- {log.name} (tail) ---\n{tail}")
                    break
                row = row_head(spec, pt, adm) | live_metrics(out, args.time_scale, slo)
                row["time_scale"] = args.time_scale
                row["prompt_format"] = fmt
                row["wall_seconds"] = time.perf_counter() - t0
                rows.append(row)
                say(_progress_line(row))
    return rows


# ------------------------------------------------------------------------------ output
def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _sec(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{1e3 * v:.1f}"


def _label(r: dict[str, Any]) -> str:
    """The policy, marked when the row ran with the admission queue."""
    return f"{r['policy']} +adm" if r.get("admission") else r["policy"]


def _progress_line(r: dict[str, Any]) -> str:
    v = _clean(r)
    return (f"  {_label(v):<22} rate {v['rate']:<7.4g} done {v['completed']:>5} "
            f"fail {v['failed']:>4} rej {v['rejected']:>4}  hit {_pct(v['hit_rate'])}  "
            f"TTFT p99 {_sec(v['ttft_p99'])}s  ({r['wall_seconds']:.1f}s wall)")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The text table: one line per policy and rate, then goodput per policy."""
    runs = [r for r in rows if r["kind"] == "run"]
    width = max([len("policy")] + [len(r["policy"]) for r in runs])
    head = (f"{'policy':<{width}} {'adm':>3} {'rate':>7} {'done':>5} {'fail':>4} {'rej':>4} "
            f"{'hit':>6} {'bound':>6} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} "
            f"{'p99':>7} {'tok/s':>7} {'SLO ok':>7} {'SLO r/s':>7}")
    out = [head, "-" * len(head)]
    for r in runs:
        out.append(f"{r['policy']:<{width}} {'on' if r['admission'] else 'off':>3} "
                   f"{r['rate']:>7.4g} {r['completed']:>5} {r['failed']:>4} {r['rejected']:>4} "
                   f"{_pct(r['hit_rate']):>6} {_pct(r['hit_rate_bound']):>6} "
                   f"{_sec(r['ttft_p50']):>9} {_sec(r['ttft_p90']):>8} "
                   f"{_sec(r['ttft_p99']):>8} {_ms(r['itl_p50']):>8} {_ms(r['itl_p99']):>7} "
                   f"{r['throughput_tok_s']:>7.0f} {_pct(r['slo_attainment']):>7} "
                   f"{r['slo_rps']:>7.2f}")
    out.append("(TTFT in model seconds, ITL in model milliseconds; hit = token hit rate at "
               "the instances, bound = one unified LRU cache of the cluster's size;\n adm = "
               "the router's admission queue, rej = requests it rejected (429/503: they miss "
               "the SLO), SLO r/s = requests meeting the SLO per second of the run)")
    gps = [r for r in rows if r["kind"] == "goodput"]
    if gps:
        s = gps[0]["slo"]
        out += ["", (f"goodput (req/s): highest swept rate up to which >= "
                     f"{100 * s['attainment']:g}% of requests have TTFT <= {s['ttft']:g} s "
                     f"and mean ITL <= {1e3 * s['itl']:g} ms")]
        notes = {"ok": "", "at_least": "  (>= : met at every swept rate)",
                 "below_sweep": "  (< lowest swept rate)"}
        for g in gps:
            out.append(f"  {_label(g):<{width + 5}} {g['goodput']:>7.4g}"
                       f"{notes[g['goodput_note']]}")
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    ap = parser()
    try:
        args = ap.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    args._given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        rows = run(args, log)
    except (ValueError, TypeError) as exc:
        print(f"kvrouter bench policies: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"kvrouter bench policies: failed: {exc}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        log(f"wrote {args.json}")
    if not args.no_plots:
        from kvrouter.bench.plots import plot_rows
        runs = [r for r in rows if r["kind"] == "run"]
        what = (f"PD {runs[0]['pd'][0]}P+{runs[0]['pd'][1]}D" if runs and runs[0]["pd"]
                else f"{runs[0]['instances']} instances" if runs else "")
        title = (f"{args.workload}, {what} {args.preset}, {runs[0]['requests'] if runs else 0} "
                 f"requests, seed {args.seed} ({'live' if args.live else 'virtual time'})")
        paths = plot_rows(rows, Path(args.out), title, ttft_slo=args.slo_ttft)
        log("wrote " + " and ".join(str(p) for p in paths))
    log("command: kvrouter bench policies " + shlex.join(list(argv)))
    if args._skipped:
        print("kvrouter bench policies: not run (router did not start): "
              + ", ".join(args._skipped), file=sys.stderr)
        return 1
    return 0
