"""``kvrouter bench overhead``: usage errors, the report, and one tiny real run (needs wrk)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvrouter.bench import BENCHMARKS
from kvrouter.bench import overhead as ovh
from kvrouter.bench.overhead_report import check_targets, table

CMD = [sys.executable, "-m", "kvrouter", "bench", "overhead"]


def _run(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)


def test_registered() -> None:
    assert BENCHMARKS["overhead"] == "kvrouter.bench.overhead:main"


@pytest.mark.parametrize("args, message", [
    (["--peer", "no-equals-sign"], "--peer wants NAME=VALUE"),
    (["--peer", "=cmd"], "--peer wants NAME=VALUE"),
    (["--peer", "direct=cmd"], "duplicate target names"),
    (["--variant", "x=/nonexistent/path"], "is not a directory"),
    (["--workers", "1,x"], "--workers wants"),
    (["--tests", "c1,bogus"], "--tests: unknown"),
    (["--duration", "0"], "--duration must be > 0"),
])
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert ovh.main(args) == 2
    assert message in capsys.readouterr().err


def test_usage_error_message_and_status() -> None:
    out = _run(["--peer", "vllm-router"])
    assert out.returncode == 2
    assert "--peer wants NAME=VALUE" in out.stderr


def test_missing_wrk_is_a_clear_usage_error(tmp_path: Path) -> None:
    out = _run(["--no-nginx"], env={"PATH": str(tmp_path)})
    assert out.returncode == 2
    assert "wrk not found" in out.stderr and "apt-get install wrk" in out.stderr


def test_table_and_checks_with_decision_rows() -> None:
    args = ovh.parser().parse_args(["--peer", "vllm-router=x", "--streams", "1000"])
    summary = {
        "direct": {"c1": {"p50_us": 50, "p99_us": 100}},
        "kvrouter": {"c1": {"p50_us": 90, "p99_us": 300, "added_p50_us": 40,
                            "added_p99_us": 200},
                     "c64": {"rps": 9000, "cpu_us_per_req": 45.0, "sys_us_per_req": 10.0},
                     "ca64": {"rps": 5000, "cpu_us_per_req": 95.0},
                     "sse": {"cpu_us_per_event": 12.0, "peak_rss_mb": 80.0,
                             "events_per_s": 50000},
                     "idle": {"rss_idle_mb": 40.0}},
        "vllm-router": {"c1": {"p50_us": 120, "p99_us": 250, "added_p50_us": 70,
                               "added_p99_us": 150}},
    }
    report = {"summary": summary, "decision": [
        {"policy": "cache_aware", "p50_us": 120.0, "p99_us": 300.0, "view_p50_us": 50.0},
        {"policy": "kv_cost", "p50_us": 400.0, "p99_us": 900.0, "view_p50_us": 60.0}]}
    checks = check_targets(report, ["kvrouter"], "vllm-router", args)
    by = {(c["target"], c["check"]): c["verdict"] for c in checks}
    assert by[("kvrouter", "CPU µs/request, tiny, c=64, request_num")] == "met"
    assert by[("kvrouter", "CPU µs/request, 2 KB prompt, c=64, cache_aware")] == "MISSED"
    assert by[("kvrouter", "added p50 µs at c=1 vs vllm-router")] == "met"
    assert by[("kvrouter", "added p99 µs at c=1 vs vllm-router")] == "MISSED"
    assert by[("kvrouter", "CPU µs/relayed SSE event, 1000 streams")] == "met"
    assert [c["verdict"] for c in checks if c["target"] == "decision"] == ["met", "MISSED"]
    report["checks"] = checks
    text = table(report, ["direct", "kvrouter", "vllm-router"], args)
    assert "kv_cost" in text and "view_p50_us" in text and "MISSED" in text


def test_summary_medians_and_added_latency() -> None:
    targets = [ovh.Target("direct", "direct"), ovh.Target("kvrouter", "kvrouter")]
    records = [{"target": "direct", "round": r, "test": "c1", "p50_us": 10 + r, "p99_us": 20}
               for r in range(3)]
    records += [{"target": "kvrouter", "round": r, "test": "c1", "p50_us": v, "p99_us": 50}
                for r, v in enumerate((100, 40, 60))]
    s = ovh.summarize(records, targets)
    assert s["direct"]["c1"]["p50_us"] == 11 and s["kvrouter"]["c1"]["p50_us"] == 60
    assert s["kvrouter"]["c1"]["added_p50_us"] == 49 and s["kvrouter"]["c1"]["added_p99_us"] == 30


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_tiny_real_run(tmp_path: Path) -> None:
    """direct, kvrouter and a stand-in peer (the mock backend itself, answering directly)."""
    out_json = tmp_path / "overhead.json"
    peer = f"{sys.executable} -m kvrouter.bench.mockbackend --ports {{port}}"
    out = _run(["--duration", "1", "--streams", "20", "--repeat", "1", "--no-nginx",
                "--no-decision", "--tests", "c1,ca64,sse", "--peer", f"stand-in={peer}",
                "--workdir", str(tmp_path / "work"), "--json", str(out_json)], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "non-stream" in out.stdout and "SSE:" in out.stdout and "targets" in out.stdout
    for label in ("direct", "kvrouter", "stand-in"):
        assert any(line.startswith(label) for line in out.stdout.splitlines()), label
    report = json.loads(out_json.read_text())
    s = report["summary"]
    assert report["errors"] == []
    assert report["environment"]["cpu_count"] >= 1 and "command" in report["environment"]
    for label in ("direct", "kvrouter", "stand-in"):
        assert s[label]["c1"]["rps"] > 0 and s[label]["ca64"]["rps"] > 0
        assert s[label]["sse"]["events"] > 0 and s[label]["sse"]["streams_done"] > 0
    for label in ("kvrouter", "stand-in"):
        assert s[label]["ca64"]["cpu_us_per_req"] > 0
        assert s[label]["c1"]["cpu_us_per_req"] > 0
        assert s[label]["sse"]["peak_rss_mb"] > 0 and s[label]["idle"]["rss_idle_mb"] > 0
    assert "added_p50_us" in s["kvrouter"]["c1"]
    assert {c["target"] for c in report["checks"]} == {"kvrouter"}
