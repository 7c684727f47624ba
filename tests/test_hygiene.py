"""Metrics and log hygiene, and the newcomer's rough edges (README "Logs", "Metrics",
"Benchmark with your own client"; docs/fastdeploy.md#metrics, #logs).

Real router processes on 127.0.0.1 in front of simulated instances: the per-instance label is
``url``, ``kvrouter_build_info`` and the process metrics (the answering worker's, never a sum),
plain help strings; heartbeats and dashboard polls at DEBUG, not in the INFO access log; the
``[stats]`` line quiet when idle and showing running streams as ``decoding``; ``log.format:
json``. Then the command line: demo usage errors, ``--help`` descriptions, the missing-port
hint, and the demo plot's labels.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from harness import Fleet, RouterProcess, bounded, get_json, metrics_text, post_json, wait_for

from kvrouter import __version__
from kvrouter.logsetup import JsonFormatter

CHAT = {"model": "default", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello there, router"}]}


def samples(text: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")]


def access_lines(r: RouterProcess, level: str = "INFO") -> list[str]:
    return [line for line in r.log().splitlines() if f" {level} kvrouter.access: " in line]


async def logged(r: RouterProcess, needle: str) -> None:
    """Wait until ``needle`` is in the router's log (the access log is written in batches)."""
    async def found() -> bool:
        return needle in r.log()
    await wait_for(found, timeout=5, interval=0.02)


# -- /metrics ------------------------------------------------------------------------------------
@bounded(30)
async def test_per_instance_label_is_url_with_build_info_process_metrics_and_plain_help(
        fleet: Fleet) -> None:
    r = await fleet.router({"manager": {"health-check-interval-secs": 0.3}})
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200
    status, body, _ = await post_json(r.url + "/v1/chat/completions", CHAT)
    assert status == 200, body

    async def probed() -> str | None:
        text = await metrics_text(r)
        probe = f'kvrouter_health_checks_total{{result="success",url="{inst.url}"}}'
        return text if probe in text else None

    text = await wait_for(probed)
    assert 'instance="' not in text
    url = re.escape(inst.url)
    for family in ("kvrouter_selections_total", "kvrouter_backend_prompt_tokens_total",
                   "kvrouter_instance_in_flight_requests", "kvrouter_instance_state",
                   "kvrouter_health_checks_total"):
        assert re.search(rf'^{family}\{{[^}}]*\burl="{url}"', text, re.M), family
    # fd-router's family keeps its labels
    assert re.search(rf'^inference_requests_total\{{decode_worker="",mixed_worker="{url}",'
                     r'prefill_worker="",status_code="200"\} 1\.0$', text, re.M)
    assert re.search(r'^kvrouter_build_info\{python="(.+)",version="(.+)"\} 1\.0$',
                     text, re.M).groups() == (platform.python_version(), __version__)
    (start,) = samples(text, "process_start_time_seconds")
    assert time.time() - 120 < start <= time.time()
    assert samples(text, "process_resident_memory_bytes")[0] > 1e6
    assert samples(text, "process_cpu_seconds_total")[0] > 0
    helps = [line for line in text.splitlines() if line.startswith("# HELP kvrouter_")]
    assert len(helps) > 15
    internal = [h for h in helps if re.search(r"\b[RT]\b", h) or len(h.split(" ", 3)[3]) < 20]
    assert not internal, internal


@bounded(40)
async def test_with_workers_the_process_metrics_are_the_answering_workers(fleet: Fleet) -> None:
    r = await fleet.router(None, "--workers", "2")

    async def merged() -> str | None:
        text = await metrics_text(r)
        return text if 'kvrouter_worker_processes{state="merged"} 2.0' in text else None

    text = await wait_for(merged, timeout=15)
    # one process's values, not the two workers' summed (twice a start time is no time)
    (start,) = samples(text, "process_start_time_seconds")
    assert time.time() - 120 < start <= time.time()
    assert len(samples(text, "process_cpu_seconds_total")) == 1
    assert samples(text, "kvrouter_build_info") == [1.0]


# -- the access log --------------------------------------------------------------------------------
@bounded(30)
async def test_heartbeats_and_dashboard_polls_are_logged_at_debug(fleet: Fleet) -> None:
    r = await fleet.router({"log": {"level": "debug"}})
    inst = await fleet.sim()
    payload = inst.registration_payload()
    for _ in range(4):                      # a registration, then 3 unchanged heartbeats
        assert (await post_json(r.url + "/register", payload))[0] == 200
    for _ in range(3):
        assert (await get_json(r.url + "/dashboard/state"))[0] == 200
    changed = dict(payload, is_paused=True)
    assert (await post_json(r.url + "/register", changed))[0] == 200
    assert (await get_json(r.url + "/registered_number"))[0] == 200
    await logged(r, "[GET] /registered_number ")

    register = [line for line in access_lines(r) if "[POST] /register " in line]
    assert len(register) == 2               # the registration and the change
    assert not [line for line in access_lines(r) if "/dashboard/state" in line]
    debug = access_lines(r, "DEBUG")
    assert len([line for line in debug if "[POST] /register HTTP/1.1 200 " in line]) == 3
    assert len([line for line in debug if "[GET] /dashboard/state HTTP/1.1 200 " in line]) == 3


