"""PNG plots of a policy benchmark: TTFT p99 and hit rate against the request rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_rows"]


def _series(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        value = r.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out.setdefault(_label(r), []).append((r["rate"], value))
    return {k: sorted(v) for k, v in out.items()}


def _label(row: dict[str, Any]) -> str:
    name = f"{row['policy']} +adm" if row.get("admission") else row["policy"]
    return name if row.get("mode", "virtual") == "virtual" else f"{name} ({row['mode']})"


def plot_rows(rows: Sequence[dict[str, Any]], out_dir: Path, title: str,
              ttft_slo: float | None = None) -> list[Path]:
    """Write ``ttft_p99_vs_rate.png`` and ``hit_rate_vs_rate.png`` (one line per policy; the
    hit-rate plot also draws the unified-LRU bound) into ``out_dir``; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in rows if r.get("kind", "run") == "run"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ttft = _series(runs, "ttft_p99")
    for name, pts in ttft.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if ttft_slo is not None:
        ax.axhline(ttft_slo, color="grey", linestyle=":", linewidth=1,
                   label=f"TTFT SLO {ttft_slo:g} s")
    if any(p[1] > 0 for pts in ttft.values() for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s, model time)")
    ax.set_ylabel("TTFT p99 (s, model time)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ttft_p99_vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in _series(runs, "hit_rate").items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    bound: dict[float, float] = {}
    for r in runs:
        if r.get("hit_rate_bound") is not None:
            bound[r["rate"]] = r["hit_rate_bound"]
    if bound:
        xs = sorted(bound)
        ax.plot(xs, [100 * bound[x] for x in xs], color="black", linestyle="--",
                label="unified LRU bound")
    ax.set_ylim(0, 100)
    ax.set_xlabel("request rate (req/s, model time)")
    ax.set_ylabel("prompt tokens served from cache (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "hit_rate_vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
