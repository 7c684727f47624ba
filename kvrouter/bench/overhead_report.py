"""Tables and target checks of ``kvrouter bench overhead`` (:mod:`kvrouter.bench.overhead`).

The targets (issue 5): router CPU ≤ 50 µs per tiny non-stream request (``request_num``) and
≤ 80 µs with a 2 KB prompt (``cache_aware``); added latency at c=1 no higher than vllm-router's,
p50 and p99; SSE relay ≤ 15 µs CPU per event and RSS ≤ 100 MB with 1,000 open streams at 50
events/s; routing decision p99 ≤ 0.5 ms with 1,000 instances and an 8k-token prompt.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["check_targets", "table"]

CPU_TINY_US = 50.0
CPU_2K_US = 80.0
SSE_EVENT_US = 15.0
RSS_STREAMS_MB = 100.0
DECISION_P99_US = 500.0
STREAMS = 1000
DECISION_INSTANCES = 1000
DECISION_TOKENS = 8192


def _get(summary: dict, label: str, test: str, key: str) -> float | None:
    value = summary.get(label, {}).get(test, {}).get(key)
    return None if value is None else float(value)


def _verdict(value: float | None, limit: float | None, why_na: str | None = None) -> str:
    if why_na:
        return f"n/a ({why_na})"
    if value is None or limit is None:
        return "n/a (not measured)"
    return "met" if value <= limit else "MISSED"


def check_targets(report: dict, kvrouter_labels: list[str], reference: str | None,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (kvrouter target, check), plus one per decision policy."""
    s = report["summary"]
    rows: list[dict[str, Any]] = []

    def add(target: str, check: str, value: float | None, limit: float | None,
            why_na: str | None = None) -> None:
        rows.append({"target": target, "check": check, "value": value, "limit": limit,
                     "verdict": _verdict(value, limit, why_na)})

    few = None if args.streams >= STREAMS else f"needs --streams {STREAMS}"
    for label in kvrouter_labels:
        add(label, "CPU µs/request, tiny, c=64, request_num",
            _get(s, label, "c64", "cpu_us_per_req"), CPU_TINY_US)
        add(label, "CPU µs/request, 2 KB prompt, c=64, cache_aware",
            _get(s, label, "ca64", "cpu_us_per_req"), CPU_2K_US)
        for q in ("p50", "p99"):
            ref = _get(s, reference, "c1", f"added_{q}_us") if reference else None
            add(label, f"added {q} µs at c=1 vs {reference or 'vllm-router'}",
                _get(s, label, "c1", f"added_{q}_us"), ref,
                None if reference else "no vllm-router --peer")
        add(label, f"CPU µs/relayed SSE event, {args.streams} streams",
            _get(s, label, "sse", "cpu_us_per_event"), SSE_EVENT_US, few)
        add(label, f"RSS MB with {args.streams} open streams",
            _get(s, label, "sse", "peak_rss_mb"), RSS_STREAMS_MB, few)
    small = (args.decision_instances < DECISION_INSTANCES
             or args.decision_prompt_tokens < DECISION_TOKENS)
    for row in report.get("decision") or []:
        add("decision", f"p99 µs {row.get('policy')}, {args.decision_instances} instances, "
            f"{args.decision_prompt_tokens} tokens", row.get("p99_us"), DECISION_P99_US,
            f"needs {DECISION_INSTANCES} instances, {DECISION_TOKENS} tokens" if small else None)
    return rows


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def table(report: dict, targets: list[str], args: argparse.Namespace) -> str:
    s = report["summary"]
    w = max([len(t) for t in targets] + [8]) + 2
    rounds = args.repeat
    lines = [f"router overhead: {args.instances} mock backends, {args.duration:g} s per test, "
             f"medians of {rounds} round(s){', pinned' if args.pin else ''}", "",
             "non-stream (tiny chat; 2 KB prompts for ca64); latency µs, CPU µs per request "
             "(router process tree, user+sys / sys)",
             f"{'target':<{w}}{'c1 p50':>8}{'p99':>8}{'+p50':>7}{'+p99':>7}{'CPU':>7}"
             f"{'c64 req/s':>11}{'CPU':>7}{'sys':>6}{'ca64 req/s':>12}{'CPU':>7}{'sys':>6}"
             f"{'errors':>8}"]
    lines.append("-" * len(lines[-1]))
    for t in targets:
        c1, c64, ca = (s.get(t, {}).get(k, {}) for k in ("c1", "c64", "ca64"))
        errors = sum(int(x.get("errors", 0)) for x in s.get(t, {}).values())
        lines.append(
            f"{t:<{w}}{_f(c1.get('p50_us'), 0):>8}{_f(c1.get('p99_us'), 0):>8}"
            f"{_f(c1.get('added_p50_us'), 0):>7}{_f(c1.get('added_p99_us'), 0):>7}"
            f"{_f(c1.get('cpu_us_per_req')):>7}{_f(c64.get('rps'), 0):>11}"
            f"{_f(c64.get('cpu_us_per_req')):>7}{_f(c64.get('sys_us_per_req')):>6}"
            f"{_f(ca.get('rps'), 0):>12}{_f(ca.get('cpu_us_per_req')):>7}"
            f"{_f(ca.get('sys_us_per_req')):>6}{errors:>8}")
    lines += ["", f"SSE: {args.streams} concurrent streams x 50 events 20 ms apart "
              f"(ideal {args.streams * 51 / 0.98:.0f} events/s); CPU µs per relayed event; "
              f"MB (RSS summed over the tree, PSS splits shared pages)",
              f"{'target':<{w}}{'events/s':>10}{'CPU':>7}{'sys':>6}{'stream p50 ms':>15}"
              f"{'p99 ms':>9}{'RSS idle':>10}{'RSS streams':>13}{'PSS streams':>13}"]
    lines.append("-" * len(lines[-1]))
    for t in targets:
        sse, idle = s.get(t, {}).get("sse", {}), s.get(t, {}).get("idle", {})
        lines.append(
            f"{t:<{w}}{_f(sse.get('events_per_s'), 0):>10}{_f(sse.get('cpu_us_per_event'), 2):>7}"
            f"{_f(sse.get('sys_us_per_event'), 2):>6}{_f(sse.get('stream_p50_ms'), 0):>15}"
            f"{_f(sse.get('stream_p99_ms'), 0):>9}{_f(idle.get('rss_idle_mb')):>10}"
            f"{_f(sse.get('peak_rss_mb')):>13}{_f(sse.get('peak_pss_mb')):>13}")
    decision = report.get("decision")
    if decision:
        extra = [k for k in ("view_p50_us", "index_bytes_per_entry") if k in decision[0]]
        lines += ["", f"routing decision ({args.decision_instances} instances, "
                  f"{args.decision_prompt_tokens}-token prompt, in-process), µs",
                  f"{'policy':<22}{'p50':>9}{'p99':>9}" + "".join(f"{k:>24}" for k in extra)]
        lines.append("-" * len(lines[-1]))
        for row in decision:
            lines.append(f"{row.get('policy')!s:<22}{_f(row.get('p50_us')):>9}"
                         f"{_f(row.get('p99_us')):>9}"
                         + "".join(f"{_f(row.get(k)):>24}" for k in extra))
    elif not args.no_decision:
        lines += ["", "routing decision: not run"]
    checks = report.get("checks") or []
    if checks:
        cw = max(len(c["check"]) for c in checks) + 2
        lines += ["", "targets", f"{'target':<{w}}{'check':<{cw}}{'value':>9}{'limit':>9}  verdict"]
        lines.append("-" * len(lines[-1]))
        for c in checks:
            lines.append(f"{c['target']:<{w}}{c['check']:<{cw}}{_f(c['value']):>9}"
                         f"{('≤ ' + _f(c['limit'])) if c['limit'] is not None else '-':>9}"
                         f"  {c['verdict']}")
    return "\n".join(lines)
