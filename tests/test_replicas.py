"""Router replicas sharing one view of the cluster through Redis (README "Router replicas
(Redis)"): a real ``redis-server`` started by the fixture on a free loopback port (persistence
off) and stopped after, real router processes with ``--redis-url``, simulated instances, real
HTTP. Skipped, with the reason, only where ``redis-server`` is not installed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from harness import bounded, get_json, merge, metrics_text, sample, start_router, wait_for

from kvrouter.demo.redisproc import MISSING, RedisServer, redis_server_binary

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason=MISSING)

# short lease and load periods: the fault tests wait for them
BASE = {"server": {"host": "127.0.0.1"},
        "state": {"leader-ttl-secs": 1.0, "load-interval-secs": 0.05, "load-ttl-secs": 1.0}}
# cache-aware as in FastDeploy's example config (a phantom request never outweighs a hit)
CACHE_AWARE = {"scheduler": {"policy": "cache_aware", "load-balance-weight": 0.05}}
KV_COST = {"scheduler": {"policy": "kv_cost", "kv-cost-exploration": 0}}
CONTEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. "
                  for i in range(40))


@pytest.fixture
async def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def replicas(tmp_path):
    """``await replicas(url, n, config, *args)`` → n router processes started together with
    ``--redis-url url`` (each in its own directory), stopped after the test."""
    started = []

    async def make(url: str, n: int = 3, config: dict | None = None, *args: str):
        dirs = [tmp_path / f"replica{len(started) + i}" for i in range(n)]
        for d in dirs:
            d.mkdir()
        routers = await asyncio.gather(*(
            start_router(d, merge(BASE, config or {}), "--redis-url", url, *args)
            for d in dirs))
        started.extend(routers)
        return routers

    yield make
    for r in started:
        await r.stop()


def chat(text: str, **extra) -> dict:
    return {"model": "default", "max_tokens": 2,
            "messages": [{"role": "user", "content": text}], **extra}


async def send(router, text: str, **extra) -> tuple[int, str]:
    """One chat request on a new connection: (status, the instance that served it)."""
    async with aiohttp.ClientSession() as s, \
            s.post(router.url + "/v1/chat/completions", json=chat(text, **extra)) as r:
        await r.read()
        return r.status, r.headers.get("X-Router-Mixed-URL", "")


async def routable(router) -> int:
    status, body = await get_json(router.url + "/registered_number")
    assert status == 200
    return body["mixed"]


async def everywhere(routers, n: int) -> bool:
    return all([await routable(r) == n for r in routers])


async def health(router) -> dict:
    status, body = await get_json(router.url + "/health")
    assert status == 200
    return body["replica"]


def probes(inst) -> int:
    return sum(1 for r in inst.received if r.path == "/health")


@bounded(90)
async def test_registration_pause_and_health_reach_every_replica(redis_server, replicas, sims):
    rs = await replicas(redis_server.url, 3,
                        {"manager": {"health-check-interval-secs": 0.25}})
    a, b = await sims(2)
    started = time.monotonic()
    assert await a.register_once(rs[0].url) == 200
    await wait_for(lambda: everywhere(rs, 1), timeout=1.0, interval=0.01)
    visible = time.monotonic() - started
    print(f"registration visible at 3 replicas after {visible * 1e3:.0f} ms")
    assert await b.register_once(rs[2].url) == 200
    await wait_for(lambda: everywhere(rs, 2), timeout=1.0, interval=0.01)
    for r in rs:
        assert (await send(r, "hello"))[0] == 200

        async def three(r=r) -> bool:     # each replica counts the others' load keys
            return sample(await metrics_text(r), "kvrouter_replicas") == 3   # every interval

        assert await wait_for(three, timeout=5)
    # a pause sent to one replica (a heartbeat with is_paused) stops the routing everywhere
    a.config.is_paused = True
    assert await a.register_once(rs[1].url) == 200
    await wait_for(lambda: everywhere(rs, 1), timeout=1.0, interval=0.01)
    for r in rs:
        for n in range(3):
            assert await send(r, f"paused {n}") == (200, b.url)
    a.config.is_paused = False
    assert await a.register_once(rs[2].url) == 200
    await wait_for(lambda: everywhere(rs, 2), timeout=1.0, interval=0.01)
    # one replica leads the health rounds: one probe per instance per round, not three
    leaders = [(await health(r))["leader"] for r in rs]
    assert leaders.count(True) == 1, leaders
    before = probes(a)
    await asyncio.sleep(2.0)
    assert 4 <= probes(a) - before <= 11, probes(a) - before     # ~8 rounds of 0.25 s
    # a failing instance leaves every replica's rotation, and comes back
    a.knobs.health_status = 500
    await wait_for(lambda: everywhere(rs, 1), timeout=3)
    a.knobs.health_status = 200
    await wait_for(lambda: everywhere(rs, 2), timeout=3)


async def prefix_at_replica_0_then_1(rs, i0, i1) -> str:
    """At replica 0: a cold prompt Q goes to i0 (URL order), then a cold prompt P to i1 (the
    instance selected least recently). At replica 1, P's next turn: the instance it goes to.
    Replica 1 never routed anything: without shared prefix records it would pick i0."""
    for inst in (i0, i1):
        assert await inst.register_once(rs[0].url) == 200
    await wait_for(lambda: everywhere(rs, 2), timeout=2)
    assert await send(rs[0], "Q" + CONTEXT) == (200, i0.url)
    assert await send(rs[0], "P" + CONTEXT + " turn 1") == (200, i1.url)
    await asyncio.sleep(0.1)                       # a record reaches the others in ms
    return (await send(rs[1], "P" + CONTEXT + " turn 1 turn 2"))[1]


@pytest.mark.parametrize("policy", [CACHE_AWARE, KV_COST], ids=["cache_aware", "kv_cost"])
@bounded(90)
async def test_a_conversation_keeps_its_instance_whichever_replica_serves_it(
        redis_server, replicas, sims, policy):
    rs = await replicas(redis_server.url, 3, policy)
    i0, i1 = await sims(2)
    assert await prefix_at_replica_0_then_1(rs, i0, i1) == i1.url
    for turn in range(3, 9):                       # the next turns, round-robin over replicas
        await asyncio.sleep(0.1)    # a user's think time (more than the load-sharing lag)
        status, served = await send(rs[turn % 3], "P" + CONTEXT + " turn 1 turn 2" +
                                    "".join(f" turn {t}" for t in range(3, turn + 1)))
        assert (status, served) == (200, i1.url), turn
    assert len(i0.inference_requests) == 1 and len(i1.inference_requests) == 8


@bounded(60)
async def test_independent_routers_lose_the_affinity(redis_server, replicas, sims):
    """The control experiment: the same steps with two key prefixes (two groups that share
    nothing) go to the other instance."""
    rs = [(await replicas(redis_server.url, 1, merge(CACHE_AWARE, {"state": {
        "key-prefix": f"group{n}"}})))[0] for n in range(2)]
    i0, i1 = await sims(2)
    assert await i1.register_once(rs[1].url) == 200
    assert await i0.register_once(rs[1].url) == 200
    assert await prefix_at_replica_0_then_1(rs, i0, i1) == i0.url


@bounded(60)
async def test_a_new_replica_starts_warm(redis_server, replicas, sims):
    r0, r1 = await replicas(redis_server.url, 2, CACHE_AWARE)
    i0, i1 = await sims(2)
    assert await prefix_at_replica_0_then_1([r0, r1], i0, i1) == i1.url
    (late,) = await replicas(redis_server.url, 1, CACHE_AWARE)
    assert await routable(late) == 2                # the registry, read at start
    status, served = await send(late, "P" + CONTEXT + " turn 1 turn 2 turn 3")
    assert (status, served) == (200, i1.url)       # the prefix records, read at start


async def in_flight(router) -> list[int]:
    status, body = await get_json(router.url + "/registered")
    assert status == 200
    return [w["in_flight_requests"] for w in body["mixed"]]


async def hang(router, text: str) -> None:
    """A streamed request that stays in flight until cancelled or cut."""
    try:
        async with aiohttp.ClientSession() as s, \
                s.post(router.url + "/v1/chat/completions", json=chat(text, stream=True)) as r:
            await r.read()
    except aiohttp.ClientError:
        pass


async def load(routers, stop: asyncio.Event, statuses: list[int], limit: int = 400) -> None:
    """Requests one after the other, round-robin over ``routers``, until ``stop`` (at most
    ``limit``)."""
    async with aiohttp.ClientSession() as s:
        for n in range(limit):
            if stop.is_set():
                return
            router = routers[n % len(routers)]
            try:
                async with s.post(router.url + "/v1/chat/completions",
                                  json=chat(f"load {n}")) as r:
                    await r.read()
                    statuses.append(r.status)
            except aiohttp.ClientError:
                statuses.append(0)
            await asyncio.sleep(0.01)


@bounded(120)
async def test_a_sigkilled_replica_loses_nothing(redis_server, replicas, sims):
    rs = await replicas(redis_server.url, 3, {"manager": {"health-check-interval-secs": 0.25}})
    a, b = await sims(2)
    await wait_for(lambda: _leader(rs), timeout=5)
    victim = await _leader(rs)                      # the lease holder, to be killed
    others = [r for r in rs if r is not victim]
    assert await a.register_once(victim.url) == 200
    # two requests held at the victim count at every replica
    a.knobs.first_byte_delay = 60.0
    held = [asyncio.ensure_future(hang(victim, f"held {n}")) for n in range(2)]
    try:
        await wait_for(lambda: _all_equal(rs, in_flight, [2]), timeout=3)
        a.knobs.first_byte_delay = 0.0
        assert await b.register_once(victim.url) == 200
        await wait_for(lambda: everywhere(rs, 2), timeout=2)
        stop, statuses = asyncio.Event(), []
        traffic = asyncio.ensure_future(load(others, stop, statuses))
        await asyncio.sleep(0.5)
        victim.proc.kill()                          # SIGKILL
        await victim.proc.wait()
        # its in-flight share stops counting (load-ttl-secs 1), another replica leads
        await wait_for(lambda: _all_equal(others, in_flight, [0, 0]), timeout=5)
        await wait_for(lambda: _leader(others), timeout=5)
        before = probes(a)
        await asyncio.sleep(1.0)
        assert probes(a) > before                   # the health rounds go on
        stop.set()
        await traffic
    finally:
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert len(statuses) > 20 and statuses.count(200) == len(statuses), statuses
    assert all([await routable(r) == 2 for r in others])
    (late,) = await replicas(redis_server.url, 1)   # the registrations live in Redis
    assert await routable(late) == 2


async def _leader(routers):
    found = [r for r in routers if (await health(r))["leader"]]
    return found[0] if len(found) == 1 else None


async def _all_equal(routers, read, expected) -> bool:
    return all([await read(r) == expected for r in routers])


@bounded(120)
async def test_redis_restarted_under_load_fails_nothing_and_resyncs(
        redis_server, replicas, sims, fleet):
    rs = await replicas(redis_server.url, 3, CACHE_AWARE)
    a, b = await sims(2)
    for inst in (a, b):
        assert await inst.register_once(rs[0].url) == 200
    await wait_for(lambda: everywhere(rs, 2), timeout=2)
    stop, statuses = asyncio.Event(), []
    traffic = asyncio.ensure_future(load(rs, stop, statuses))
    try:
        await asyncio.sleep(0.5)
        await redis_server.stop()
        await wait_for(lambda: _all_redis(rs, "lost"), timeout=5)
        c = await fleet.sim(time_scale=0.01)        # registers while Redis is down: local
        assert await c.register_once(rs[0].url) == 200
        assert await routable(rs[1]) == 2
        await asyncio.sleep(0.5)
        await redis_server.start()                  # empty: no persistence
        restarted = time.monotonic()
        await wait_for(lambda: _all_redis(rs, "connected"), timeout=5)
        await wait_for(lambda: everywhere(rs, 3), timeout=5)
        resync = time.monotonic() - restarted
        print(f"resynchronised {resync:.2f} s after Redis restarted")
        assert resync <= 5.0
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await traffic
    assert len(statuses) > 50 and statuses.count(200) == len(statuses), statuses
    assert all(r.log().count("lost Redis at") == 1 for r in rs)     # logged once each
    (late,) = await replicas(redis_server.url, 1)   # the refilled Redis starts one warm
    assert await routable(late) == 3


async def _all_redis(routers, state: str) -> bool:
    return all([(await health(r))["redis"] == state for r in routers])


@bounded(60)
async def test_admission_headroom_counts_every_replicas_requests(redis_server, replicas, sims):
    rs = await replicas(redis_server.url, 2, {"scheduler": {"max-inflight-per-instance": 1}})
    (a,) = await sims(1)
    assert await a.register_once(rs[0].url) == 200
    await wait_for(lambda: everywhere(rs, 1), timeout=2)
    a.knobs.first_byte_delay = 1.5
    first = asyncio.ensure_future(send(rs[0], "first"))
    await wait_for(lambda: _all_equal(rs, in_flight, [1]), timeout=3)
    second = asyncio.ensure_future(send(rs[1], "second"))
    # replica 1 holds its request in the queue: the only slot is taken at replica 0
    await wait_for(lambda: _queued(rs[1]), timeout=3)
    assert len(a.inference_requests) == 1
    a.knobs.first_byte_delay = 0.0
    assert await first == (200, a.url)
    assert await second == (200, a.url)
    assert len(a.inference_requests) == 2


async def _queued(router) -> bool:
    return sample(await metrics_text(router), "kvrouter_queue_depth", priority="default") == 1


@bounded(60)
async def test_redis_down_at_start_is_a_clear_error(tmp_path):
    server = RedisServer(tmp_path)                  # a free port, nothing listening
    url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "--port", "0", "--redis-url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(tmp_path))
    out, err = await proc.communicate()
    text = (out + err).decode()
    assert proc.returncode == 1, text
    assert f"cannot connect to Redis at redis://:***@127.0.0.1:{server.port}/0" in text
    assert "state.redis-optional" in text and "s3cret" not in text
    assert "Starting server" not in text


@bounded(60)
async def test_redis_optional_starts_routes_and_connects_later(tmp_path, replicas, sims):
    server = RedisServer(tmp_path / "late")         # started only later
    (r,) = await replicas(server.url, 1, {"state": {"redis-optional": True}})
    assert "unreachable" in r.log() and (await health(r))["redis"] == "lost"
    (a,) = await sims(1)
    assert await a.register_once(r.url) == 200
    assert await send(r, "hello") == (200, a.url)
    await server.start()
    try:
        await wait_for(lambda: _all_redis([r], "connected"), timeout=5)
        (other,) = await replicas(server.url, 1)    # what it had is in Redis now
        assert await routable(other) == 1
    finally:
        await server.stop()


@pytest.mark.parametrize("args,config,needle", [
    (["--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"], {},
     "state.redis-url: cannot be combined with server.workers > 1"),
    (["--redis-url", "http://:pw123@127.0.0.1:1/0"], {},
     "config error: --redis-url: must be a redis:// or rediss:// URL with a host, "
     "got http://:***@127.0.0.1:1/0"),
    ([], {"state": {"redis-url": "redis://:pw123@127.0.0.1:1/x"}},
     "state.redis-url: the path must be a database number (/0), got "
     "redis://:***@127.0.0.1:1/x"),
    ([], {"state": {"load-interval-secs": 1, "load-ttl-secs": 2}},
     "state.load-ttl-secs: must be at least 3 × state.load-interval-secs (3), got 2"),
    ([], {"state": {"key-prefix": "a b"}}, "state.key-prefix: must be 1 to 64 of"),
])
def test_state_config_errors(tmp_path, args, config, needle):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "kvrouter", "--port", "0", "--config_path",
                           str(cfg), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert needle in proc.stderr and "pw123" not in proc.stderr, proc.stderr


def test_without_a_redis_url_redis_is_never_imported(tmp_path):
    """The router without ``--redis-url`` runs as before: redis-py is not even imported."""
    code = """
