"""``kvrouter --workers N``: a real supervisor and worker processes on 127.0.0.1, simulated
instances, real HTTP. Which worker answers a connection is the kernel's choice
(SO_REUSEPORT); ``GET /health`` names it, so a keep-alive connection can be pinned to one."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import signal
import time

import aiohttp
import pytest

from harness import bounded, get_json, wait_for

LOCAL = {"server": {"host": "127.0.0.1"}}
# load-balance-weight as in FastDeploy's example config: a just-finished request can still
# count on a sibling for a few ms (the load-sharing lag); it must not outweigh a full hit
CACHE_AWARE = {"server": {"host": "127.0.0.1"},
               "scheduler": {"policy": "cache_aware", "load-balance-weight": 0.05}}
CONTEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " for i in range(40))


def chat(text: str, **extra) -> dict:
    return {"model": "default", "max_tokens": 2,
            "messages": [{"role": "user", "content": text}], **extra}


class Pinned:
    """A keep-alive connection known to be served by one worker."""

    def __init__(self, session: aiohttp.ClientSession, url: str, worker: int, pid: int) -> None:
        self.session, self.url, self.worker, self.pid = session, url, worker, pid

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        async with self.session.post(self.url + path, json=body) as r:
            payload = await r.read()
            return r.status, dict(r.headers), payload

    async def get(self, path: str) -> tuple[int, object]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.json(content_type=None)

    async def close(self) -> None:
        await self.session.close()


async def pin(router, worker: int, tries: int = 200) -> Pinned:
    """Open connections until one is served by ``worker`` (keep it, close the others)."""
    for _ in range(tries):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with session.get(router.url + "/health") as r:
            body = await r.json()
        if body["worker"]["id"] == worker:
            return Pinned(session, router.url, worker, body["worker"]["pid"])
        await session.close()
    raise AssertionError(f"no connection reached worker {worker} in {tries} tries")


async def fresh_get(router, path: str) -> object:
    """GET on a new connection (so the kernel picks a worker each time)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(router.url + path) as r:
            assert r.status == 200
            return await r.json(content_type=None)


