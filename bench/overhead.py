#!/usr/bin/env python3
"""Router overhead: CPU per request, added latency, CPU per relayed chunk, RSS with open streams.

Starts mock instances (``bench/mock_instance.py``, or the aiohttp ``mock_worker.py`` of the
peer benchmark with ``--mock-worker``), then for each router variant a real ``python -m
kvrouter`` process (``--variant NAME=PYTHONPATH`` picks the code, default: this checkout),
registers the instances and drives it with wrk. CPU is the router process's utime+stime from
``/proc/<pid>/stat`` over the wrk run; RSS is its peak ``VmRSS``. Everything binds 127.0.0.1
and only the processes started here are stopped.

Tests (``--tests``, comma list):

* ``direct_c1``  wrk -c1 straight to one mock (the added-latency baseline);
* ``ns_c1``      tiny non-stream chat, wrk -c1: p50/p99 and CPU per request (request_num);
* ``ns_c64``     the same at c=64: throughput and CPU per request;
* ``ca_c64``     cache_aware, ~2 KB chat prompts (shared 1.5 KB prefix + a unique suffix), c=64;
* ``sse``        ``--streams`` concurrent streams of 50 events 20 ms apart (50 events/s each):
                 CPU per relayed event, peak RSS, stream duration p50/p99 (ideal ~1 s).

usage:
  python bench/overhead.py                                   # this checkout, all tests
  python bench/overhead.py --variant before=/tmp/old --variant after=.  --duration 10
  python bench/overhead.py --tests ns_c64,sse --streams 1000 --pin --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK = os.sysconf("SC_CLK_TCK")

DONE_LUA = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
'''
CHAT_LUA = r'''
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock-model","messages":[{"role":"user","content":"Say hi."}],"max_tokens":4,"stream":false}'
''' + DONE_LUA
PREFIX = ("You are a careful assistant. " * 52)[:1500]
CACHE_LUA = r'''
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
local prefix = "{prefix}"
request = function()
  n = n + 1
  local suffix = string.rep("q" .. n .. " ", 60)
  local body = '{"model":"mock","messages":[{"role":"system","content":"' .. prefix ..
    '"},{"role":"user","content":"' .. string.sub(suffix, 1, 500) .. '"}],"max_tokens":4}'
  return wrk.format(nil, nil, nil, body)
end
'''.replace("{prefix}", PREFIX) + DONE_LUA
STREAM_BODY = ('{"model":"mock","messages":[{"role":"user","content":"Say hello."}],'
               '"stream":true,"max_tokens":50,"mock_delay_ms":20}')
STREAM_LUA = r'''
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
'''.replace("{body}", STREAM_BODY) + DONE_LUA


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def taskset(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu else []


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: str | None = None):
        self.log = log
        self.fh = open(log, "wb")  # noqa: SIM115 - closed with the process
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.fh, env=env, cwd=cwd,
                                  start_new_session=True)

    def wait_line(self, prefix: str, timeout: float = 20) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"process exited; log {self.log}:\n{self.log.read_text()[-2000:]}")
            self.fh.write(line)
            text = line.decode()
            if text.startswith(prefix):
                threading.Thread(target=self._pump, daemon=True).start()
                return text
        raise RuntimeError(f"no {prefix!r} within {timeout}s")

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.fh.write(line)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def http(method: str, url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_router(name: str, pythonpath: str, policy: str, ports: list[int], tmp: Path,
                 cpu: str | None) -> tuple[Proc, str]:
    sub = tmp / f"router-{name}-{policy}"
    sub.mkdir(exist_ok=True)
    cfg = sub / "config.yaml"
    cfg.write_text(f"scheduler:\n  policy: {policy}\n  stats-interval-secs: 0\n"
                   f"manager:\n  health-check-interval-secs: 60\n")
    env = dict(os.environ, PYTHONPATH=str(Path(pythonpath).resolve()), PYTHONUNBUFFERED="1")
    port = free_port()
    proc = Proc([*taskset(cpu), sys.executable, "-m", "kvrouter", "--port", str(port),
                 "--config_path", str(cfg)], sub / "router.log", env=env, cwd=str(sub))
    proc.wait_line("Starting server on ")
    url = f"http://127.0.0.1:{port}"
    for p in ports:
        status, body = http("POST", url + "/register",
                            {"role": "mixed", "host_ip": "127.0.0.1", "port": p})
        if status != 200:
            raise RuntimeError(f"register {p}: {status} {body!r}")
    return proc, url


def wrk(url: str, lua: Path, conns: int, duration: float, cpu: str | None,
        timeout: str = "10s") -> dict:
    out = subprocess.run([*taskset(cpu), "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s",
                          f"--timeout={timeout}", "-s", str(lua), url],
                         capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")


def measure(pid: int, run) -> tuple[dict, tuple[float, float], float]:
    """Run ``run()`` while sampling the router; returns (wrk result, (user, system) CPU
    seconds, peak RSS MB)."""
    peak = [rss_mb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], rss_mb(pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    c0 = cpu_ticks(pid)
    res = run()
    c1 = cpu_ticks(pid)
    stop.set()
    t.join()
    return res, ((c1[0] - c0[0]) / CLK, (c1[1] - c0[1]) / CLK), peak[0]


def stream_bytes(url: str) -> int:
    """Raw response bytes of one stream (what wrk counts per stream)."""
    host, port = url.split("//")[1].split(":")
    body = STREAM_BODY.encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return len(data)


# -- main --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=PYTHONPATH of a kvrouter checkout (repeatable; default this one)")
    ap.add_argument("--tests", default="direct_c1,ns_c1,ns_c64,ca_c64,sse")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; each round runs every variant once, in turn (A/B interleaved)")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--mock-worker", default=None,
                    help="path of peer_bench/mock_worker.py (aiohttp) instead of the fast mock")
    ap.add_argument("--pin", action="store_true",
                    help="router on CPU 0, wrk and mocks on CPU 1")
    ap.add_argument("--json", default=None, help="append one JSON line per result")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variant] or [["this", str(REPO)]]
    tests = args.tests.split(",")
    r_cpu, o_cpu = ("0", "1") if args.pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="kvr-overhead-"))
    luas = {}
    for name, text in (("chat", CHAT_LUA), ("cache", CACHE_LUA), ("stream", STREAM_LUA)):
        luas[name] = tmp / f"{name}.lua"
        luas[name].write_text(text)

    ports = [free_port() for _ in range(args.instances)]
    mocks: list[Proc] = []
    if args.mock_worker:
        for p in ports:
            m = Proc([*taskset(o_cpu), sys.executable, args.mock_worker, "--port", str(p),
                      "--no-log", "--chunks", "50", "--chunk-delay-ms", "20"],
                     tmp / f"mock-{p}.log")
            mocks.append(m)
        time.sleep(2)
    else:
        m = Proc([*taskset(o_cpu), sys.executable, str(HERE / "mock_instance.py"), "--ports",
                  ",".join(map(str, ports))], tmp / "mock.log")
        m.wait_line("mock instance listening")
        mocks.append(m)
    results = []

    def report(rec: dict) -> None:
        results.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    try:
        if "direct_c1" in tests:
            lua = luas["chat"]
            wrk(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", lua, 1, 1, o_cpu)
            res = wrk(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", lua, 1,
                      args.duration, o_cpu)
            report({"variant": "direct", "test": "direct_c1", "rps": _rps(res),
                    "p50_us": res["p50_us"], "p99_us": res["p99_us"]})
        for rnd in range(args.repeat):
            for name, path in variants:
                for policy, group in (("request_num", ("ns_c1", "ns_c64", "sse")),
                                      ("cache_aware", ("ca_c64",))):
                    todo = [t for t in group if t in tests]
                    if not todo:
                        continue
                    router, url = start_router(f"{name}-{rnd}", path, policy, ports, tmp, r_cpu)
                    pid = router.p.pid
                    try:
                        for test in todo:
                            report({**run_test(test, name, url, pid, luas, args, o_cpu),
                                    "round": rnd})
                    finally:
                        router.stop()
        summarize(results)
    finally:
        for m in mocks:
            m.stop()
    print(f"# logs in {tmp}", file=sys.stderr)
    return 0


def summarize(results: list[dict]) -> None:
    """Median per (variant, test) of the main figures."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["test"]), []).append(r)
    keys = ("rps", "p50_us", "p99_us", "cpu_us_per_req", "sys_us_per_req", "chunks_per_s",
            "cpu_us_per_chunk", "sys_us_per_chunk", "stream_p50_ms", "stream_p99_ms",
            "peak_rss_mb")
    print("\n# medians (n = rounds)")
    for (variant, test), rows in groups.items():
        med = {}
        for k in keys:
            vals = sorted(r[k] for r in rows if k in r)
            if vals:
                med[k] = vals[len(vals) // 2] if len(vals) % 2 else \
                    round((vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2, 2)
        print(f"{variant:10s} {test:18s} n={len(rows)} " +
              " ".join(f"{k}={v}" for k, v in med.items()), flush=True)


def _rps(res: dict) -> float:
    return round(res["requests"] / (res["duration_us"] / 1e6), 1)


def run_test(test: str, name: str, url: str, pid: int, luas: dict, args, cpu) -> dict:
    chat = url + "/v1/chat/completions"
    if test in ("ns_c1", "ns_c64", "ca_c64"):
        conns = 1 if test == "ns_c1" else 64
        lua = luas["cache" if test == "ca_c64" else "chat"]
        wrk(chat, lua, conns, 2, cpu)  # warm-up
        res, (user, system), rss = measure(pid, lambda: wrk(chat, lua, conns, args.duration,
                                                              cpu))
        n = max(res["requests"], 1)
        secs = user + system
        return {"variant": name, "test": test, "rps": _rps(res), "p50_us": res["p50_us"],
                "p99_us": res["p99_us"], "cpu_us_per_req": round(secs / n * 1e6, 1),
                "sys_us_per_req": round(system / n * 1e6, 1),
                "router_cores": round(secs / (res["duration_us"] / 1e6), 2),
                "errors": res["err_status"] + res["err_read"] + res["err_timeout"],
                "rss_mb": round(rss, 1)}
    if test == "sse":
        per_stream = stream_bytes(url)
        events = 51
        res, (user, system), rss = measure(pid, lambda: wrk(chat, luas["stream"], args.streams,
                                                              args.duration, cpu, timeout="30s"))
        secs = user + system
        chunks = res["bytes"] / per_stream * events
        dur = res["duration_us"] / 1e6
        return {"variant": name, "test": f"sse_{args.streams}x50/s", "streams": res["requests"],
                "chunks_per_s": round(chunks / dur), "offered_chunks_per_s": args.streams * 50,
                "cpu_us_per_chunk": round(secs / max(chunks, 1) * 1e6, 2),
                "sys_us_per_chunk": round(system / max(chunks, 1) * 1e6, 2),
                "router_cores": round(secs / dur, 2), "stream_p50_ms": res["p50_us"] / 1e3,
                "stream_p99_ms": res["p99_us"] / 1e3, "peak_rss_mb": round(rss, 1),
                "errors": res["err_status"] + res["err_read"] + res["err_timeout"]}
    raise ValueError(test)


if __name__ == "__main__":
    sys.exit(main())