@bounded(30)
async def test_a_path_cannot_forge_access_log_lines(fleet: Fleet) -> None:
    r = await fleet.router()
    async with aiohttp.ClientSession() as s, \
            s.get(r.url + "/nope%0A2030-01-01%2000:00:00.000%20INFO%20forged") as resp:
        assert resp.status == 404
    await logged(r, "[GET] /nope")
    (line,) = [x for x in access_lines(r) if "/nope" in x]
    assert line.endswith(" 127.0.0.1") and "/nope\\n2030-01-01 00:00:00.000 INFO forged" in line
    assert not [x for x in r.log().splitlines() if x.startswith("2030-01-01")]


# -- the [stats] line ------------------------------------------------------------------------------
STATS = re.compile(r"\[stats\] total_running=(\d+), workers: \[(.*)\], .*, requests=(\d+)$")


def stats(r: RouterProcess) -> list[re.Match]:
    return [m for line in r.log().splitlines() if (m := STATS.search(line))]


@bounded(40)
async def test_stats_line_is_quiet_when_idle_and_says_once_that_activity_stopped(
        fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"stats-interval-secs": 0.25}})
    await asyncio.sleep(1.0)
    assert stats(r) == []                        # no instance, nothing happened: no line
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200

    async def lines(n: int) -> list[re.Match] | None:
        got = stats(r)
        return got if len(got) >= n else None

    (joined,) = await wait_for(lambda: lines(1), timeout=5)     # the instance appeared
    assert inst.url in joined.group(2) and joined.group(3) == "0"
    await asyncio.sleep(1.5)                     # six idle intervals
    assert len(stats(r)) == 1
    assert (await post_json(r.url + "/v1/chat/completions", CHAT))[0] == 200

    async def stopped() -> list[re.Match] | None:
        got = stats(r)
        return got if got[-1].group(3) == "0" and len(got) >= 3 else None

    after = await wait_for(stopped, timeout=5)
    assert sum(int(m.group(3)) for m in after) == 1
    assert after[-1].group(1) == "0"             # the line that says activity stopped
    n = len(after)
    await asyncio.sleep(1.5)
    assert len(stats(r)) == n


