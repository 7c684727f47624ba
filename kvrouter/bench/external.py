"""An external router (sglang-router, vllm-router, …) in front of simulated instances.

``--router-cmd`` is a command template; ``{port}`` becomes a free port the router must listen
on, ``{workers}`` the instance URLs separated by spaces (one argument each, for
``--worker-urls URL...``), ``{workers_comma}`` the same joined by commas and
``{prometheus_port}`` a second free port (both peers default to 29000, which collides when
several run). The command is split like a shell would (``shlex``) but not run by a shell. The
instances do not register by heartbeat; the router only gets their URLs.

Ready means: ``GET /readiness`` (or, if the router has none, ``GET /health``) answers 200 and,
when the router lists its workers (``GET /workers`` or ``/list_workers``), all of them are
there — SGLang's router registers workers in the background after it starts listening.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

__all__ = ["default_label", "free_port", "launch_external", "render_command", "start_external"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_command(template: str, port: int, workers: list[str],
                   prometheus_port: int) -> list[str]:
    """The argv of ``template`` with its placeholders filled in."""
    argv: list[str] = []
    for arg in shlex.split(template):
        if arg == "{workers}":
            argv.extend(workers)
            continue
        argv.append(arg.replace("{port}", str(port))
                    .replace("{workers_comma}", ",".join(workers))
                    .replace("{workers}", " ".join(workers))
                    .replace("{prometheus_port}", str(prometheus_port)))
    return argv


def default_label(template: str) -> str:
    """A row label for a command: executable name and its ``--policy`` value, if any."""
    args = shlex.split(template)
    if not args:
        return "external"
    name = os.path.basename(args[0])
    if name.startswith("python") and "-m" in args:
        name = args[args.index("-m") + 1].split(".")[0]
    for flag in ("--policy", "--prefill-policy"):
        if flag in args and args.index(flag) + 1 < len(args):
            return f"{name}:{args[args.index(flag) + 1]}"
    return name


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the router's process group (we started it in its own session), SIGKILL after
    15 s."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()


def _worker_count(data: Any) -> int | None:
    """How many workers a ``/workers`` or ``/list_workers`` answer lists (None: unknown)."""
    if isinstance(data, list):
        return len(data)
    if isinstance(data, dict):
        for key in ("workers", "urls"):
            if isinstance(data.get(key), list):
                return len(data[key])
        for key in ("total", "count"):
            if isinstance(data.get(key), int):
                return int(data[key])
    return None


async def _ready(session: aiohttp.ClientSession, url: str, n_workers: int) -> bool:
    status = 0
    for path in ("/readiness", "/health"):
        try:
            async with session.get(url + path) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientError:
            return False
        if status != 404:
            break
    if status != 200:
        return False
    for path in ("/workers", "/list_workers"):
        try:
            async with session.get(url + path) as r:
                if r.status != 200:
                    continue
                count = _worker_count(await r.json(content_type=None))
        except (aiohttp.ClientError, ValueError):
            continue
        if count is not None:
            return count >= n_workers
    return True


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")


async def start_external(template: str, workers: list[str], stack: AsyncExitStack,
                         log_path: Path, ready_timeout: float = 120.0) -> str:
    """Start the router of ``template`` in front of ``workers``; return its URL once ready.
    Its output goes to ``log_path``; it is stopped when ``stack`` closes."""
    url, _ = await launch_external(template, workers, stack, log_path, ready_timeout)
    return url


async def launch_external(template: str, workers: list[str], stack: AsyncExitStack,
                          log_path: Path, ready_timeout: float = 120.0, *,
                          port: int | None = None) -> tuple[str, int]:
    """:func:`start_external` that also returns the process id (for CPU/RSS sampling) and
    takes the listen port (``port``, default: a free one) when the caller needs it first."""
    port, prom = port or free_port(), free_port()
    argv = render_command(template, port, workers, prom)
    log = _open_log(log_path)
    stack.callback(log.close)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                stdin=asyncio.subprocess.DEVNULL,
                                                start_new_session=True)
    stack.push_async_callback(_stop, proc)
    url = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=5)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_timeout
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not await _ready(session, url, len(workers)):
            if proc.returncode is not None:
                raise RuntimeError(f"router exited with status {proc.returncode} before it was "
                                   f"ready: {shlex.join(argv)} (log: {log_path})")
            if loop.time() > deadline:
                raise RuntimeError(f"router not ready after {ready_timeout:g} s: "
                                   f"{shlex.join(argv)} (log: {log_path})")
            await asyncio.sleep(0.25)
    return url, proc.pid