async def fresh_text(router, path: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(router.url + path) as r:
            return await r.text()


async def worker_pids(router, n: int = 2) -> dict[int, int]:
    """Worker number → pid, asking fresh connections until all ``n`` answered."""
    seen: dict[int, int] = {}
    for _ in range(200):
        body = await fresh_get(router, "/health")
        seen[body["worker"]["id"]] = body["worker"]["pid"]
        if len(seen) == n:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def registered_urls(router) -> list[str]:
    body = await fresh_get(router, "/registered")
    return [w["url"] for w in body["mixed"]]


@bounded(60)
async def test_two_workers_serve_share_registrations_and_stop(router_factory, sims):
    router = await router_factory(LOCAL, "--workers", "2")
    pids = await worker_pids(router)
    assert len(set(pids.values())) == 2 and router.proc.pid not in pids.values()
    (a,) = await sims(1)
    assert await a.register_once(router.url) == 200       # handled by one of the workers
    for _ in range(40):                                     # every worker lists it at once
        assert await registered_urls(router) == [a.url]
    for _ in range(10):
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(router.url + "/v1/chat/completions", json=chat("hi")) as r:
                assert r.status == 200
                await r.read()
    text = await fresh_text(router, "/metrics")             # counters summed over the workers
    assert re.search(r'^inference_requests_total\{decode_worker="",mixed_worker="'
                     + re.escape(a.url) + r'",prefill_worker="",status_code="200"\} 10\.0$',
                     text, re.M), text
    assert 'kvrouter_worker_processes{state="merged"} 2.0' in text
    assert await router.stop() == 0
    for pid in pids.values():
        assert not alive(pid)


async def prefix_from_worker_0_then_1(router, i0, i1) -> str:
    """Register both instances; through worker 0 send a cold prompt (→ ``i0``) and a prompt
    with prefix P (→ ``i1``); then P through worker 1: the instance it picks."""
    for inst in (i0, i1):
        assert await inst.register_once(router.url) == 200
    w0, w1 = await pin(router, 0), await pin(router, 1)
    try:
        _, h, _ = await w0.post("/v1/chat/completions", chat("Q" + CONTEXT))
        assert h["X-Router-Mixed-URL"] == i0.url
        _, h, _ = await w0.post("/v1/chat/completions", chat("P" + CONTEXT + " question 0"))
        assert h["X-Router-Mixed-URL"] == i1.url
        await asyncio.sleep(0.05)                     # a few ms: a record reaches worker 1
        _, h, _ = await w1.post("/v1/chat/completions", chat("P" + CONTEXT + " question 1"))
        return h["X-Router-Mixed-URL"]
    finally:
        await w0.close()
        await w1.close()


@bounded(90)
async def test_cache_affinity_across_workers(router_factory, sims):
    router = await router_factory(CACHE_AWARE, "--workers", "2")
    i0, i1 = await sims(2)
    assert await prefix_from_worker_0_then_1(router, i0, i1) == i1.url  # worker 1 knows P

    # many requests sharing P, each on a new connection: both workers, one instance
    served_by: dict[int, int] = {}
    for n in range(30):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(router.url + "/health") as r:      # same connection as the POST
                worker = (await r.json())["worker"]["id"]
            async with s.post(router.url + "/v1/chat/completions",
                              json=chat("P" + CONTEXT + f" follow-up {n}")) as r:
                assert r.status == 200
                assert r.headers["X-Router-Mixed-URL"] == i1.url
                await r.read()
        served_by[worker] = served_by.get(worker, 0) + 1
    assert set(served_by) == {0, 1}, served_by
    assert len(i1.inference_requests) == 32 and len(i0.inference_requests) == 1


@bounded(60)
async def test_without_prefix_sharing_affinity_is_lost(router_factory, sims, monkeypatch):
    """The control experiment: the same steps with KVROUTER_SHARE_PREFIX=0."""
    monkeypatch.setenv("KVROUTER_SHARE_PREFIX", "0")
    router = await router_factory(CACHE_AWARE, "--workers", "2")
    i0, i1 = await sims(2)
    assert await prefix_from_worker_0_then_1(router, i0, i1) == i0.url  # cold for worker 1


async def _slow_stream(pinned: Pinned) -> None:
    async with pinned.session.post(pinned.url + "/v1/chat/completions",
                                   json=chat("slow", stream=True)) as r:
        await r.read()


async def _in_flight_everywhere(router, expected: int, checks: int = 20) -> bool:
    for _ in range(checks):
        body = await fresh_get(router, "/registered")
        if [w["in_flight_requests"] for w in body["mixed"]] != [expected]:
            return False
    return True


@bounded(90)
async def test_in_flight_counts_include_every_worker_and_a_dead_one_leaks_nothing(
        router_factory, sims):
    router = await router_factory(LOCAL, "--workers", "2")
    (a,) = await sims(1)
    assert await a.register_once(router.url) == 200
    a.knobs.first_byte_delay = 60.0                          # streams hang until cancelled
    conns = [await pin(router, 0), await pin(router, 0), await pin(router, 1),
             await pin(router, 1), await pin(router, 1)]
    tasks = [asyncio.ensure_future(_slow_stream(c)) for c in conns]
    try:
        await wait_for(lambda: _in_flight_everywhere(router, 5), timeout=10)
        text = await fresh_text(router, "/metrics")
        assert re.search(r"^kvrouter_instance_in_flight_requests\{[^}]*\} 5\.0$", text, re.M)
        # SIGKILL worker 1 (3 streams): the others drop its share at once
        os.kill(conns[2].pid, signal.SIGKILL)
        await wait_for(lambda: _in_flight_everywhere(router, 2, checks=5), timeout=5)
        # it is restarted and counts the survivors' streams too
        pids = await wait_for(lambda: _new_pid(router, 1, conns[2].pid), timeout=15)
        w1 = await pin(router, 1)
        try:
            assert w1.pid == pids
            _, body = await w1.get("/registered")
            assert [w["url"] for w in body["mixed"]] == [a.url]
            assert [w["in_flight_requests"] for w in body["mixed"]] == [2]
        finally:
            await w1.close()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.close()
    await wait_for(lambda: _in_flight_everywhere(router, 0, checks=5), timeout=10)
    assert "worker 1" in router.log() and "restarting it" in router.log()


async def _new_pid(router, worker: int, old: int) -> int | None:
    try:
        body = await fresh_get(router, "/health")
    except aiohttp.ClientError:
        return None
    info = body["worker"]
    return info["pid"] if info["id"] == worker and info["pid"] != old else None


@bounded(90)
async def test_restarted_worker_gets_registry_and_prefix_index(router_factory, sims):
    router = await router_factory(CACHE_AWARE, "--workers", "2")
    i0, i1 = await sims(2)
    for inst in (i0, i1):
        assert await inst.register_once(router.url) == 200
    w0 = await pin(router, 0)
    try:
        _, h, _ = await w0.post("/v1/chat/completions", chat("Q" + CONTEXT))
        assert h["X-Router-Mixed-URL"] == i0.url
        _, h, _ = await w0.post("/v1/chat/completions", chat("P" + CONTEXT + " question 0"))
        assert h["X-Router-Mixed-URL"] == i1.url
    finally:
        await w0.close()
    old = (await worker_pids(router))[1]
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: _new_pid(router, 1, old), timeout=15)
    w1 = await pin(router, 1)
    try:
        _, body = await w1.get("/registered")
        assert sorted(w["url"] for w in body["mixed"]) == sorted([i0.url, i1.url])
        _, h, _ = await w1.post("/v1/chat/completions", chat("P" + CONTEXT + " question 1"))
        assert h["X-Router-Mixed-URL"] == i1.url             # the index came from worker 0
    finally:
        await w1.close()
    assert not alive(old)