@bounded(40)
async def test_stats_line_shows_running_streams_as_decoding(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"stats-interval-secs": 0.2}})
    inst = await fleet.sim(output_tokens=40)
    inst.knobs.itl = 0.1                         # a stream of about 4 s
    assert await inst.register_once(r.url) == 200
    body = dict(CHAT, stream=True, max_tokens=40)
    async with aiohttp.ClientSession() as s, \
            s.post(r.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readany()             # the first byte: T released, R still held
        want = f"{inst.url}: running=1 prefill_tokens=0 decoding=1 state=healthy"

        async def shown() -> bool:
            return any(want in m.group(2) for m in stats(r))
        await wait_for(shown, timeout=3, interval=0.05)
        await resp.read()


# -- log.format: json ------------------------------------------------------------------------------
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@bounded(30)
async def test_json_log_lines_parse(fleet: Fleet) -> None:
    r = await fleet.router({"log": {"format": "json"},
                            "scheduler": {"stats-interval-secs": 0.2}})
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200
    assert (await post_json(r.url + "/v1/chat/completions", CHAT))[0] == 200
    assert (await post_json(r.url + "/v1/chat/completions", data=b"{nope"))[0] == 400
    await logged(r, '"status":400')
    await logged(r, "[stats]")
    objs = []
    for line in r.log().splitlines():
        if line.startswith("Starting server on "):      # the harness reads this print
            continue
        obj = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(obj), obj
        assert STAMP.fullmatch(obj["time"]), obj
        objs.append(obj)
    access = [o for o in objs if o["logger"] == "kvrouter.access"]
    ok = next(o for o in access if o["status"] == 200 and o["path"] == "/v1/chat/completions")
    assert ok["method"] == "POST" and ok["protocol"] == "HTTP/1.1" and ok["level"] == "info"
    assert ok["client"] == "127.0.0.1" and ok["latency_ms"] > 0
    assert ok["message"].startswith("[POST] /v1/chat/completions HTTP/1.1 200 ")
    assert any(o["logger"] == "kvrouter.router" and o["message"].startswith("[stats] ")
               for o in objs)
    assert any(o["level"] == "warning" and "auth is off" in o["message"] for o in objs)


def test_json_formatter_fields_tags_and_exceptions() -> None:
    fmt = JsonFormatter()
    record = logging.LogRecord("kvrouter.pd", logging.WARNING, __file__, 1,
                               "[request_id:r-1] [session_id:s 2] prefill %s ended\nbadly",
                               ("http://x",), None)
    line = fmt.format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["request_id"] == "r-1" and obj["level"] == "warning"
    assert obj["message"] == "[session_id:s 2] prefill http://x ended\nbadly"   # not a tag
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("kvrouter.x", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    obj = json.loads(fmt.format(record))
    assert obj["message"] == "failed" and "ValueError: boom" in obj["exception"]


# -- the command line ------------------------------------------------------------------------------
def run_kvrouter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrouter", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize(("args", "says"), [
    (("--policies", "foo"), "--policies: unknown policy 'foo' (valid: random, round_robin"),
    (("--policies", "kv_cost,nope"), "unknown policy 'nope' (valid: "),
    (("--workload", "foo"), "--workload: unknown workload 'foo' (valid: b2b, multigroup"),
    (("--workload", "trace:/no/such/file"), "no such trace file"),
    (("--preset", "h200"), "--preset: unknown preset 'h200' (valid: "),
    (("--requests", "0"), "--requests must be >= 1"),
    (("--instances", "0"), "--instances must be >= 1"),
])
def test_demo_usage_errors_are_one_line_exit_2(tmp_path: Path, args, says) -> None:
    out = run_kvrouter("demo", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("kvrouter demo: error: ")
    assert not (tmp_path / "out").exists()


def test_bare_kvrouter_says_how_to_set_the_port(tmp_path: Path) -> None:
    out = run_kvrouter(cwd=tmp_path)
    assert out.returncode == 1
    first, hint = out.stderr.strip().splitlines()
    assert first == "Failed to load config: failed to set router listen port"   # fd-router's
    assert "--port P" in hint and "server.port" in hint


def parsers() -> dict[str, argparse.ArgumentParser]:
    from kvrouter import cli, demo
    from kvrouter.bench import overhead, policies
    from kvrouter.sim import cli as sim_cli

    return {"kvrouter": cli._parser(), "kvrouter sim": sim_cli.build_parser(),
            "kvrouter demo": demo.parser(), "kvrouter bench policies": policies.parser(),
            "kvrouter bench overhead": overhead.parser()}


@pytest.mark.parametrize("name", list(parsers()))
def test_every_help_option_is_described_with_its_default(name: str) -> None:
    parser = parsers()[name]
    fmt = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = fmt._expand_help(action) if action.help else ""
        default = action.default
        shown = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
        if not text.strip() or (default not in (None, False, "", [])
                                and not any(s in text for s in shown)):
            missing.append((action.option_strings, default, text))
    assert not missing, missing


def test_sim_help_names_the_answer_length_and_the_token_counting() -> None:
    text = " ".join(parsers()["kvrouter sim"].format_help().split())
    assert "ignore_eos" in text and "(default 16)" in text
    assert "--use-server-token-count" in text


def test_demo_plot_labels_do_not_overlap(monkeypatch, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from kvrouter.demo import report

    names = [p + label for p in ("round_robin", "cache_aware", "sglang_cache_aware", "kv_cost")
             for label in ("", " ×2 redis", " ×2 no-redis")]
    rows = [report.PolicySummary(n, 10, 0, 1.0, 100.0, 0.1, 0.2, 0.3, 0.01, 0.5, {"a": 10})
            for n in names]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot(rows, tmp_path / "demo.png", "title")
    monkeypatch.undo()
    assert (tmp_path / "demo.png").stat().st_size > 0
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in labels] == names
        ticks = ax.transData.transform([(x, 0) for x in ax.get_xticks()])[:, 0]
        spacing = min(b - a for a, b in itertools.pairwise(ticks))
        # parallel labels, one per tick: upright ones must fit between ticks, slanted ones
        # lie on parallel lines spacing × sin(angle) apart, which must exceed their height
        for t in labels:
            width, height, _ = renderer.get_text_width_height_descent(
                t.get_text(), t.get_fontproperties(), ismath=False)
            angle = math.radians(t.get_rotation())
            if angle == 0:
                assert width < spacing, (t.get_text(), width, spacing)
            else:
                assert spacing * math.sin(angle) > height, (t.get_text(), spacing, height)
    plt.close(fig)