import asyncio, os, signal, sys
from kvrouter.config import load_config
from kvrouter.server.app import run_server

async def main():
    cfg, _ = load_config(None, port=0)
    cfg.server.host = "127.0.0.1"
    loop = asyncio.get_running_loop()
    def check():
        print("redis modules:", [m for m in sys.modules if m.split(".")[0] == "redis"], flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    loop.call_later(1.0, check)
    return await run_server(cfg, [])

sys.exit(asyncio.run(main()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path), env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "redis modules: []" in proc.stdout, proc.stdout + proc.stderr


def test_demo_compares_one_router_replicas_and_independent_routers(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter", "demo", "--replicas", "2", "--policies", "kv_cost",
         "--requests", "40", "--time-scale", "0.3", "--out", str(out),
         "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = {r["policy"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert list(rows) == ["kv_cost", "kv_cost ×2 redis", "kv_cost ×2 no-redis"]
    for r in rows.values():
        assert r["completed"] == 40 and r["failed"] == 0 and 0 < r["hit_rate"] < 1
    assert rows["kv_cost"]["router_hit_rates"] == []
    for name in ("kv_cost ×2 redis", "kv_cost ×2 no-redis"):
        assert len(rows[name]["router_hit_rates"]) == 2
    shared = rows["kv_cost ×2 redis"]
    assert shared["redis_commands_per_request"] > 0
    assert 0 <= shared["registration_visible_ms"] < 1000
    assert rows["kv_cost ×2 no-redis"]["redis_commands_per_request"] is None
    assert "hit rate at the instances: 1 router / 2 replicas with Redis" in proc.stdout
    assert "hit rate per router" in (out / "demo.md").read_text()


def test_demo_replicas_say_so_without_redis_server(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))    # no redis-server on it
    proc = subprocess.run([sys.executable, "-m", "kvrouter", "demo", "--replicas", "3"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "redis-server not found on PATH" in proc.stderr


@bounded(60)
async def test_a_tampered_registration_in_redis_is_not_routed(redis_server, replicas, sims):
    """Redis is reachable by more than the routers: a record whose host could reach a header
    is skipped (and logged), the valid one next to it is applied."""
    import redis.asyncio as aioredis

    (r,) = await replicas(redis_server.url, 1)
    (a,) = await sims(1)
    port = a.url.rsplit(":", 1)[1]
    good = {"role": "mixed", "host": "127.0.0.1", "scheme": "http", "port": port,
            "is_paused": False, "engine": "fastdeploy"}
    bad = dict(good, host="127.0.0.1\r\nX-Evil: 1")
    bad_kv = dict(good, host="127.0.0.2", engine="vllm", kv_zmq_address="10.0.0.1:5\r\nX: 1")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for info in (bad, bad_kv, good):
            event = {"t": "reg", "id": f"{info['host']}:{port}", "v": [time.time(), 1],
                     "i": info, "st": False}
            await client.xadd("kvrouter:events", {"r": "someone", "e": json.dumps([event])})
    finally:
        await client.aclose()
    await wait_for(lambda: everywhere([r], 1), timeout=3)
    status, body = await get_json(r.url + "/registered")
    assert status == 200 and [w["url"] for w in body["mixed"]] == [a.url]
    assert body["unavailable"] == []
    assert "skipped an unreadable stream entry" in r.log() and "invalid host" in r.log()
    assert "invalid kv_zmq_address" in r.log()


@bounded(60)
async def test_a_password_protected_redis(tmp_path, replicas, sims):
    server = RedisServer(tmp_path / "auth", password="s3cret-pw")
    await server.start()
    try:
        r0, r1 = await replicas(server.url, 2)
        (a,) = await sims(1)
        assert await a.register_once(r0.url) == 200
        await wait_for(lambda: everywhere([r0, r1], 1), timeout=2)
        assert await send(r1, "hello") == (200, a.url)
        assert "s3cret" not in r0.log() + r1.log()
        wrong = server.url.replace("s3cret-pw", "wrong-pw")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvrouter", "--port", "0", "--redis-url", wrong,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(tmp_path))
        out, err = await proc.communicate()
        text = (out + err).decode()
        assert proc.returncode == 1 and "wrong-pw" not in text, text
        assert f"cannot connect to Redis at redis://:***@127.0.0.1:{server.port}/0" in text
    finally:
        await server.stop()


def _event(info: dict, port: str) -> dict:
    return {"t": "reg", "id": f"{info['host']}:{port}", "v": [time.time(), 1], "i": info,
            "st": False}


@bounded(60)
async def test_a_malformed_registration_stored_in_redis_does_not_stop_a_replica(
        redis_server, replicas, sims):
    """A registration key that is not even a mapping (any exception, not only ValueError)
    is skipped and logged when a replica reads the registry at startup; the rest is read."""
    import redis.asyncio as aioredis

    (a,) = await sims(1)
    port = a.url.rsplit(":", 1)[1]
    good = {"role": "mixed", "host": "127.0.0.1", "scheme": "http", "port": port,
            "is_paused": False, "engine": "fastdeploy"}
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for ident, reg in (("10.0.0.9:80", {**_event(good, port), "id": "10.0.0.9:80",
                                            "i": ["not", "a", "mapping"]}),
                           (f"127.0.0.1:{port}", _event(good, port))):
            await client.hset(f"kvrouter:inst:{ident}", "reg", json.dumps(reg))
            await client.sadd("kvrouter:instances", ident)
    finally:
        await client.aclose()
    (r,) = await replicas(redis_server.url, 1)
    assert await routable(r) == 1
    assert await send(r, "hello") == (200, a.url)
    assert "skipped the unreadable record of '10.0.0.9:80'" in r.log()
    assert (await health(r))["redis"] == "connected"


@bounded(60)
async def test_malformed_stream_entries_never_stop_the_reader(redis_server, replicas, sims):
    """Entries of any shape (a registration that is not a mapping, events that are not a
    list, a load share of the wrong type, a port in full-width digits) are skipped; the
    entries after them are still applied, and the replica stays connected."""
    import redis.asyncio as aioredis

    (r,) = await replicas(redis_server.url, 1)
    (a,) = await sims(1)
    port = a.url.rsplit(":", 1)[1]
    good = {"role": "mixed", "host": "127.0.0.1", "scheme": "http", "port": port,
            "is_paused": False, "engine": "fastdeploy"}
    wide = dict(good, host="127.0.0.3", port="８０８０")     # isdigit() is true for these
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        entries = [{"e": json.dumps([{**_event(good, port), "i": "not a mapping"}])},
                   {"e": json.dumps({"t": "reg"})},
                   {"ld": json.dumps([1, ["not", "a", "mapping"]])},
                   {"e": json.dumps([_event(wide, "8080")])},
                   {"e": json.dumps([_event(good, port)])}]
        for fields in entries:
            await client.xadd("kvrouter:events", {"r": "someone", **fields})
    finally:
        await client.aclose()
    await wait_for(lambda: everywhere([r], 1), timeout=3)
    status, body = await get_json(r.url + "/registered")
    assert status == 200 and [w["url"] for w in body["mixed"]] == [a.url]
    assert "invalid port '８０８０'" in r.log()
    assert "AttributeError" in r.log()
    assert (await health(r))["redis"] == "connected"
    assert await send(r, "hello") == (200, a.url)


# -- replicas in this process, on the real redis-server: internal state and timing ------------

def _info(port: int):
    from kvrouter.instance import parse_registration
    return parse_registration({"role": "mixed", "host_ip": "127.0.0.1", "port": port},
                              splitwise=False)


async def _in_process(url: str, n: int = 2):
    """``n`` routers sharing state through Redis in this process: [(router, state), …]."""
    from kvrouter.config import RouterConfig
    from kvrouter.router import Router
    from kvrouter.shared.redis import RedisState

    out = []
    for _ in range(n):
        cfg = RouterConfig()
        cfg.state.redis_url = url
        cfg.state.leader_ttl_secs, cfg.state.load_interval_secs = 1.0, 0.05
        cfg.state.load_ttl_secs = 1.0
        state = RedisState(cfg.state)
        router = Router(cfg, shared=state)
        await state.open()
        out.append((router, state))
    return out


async def _close(pairs) -> None:
    for router, state in pairs:
        await state.aclose()
        await router.close()


async def _until(predicate, timeout: float = 3.0) -> None:
    async def check():
        return predicate()
    await wait_for(check, timeout=timeout, interval=0.01)


@bounded(30)
async def test_removals_are_forgotten_by_every_replica_not_only_the_leader(
        redis_server, monkeypatch):
    from kvrouter.shared import redis as redis_state
    from kvrouter.workers import replica

    monkeypatch.setattr(replica, "TOMBSTONE_SECS", 0.5)
    monkeypatch.setattr(redis_state, "TOMBSTONE_EXPIRY", 0.1)
    pairs = await _in_process(redis_server.url)
    try:
        await _until(lambda: sum(s.leads for _, s in pairs) == 1)
        (leader, _), (follower, f_state) = sorted(pairs, key=lambda p: not p[1].leads)
        inst = leader.registry.add(_info(9))
        await _until(lambda: follower.registry.get(inst.identity) is not None)
        leader.registry.remove(inst, "instance_removed")
        await _until(lambda: follower.registry.get(inst.identity) is None)
        assert inst.identity in f_state.replica._tombstones
        await _until(lambda: all(not s.replica._tombstones for _, s in pairs))
    finally:
        await _close(pairs)


@bounded(30)
async def test_a_sync_task_that_fails_is_logged_resynchronised_and_restarted(
        redis_server, monkeypatch, caplog):
    """A bug that ends the reader (here: an exception its Redis call never raises) must
    not leave the replica silently deaf while it says "connected"."""
    import logging

    from kvrouter.shared import redis as redis_state

    monkeypatch.setattr(redis_state, "RESTART_AFTER", 0.2)
    caplog.set_level(logging.INFO, logger="kvrouter.replicas")
    pairs = await _in_process(redis_server.url)
    (r0, _), (r1, s1) = pairs
    try:
        xread, calls = s1._r.xread, []

        async def fails_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the reader")
            return await xread(*args, **kwargs)

        s1._r.xread = fails_once
        await _until(lambda: calls)
        inst = r0.registry.add(_info(10))        # read again from the keys: resynchronised
        await _until(lambda: r1.registry.get(inst.identity) is not None, timeout=5)
        await _until(lambda: len(calls) > 1)     # the reader runs again …
        inst = r0.registry.add(_info(11))        # … and applies the stream
        await _until(lambda: r1.registry.get(inst.identity) is not None)
        assert s1.connected
        text = caplog.text
        assert "the Redis reader task stopped (RuntimeError('a bug in the reader'))" in text
        assert "shared state resynchronised" in text
    finally:
        await _close(pairs)


@bounded(30)
async def test_the_stream_carries_only_the_load_shares_that_moved(redis_server):
    """With many instances busy, a change on one puts that one's share on the stream, not
    the whole fleet's every 10 ms; the others' counters follow."""
    import redis.asyncio as aioredis

    pairs = await _in_process(redis_server.url)
    (r0, s0), (r1, _) = pairs
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        insts = [r0.registry.add(_info(11000 + n)) for n in range(30)]
        leases = [inst.load.acquire(10) for inst in insts]
        seen = [r1.registry.load_for(inst.identity, create=True) for inst in insts]
        await _until(lambda: all(load.requests == 1 for load in seen))
        last = (await client.xrevrange("kvrouter:events", count=1))[0][0]
        extra = insts[5].load.acquire(1)
        await _until(lambda: seen[5].requests == 2)
        mine = [fields for _, fields in await client.xrange("kvrouter:events", min=b"(" + last)
                if fields[b"r"] == s0.rid.encode()]
        assert mine and all(b"l" not in fields for fields in mine), mine
        changed = [json.loads(fields[b"ld"])[1] for fields in mine if b"ld" in fields]
        assert changed and all(list(c) == [insts[5].identity] for c in changed), changed
        extra.release()
        for lease in leases:
            lease.release()
        await _until(lambda: all(load.requests == 0 for load in seen))
    finally:
        await client.aclose()
        await _close(pairs)