def write_register(path, *insts) -> None:
    """Replace register.yaml atomically (as the README asks) with ``insts``."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"instances": [
        {"role": "mixed", "host_ip": "127.0.0.1", "port": i.port} for i in insts]}))
    os.replace(tmp, path)


async def _lists(conns: list[Pinned], urls: list[str]) -> bool:
    for conn in conns:
        _, body = await conn.get("/registered")
        if sorted(w["url"] for w in body["mixed"]) != sorted(urls):
            return False
    return True


async def _keeps_listing(conns: list[Pinned], urls: list[str], secs: float = 3.0) -> None:
    """Every worker lists ``urls`` for ``secs`` (longer than a register.yaml check period)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + secs
    while loop.time() < end:
        assert await _lists(conns, urls)
        await asyncio.sleep(0.05)


@bounded(90)
async def test_restarted_workers_keep_register_yaml_edits(router_factory, sims, tmp_path):
    a, b, c = await sims(3)
    path = tmp_path / "register.yaml"
    write_register(path, a, b)
    router = await router_factory({**LOCAL, "manager": {"register-path": str(path)}},
                                  "--workers", "2")
    conns = [await pin(router, 0), await pin(router, 1)]
    try:
        assert await _lists(conns, [a.url, b.url])
        write_register(path, a)                                   # b removed
        await wait_for(lambda: _lists(conns, [a.url]), timeout=10)
        # worker 1 restarted: it must not bring b back from the list read at startup
        old = conns[1].pid
        os.kill(old, signal.SIGKILL)
        await wait_for(lambda: _new_pid(router, 1, old), timeout=15)
        await conns[1].close()
        conns[1] = await pin(router, 1)
        await wait_for(lambda: _lists(conns, [a.url]), timeout=5)
        await _keeps_listing(conns, [a.url])
        # worker 0 (the file's watcher) killed, and the file edited before it is back: the
        # restarted one reads the file again
        old = conns[0].pid
        os.kill(old, signal.SIGKILL)
        write_register(path, b, c)
        await wait_for(lambda: _new_pid(router, 0, old), timeout=15)
        await conns[0].close()
        conns[0] = await pin(router, 0)
        await wait_for(lambda: _lists(conns, [b.url, c.url]), timeout=10)
        await _keeps_listing(conns, [b.url, c.url])
    finally:
        for conn in conns:
            await conn.close()


@bounded(60)
async def test_health_rounds_run_once_and_reach_every_worker(router_factory, sims):
    cfg = {"server": {"host": "127.0.0.1", "workers": 2},
           "manager": {"health-check-interval-secs": 0.25}}
    router = await router_factory(cfg)
    (a,) = await sims(1)
    assert await a.register_once(router.url) == 200
    await worker_pids(router)
    def probes() -> int:
        return sum(1 for r in a.received if r.path == "/health")
    before = probes()
    await asyncio.sleep(2.0)
    # one probe per round (the leader's), not one per worker: ~8 in 2 s
    assert 4 <= probes() - before <= 11, probes() - before
    a.knobs.health_status = 500
    await wait_for(lambda: _routable_everywhere(router, 0), timeout=5)
    a.knobs.health_status = 200
    await wait_for(lambda: _routable_everywhere(router, 1), timeout=5)


