"""The operator's view (README "Operator's view"): ``GET /dashboard`` rendered by a real headless
Chromium against a real router process and simulated instances, and its data,
``GET /dashboard/state``.

The browser is driven over the DevTools protocol (a websocket on 127.0.0.1) so that the test can
type the admin token into the page like an operator would, wait for what the page renders, read
the DOM and save a screenshot (``dashboard.png`` in the test's tmp dir).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from harness import bounded, get_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium', which "
    ".ci/run installs)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1400,1000")
STATIC = Path(__file__).resolve().parent.parent / "kvrouter" / "server" / "static"
PAGE = {"/dashboard": ("dashboard.html", "text/html"),
        "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
        "/dashboard/dashboard.css": ("dashboard.css", "text/css")}
TOKEN = "admin-token-for-the-dashboard-test"
AUTH = {"auth": {"admin-token": TOKEN, "register-allow-cidrs": ["127.0.0.0/8"]}}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Browser:
    """One headless Chromium process and its page, over the DevTools protocol."""

    def __init__(self, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse, log) -> None:
        self.proc, self.session, self.ws, self.log = proc, session, ws, log
        self._ids = itertools.count(1)

    @classmethod
    async def start(cls, tmp_path: Path) -> Browser:
        assert CHROMIUM is not None
        profile = tmp_path / "chromium-profile"
        log = open(tmp_path / "chromium.log", "wb")     # noqa: SIM115 (closed by close())
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        session = aiohttp.ClientSession()
        try:
            active = profile / "DevToolsActivePort"      # written once it listens
            async with asyncio.timeout(30):
                while not active.exists() or not active.read_text().strip():
                    assert proc.returncode is None, "chromium exited at startup"
                    await asyncio.sleep(0.1)
                port = int(active.read_text().split()[0])
                while True:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.1)
            ws = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            await _stop(proc)
            log.close()
            raise
        browser = cls(proc, session, ws, log)
        await browser.call("Emulation.setDeviceMetricsOverride",
                           width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        return browser

    async def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events in between are skipped)."""
        ident = next(self._ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == ident:
                assert "error" not in msg, msg
                return msg["result"]

    async def evaluate(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete' && location.href === "
                         f"{url!r}")

    async def until(self, expression: str, timeout: float = 15.0):
        """Wait until ``expression`` is truthy in the page; its value."""
        async with asyncio.timeout(timeout):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.1)
        return value

    async def screenshot(self, path: Path) -> None:
        res = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(res["data"]))

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
        await _stop(self.proc)
        self.log.close()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the chromium we started (it takes its own children down), then SIGKILL."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def browser(tmp_path):
    b = await Browser.start(tmp_path)
    try:
        yield b
    finally:
        await b.close()


def chat(i: int, stream: bool) -> dict:
    """Requests over three long shared contexts: the second of each context hits the cache."""
    return {"messages": [{"role": "user", "content": f"context {i % 3} " * 150 + f"q{i}"}],
            "max_tokens": 4, "stream": stream, "stream_options": {"include_usage": True}}


async def send(router, bodies: list[dict], headers: dict | None = None) -> list[str]:
    """Send one after the other; the instance each went to."""
    went = []
    async with aiohttp.ClientSession() as s:
        for body in bodies:
            async with s.post(router.url + "/v1/chat/completions", json=body,
                              headers=headers) as r:
                await r.read()
                assert r.status == 200
                went.append(r.headers["X-Router-Mixed-URL"])
    return went


DOM = """(() => {
  const rows = [...document.querySelectorAll('#instances tbody tr[data-url]')];
  return {
    instances: rows.map(r => ({url: r.dataset.url,
                               state: r.querySelector('.state').textContent,
                               kv: r.querySelector('.kv').textContent,
                               measured: r.querySelector('.measured').textContent})),
    decisions: [...document.querySelectorAll('#decisions tbody tr.decision')]
      .map(r => [...r.cells].map(c => c.textContent)),
    predicted: document.getElementById('hit-predicted').textContent,
    measured: document.getElementById('hit-measured').textContent,
    ttft: document.getElementById('card-ttft').textContent,
    status: document.getElementById('status').hidden ? ''
      : document.getElementById('status').textContent,
    lines: document.querySelectorAll('#chart-rps polyline').length,
  };
})()"""


