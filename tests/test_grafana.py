"""The Grafana board (``deploy/grafana/kvrouter.json``) and the Prometheus scrape example
(``deploy/prometheus.yml``): every metric the board's PromQL reads is in a live router's
``/metrics``, with samples, after traffic that gives each labelled family a series."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import yaml

from harness import bounded

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
BOARD = DEPLOY / "grafana" / "kvrouter.json"
#: PromQL words that are neither metrics nor followed by "(" (functions are)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless"}


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))          # panels inside collapsed rows
    return out


def queries(board: dict) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)                   # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)                  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if m.group() in KEYWORDS or expr[m.end():].lstrip().startswith("("):
            continue                                         # a keyword or a function
        names.add(m.group())
    return names


def board_metrics(board: dict) -> set[str]:
    names = set().union(*(metric_names(q) for q in queries(board)))
    for var in board["templating"]["list"]:              # label_values(<metric>, <label>)
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q or "")
        names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", text))
    return names


def test_metric_names_are_extracted_from_promql():
    assert metric_names('histogram_quantile(0.9, sum by (le, stream) (rate(a_bucket{job=~"$j",'
                        'x="y(z)"}[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("sum(rate(b_total[5m])) / sum by (instance) (c) and on (x) d") == \
        {"b_total", "c", "d"}


def test_board_is_well_formed():
    board = json.loads(BOARD.read_text())
    ps = panels(board)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids))
    for p in ps:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs))
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert len(queries(board)) >= 20


def test_prometheus_example_scrapes_metrics():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]
    assert "honor_labels" not in job
    assert "credentials_file" in (DEPLOY / "prometheus.yml").read_text()   # the token, commented


def chat(i: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "shared context " * 40 + f"q{i}"}],
            "max_tokens": 2, "stream": stream, "stream_options": {"include_usage": True}}


def sample_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.M)}


@bounded(60)
async def test_every_board_metric_is_in_metrics(router_factory, sims):
    wanted = board_metrics(json.loads(BOARD.read_text()))
    assert len(wanted) >= 20
    router = await router_factory({
        "scheduler": {"policy": "kv_cost", "kv-cost-exploration": 0,
                      "metrics-scrape-interval-secs": 1, "metrics-scrape-timeout-secs": 1,
                      "max-inflight-per-instance": 1, "queue-size": 1},
        "manager": {"health-check-interval-secs": 1},
        "server": {"status-retries": 1}})
    a, b = await sims(2)
    for inst in (a, b):
        assert await inst.register_once(router.url) == 200
    url = router.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        for i in range(6):                      # streams (TTFT) and answers with usage
            async with s.post(url, json=chat(i, stream=i % 2 == 0)) as r:
                assert r.status == 200
                await r.read()
        async with s.post(url, data=b"{") as r:     # kvrouter_errors_total
            assert r.status == 400
        a.knobs.reply_status, a.knobs.reply_body = 500, {"error": {"message": "boom"}}
        for i in range(2):                      # one lands on a, is retried on b
            async with s.post(url, json=chat(10 + i, stream=False)) as r:
                assert r.status == 200
        a.knobs.reply_status = None
        for inst in (a, b):                     # queue: 2 in flight, 1 waits, 1 rejected
            inst.knobs.header_delay = 0.5

        async def one(i: int) -> int:
            async with s.post(url, json=chat(20 + i, stream=False)) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(4)))
        assert sorted(statuses) == [200, 200, 200, 429]

        async def missing() -> set[str]:
            async with s.get(router.url + "/metrics") as r:
                return wanted - sample_names(await r.text())

        left = await missing()
        for _ in range(50):                     # probe rounds and scrapes run every second
            if not left:
                break
            await asyncio.sleep(0.3)
            left = await missing()
        assert not left, f"used by the board, not in /metrics: {sorted(left)}"