async def _routable_everywhere(router, n: int) -> bool:
    for _ in range(10):
        if (await fresh_get(router, "/registered_number"))["mixed"] != n:
            return False
    return True


@bounded(60)
async def test_pd_mode_with_two_workers(router_factory, sims):
    router = await router_factory(LOCAL, "--splitwise", "--workers", "2")
    (p,) = await sims(1, role="prefill")
    (d,) = await sims(1, role="decode")
    for inst in (p, d):
        assert await inst.register_once(router.url) == 200
    for n in range(8):                                        # fresh connections: both workers
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(router.url + "/v1/chat/completions",
                              json=chat(f"question {n}", stream=n % 2 == 0)) as r:
                assert r.status == 200
                assert r.headers["X-Router-Decode-URL"] == d.url
                await r.read()
    assert len(p.inference_requests) == len(d.inference_requests) == 8

    async def idle() -> bool:       # a just-finished request counts on a sibling for ~3 ms
        body = await fresh_get(router, "/registered")
        return [w["in_flight_requests"] for w in body["prefill"] + body["decode"]] == [0, 0]
    await wait_for(idle, timeout=5)


@bounded(30)
async def test_workers_die_with_the_supervisor(router_factory):
    router = await router_factory(LOCAL, "--workers", "2")
    pids = await worker_pids(router)
    router.proc.kill()                                       # SIGKILL: no chance to clean up
    await router.proc.wait()

    async def all_gone() -> bool:
        return not any(alive(p) for p in pids.values())
    await wait_for(all_gone, timeout=10)


@pytest.mark.parametrize("args, config, needle", [
    (("--workers", "0"), {}, "--workers: must be between 1 and 64, got 0"),
    ((), {"server": {"workers": 0}}, "server.workers: must be between 1 and 64, got 0"),
    ((), {"server": {"workers": "two"}}, "server.workers:"),
])
async def test_workers_config_errors(tmp_path, args, config, needle):
    import sys

    import yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "--port", "0", "--config_path", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert needle in err.decode(), err.decode()
    if config:
        assert str(path) in err.decode()


@bounded(30)
async def test_port_in_use_is_refused(router_factory, tmp_path):
    first = await router_factory(LOCAL, "--workers", "2")
    import sys

    import yaml
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(LOCAL))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "--port", str(first.port), "--config_path", str(path),
        "--workers", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert "Failed to start server on 127.0.0.1" in err.decode()
    status, _ = await get_json(first.url + "/health")
    assert status == 200


# -- the sync layer in one process: two workers' state linked by a real socket pair ----------

def _pair_of_routers(policy: str = "cache_aware", linked: bool = True):
    """Two routers whose shared state is a WorkerSync each (linked by a socket pair)."""
    from kvrouter.config import RouterConfig
    from kvrouter.router import Router
    from kvrouter.workers.channel import socket_pair
    from kvrouter.workers.sync import WorkerSync

    a, b = socket_pair() if linked else (None, None)
    routers, syncs = [], []
    for k, peers in enumerate(({1: a}, {0: b}) if linked else ({}, {})):
        cfg = RouterConfig()
        cfg.scheduler.policy = policy
        cfg.scheduler.cache_block_size = 4
        cfg.scheduler.stats_interval_secs = 1
        sync = WorkerSync(k, 2, peers)
        routers.append(Router(cfg, shared=sync))
        syncs.append(sync)
    return routers, syncs


def _info(port: int):
    from kvrouter.instance import parse_registration
    return parse_registration({"role": "mixed", "host_ip": "127.0.0.1", "port": port},
                              splitwise=False)


async def _until(predicate, timeout: float = 2.0) -> None:
    async def check():
        return predicate()
    await wait_for(check, timeout=timeout, interval=0.002)