@needs_chromium
@bounded(90)
async def test_dashboard_renders_the_fleet_in_a_real_browser(router_factory, sims, browser,
                                                             tmp_path):
    router = await router_factory({"scheduler": {"policy": "kv_cost",
                                                 "kv-cost-exploration": 0,
                                                 "metrics-scrape-interval-secs": 1,
                                                 "metrics-scrape-timeout-secs": 1}})
    a, b = await sims(2)
    for inst in (a, b):
        assert await inst.register_once(router.url) == 200
    status, _ = await get_json(router.url + "/dashboard/state")   # starts recording decisions
    assert status == 200
    went = await send(router, [chat(i, stream=i % 2 == 0) for i in range(9)])
    assert set(went) == {a.url, b.url}

    await browser.open(router.url + "/dashboard")
    await browser.until("document.querySelectorAll('#instances tbody tr[data-url]').length == 2"
                        " && document.querySelectorAll('#decisions tr.decision').length == 9"
                        " && ![...document.querySelectorAll('.age')]"
                        ".some(c => c.textContent == 'not scraped')")   # kv_cost scrapes
    dom = await browser.evaluate(DOM)
    await browser.screenshot(tmp_path / "dashboard.png")

    assert dom["status"] == ""
    assert {(i["url"], i["state"]) for i in dom["instances"]} == {(a.url, "healthy"),
                                                                  (b.url, "healthy")}
    # newest first: the last request's decision, with its reason and matched blocks
    time_, role, policy, url, reason, blocks = dom["decisions"][0]
    assert re.fullmatch(r"\d\d:\d\d:\d\d", time_)
    assert (role, policy, url, reason) == ("mixed", "kv_cost", went[-1], "cost_estimate")
    matched, looked = map(int, blocks.split(" / "))
    assert 0 < matched <= looked                  # the 9th request shares a warm context
    # requests 4..9 reuse a context: both rates are shown, as percentages
    assert re.fullmatch(r"\d+\.\d%", dom["predicted"]) and dom["predicted"] != "0.0%"
    assert re.fullmatch(r"\d+\.\d%", dom["measured"]) and dom["measured"] != "0.0%"
    assert all(re.fullmatch(r"\d+\.\d%", i["measured"]) for i in dom["instances"])
    assert all(re.fullmatch(r"\d+\.\d%", i["kv"]) for i in dom["instances"])   # scraped
    assert re.fullmatch(r"\d+ ms", dom["ttft"])   # streams were relayed in the last minute
    assert dom["lines"] >= 1                      # the throughput chart has a line
    png = (tmp_path / "dashboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


@needs_chromium
@bounded(90)
async def test_dashboard_asks_for_the_admin_token_and_sends_it(router_factory, sims, browser,
                                                               tmp_path):
    router = await router_factory(AUTH)
    a, b = await sims(2)
    for inst in (a, b):
        assert await inst.register_once(router.url) == 200
    await browser.open(router.url + "/dashboard")      # the page itself is open
    text = await browser.until("!document.getElementById('status').hidden && "
                               "document.getElementById('status').textContent")
    assert "admin token is needed" in text
    assert await browser.evaluate(
        "document.querySelectorAll('#instances tbody tr[data-url]').length") == 0

    # typed into the page: kept in sessionStorage, sent with every refresh, not left in the DOM
    await browser.evaluate(f"document.getElementById('token').value = {TOKEN!r}; "
                           "document.getElementById('token-form').requestSubmit()")
    await browser.until("document.querySelectorAll('#instances tbody tr[data-url]').length == 2")
    assert await browser.evaluate("sessionStorage.getItem('kvrouter.adminToken')") == TOKEN
    assert await browser.evaluate("document.getElementById('status').hidden") is True
    assert TOKEN not in await browser.evaluate("document.documentElement.outerHTML")
    await send(router, [chat(0, stream=False)])
    await browser.until("document.querySelectorAll('#decisions tr.decision').length == 1")
    await browser.screenshot(tmp_path / "dashboard-auth.png")

    await browser.evaluate("document.getElementById('token-forget').click()")
    assert "admin token is needed" in await browser.until(
        "!document.getElementById('status').hidden && "
        "document.getElementById('status').textContent")


@bounded(60)
async def test_page_files_are_open_and_the_state_is_an_admin_route(router_factory):
    router = await router_factory(AUTH)
    async with aiohttp.ClientSession() as s:
        for path, (name, ctype) in PAGE.items():
            async with s.get(router.url + path) as r:
                body = await r.read()
                assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert body == (STATIC / name).read_bytes()
        async with s.get(router.url + "/dashboard/state") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with s.get(router.url + "/dashboard/state",
                         headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(router.url + "/dashboard/state", headers=BEARER) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            assert (await r.json())["mode"] == "mixed"


def test_page_fetches_nothing_from_elsewhere():
    """Air-gapped clusters: no URL in the page's files but the SVG namespace (an identifier,
    never fetched)."""
    for name, _ in PAGE.values():
        text = (STATIC / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "@import" not in text and "url(" not in text


@bounded(60)
async def test_state_reports_instances_decisions_traffic_and_queue(router_factory, sims):
    router = await router_factory({
        "scheduler": {"policy": "request_num", "max-inflight-per-instance": 4},
        "server": {"status-retries": 0},
        "outlier": {"consecutive-failures": 2, "max-ejection-percent": 50}})
    a, b = await sims(2)
    for inst in (a, b):
        assert await inst.register_once(router.url) == 200
    # not recorded: no dashboard has asked yet
    await send(router, [chat(0, stream=True)])
    status, state = await get_json(router.url + "/dashboard/state")
    assert status == 200 and state["decisions"] == []
    assert state["policies"] == {"mixed": "request_num"}
    assert state["queue"] == {"interactive": 0, "default": 0, "batch": 0}
    assert sum(state["traffic"]["requests"]) == 1           # traffic is always counted
    assert len(state["traffic"]["requests"]) == 300

    went = await send(router, [chat(i, stream=True) for i in range(1, 4)])
    a.knobs.reply_status, a.knobs.reply_body = 500, {"error": {"message": "boom"}}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):       # request_num: ties go to a (the earliest URL) → 2 failures
            async with s.post(router.url + "/v1/chat/completions", json=chat(9, False)) as r:
                assert r.status == 500 and r.headers["X-Router-Mixed-URL"] == a.url
    status, state = await get_json(router.url + "/dashboard/state")
    decisions = state["decisions"]
    assert [d["instance"] for d in decisions] == [a.url, a.url, *reversed(went)]
    assert {(d["role"], d["policy"], d["strategy"]) for d in decisions} == {
        ("mixed", "request_num", "policy")}
    by_url = {i["url"]: i for i in state["instances"]}
    assert by_url[a.url]["ejected"] is True and by_url[b.url]["ejected"] is False
    assert by_url[a.url]["state"] == "healthy" and by_url[a.url]["routable"] is True
    assert by_url[a.url]["in_flight_requests"] == 0
    assert by_url[a.url]["prompt_tokens"] + by_url[b.url]["prompt_tokens"] > 0
    traffic = state["traffic"]
    assert sum(traffic["requests"]) == 6 and sum(traffic["errors"]) == 2
    assert any(t is not None and t > 0 for t in traffic["ttft_mean"])
    assert sum(traffic["prompt_tokens"]) > 0
    assert state["hit_rate"]["predicted_total"] is None      # request_num looks up no block
    assert 0 <= state["hit_rate"]["measured_total"] <= 1
