"""``kvrouter bench policies``: virtual sweep (rows, goodput, plots), goodput rules, the
peer-router probes of the simulated instance, and one small live run through kvrouter."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import pytest

from kvrouter.bench import main as bench_main
from kvrouter.bench.external import default_label, render_command
from kvrouter.bench.goodput import Slo, attainment, goodput
from kvrouter.demo.replay import tokens_as_text
from kvrouter.sim import SimConfig, SimInstance
from kvrouter.sim.tokens import tokenize

RUN_KEYS = {"policy", "rate", "hit_rate", "hit_rate_bound", "ttft_p50", "ttft_p90", "ttft_p99",
            "itl_p50", "itl_p99", "throughput_tok_s", "completed", "failed"}

TINY = ["--workload", "b2b", "--workload-param", "groups=6 context=1024 users=2 question=128",
        "--workload-param", "output=8", "--instances", "2", "--preset", "llama3-8b-h100",
        "--kv-blocks", "64", "--requests", "40", "--seed", "3", "-q"]


def test_virtual_sweep_rows_goodput_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    policies = ["random", "round_robin", "request_num", "cache_aware", "oracle"]
    rc = bench_main(["policies", *TINY, "--policies", ",".join(policies), "--sweep", "4,16",
                     "--json", str(tmp_path / "b.json"), "--out", str(out)])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    runs = [r for r in rows if r["kind"] == "run"]
    assert [(r["policy"], r["rate"]) for r in runs] == \
        [(p, rate) for p in policies for rate in (4.0, 16.0)]
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["mode"] == "virtual" and r["completed"] + r["failed"] == 40
        assert 0 <= r["hit_rate"] <= 1 and 0 < r["hit_rate_bound"] <= 1
        assert 0 < r["ttft_p50"] <= r["ttft_p90"] <= r["ttft_p99"]
        assert 0 < r["itl_p50"] <= r["itl_p99"] and r["throughput_tok_s"] > 0
        assert 0 <= r["slo_attainment"] <= 1
    # same workload (same seed) at every rate → the same bound
    assert len({r["hit_rate_bound"] for r in runs}) == 1
    gps = [r for r in rows if r["kind"] == "goodput"]
    assert [g["policy"] for g in gps] == policies
    for g in gps:
        assert g["goodput"] in (0.0, 4.0, 16.0) and g["rates"] == [4.0, 16.0]
    for name in ("ttft_p99_vs_rate.png", "hit_rate_vs_rate.png"):
        assert (out / name).stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "goodput" in table and "oracle" in table


def test_virtual_run_is_deterministic(tmp_path):
    args = ["policies", *TINY, "--policies", "cache_aware", "--rate", "8", "--no-plots"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert bench_main([*args, "--json", str(a)]) == 0
    assert bench_main([*args, "--json", str(b)]) == 0
    strip = [{k: v for k, v in r.items() if k != "wall_seconds"}
             for r in json.loads(a.read_text())]
    assert strip == [{k: v for k, v in r.items() if k != "wall_seconds"}
                     for r in json.loads(b.read_text())]


def test_pd_baseline_and_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 250 * i, "input_length": 1100 + 30 * (i % 4), "output_length": 6,
              "hash_ids": [0, 1 + i % 3, 10 + i]} for i in range(24)]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    j = tmp_path / "pd.json"
    rc = bench_main(["policies", "--workload", f"trace:{trace}", "--pd", "1,2", "--preset",
                     "llama3-8b-h100", "--kv-blocks", "128", "--policies",
                     "random/random,cache_aware", "--sweep", "1,2", "--json", str(j),
                     "--no-plots", "-q"])
    assert rc == 0
    rows = json.loads(j.read_text())
    runs = [r for r in rows if r["kind"] == "run"]
    assert {(r["prefill_policy"], r["decode_policy"]) for r in runs} == \
        {("random", "random"), ("cache_aware", "request_num")}
    for r in runs:
        assert r["pd"] == [1, 2] and r["completed"] == 24
        # trace: rate = effective request rate = speed × 4 req/s
        assert r["rate"] == pytest.approx(4.0 * r["speed"])
    assert next(g["rates"] for g in rows if g["kind"] == "goodput") == \
        pytest.approx([4.0, 8.0])


def test_usage_errors():
    assert bench_main([]) == 2
    assert bench_main(["nope"]) == 2
    assert bench_main(["policies", "--policies", "no_such_policy", "-q"]) == 2
    assert bench_main(["policies", "--router-cmd", "x {port}", "-q"]) == 2   # needs --live


def test_goodput_definition():
    slo = Slo(ttft=2.0, itl=0.1, attainment=0.9)
    assert attainment([(True, 1.0, 0.05), (True, 2.5, 0.05), (False, None, None),
                       (True, 0.1, None)], slo) == 0.5
    assert goodput([(10, 0.95), (5, 1.0), (20, 0.5), (40, 0.95)], slo) == (10, "ok")
    assert goodput([(5, 0.5), (10, 1.0)], slo) == (0.0, "below_sweep")
    assert goodput([(5, 0.9), (10, 0.91)], slo) == (10, "at_least")


def test_external_command_template():
    argv = render_command("smg launch --port {port} --worker-urls {workers} "
                          "--prometheus-port {prometheus_port} --x={workers_comma}",
                          8000, ["http://a:1", "http://b:2"], 29001)
    assert argv == ["smg", "launch", "--port", "8000", "--worker-urls", "http://a:1",
                    "http://b:2", "--prometheus-port", "29001", "--x=http://a:1,http://b:2"]
    assert default_label("/tmp/v/bin/vllm-router --policy cache_aware") == \
        "vllm-router:cache_aware"


def test_text_prompts_keep_length_and_prefixes():
    a, b = [1, 2, 3, 65535], [1, 2, 3, 7]
    ta, tb = tokenize(tokens_as_text(a)), tokenize(tokens_as_text(b))
    assert len(ta) == 4 and ta[:3] == tb[:3] and ta[3] != tb[3]


async def test_sim_answers_peer_router_probes():
    inst = SimInstance(SimConfig(role="mixed", port=0, time_scale=0.01))
    await inst.start()
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/server_info", "/get_server_info"):
                async with s.get(inst.url + path) as r:
                    info = await r.json()
                    assert r.status == 200 and info["disaggregation_mode"] == "null"
                    assert info["dp_size"] == 1 and info["served_model_name"] == "default"
            for path in ("/model_info", "/get_model_info"):
                async with s.get(inst.url + path) as r:
                    assert r.status == 200 and (await r.json())["is_generation"] is True
            for path in ("/health_generate", "/v1/models"):
                async with s.get(inst.url + path) as r:
                    assert r.status == 200
            async with s.get(inst.url + "/get_load") as r:
                load = await r.json()
                assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] == 0
            async with s.post(inst.url + "/v1/completions/render",
                              json={"model": "default", "prompt": "abcdefgh"}) as r:
                assert (await r.json())["token_ids"] == tokenize("abcdefgh")
            async with s.post(inst.url + "/v1/chat/completions/render",
                              json={"messages": [{"role": "user", "content": "hi"}]}) as r:
                assert len((await r.json())["token_ids"]) == 2     # "user:hi\n"
            async with s.post(inst.url + "/tokenize", json={"prompt": "abcd"}) as r:
                body = await r.json()
                assert body["count"] == 1 and body["tokens"] == tokenize("abcd")
    finally:
        await inst.stop()


def test_live_run_through_kvrouter(tmp_path):
    j = tmp_path / "live.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter", "bench", "policies", "--live", *TINY,
         "--policies", "round_robin,cache_aware,oracle", "--requests", "30", "--rate", "10",
         "--time-scale", "0.3", "--json", str(j), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(j.read_text())
    assert [r["policy"] for r in rows] == ["round_robin", "cache_aware"]   # no live oracle
    for r in rows:
        assert RUN_KEYS <= set(r)
        assert r["mode"] == "live" and r["completed"] == 30 and r["failed"] == 0
        assert 0 < r["hit_rate"] < 1                   # measured at the instances
        assert sum(r["per_instance"].values()) == 30 and len(r["per_instance"]) == 2
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and r["itl_p50"] > 0
    assert (tmp_path / "out" / "hit_rate_vs_rate.png").exists()
    assert "round_robin" in proc.stdout


def test_admission_both_rows_rejections_and_goodput(tmp_path, capsys):
    """``--admission both``: every run twice; with a tiny queue the burst is partly rejected,
    and the rejected requests count as missing the SLO."""
    j = tmp_path / "adm.json"
    rc = bench_main(["policies", *TINY, "--policies", "round_robin,kv_cost", "--admission",
                     "both", "--max-inflight", "1", "--queue-size", "2", "--sweep", "4,400",
                     "--json", str(j), "--no-plots"])
    assert rc == 0
    rows = json.loads(j.read_text())
    runs = [r for r in rows if r["kind"] == "run"]
    assert [(r["policy"], r["admission"], r["rate"]) for r in runs] == \
        [(p, a, rate) for p in ("round_robin", "kv_cost") for a in (False, True)
         for rate in (4.0, 400.0)]
    for r in runs:
        assert r["completed"] + r["failed"] + r["rejected"] == 40
        assert r["slo_attainment"] * 40 <= r["completed"] + 1e-9
        assert r["slo_rps"] * r["duration"] == pytest.approx(r["slo_attainment"] * 40)
        if r["admission"]:
            limits = r["admission_limits"]
            assert (limits["max_inflight"], limits["queue_size"], limits["queue_timeout"]) == \
                (1, 2, 0.5)
            # 1 s (half the TTFT SLO) of llama3-8b prefill: ~25k tokens
            assert limits["max_prefill_tokens"] == pytest.approx(25_400, rel=0.02)
            assert r["queue_peak"] <= 2
        else:
            assert r["rejected"] == 0 and "admission_limits" not in r
    burst = [r for r in runs if r["admission"] and r["rate"] == 400.0]
    assert all(r["rejected"] > 0 and r["rejections"]["queue_full"] > 0 for r in burst)
    gps = [(g["policy"], g["admission"]) for g in rows if g["kind"] == "goodput"]
    assert gps == [("round_robin", False), ("round_robin", True), ("kv_cost", False),
                   ("kv_cost", True)]
    table = capsys.readouterr().out
    assert " rej " in table and "kv_cost +adm" in table


def test_admission_default_limits_come_from_the_engine_and_the_slo(tmp_path):
    j = tmp_path / "a.json"
    assert bench_main(["policies", *TINY, "--policies", "request_num", "--admission", "on",
                       "--slo-ttft", "1", "--rate", "4", "--json", str(j), "--no-plots"]) == 0
    (row,) = json.loads(j.read_text())
    # 64 blocks × 64 tokens per instance / (1024 + 128 prompt + 8 output tokens) = 3 in flight;
    # 0.5 s of prefill at the preset's rate; a quarter of the TTFT SLO in the queue
    limits = row["admission_limits"]
    assert (limits["max_inflight"], limits["queue_size"], limits["queue_timeout"]) == \
        (3, 1024, 0.25)
    assert limits["max_prefill_tokens"] == pytest.approx(12_700, rel=0.02)
    assert bench_main(["policies", *TINY, "--admission", "on", "--queue-timeout", "0"]) == 2


def test_live_admission_both_gets_429s_from_the_router(tmp_path):
    """Live, the router gets the limits as ``scheduler.*`` keys: with one request in flight
    per instance and two waiting, a burst is partly answered 429 (counted as ``rejected``);
    without the queue (``queue-size: 0``) every request is served."""
    j = tmp_path / "live.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter", "bench", "policies", "--live", *TINY,
         "--policies", "kv_cost", "--admission", "both", "--max-inflight", "1",
         "--queue-size", "2", "--requests", "30", "--rate", "60", "--time-scale", "0.3",
         "--json", str(j), "--no-plots"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    off, on = json.loads(j.read_text())
    assert (off["admission"], on["admission"]) == (False, True)
    assert off["completed"] == 30 and off["rejected"] == 0
    assert on["rejected"] > 0 and on["failed"] == 0
    assert on["completed"] + on["rejected"] == 30
    assert on["slo_attainment"] * 30 <= on["completed"] + 1e-9