@bounded(20)
async def test_sync_registry_load_prefix_sessions_and_departure_in_process():
    from kvrouter.instance import Role

    (r0, r1), (s0, s1) = _pair_of_routers()
    assert r0.index.on_record == s0.recorded and r0.shared is s0
    s0.start()
    s1.start()
    try:
        inst = r0.registry.add(_info(9001))                      # registry: add, pause, health
        await _until(lambda: r1.registry.get(inst.identity) is not None)
        r0.registry.update(inst, dataclasses.replace(inst.info, is_paused=True))
        await _until(lambda: r1.registry.get(inst.identity).paused)
        r0.health.observe(inst, False)
        await _until(lambda: r1.registry.get(inst.identity).state == "unhealthy")
        assert r1.registry.get(inst.identity).unhealthy_since is not None
        r0.health.observe(inst, True)
        await _until(lambda: r1.registry.get(inst.identity).state == "healthy")
        await s0.registered()                                    # the barrier answers

        lease = inst.load.acquire(100)                           # load: summed, then released
        other = r1.registry.get(inst.identity).load
        await _until(lambda: (other.requests, other.tokens) == (1, 100))
        assert other.remote is not None and other.remote.requests == 1
        lease2 = other.acquire(7, prefill=3)
        await _until(lambda: (inst.load.requests, inst.load.tokens) == (2, 107))
        assert inst.load.prefill_tokens == 103 and inst.load.pending_prefill == 103
        lease.release()
        await _until(lambda: (other.requests, other.tokens) == (1, 7))
        assert (inst.load.requests, inst.load.tokens) == (1, 7)

        hashes = list(range(1, 40))                              # prefix records
        r1.index.record(hashes, inst.identity, time.monotonic())
        await _until(lambda: r0.index.match(hashes, [inst.identity])[inst.identity] == 39)
        big = [[f"10.0.0.{i}:80", list(range(1000 * i + 1, 1000 * i + 500))] for i in range(40)]
        s0._send_to(s0.links[1], [{"t": "rec", "r": big}])      # > 60 KB: fragmented
        await _until(lambda: r1.index.match(big[-1][1], [big[-1][0]])[big[-1][0]] == 499)
        assert not s1._records                                   # applied, not sent back

        mem0, mem1 = r0.sessions[Role.MIXED], r1.sessions[Role.MIXED]     # session affinity
        assert mem1.observe("s1", inst.identity) is False
        await _until(lambda: len(mem0) == 1)
        assert mem0.observe("s1", inst.identity) is True

        r1.metrics.cache_hit.inc(3)                              # counters: [stats], /metrics
        r1.metrics.http_requests.labels("/x", "GET", "200").inc(2)
        r0.metrics.http_requests.labels("/x", "GET", "200").inc(1)
        s1._emit({"t": "ctr", "c": r1.metrics.stats_totals().as_list()})
        await _until(lambda: s0.peer_totals() is not None)
        assert s0.peer_totals().cache_hits == 3
        assert "hits=3/" in r0.stats_line()
        text = (await s0.render_metrics(r0.metrics)).decode()
        assert re.search(r'^http_requests_total\{endpoint="/x",method="GET",status_code="200"\} '
                         r'3\.0$', text, re.M), text
        assert 'kvrouter_worker_processes{state="merged"} 2.0' in text
        assert s0.health_info()["worker"]["linked"] == [1]

        s1.close()                                               # worker 1 leaves: share gone
        await _until(lambda: (inst.load.requests, inst.load.tokens) == (0, 0))
        assert inst.load.remote is None and inst.load.prefill_tokens == 0
        assert other.requests == 1       # its own lease (the process would be gone)
        lease2.release()
        r0.registry.remove(inst, "instance_removed")
    finally:
        s0.close()
        s1.close()
        for r in (r0, r1):
            await r.close()


@bounded(10)
async def test_sync_last_writer_wins_and_tombstones():
    (r0, r1), (s0, _s1) = _pair_of_routers(linked=False)
    link = type("L", (), {"peer": 1, "state": {}})()
    from kvrouter.workers import events as wev
    info = _info(9002)
    reg = {"t": "reg", "id": info.identity, "v": [100.0, 1], "i": wev.info_to_json(info),
           "st": False}
    s0._apply_reg(link, reg)
    inst = r0.registry.get(info.identity)
    hl = {"t": "hl", "id": info.identity, "f": 1, "ok": 0, "since": time.time()}
    s0._apply_health(link, {**hl, "v": [101.0, 1], "s": "unhealthy"})
    s0._apply_health(link, {**hl, "v": [100.5, 1], "s": "healthy"})     # older: ignored
    assert inst.state == "unhealthy"
    s0._apply_del(link, {"t": "del", "id": info.identity, "v": [102.0, 1], "r": "x"})
    assert r0.registry.get(info.identity) is None
    s0._apply_reg(link, reg)                                             # older than removal
    assert r0.registry.get(info.identity) is None
    s0._apply_reg(link, {**reg, "v": [103.0, 0]})                        # a later heartbeat
    assert r0.registry.get(info.identity) is not None
    for r in (r0, r1):
        await r.close()


