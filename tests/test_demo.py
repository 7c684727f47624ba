"""``kvrouter demo`` end to end: real router and sim processes, a small workload, artifacts."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_writes_artifacts(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter", "demo", "--policies", "round_robin,cache_aware",
         "--requests", "40", "--time-scale", "0.3", "--out", str(out),
         "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["policy"] for r in rows] == ["round_robin", "cache_aware"]
    for r in rows:
        assert r["completed"] == 40 and r["failed"] == 0
        assert 0 < r["ttft_p50"] <= r["ttft_p99"]
        assert 0 < r["hit_rate"] < 1          # measured at the instances
        assert sum(r["spread"].values()) == 40
    assert (out / "demo.png").stat().st_size > 10_000
    report = (out / "demo.md").read_text()
    assert "| round_robin |" in report and "demo.png" in report
    assert "round_robin" in proc.stdout and "cache_aware" in proc.stdout
