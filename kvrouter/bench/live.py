"""Live runs: a real router (kvrouter, or an external one) in front of real-time ``kvrouter
sim`` processes, the workload replayed over HTTP, client-side latencies.

Every (policy, rate) point gets a fresh router and fresh instances (cold caches). Times are
converted to model seconds (real seconds / ``time_scale``). The hit rate is measured at the
instances: Σ cached / Σ prompt tokens over the ground-truth rows of ``GET /sim/requests``
(the mixed or prefill leg of every request), the same source for kvrouter and for external
routers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrouter.bench.external import start_external
from kvrouter.bench.goodput import Slo, attainment, meets
from kvrouter.demo.processes import ClusterSpec, sim_truth, start_cluster, start_sims
from kvrouter.demo.replay import ClientResult, replay
from kvrouter.sim.cluster.summary import latency_stats
from kvrouter.sim.workloads import WorkloadRequest

__all__ = ["LiveOutcome", "LiveSetup", "LiveTarget", "live_metrics", "router_log_path",
           "run_live"]


@dataclass
class LiveSetup:
    instances: int
    pd: tuple[int, int] | None
    preset: str
    kv_blocks: int | None
    time_scale: float
    seed: int
    timeout: float                 # real seconds per request
    workdir: Path
    ready_timeout: float = 120.0


@dataclass
class LiveTarget:
    """What routes: kvrouter with ``policy`` (and ``decode_policy`` in PD), or the external
    router of ``command`` (a ``--router-cmd`` template)."""

    label: str
    policy: str | None = None
    decode_policy: str = "request_num"
    command: str | None = None
    prompt_format: str = "ids"
    router_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # config.yaml


@dataclass
class LiveOutcome:
    results: list[ClientResult]
    seconds: float                 # real seconds of the replay
    truth: list[dict[str, Any]]    # /sim/requests rows of every instance
    roles: dict[str, str] = field(default_factory=dict)


def router_log_path(setup: LiveSetup, label: str) -> Path:
    """Where the output of the external router labelled ``label`` goes."""
    safe = "".join(c if c.isalnum() else "_" for c in label)
    return setup.workdir / f"router-{safe}.log"


def _sim_args(workload: Sequence[WorkloadRequest], setup: LiveSetup) -> list[str]:
    longest = max((len(r.prompt_tokens) + r.max_tokens for r in workload), default=0)
    args = ["--seed", str(setup.seed), "--max-model-len", str(max(8192, longest + 1))]
    if setup.kv_blocks:
        args += ["--num-gpu-blocks", str(setup.kv_blocks)]
    return args


async def run_live(target: LiveTarget, workload: Sequence[WorkloadRequest], setup: LiveSetup,
                   progress: Callable[[int, int], None] | None = None) -> LiveOutcome:
    """One live point: start everything, replay, collect the instances' ground truth, stop."""
    spec = ClusterSpec(target.policy or "external", setup.instances, setup.pd, setup.preset,
                       setup.time_scale, sim_args=_sim_args(workload, setup),
                       router_config=target.router_config, decode_policy=target.decode_policy)
    async with AsyncExitStack() as stack:
        if target.command is None:
            cluster = await start_cluster(spec, setup.workdir, stack)
            url, roles = cluster.url, cluster.roles
        else:
            if setup.pd:
                raise ValueError("external routers are benchmarked in mixed mode only (the "
                                 "simulated instances speak FastDeploy's PD protocol)")
            roles = await start_sims(spec, stack)
            url = await start_external(target.command, list(roles), stack,
                                       router_log_path(setup, target.label),
                                       setup.ready_timeout)
        results, seconds = await replay(url, workload, time_scale=setup.time_scale,
                                        progress=progress, timeout=setup.timeout,
                                        prompt_format=target.prompt_format)
        truth = await sim_truth(list(roles))
    return LiveOutcome(results, seconds, truth, roles)


def live_metrics(out: LiveOutcome, time_scale: float, slo: Slo) -> dict[str, Any]:
    """The row metrics of a live point (model seconds)."""
    scale = 1.0 / time_scale if time_scale > 0 else 1.0
    ok = [r for r in out.results if r.ok]
    ttfts = [r.ttft * scale for r in ok if r.ttft is not None]
    itls = [x * scale for r in ok for x in r.itl]

    def mean_itl(r: ClientResult) -> float | None:
        return sum(r.itl) / len(r.itl) * scale if r.itl else None

    ends = [r.sent + r.end for r in ok if r.end is not None]
    starts = [r.sent for r in out.results]
    span = (max(ends) - min(starts)) * scale if ends and starts else 0.0
    legs = [t for t in out.truth if t.get("phase") in ("full", "prefill")]
    prompt = sum(t.get("prompt_tokens") or 0 for t in legs)
    cached = sum(t.get("cached_tokens") or 0 for t in legs)
    per_instance: dict[str, int] = {u: 0 for u, role in out.roles.items() if role != "decode"}
    for t in legs:
        per_instance[t["instance"]] = per_instance.get(t["instance"], 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    rejected = sum(1 for r in out.results if not r.ok and r.status in (429, 503))
    met = sum(meets(r.ok, None if r.ttft is None else r.ttft * scale, mean_itl(r), slo)
              for r in out.results)
    return {
        "completed": len(ok),
        "failed": len(out.results) - len(ok) - rejected,
        "rejected": rejected,               # answered 429/503 (by the router or an instance)
        "slo_rps": met / span if span > 0 else 0.0,
        "duration": span,
        "hit_rate": cached / prompt if prompt else None,
        **latency_stats(ttfts, itls),
        "throughput_tok_s": out_tokens / span if span > 0 else 0.0,
        "request_throughput": len(ok) / span if span > 0 else 0.0,
        "slo_attainment": attainment(((r.ok, None if r.ttft is None else r.ttft * scale,
                                       mean_itl(r)) for r in out.results), slo),
        "per_instance": per_instance,
        "real_seconds": out.seconds,
    }