@bounded(10)
async def test_sync_forgets_the_snapshots_sent_of_a_removed_instance():
    from kvrouter.backends.snapshot import MetricsSnapshot

    (r0, r1), (s0, s1) = _pair_of_routers(policy="fd_remote_metrics_score")
    s0.start()
    s1.start()
    try:
        inst = r0.registry.add(_info(9004))
        inst.snapshot = MetricsSnapshot(running=1, waiting=2, taken_at=time.monotonic())
        await _until(lambda: (i := r1.registry.get(inst.identity)) is not None
                     and i.snapshot is not None)
        assert inst.identity in s0._snaps_sent
        r0.registry.remove(inst, "instance_removed")
        assert inst.identity not in s0._snaps_sent
        await _until(lambda: r1.registry.get(inst.identity) is None)
    finally:
        s0.close()
        s1.close()
        for r in (r0, r1):
            await r.close()


def test_load_shares_are_summed_per_sender_and_dropped_with_it():
    from kvrouter.load import LoadShare
    from kvrouter.registry import Registry
    from kvrouter.shared.loads import LoadShares

    reg = Registry()
    inst = reg.add(_info(9003))
    own = inst.load.acquire(10, now=1.0, prefill=4)
    shares = LoadShares(reg)
    shares.update("a", 1, {inst.identity: LoadShare(requests=2, tokens=20, pending=2)})
    shares.update("b", 1, {inst.identity: LoadShare(requests=1, tokens=5),
                           "10.9.9.9:1": LoadShare(requests=1)})     # not registered here
    shares.update("a", 1, {})                                          # old sequence: ignored
    load = inst.load
    assert (load.requests, load.tokens, load.pending) == (4, 35, 3)
    assert load.remote == LoadShare(requests=3, tokens=25, pending=2)
    assert shares.own() == {inst.identity: LoadShare(1, 10, 4, 1, 1, 4, 1)}
    assert reg.load_for("10.9.9.9:1").requests == 1
    load.on_snapshot(5.0)                                  # the others' pending stays counted
    assert (load.pending, load.pending_prefill) == (2, 0)
    shares.drop("a")
    assert (load.requests, load.tokens, load.remote) == (2, 15, LoadShare(requests=1, tokens=5))
    shares.update("b", 2, {})
    assert load.remote is None and (load.requests, load.tokens) == (1, 10)
    own.release()
    assert load.idle and shares.own() == {}


def test_prefix_index_runs_replay_to_the_same_index():
    from kvrouter.prefix.index import PrefixIndex
    from kvrouter.workers.sync import SharedPrefixIndex

    src = SharedPrefixIndex(300, 0)
    rng = random.Random(5)
    chains = {}
    for n in range(60):
        ident = f"i{n % 3}"
        base = rng.randrange(8)
        chain = [base * 1000 + d for d in range(1, rng.randrange(2, 12))]
        chains[n] = (ident, chain)
        src.record(chain, ident, float(n))
    dst = PrefixIndex(300, 0)
    for ident, run in src.runs():
        dst.record(run[::-1], ident, 0.0)
    assert dst.size == src.size
    for ident, chain in chains.values():
        ids = ["i0", "i1", "i2"]
        assert dst.match(chain, ids) == src.match(chain, ids)
    src.record([1, 2, 3], "i0", 100.0)                   # eviction order is the same too
    dst.record([1, 2, 3], "i0", 100.0)
    for ident, chain in chains.values():
        assert dst.match(chain, ["i0", "i1", "i2"]) == src.match(chain, ["i0", "i1", "i2"])


