"""Black-box acceptance tests: listening, registration and heartbeats
(docs/fastdeploy.md#registration-and-heartbeat).

Every test runs a real ``python -m kvrouter`` process (tests/harness.py) and simulated
FastDeploy instances (kvrouter.sim) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from harness import (Fleet, RouterProcess, bounded, get_json, number, post_json, registered,
                     wait_for)


FIELD = "invalid InstanceInfo format:"
FORMAT = "Invalid InstanceInfo JSON format"
EMPTY = {"mixed": 0, "prefill": 0, "decode": 0}
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}


# --- helpers -------------------------------------------------------------------------------------


async def register(router: RouterProcess, payload: object | None = None, *,
                   data: bytes | None = None) -> tuple[int, object, dict]:
    return await post_json(router.url + "/register", payload, data=data)


def every_record(reg: dict) -> list[dict]:
    return [w for key in ("mixed", "prefill", "decode", "unavailable") for w in reg[key]]


def where(reg: dict, url: str) -> tuple[str, dict] | None:
    """(list name, worker record) of ``url`` in a /registered answer."""
    for key in ("mixed", "prefill", "decode", "unavailable"):
        for w in reg[key]:
            if w["url"] == url:
                return key, w
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def connects(host: str, port: int) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


def assert_json_error(status: int, body: object, headers: dict, want_status: int,
                      msg: str | None = None, *, prefix: str | None = None,
                      contains: str | None = None) -> None:
    assert status == want_status, (status, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and body.get("code") == want_status, body
    if msg is not None:
        assert body["msg"] == msg, body
    if prefix is not None:
        assert body["msg"].startswith(prefix), body
    if contains is not None:
        assert contains in body["msg"], body


# --- CLI / listening (docs/fastdeploy.md#command-line) -----------------------------------------


@bounded(20)
async def test_port_flag_overrides_config(fleet: Fleet) -> None:
    flag_port, cfg_port = free_ports(2)
    r = await fleet.router({"server": {"port": str(cfg_port)}}, "--port", str(flag_port))
    assert r.port == flag_port
    assert f"Starting server on 0.0.0.0:{flag_port}" in r.log()
    status, body = await get_json(f"http://127.0.0.1:{flag_port}/health")
    assert status == 200 and body["status"] == "ok"
    assert not await connects("127.0.0.1", cfg_port), "server.port must be overridden by --port"


@bounded(20)
async def test_host_binds_loopback_only(fleet: Fleet) -> None:
    r = await fleet.router({"server": {"host": "127.0.0.1"}})
    assert r.host == "127.0.0.1"
    assert f"Starting server on 127.0.0.1:{r.port}" in r.log()
    status, _ = await get_json(f"http://127.0.0.1:{r.port}/health")
    assert status == 200
    # 127.0.0.2 reaches a wildcard listener on Linux; check that first (else skip the probe).
    probe = socket.socket()
    probe.bind(("0.0.0.0", 0))
    probe.listen()
    try:
        other_loopback_works = await connects("127.0.0.2", probe.getsockname()[1])
    finally:
        probe.close()
    if not other_loopback_works:
        pytest.skip("127.0.0.2 does not reach a wildcard listener here")
    assert not await connects("127.0.0.2", r.port), "router must be bound to 127.0.0.1 only"


@bounded(20)
async def test_splitwise_flag_ors_config(fleet: Fleet) -> None:
    r = await fleet.router({"server": {"splitwise": False}}, "--splitwise")
    inst = await fleet.sim(role="mixed")
    status, body, headers = await register(r, inst.registration_payload())
    assert_json_error(status, body, headers, 400,
                      "splitwise mode only supports PREFILL/DECODE instances")
    _, health = await get_json(r.url + "/health")
    assert health["mode"] == "splitwise"
    assert await number(r) == EMPTY


@bounded(20)
async def test_unknown_key_warns_and_starts(fleet: Fleet) -> None:
    r = await fleet.router({"scheduler": {"interval-cleanup-secs": 30}})
    status, _ = await get_json(r.url + "/health")
    assert status == 200
    cfg_path = r.log_path.parent / "config.yaml"
    want = f"config warning: {cfg_path}: unknown key 'scheduler.interval-cleanup-secs' ignored"
    assert want in r.log(), r.log()


# --- registration (docs/fastdeploy.md#registration-and-heartbeat) ------------------------------


@bounded(20)
async def test_register_mixed(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    status, body, headers = await register(r, inst.registration_payload())
    assert status == 200
    assert body == {"code": 200, "msg": "Register success"}
    assert headers["Content-Type"].startswith("application/json")
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}
    reg = await registered(r)
    assert [w["url"] for w in reg["mixed"]] == [inst.url]
    w = reg["mixed"][0]
    assert w["worker_type"] == "mixed" and w["state"] == "healthy" and w["port"] == str(inst.port)
    assert len(inst.requests_to("/health")) == 1, "a new instance is probed exactly once"


@bounded(20)
async def test_string_port_uppercase_role(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    payload = dict(inst.registration_payload(), port=str(inst.port), role="MIXED")
    status, body, _ = await register(r, payload)
    assert (status, body) == (200, {"code": 200, "msg": "Register success"})
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}


@bounded(20)
async def test_pd_role_int_and_lists(fleet: Fleet) -> None:
    r = await fleet.router({}, "--splitwise")
    pre = await fleet.sim(role="prefill")
    dec = await fleet.sim(role="decode")
    # "role": 1 → prefill; rdma_ports / device_ids as ints and strings → strings
    payload = dict(pre.registration_payload(), role=1, rdma_ports=[7100, "7101"],
                   device_ids=[0, "1"])
    status, body, _ = await register(r, payload)
    assert (status, body) == (200, {"code": 200, "msg": "Register success"})
    status, _, _ = await register(r, dict(dec.registration_payload(), role=2))
    assert status == 200
    reg = await registered(r)
    assert [w["url"] for w in reg["prefill"]] == [pre.url]
    assert [w["url"] for w in reg["decode"]] == [dec.url]
    w = reg["prefill"][0]
    assert w["worker_type"] == "prefill"
    assert w["rdma_ports"] == ["7100", "7101"]
    assert w["device_ids"] == ["0", "1"]
    assert w["connector_port"] == str(pre.connector_port)
    assert await number(r) == {"mixed": 0, "prefill": 1, "decode": 1}

    # format errors (docs/fastdeploy.md#registration-payload)
    for bad in ({"rdma_ports": [1.5]}, {"device_ids": "0,1"}):
        status, body, headers = await register(r, dict(dec.registration_payload(), **bad))
        assert_json_error(status, body, headers, 400, prefix=FORMAT)
    # PD part of the field errors: rdma port range (docs/fastdeploy.md#registration-errors)
    status, body, headers = await register(r, dict(dec.registration_payload(), rdma_ports=[99999]))
    assert_json_error(status, body, headers, 400, FIELD + "rdma_ports[0] invalid port: 99999")
    # mirror of test_mixed_router_refuses_prefill: PD router refuses a mixed instance
    status, body, headers = await register(r, dict(dec.registration_payload(), role="mixed"))
    assert_json_error(status, body, headers, 400,
                      "splitwise mode only supports PREFILL/DECODE instances")
    reg = await registered(r)
    assert reg["decode"][0]["rdma_ports"] == [], "refused heartbeats must not change the entry"


@bounded(20)
async def test_role_errors(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    base = inst.registration_payload()
    no_role = {k: v for k, v in base.items() if k != "role"}
    cases = [
        (no_role, {"msg": FIELD + "role is required"}),
        (dict(base, role=None), {"msg": FIELD + "role is required"}),
        (dict(base, role="custom"), {"contains": "invalid role: custom"}),
        (dict(base, role=99), {"prefix": FORMAT}),
    ]
    for payload, want in cases:
        status, body, headers = await register(r, payload)
        assert_json_error(status, body, headers, 400, **want)
    _, body, _ = await register(r, dict(base, role=99))
    assert "invalid role integer: 99" in body["msg"]
    assert await number(r) == EMPTY
    assert inst.requests_to("/health") == [], "invalid payloads must not be probed"
    assert "ERROR" in r.log() and f"Failed to register instance: {FIELD}role is required" in r.log()


@bounded(20)
async def test_field_errors(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    base = inst.registration_payload()
    cases = [
        (dict(base, host_ip="bad host!"), FIELD + "invalid host_ip: bad host!"),
        (dict(base, port=99999), FIELD + "invalid port: 99999"),
        (dict(base, port=0), FIELD + "invalid port: 0"),
        (dict(base, transfer_protocol=["tcp"]), FIELD + "invalid protocol: tcp"),
    ]
    for payload, msg in cases:
        status, body, headers = await register(r, payload)
        assert_json_error(status, body, headers, 400, msg)
    assert await number(r) == EMPTY


@bounded(20)
async def test_localhost(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    status, body, _ = await register(r, dict(inst.registration_payload(), host_ip="localhost"))
    assert (status, body) == (200, {"code": 200, "msg": "Register success"})
    reg = await registered(r)
    assert [w["url"] for w in reg["mixed"]] == [f"http://localhost:{inst.port}"]
    status, _, headers = await post_json(r.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["X-Router-Mixed-URL"] == f"http://localhost:{inst.port}"
    assert len(inst.inference_requests) == 1


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="cannot bind ::1")
@bounded(20)
async def test_ipv6(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim(host="::1")
    payload = inst.registration_payload()
    assert payload["host_ip"] == "::1"
    status, body, _ = await register(r, payload)
    assert (status, body) == (200, {"code": 200, "msg": "Register success"})
    url = f"http://[::1]:{inst.port}"
    reg = await registered(r)
    assert [w["url"] for w in reg["mixed"]] == [url]
    status, _, headers = await post_json(r.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["X-Router-Mixed-URL"] == url
    assert len(inst.inference_requests) == 1
    # the bracketed form is the same identity
    status, _, _ = await register(r, dict(payload, host_ip="[::1]"))
    assert status == 200
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}


@bounded(20)
async def test_metrics_port_defaults_to_port(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    payload = {k: v for k, v in inst.registration_payload().items() if k != "metrics_port"}
    status, _, _ = await register(r, payload)
    assert status == 200
    w = (await registered(r))["mixed"][0]
    assert w["metrics_port"] == str(inst.port)


@bounded(20)
async def test_unhealthy_instance_refused(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    inst.knobs.health_status = 500
    status, body, headers = await register(r, inst.registration_payload())
    assert_json_error(status, body, headers, 503, f"{inst.url} service is not healthy")
    assert len(inst.requests_to("/health")) == 1
    reg = await registered(r)
    assert every_record(reg) == []
    assert await number(r) == EMPTY


@bounded(20)
async def test_invalid_bodies(fleet: Fleet) -> None:
    r = await fleet.router()
    for raw in (b"invalid json", b""):
        status, body, headers = await register(r, data=raw)
        assert_json_error(status, body, headers, 400, prefix=FORMAT)
    # an empty body through the plain client (no Content-Type at all)
    async with aiohttp.ClientSession() as s, s.post(r.url + "/register") as resp:
        assert resp.status == 400
        assert resp.headers["Content-Type"].startswith("application/json")
        assert (await resp.json())["code"] == 400


@bounded(20)
async def test_reregistration_is_idempotent(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    base = inst.registration_payload()
    assert (await register(r, dict(base, connector_port=1234)))[0] == 200
    assert (await register(r, dict(base, connector_port=1235)))[0] == 200
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}
    reg = await registered(r)
    assert len(every_record(reg)) == 1
    assert reg["mixed"][0]["connector_port"] == "1235"
    # the same identity spelled differently (scheme, trailing slash) is still one instance
    assert (await register(r, dict(base, host_ip="http://127.0.0.1/")))[0] == 200
    assert len(every_record(await registered(r))) == 1


@bounded(20)
async def test_heartbeat_of_healthy_instance_never_probes(fleet: Fleet) -> None:
    r = await fleet.router()   # health interval 60 s: no periodic round during the test
    inst = await fleet.sim()
    payload = inst.registration_payload()
    assert (await register(r, payload))[0] == 200
    probes = len(inst.requests_to("/health"))
    assert probes == 1
    inst.knobs.health_delay = 3.0
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            t0 = time.perf_counter()
            async with s.post(r.url + "/register", json=payload) as resp:
                body = await resp.json()
            elapsed = time.perf_counter() - t0
            assert resp.status == 200 and body == {"code": 200, "msg": "Register success"}
            assert elapsed < 0.2, f"heartbeat took {elapsed:.3f}s"
    assert len(inst.requests_to("/health")) == probes, "a healthy heartbeat must not probe"


@bounded(20)
async def test_heartbeat_of_unhealthy_instance_probes_inline(fleet: Fleet) -> None:
    """A heartbeat from an unhealthy instance updates its fields and probes once; with the
    default success threshold 1 a passing probe restores it at once
    (docs/fastdeploy.md#identity-and-re-registration)."""
    r = await fleet.router({"manager": {"health-check-interval-secs": 1}})
    inst = await fleet.sim()
    payload = inst.registration_payload()
    assert (await register(r, payload))[0] == 200
    inst.knobs.health_status = 500

    async def unhealthy() -> bool:
        return (await number(r))["mixed"] == 0

    await wait_for(unhealthy, timeout=3)
    status, body, headers = await register(r, dict(payload, connector_port=4321))
    assert_json_error(status, body, headers, 503, f"{inst.url} service is not healthy")
    reg = await registered(r)
    assert [(w["url"], w["connector_port"]) for w in reg["unavailable"]] == [(inst.url, "4321")]

    inst.knobs.health_status = 200
    status, body, _ = await register(r, payload)
    assert (status, body) == (200, {"code": 200, "msg": "Register success"})
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}


@bounded(20)
async def test_paused_instances(fleet: Fleet) -> None:
    r = await fleet.router()
    a = await fleet.sim()
    b = await fleet.sim()
    for inst in (a, b):
        assert (await register(r, inst.registration_payload()))[0] == 200
    assert await number(r) == {"mixed": 2, "prefill": 0, "decode": 0}

    a.config.is_paused = True
    assert await a.register_once(r.url) == 200
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}
    reg = await registered(r)
    assert [w["url"] for w in reg["mixed"]] == [b.url]
    assert [(w["url"], w["is_paused"]) for w in reg["unavailable"]] == [(a.url, True)]
    for _ in range(3):
        status, _, headers = await post_json(r.url + "/v1/chat/completions", CHAT)
        assert status == 200 and headers["X-Router-Mixed-URL"] == b.url
    assert a.inference_requests == []

    b.config.is_paused = True
    assert await b.register_once(r.url) == 200
    assert await number(r) == EMPTY
    status, body, headers = await post_json(r.url + "/v1/chat/completions", CHAT)
    assert status == 503, body
    assert body["error"]["code"] == "no_available_instance"

    a.config.is_paused = False
    assert await a.register_once(r.url) == 200
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}
    status, _, headers = await post_json(r.url + "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-Router-Mixed-URL"] == a.url
    assert len(a.inference_requests) == 1


@bounded(20)
async def test_mixed_router_refuses_prefill(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim(role="prefill")
    status, body, headers = await register(r, inst.registration_payload())
    assert_json_error(status, body, headers, 400, "only MIXED instances are allowed")
    assert await number(r) == EMPTY
    assert inst.requests_to("/health") == []


# --- register.yaml (docs/fastdeploy.md#static-instances) -----------------------------------------


@bounded(25)
async def test_register_yaml_static_entries(fleet: Fleet, tmp_path: Path) -> None:
    good = await fleet.sim()
    late = await fleet.sim()
    await late.close_port()                 # keeps its port number; unreachable for now
    entries = []
    for inst in (good, late):
        p = inst.registration_payload()
        entries.append({"role": "mixed", "host_ip": p["host_ip"], "port": p["port"],
                        "transfer_protocol": ["ipc", "rdma"], "device_ids": [0]})
    reg_file = tmp_path / "register.yaml"
    reg_file.write_text(yaml.safe_dump({"instances": entries}))
    interval = 1
    r = await fleet.router({"manager": {"register-path": str(reg_file),
                                        "health-check-interval-secs": interval}})
    assert await number(r) == {"mixed": 1, "prefill": 0, "decode": 0}
    reg = await registered(r)
    assert [w["url"] for w in reg["mixed"]] == [good.url]
    assert [w["url"] for w in reg["unavailable"]] == [late.url]
    assert reg["unavailable"][0]["state"] == "unhealthy"
    assert reg["unavailable"][0]["static"] is True and reg["mixed"][0]["static"] is True
    assert late.url in r.log()   # WARN for the entry that is down at startup

    await late.start()
    assert late.url == f"http://127.0.0.1:{entries[1]['port']}"
    t0 = time.monotonic()

    async def both() -> bool:
        return (await number(r))["mixed"] == 2

    # success threshold (1) + 1 intervals, plus a little slack for the probe itself
    await wait_for(both, timeout=(1 + 1) * interval + 0.8)
    assert time.monotonic() - t0 <= (1 + 1) * interval + 0.8
    assert "POST] /register" not in r.log(), "recovered without any registration POST"
    assert late.requests_to("/health"), "recovered by the health loop's probe"
