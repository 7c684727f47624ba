"""``kvrouter demo`` end to end: real router and sim processes, a small workload, artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_real_llamacpp import engine_files  # noqa: F401  (the fixture: builds or finds it)


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


# --- --engine llamacpp: real llama-servers (tests/test_real_llamacpp.py builds or finds them) --

def _tree(pid: int) -> dict[int, str]:
    """The descendants of ``pid`` (``/proc``): PID → command line (empty for a zombie: an
    exited process its parent has not waited for yet)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")\
                    .decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _watch(proc: subprocess.Popen, seen: dict[int, str], timeout: float,
           until: Callable[[dict[int, str]], bool] | None = None) -> None:
    """Record ``proc``'s descendants in ``seen`` every 50 ms until it exits (or ``until(seen)``
    holds); kills it and fails after ``timeout`` s. A command line read between fork and exec
    is the parent's: a later read replaces it; an empty one (a zombie's) does not."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not (until and until(seen)):
        seen.update((pid, cmd) for pid, cmd in _tree(proc.pid).items() if cmd or pid not in seen)
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kvrouter demo still running after {timeout} s")
        time.sleep(0.05)


def _servers(seen: dict[int, str]) -> list[int]:
    return [pid for pid, cmd in seen.items() if "llama-server" in cmd]


def _routers(seen: dict[int, str]) -> list[int]:
    return [pid for pid, cmd in seen.items() if "-m kvrouter --port 0" in cmd]


def _stop_leftovers(seen: dict[int, str]) -> None:
    """After a failed assertion: SIGKILL what the demo left running, by PID."""
    for pid in seen:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("engine_files")
def test_demo_on_llama_cpp_servers(tmp_path):
    """Two fresh llama-servers and a fresh router per policy: cache_aware's hit rate, read
    from the engines' own usage, is several times round_robin's; nothing is left running."""
    out = tmp_path / "out"
    seen: dict[int, str] = {}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", "demo", "--engine", "llamacpp",
             "--policies", "round_robin,cache_aware", "--requests", "16", "--out", str(out),
             "--json", str(tmp_path / "t.json")], stdout=stdout, stderr=stderr)
        try:
            _watch(proc, seen, timeout=150)
            err = (tmp_path / "stderr").read_text()
            assert proc.returncode == 0, err[-3000:]
            assert len(_servers(seen)) == 4 and len(_routers(seen)) == 2, seen  # fresh per policy
            assert not [pid for pid in seen if _running(pid)], seen
        finally:
            _stop_leftovers(seen)
    rows = {r["policy"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert list(rows) == ["round_robin", "cache_aware"]
    for r in rows.values():
        assert r["completed"] == 16 and r["failed"] == 0, r
        assert len(r["spread"]) == 2 and sum(r["spread"].values()) == 16, r
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and r["throughput_tok_s"] > 0, r
    rr, ca = rows["round_robin"]["hit_rate"], rows["cache_aware"]["hit_rate"]
    assert ca >= 0.3 and ca >= 2.5 * rr, (rr, ca)
    assert (out / "demo.png").stat().st_size > 10_000
    report = (out / "demo.md").read_text()
    assert "| cache_aware |" in report and "llama-server" in report
    assert "cache_aware" in (tmp_path / "stdout").read_text()


@pytest.mark.usefixtures("engine_files")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_on_llama_cpp_stops_everything_when_interrupted(tmp_path, sig):
    """Ctrl-C (or SIGTERM) in the middle of a run: the demo stops its llama-servers and its
    router, by PID, and exits 130."""
    seen: dict[int, str] = {}
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", "demo", "--engine", "llamacpp",
             "--requests", "200", "--out", str(tmp_path / "out")],
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _watch(proc, seen, timeout=60,
                   until=lambda s: len(_servers(s)) == 2 and len(_routers(s)) == 1)
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(1)                     # the replay is under way
            proc.send_signal(sig)
            _watch(proc, seen, timeout=30)
            assert proc.returncode == 130, (tmp_path / "stderr").read_text()[-3000:]
            assert not [pid for pid in seen if _running(pid)], seen
        finally:
            _stop_leftovers(seen)