@bounded(60)
async def test_long_session_ids_are_neither_remembered_nor_shared(router_factory, sims):
    """Session ids over 256 characters are not remembered (nor sent to the sibling): such
    requests do not count for router_cache_request_total; short ids count across workers."""
    router = await router_factory(CACHE_AWARE, "--workers", "2")
    (a,) = await sims(1)
    assert await a.register_once(router.url) == 200
    conns = [await pin(router, 0), await pin(router, 1)]
    try:
        for sid in ("s" * 300, "short-session"):
            for c in conns:
                status, _, _ = await c.post("/v1/chat/completions",
                                            chat("P" + CONTEXT, session_id=sid))
                assert status == 200
                await asyncio.sleep(0.1)         # the observation reaches the sibling (~1 ms)
        text = await fresh_text(router, "/metrics")
        assert 'kvrouter_worker_processes{state="merged"} 2.0' in text
        assert re.search(r"^router_cache_request_total 2\.0$", text, re.M), text
        assert re.search(r"^router_cache_hit_total 1\.0$", text, re.M), text   # via worker 0
    finally:
        for c in conns:
            await c.close()


@bounded(20)
async def test_sync_sends_only_the_load_shares_that_moved():
    """With many instances busy, a change on one sends that one's share (a partial ``load``
    event), not the whole fleet's every 2 ms; the whole share, recomputed from every
    instance, follows every LOAD_REFRESH, so a change that was not marked still arrives."""
    from kvrouter.workers.sync import LOAD_REFRESH

    (r0, r1), (s0, s1) = _pair_of_routers(policy="request_num")
    received: list[dict] = []
    apply_load = s1._handlers["load"]

    def record(link, e: dict) -> None:
        received.append(e)
        apply_load(link, e)

    s1._handlers["load"] = record
    s0.start()
    s1.start()
    try:
        insts = [r0.registry.add(_info(9100 + n)) for n in range(50)]
        leases = [inst.load.acquire(10) for inst in insts]
        seen = [r1.registry.load_for(inst.identity, create=True) for inst in insts]
        await _until(lambda: all(load.requests == 1 for load in seen))
        received.clear()
        extra = insts[7].load.acquire(5)
        await _until(lambda: seen[7].requests == 2)
        partial = [e for e in received if e.get("p")]
        assert partial and all(list(e["l"]) == [insts[7].identity] for e in partial), received
        extra.release()
        leases[7].release()
        await _until(lambda: seen[7].requests == 0)
        last = [e for e in received if e.get("p")][-1]
        assert last["l"] == {insts[7].identity: [0] * 7}               # zero: gone
        received.clear()
        insts[3].load.requests += 1          # not through acquire: no mark, the rebuild finds it
        await _until(lambda: seen[3].requests == 2, timeout=LOAD_REFRESH + 1.5)
        full = [e for e in received if not e.get("p")]
        assert full and len(full[-1]["l"]) == 49, received           # all but the idle one
        insts[3].load.requests -= 1
        for lease in leases:
            lease.release()
        await _until(lambda: all(load.requests == 0 for load in seen))
    finally:
        s0.close()
        s1.close()
        for r in (r0, r1):
            await r.close()


def test_load_shares_send_changes_and_apply_them_on_the_senders_snapshot():
    from kvrouter.load import LoadShare
    from kvrouter.registry import Registry
    from kvrouter.shared.loads import LoadShares

    sender, receiver = Registry(), Registry()
    a, b = sender.add(_info(9005)), sender.add(_info(9006))
    mine, theirs = LoadShares(sender), LoadShares(receiver)
    la = a.load.acquire(10, now=1.0)
    b.load.acquire(20, now=1.0)
    first = mine.changes()
    assert set(first) == {a.identity, b.identity} and mine.changes() == {}
    assert mine.busy
    theirs.update("s", 1, first, partial=True)
    la.release_tokens()
    change = mine.changes()
    assert list(change) == [a.identity] and change[a.identity].tokens == 0
    theirs.update("s", 2, change, partial=True)
    assert receiver.load_for(a.identity).requests == 1
    assert receiver.load_for(a.identity).tokens == 0
    assert receiver.load_for(b.identity).tokens == 20
    la.release_request()
    assert mine.changes() == {a.identity: LoadShare()}             # all zero: gone
    theirs.update("s", 3, {a.identity: LoadShare()}, partial=True)
    assert receiver.load_for(a.identity).requests == 0
    theirs.update("s", 2, {b.identity: LoadShare()}, partial=True)  # older: ignored
    assert receiver.load_for(b.identity).tokens == 20
    theirs.update("s", 4, mine.own(rebuild=True))                  # whole: replaces
    assert receiver.load_for(b.identity).tokens == 20
    assert mine.own() == {b.identity: LoadShare(1, 20, 20, 1, 1, 20, 1)}
