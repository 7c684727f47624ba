"""Load and measurement helpers of the router-overhead benchmark (:mod:`kvrouter.bench.overhead`).

* :func:`run_wrk` drives a URL with ``wrk`` (one thread, ``-c`` connections) and a Lua script
  whose ``done`` hook prints one ``JSON {…}`` line (requests, bytes, errors, latency
  percentiles in µs);
* :class:`ProcTree` samples a process *and all its descendants* (found by walking ``/proc`` for
  parent ids, since ``/proc/<pid>/task/*/children`` is not always compiled in): CPU ticks
  (user and system, including reaped children's) and the summed ``VmRSS``;
* :func:`stream_bytes` is the raw size of one streamed response, to turn wrk's byte count into
  a count of relayed events.

Lua bodies use model ``mock`` and standard OpenAI fields only (peer routers drop unknown ones).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EVENTS_PER_STREAM", "LUA", "STREAM_SECONDS", "ProcTree", "run_wrk", "stream_bytes",
           "write_lua"]

CLK = os.sysconf("SC_CLK_TCK")

#: SSE events per stream: ``max_tokens`` = 50 token events plus ``data: [DONE]``.
EVENTS_PER_STREAM = 51
#: Length of one stream at the mock: the first event at once, the other 50 (the last one with
#: ``[DONE]``) on 49 ticks of 20 ms.
STREAM_SECONDS = 0.98

_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,' ..
    '"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
'''
_POST = '''
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
'''
TINY_BODY = ('{"model":"mock","messages":[{"role":"user","content":"Say hi."}],'
             '"max_tokens":4,"stream":false}')
STREAM_BODY = ('{"model":"mock","messages":[{"role":"user","content":"Say hello."}],'
               '"max_tokens":50,"stream":true}')
_PREFIX = ("You are a careful assistant. " * 60)[:1500]
#: ~2 KB chat prompts: one shared 1.5 KB system prefix and a 500-character unique question.
_CACHE = r'''
local n = 0
local prefix = "{prefix}"
request = function()
  n = n + 1
  local suffix = string.sub(string.rep("q" .. n .. " ", 100), 1, 500)
  local body = '{"model":"mock","messages":[{"role":"system","content":"' .. prefix ..
    '"},{"role":"user","content":"' .. suffix .. '"}],"max_tokens":4,"stream":false}'
  return wrk.format(nil, nil, nil, body)
end
'''.replace("{prefix}", _PREFIX)

LUA: dict[str, str] = {
    "tiny": _POST + f"wrk.body = '{TINY_BODY}'\n" + _DONE,
    "prompt2k": _POST + _CACHE + _DONE,
    "stream": _POST + f"wrk.body = '{STREAM_BODY}'\n" + _DONE,
}


def write_lua(directory: Path) -> dict[str, Path]:
    """The Lua scripts of :data:`LUA` written into ``directory``; name → path."""
    paths = {}
    for name, text in LUA.items():
        paths[name] = directory / f"{name}.lua"
        paths[name].write_text(text)
    return paths


async def run_wrk(url: str, lua: Path, conns: int, duration: float, *, timeout: str = "10s",
                  cpu: str | None = None) -> dict:
    """One wrk run; its ``JSON`` summary plus ``rps``. Raises RuntimeError on failure."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", f"--timeout={timeout}",
            "-s", str(lua), url]
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration + 45)
    finally:
        await _kill_group(proc)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("JSON "):
            res = json.loads(line[5:])
            res["rps"] = round(res["requests"] / max(res["duration_us"] / 1e6, 1e-9), 1)
            res["errors"] = (res["err_connect"] + res["err_read"] + res["err_write"]
                             + res["err_status"] + res["err_timeout"])
            return res
    raise RuntimeError(f"wrk failed (status {proc.returncode}): "
                       f"{(out + err).decode(errors='replace').strip()[-500:]}")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 5 s, to the process group of ``proc`` (its own session)."""
    if proc.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue


@dataclass
class Usage:
    user: float = 0.0      # CPU seconds
    system: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.system


class ProcTree:
    """A root process and its descendants, re-discovered at every sample."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def cpu(self) -> Usage:
        """User and system CPU seconds of the tree (utime+cutime, stime+cstime per process:
        children that ended and were reaped stay counted in their parent)."""
        use = Usage()
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            use.user += (int(fields[11]) + int(fields[13])) / CLK
            use.system += (int(fields[12]) + int(fields[14])) / CLK
        return use

    def rss_mb(self) -> float:
        """Summed VmRSS of the tree in MB (shared pages count once per process)."""
        return self._sum_kb("status", "VmRSS:") / 1024

    def pss_mb(self) -> float:
        """Summed Pss of the tree in MB (shared pages split between their users): the fair
        figure for forked workers."""
        return self._sum_kb("smaps_rollup", "Pss:") / 1024

    def _sum_kb(self, name: str, key: str) -> int:
        kb = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    for line in f:
                        if line.startswith(key):
                            kb += int(line.split()[1])
                            break
            except (OSError, ValueError):
                continue
        return kb


async def stream_bytes(url: str, timeout: float = 15.0) -> int:
    """Raw bytes (head and body) of one streamed response from ``url`` over a keep-alive
    connection, as wrk counts them."""
    host, _, rest = url.split("//", 1)[1].partition(":")
    port, _, path = rest.partition("/")
    body = STREAM_BODY.encode()
    req = (f"POST /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def fetch() -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower:
                data = head
                while not data.endswith(b"\r\n0\r\n\r\n"):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
                return len(data)
            length = None
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            rest = await (reader.readexactly(length) if length is not None else reader.read())
            return len(head) + len(rest)
        finally:
            writer.close()

    return await asyncio.wait_for(fetch(), timeout)
