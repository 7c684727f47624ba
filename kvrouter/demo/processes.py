"""Starting and stopping a router and simulated instances as real processes, as an operator
would run them (``kvrouter --port 0 …`` and ``kvrouter sim … --router``)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

#: stdout drains of spawned processes (the event loop only keeps weak references to tasks)
_drains: set[asyncio.Task[None]] = set()


async def spawn(*args: str, marker: str, count: int = 1,
                timeout: float = 30) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start ``python -m kvrouter *args``; wait for ``count`` stdout lines starting with
    ``marker`` and return them. The rest of stdout is drained in the background."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while len(lines) < count:
                raw = await stdout.readline()
                if not raw:
                    raise RuntimeError(f"'kvrouter {' '.join(args[:2])}' exited early")
                if raw.decode().startswith(marker):
                    lines.append(raw.decode().strip())
    except BaseException:
        await stop(proc)
        raise
    drain = asyncio.ensure_future(_drain(stdout))
    _drains.add(drain)
    drain.add_done_callback(_drains.discard)
    return proc, lines


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process we started, then SIGKILL it if it does not exit in 10 s."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass
class ClusterSpec:
    """A router and its simulated instances."""

    policy: str
    instances: int = 4
    pd: tuple[int, int] | None = None          # (prefill, decode) counts in PD mode
    preset: str = "llama3-8b-h100"
    time_scale: float = 1.0
    sim_args: list[str] = field(default_factory=list)   # extra `kvrouter sim` flags
    router_config: dict = field(default_factory=dict)   # merged into config.yaml
    decode_policy: str = "request_num"                  # PD: the decode policy
    routers: int = 1          # router processes (mixed mode when more than one)
    redis_url: str = ""       # routers > 1: replicas sharing state through this Redis; "":
                              # independent routers, each given the instances' register.yaml


@dataclass
class RunningCluster:
    url: str                  # the first router
    instances: int
    roles: dict[str, str] = field(default_factory=dict)  # instance URL → role
    urls: list[str] = field(default_factory=list)        # every router
    #: replicas sharing state: seconds from the moment the first router routed to every
    #: instance (they register there) until the last one did (each polled every ~5 ms)
    visible_after: float | None = None


async def start_sims(spec: ClusterSpec, stack: AsyncExitStack,
                     router: str | None = None) -> dict[str, str]:
    """Start the ``kvrouter sim`` processes of ``spec`` (one per role); with ``router``
    (``host:port``) they register themselves by heartbeat, without it they only listen (for a
    router that is given their URLs). Returns instance URL → role, in start order."""
    roles = [("prefill", spec.pd[0]), ("decode", spec.pd[1])] if spec.pd \
        else [("mixed", spec.instances)]
    out: dict[str, str] = {}
    for role, n in roles:
        register = ["--router", router, "--heartbeat-period", "2",
                    "--first-heartbeat-delay", "0"] if router else []
        sim, lines = await spawn("sim", "--instances", str(n), "--role", role, *register,
                                 "--preset", spec.preset, "--time-scale", str(spec.time_scale),
                                 *spec.sim_args, marker="sim instance", count=n)
        stack.push_async_callback(stop, sim)
        for line in lines:   # "sim instance <role> <url> ready"
            out[line.split()[3]] = role
    return out


async def start_cluster(spec: ClusterSpec, workdir: Path, stack: AsyncExitStack) -> RunningCluster:
    """Start the router(s), then the instances (which register themselves by heartbeat at the
    first router; independent routers get them in a ``register.yaml``); returns once every
    router routes to every instance. Everything started is stopped when ``stack`` closes."""
    sched: dict[str, Any] = {"stats-interval-secs": 0}
    if spec.pd:
        sched.update({"prefill-policy": spec.policy, "decode-policy": spec.decode_policy})
    else:
        sched["policy"] = spec.policy
    cfg: dict[str, dict[str, Any]] = {"scheduler": sched,
                                      "manager": {"health-check-interval-secs": 5},
                                      "log": {"level": "warn"}}
    if spec.redis_url:
        cfg["state"] = {"redis-url": spec.redis_url}
    independent = spec.routers > 1 and not spec.redis_url
    sims: dict[str, str] = {}
    if independent:
        sims = await start_sims(spec, stack)
        register = workdir / f"register-{spec.policy}.yaml"
        register.write_text(yaml.safe_dump({"instances": [
            {"role": "mixed", "host_ip": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])}
            for url in sims]}))
        cfg["manager"]["register-path"] = str(register)
    for section, values in spec.router_config.items():
        cfg.setdefault(section, {}).update(values)
    cfg_path = workdir / f"router-{spec.policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    mode = ["--splitwise"] if spec.pd else []
    started = await asyncio.gather(*(
        spawn("--port", "0", "--config_path", str(cfg_path), *mode, marker="Starting server on ")
        for _ in range(spec.routers)), return_exceptions=True)
    for res in started:
        if not isinstance(res, BaseException):
            stack.push_async_callback(stop, res[0])
    ports = []
    for res in started:
        if isinstance(res, BaseException):
            raise res
        ports.append(res[1][0].rsplit(":", 1)[1])
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    if not independent:
        sims = await start_sims(spec, stack, router=f"127.0.0.1:{ports[0]}")
    total = len(sims)
    loop = asyncio.get_running_loop()
    ready: dict[str, float] = {}          # router → when it first routed to every instance
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(30):
            while len(ready) < len(urls):
                for url in urls:
                    if url not in ready and await _routes_to(s, url, total):
                        ready[url] = loop.time()
                await asyncio.sleep(0.005)
    visible = max(0.0, max(ready.values()) - ready[urls[0]]) if spec.redis_url else None
    return RunningCluster(urls[0], total, sims, urls, visible)


async def _routes_to(s: aiohttp.ClientSession, url: str, total: int) -> bool:
    async with s.get(url + "/health") as r:
        health = await r.json()
    return bool(health["ready"]) and sum(health["routable"].values()) == total


async def sim_truth(urls: list[str]) -> list[dict]:
    """Every instance's ground-truth rows (``GET /sim/requests``: prompt and cached tokens,
    model-time queue/TTFT/e2e per finished request), each with its ``instance`` URL."""
    rows: list[dict] = []
    async with aiohttp.ClientSession() as s:
        for url in urls:
            async with s.get(url + "/sim/requests") as r:
                data = await r.json()
            for row in data.get("requests", []):
                row["instance"] = url
                rows.append(row)
    return rows


async def backend_token_totals(url: str) -> tuple[float, float]:
    """Σ prompt and Σ cached tokens the instances reported, from the router's ``/metrics``
    (in PD mode these come from the prefill instances' answers, which the client never sees)."""
    totals = await metric_totals(url, ("kvrouter_backend_prompt_tokens_total",
                                       "kvrouter_backend_cached_tokens_total"))
    return (totals["kvrouter_backend_prompt_tokens_total"],
            totals["kvrouter_backend_cached_tokens_total"])


async def metric_totals(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The router's ``/metrics`` samples of each family in ``names``, summed over labels."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals
