"""Summaries, the table, the PNG plot and the Markdown report of a demo run."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrouter.demo.replay import ClientResult
from kvrouter.sim.cluster import percentile


@dataclass
class PolicySummary:
    policy: str
    completed: int
    failed: int
    seconds: float             # real seconds the replay took
    throughput_tok_s: float    # output tokens per model second
    ttft_p50: float            # model seconds (client-measured real time / time scale)
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    hit_rate: float            # Σ cached / Σ prompt tokens, as reported by the instances
    spread: dict[str, int]     # requests per instance (prefill instance in PD)
    # several routers (--replicas): each one's hit rate (its own requests' Σ cached / Σ prompt)
    router_hit_rates: list[float] = field(default_factory=list)
    # replicas sharing state through Redis: commands of every replica per request (background
    # work included), and how long a registration took to be listed by every replica
    redis_commands_per_request: float | None = None
    registration_visible_ms: float | None = None


def summarize(policy: str, results: Sequence[ClientResult], seconds: float,
              time_scale: float, prompt_tokens: float, cached_tokens: float, *,
              router_hit_rates: Sequence[float] = (),
              redis_commands_per_request: float | None = None,
              registration_visible_ms: float | None = None) -> PolicySummary:
    """``prompt_tokens``/``cached_tokens``: the instances' usage totals (the measured hit rate);
    the others: :class:`PolicySummary`'s fields of several routers."""
    ok = [r for r in results if r.ok]
    scale = 1.0 / time_scale if time_scale else 1.0
    ttfts = [r.ttft * scale for r in ok if r.ttft is not None]   # every ok result has one
    itls = [x * scale for r in ok for x in r.itl]
    spread: dict[str, int] = {}
    for r in ok:
        spread[r.instance] = spread.get(r.instance, 0) + 1
    model_seconds = seconds * scale
    return PolicySummary(
        policy, len(ok), len(results) - len(ok), seconds,
        sum(r.output_tokens for r in ok) / model_seconds if model_seconds else 0.0,
        percentile(ttfts, 50), percentile(ttfts, 90), percentile(ttfts, 99),
        percentile(itls, 50), cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        dict(sorted(spread.items())), list(router_hit_rates), redis_commands_per_request,
        registration_visible_ms)


def per_router(r: PolicySummary) -> str:
    """The hit rate of each router, ``-`` for a single one."""
    return "/".join(f"{x:.1%}" for x in r.router_hit_rates) or "-"


def table(rows: Sequence[PolicySummary]) -> str:
    routers = any(r.router_hit_rates for r in rows)
    width = max([18, *(len(r.policy) for r in rows)])
    head = (f"{'policy':<{width}} {'done':>5} {'fail':>5} {'tok/s':>8} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'hit rate':>9}  " + ("hit rate per router  " if routers else "")
            + "requests per instance")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.policy:<{width}} {r.completed:>5} {r.failed:>5} "
                   f"{r.throughput_tok_s:>8.0f} {r.ttft_p50:>8.3f}s {r.ttft_p99:>8.3f}s "
                   f"{r.hit_rate:>8.1%}  " + (f"{per_router(r):<21}" if routers else "")
                   + "/".join(str(v) for v in r.spread.values()))
    return "\n".join(out)


def plot(rows: Sequence[PolicySummary], path: Path, title: str, real_time: bool = False) -> None:
    """Two panels: TTFT p50/p99 per policy, and the measured cache hit rate. ``real_time``:
    times are seconds on real engines, not model seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # slanted labels and a figure that widens with the rows: upright, long policy names
    # ("sglang_cache_aware ×2 no-redis") overlapped from four policies on
    names = [r.policy for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10.0, 4.0 + len(rows)), 4.8))
    w = 0.38
    ax1.bar([i - w / 2 for i in x], [r.ttft_p50 for r in rows], w, label="p50")
    ax1.bar([i + w / 2 for i in x], [r.ttft_p99 for r in rows], w, label="p99")
    ax1.set_xticks(list(x), names, rotation=30, ha="right", rotation_mode="anchor")
    ax1.set_ylabel("time to first token (s" + ("" if real_time else ", model time") + ")")
    ax1.set_title("TTFT (lower is better)")
    ax1.legend()
    ax2.bar(list(x), [100 * r.hit_rate for r in rows], 0.6, color="tab:green")
    ax2.set_xticks(list(x), names, rotation=30, ha="right", rotation_mode="anchor")
    ax2.set_ylabel("prompt tokens served from cache (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("prefix-cache hit rate, measured at the instances")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: Sequence[PolicySummary], setup: dict, command: str, png: str,
             real_time: bool = False) -> str:
    lines = ["# kvrouter demo report", "", f"Command: `{command}`", "", "## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    lines += ["", "## Results", "",
              "| policy | completed | failed | output tok/s | TTFT p50 (s) | TTFT p90 (s) | "
              "TTFT p99 (s) | ITL p50 (ms) | hit rate | hit rate per router | "
              "requests per instance |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.policy} | {r.completed} | {r.failed} | {r.throughput_tok_s:.0f} | "
                     f"{r.ttft_p50:.3f} | {r.ttft_p90:.3f} | {r.ttft_p99:.3f} | "
                     f"{1e3 * r.itl_p50:.1f} | {r.hit_rate:.1%} | {per_router(r)} | "
                     f"{'/'.join(str(v) for v in r.spread.values())} |")
    shared = [r for r in rows if r.redis_commands_per_request is not None]
    if shared:
        lines += ["", "Router replicas sharing state through Redis:", ""]
        lines += [f"- {r.policy}: {r.redis_commands_per_request:.2f} Redis commands per "
                  f"request (all replicas, background work included); registration listed "
                  f"by every replica {r.registration_visible_ms:.0f} ms after the first"
                  for r in shared]
    times = ("Times are seconds, as the client measured them." if real_time else
             "Times are model seconds: client-measured real time divided by the simulator's "
             "time scale.")
    lines += ["", f"![TTFT and hit rate per policy]({png})", "",
              times + " The hit rate is Σ `cached_tokens` / Σ `prompt_tokens` from the "
              "instances' own `usage` reports.", ""]
    return "\n".join(lines)


def write_json(rows: Sequence[PolicySummary], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def write_all(rows: Sequence[PolicySummary], setup: dict, out: Path, title: str, command: str,
              json_path: str | None, real_time: bool = False) -> None:
    """``out``/demo.png and ``out``/demo.md, and the JSON table at ``json_path`` if given."""
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "demo.png", out / "demo.md"
    plot(rows, png, title, real_time)
    md.write_text(markdown(rows, setup, command.strip(), png.name, real_time))
    print(f"wrote {png} and {md}", file=sys.stderr)
    if json_path:
        write_json(rows, Path(json_path))
        print(f"wrote {json_path}", file=sys.stderr)
