"""Authentication (``auth.*``, README "Authentication"): client keys on the inference routes,
the admin token on the control plane, anonymous registration from allowed networks only for
the own address, credentials kept from the instances, secrets kept out of the log.

Real router processes (tests/harness.py) and simulated instances on loopback; requests that
must come from "another host" are sent from 127.0.0.2/127.0.0.3 (all of 127/8 is loopback on
Linux).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from harness import Fleet, RouterProcess, bounded, wait_for

from kvrouter.server.auth import names_source, source_address

TOKEN = "adm-Tok3n-0123456789abcdef"
KEY = "sk-client-one-0123456789"
OTHER_KEY = "sk-client-two-0123456789"
BAD = "sk-not-a-key-0123456789"
ADMIN_H = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}


def auth_config(**extra: object) -> dict:
    return {"auth": {"api-keys": [KEY, OTHER_KEY], "admin-token": TOKEN,
                     "register-allow-cidrs": ["127.0.0.1/32"], **extra}}


def _loopback_alias_works() -> bool:
    """127.0.0.2 can be a source address (Linux: all of 127/8 is local)."""
    try:
        with socket.socket() as srv, socket.socket() as cli:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            cli.bind(("127.0.0.2", 0))
            cli.connect(srv.getsockname())
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_alias_works(),
                                reason="127.0.0.2 is not usable as a source address")


async def call(method: str, url: str, *, headers: dict | None = None, json: object = None,
               source: str = "127.0.0.1") -> tuple[int, object, dict]:
    """One request from the loopback address ``source``: (status, JSON body or text, headers)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.request(method, url, headers=headers, json=json) as r:
        text = await r.text()
        try:
            body: object = await r.json(content_type=None)
        except ValueError:
            body = text
        return r.status, body, dict(r.headers)


def assert_refused(result: tuple[int, object, dict], status: int) -> None:
    code, body, headers = result
    assert code == status, result
    want = "invalid_api_key" if status == 401 else "permission_denied"
    assert isinstance(body, dict) and body["error"]["code"] == want, body
    assert headers["Content-Type"].startswith("application/json")
    if status == 401:
        assert headers.get("WWW-Authenticate") == "Bearer", headers


async def admin_get(r: RouterProcess, path: str) -> object:
    status, body, _ = await call("GET", r.url + path, headers=ADMIN_H)
    assert status == 200, (path, status, body)
    return body


FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/abort_requests")


def credentials_seen(inst) -> list[tuple[str | None, str | None]]:
    """(Authorization, x-api-key) of each request the router passed on to ``inst``."""
    return [(q.headers.get("Authorization"), q.headers.get("x-api-key"))
            for q in inst.received if q.path in FORWARDED]


# --- auth off: fd-router's open router, plus one warning ------------------------------------


@bounded(30)
async def test_auth_off_everything_open_with_a_warning(fleet: Fleet) -> None:
    r = await fleet.router()
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200
    status, _, _ = await call("POST", r.url + "/v1/chat/completions", json=CHAT,
                              headers={"Authorization": "Bearer for-the-instance"})
    assert status == 200
    assert credentials_seen(inst) == [("Bearer for-the-instance", None)], "passes unchanged"
    for path in ("/registered", "/registered_number", "/metrics", "/v1/models"):
        assert (await call("GET", r.url + path))[0] == 200, path
    assert "auth is off: anyone who can reach 0.0.0.0 (ephemeral port) can register " \
           "instances and read prompts; see README 'Running in production'" in r.log()


# --- client keys -----------------------------------------------------------------------------


@bounded(40)
async def test_client_keys_and_credentials_kept_from_instances(fleet: Fleet) -> None:
    r = await fleet.router(auth_config())
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200      # anonymous, from 127.0.0.1, own address
    url = r.url + "/v1/chat/completions"
    assert_refused(await call("POST", url, json=CHAT), 401)
    assert_refused(await call("POST", url, json=CHAT, headers={"Authorization": f"Bearer {BAD}"}),
                   401)
    assert_refused(await call("POST", url, json=CHAT, headers={"Authorization": f"Basic {KEY}"}),
                   401)
    assert_refused(await call("GET", r.url + "/v1/models"), 401)
    assert inst.inference_requests == [], "a refused request reaches no instance"

    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY},
                    {"authorization": f"bearer {OTHER_KEY}"}, ADMIN_H):
        status, body, _ = await call("POST", url, json=CHAT, headers=headers)
        assert status == 200, (headers, body)
    assert (await call("GET", r.url + "/v1/models", headers={"x-api-key": KEY}))[0] == 200
    assert (await call("GET", r.url + "/health"))[0] == 200, "/health stays open"
    assert credentials_seen(inst) == [(None, None)] * 4, "no credential reaches the instance"

    # a client key is not an admin credential
    assert_refused(await call("GET", r.url + "/metrics", headers={"x-api-key": KEY}), 403)
    metrics = await admin_get(r, "/metrics")
    assert 'kvrouter_client_requests_total{key="key1"} 3.0' in metrics   # + /v1/models
    assert 'kvrouter_client_requests_total{key="key2"} 1.0' in metrics
    assert KEY not in metrics and TOKEN not in metrics


@bounded(30)
async def test_forward_client_key_passes_the_key_but_never_the_admin_token(fleet: Fleet) -> None:
    r = await fleet.router(auth_config(**{"forward-client-key": True}))
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200
    url = r.url + "/v1/chat/completions"
    assert (await call("POST", url, json=CHAT, headers={"Authorization": f"Bearer {KEY}"}))[0] \
        == 200
    assert (await call("POST", url, json=CHAT, headers=ADMIN_H))[0] == 200
    status, _, _ = await call("POST", r.url + "/v1/abort_requests", json={"abort_all": True},
                              headers=ADMIN_H)
    assert status == 200
    assert credentials_seen(inst) == [(f"Bearer {KEY}", None), (None, None), (None, None)]


@bounded(40)
async def test_pd_credentials_kept_from_both_legs(fleet: Fleet) -> None:
    r = await fleet.router(auth_config(), "--splitwise")
    p = await fleet.sim(role="prefill", time_scale=0.01)
    d = await fleet.sim(role="decode", time_scale=0.01)
    for inst in (p, d):
        assert await inst.register_once(r.url) == 200
    url = r.url + "/v1/chat/completions"
    assert_refused(await call("POST", url, json=CHAT), 401)
    status, body, _ = await call("POST", url, json=CHAT,
                                 headers={"Authorization": f"Bearer {KEY}", "x-api-key": KEY})
    assert status == 200, body
    assert credentials_seen(p) == [(None, None)]
    assert credentials_seen(d) == [(None, None)]


# --- the admin token --------------------------------------------------------------------------


ADMIN_GETS = ("/registered", "/registered_number", "/health_generate", "/decode_instances",
              "/metrics")


@bounded(40)
async def test_admin_routes_take_the_admin_token(fleet: Fleet) -> None:
    r = await fleet.router(auth_config())
    inst = await fleet.sim()
    assert await inst.register_once(r.url) == 200
    for path in ADMIN_GETS:
        source = "127.0.0.2" if path == "/decode_instances" else "127.0.0.1"
        assert_refused(await call("GET", r.url + path, source=source), 401)
        assert_refused(await call("GET", r.url + path, source=source,
                                  headers={"Authorization": f"Bearer {BAD}"}), 401)
        assert_refused(await call("GET", r.url + path, headers={"x-api-key": KEY}), 403)
        await admin_get(r, path)
    # /decode_instances is open to the allowed networks (FastDeploy prefills poll it)
    assert (await call("GET", r.url + "/decode_instances"))[0] == 200

    abort = r.url + "/v1/abort_requests"
    for headers in (None, {"Authorization": f"Bearer {BAD}"}):
        assert_refused(await call("POST", abort, json={"abort_all": True}, headers=headers), 401)
    assert_refused(await call("POST", abort, json={"abort_all": True},
                              headers={"Authorization": f"Bearer {KEY}"}), 403)
    assert inst.requests_to("/v1/abort_requests") == [], "a refused abort reaches no instance"
    status, body, _ = await call("POST", abort, json={"abort_all": True}, headers=ADMIN_H)
    assert status == 200 and [row["status_code"] for row in body["results"]] == [200]
    (sent,) = inst.requests_to("/v1/abort_requests")
    assert "Authorization" not in sent.headers, "the admin token never reaches an instance"


@bounded(30)
async def test_client_keys_only_admin_routes_disabled(fleet: Fleet) -> None:
    r = await fleet.router({"auth": {"api-keys": [KEY]}})
    inst = await fleet.sim()
    assert_refused(await call("POST", r.url + "/register", json=inst.registration_payload()), 403)
    assert_refused(await call("GET", r.url + "/registered"), 403)
    assert_refused(await call("GET", r.url + "/metrics", headers={"x-api-key": KEY}), 403)
    assert "auth.admin-token is not set: the admin routes are refused" in r.log()
    assert (await call("GET", r.url + "/health"))[0] == 200


# --- registration -----------------------------------------------------------------------------


@bounded(40)
async def test_rogue_registration_is_refused_and_gets_no_traffic(fleet: Fleet) -> None:
    r = await fleet.router(auth_config())
    good = await fleet.sim()
    rogue = await fleet.sim(host="127.0.0.2")
    assert await good.register_once(r.url) == 200
    reg = r.url + "/register"
    payload = rogue.registration_payload()
    assert payload["host_ip"] == "127.0.0.2"
    # from a source outside register-allow-cidrs, anonymous or with a wrong or client key
    assert_refused(await call("POST", reg, json=payload, source="127.0.0.2"), 403)
    assert_refused(await call("POST", reg, json=payload, source="127.0.0.2",
                              headers={"Authorization": f"Bearer {BAD}"}), 401)
    assert_refused(await call("POST", reg, json=payload, source="127.0.0.2",
                              headers={"Authorization": f"Bearer {KEY}"}), 403)
    # from the allowed network, but naming another address
    status, body, headers = await call("POST", reg, json=payload)
    assert_refused((status, body, headers), 403)
    assert "host_ip must be the source address" in body["error"]["message"]
    assert "Refused registration of http://127.0.0.2:" in r.log()
    assert rogue.requests_to("/health") == [], "a refused registration is not even probed"

    assert [w["url"] for w in (await admin_get(r, "/registered"))["mixed"]] == [good.url]
    for _ in range(4):
        status, _, _ = await call("POST", r.url + "/v1/chat/completions", json=CHAT,
                                  headers={"x-api-key": KEY})
        assert status == 200
    assert len(good.inference_requests) == 4 and rogue.inference_requests == []

    # the admin token may register any address
    status, _, _ = await call("POST", reg, json=payload, source="127.0.0.2", headers=ADMIN_H)
    assert status == 200
    assert (await admin_get(r, "/registered_number"))["mixed"] == 2


@bounded(40)
async def test_rogue_cannot_pause_or_repoint_an_instance(fleet: Fleet) -> None:
    r = await fleet.router(auth_config())
    inst = await fleet.sim(host="127.0.0.2")
    payload = inst.registration_payload()
    reg = r.url + "/register"
    assert (await call("POST", reg, json=payload, source="127.0.0.2", headers=ADMIN_H))[0] == 200

    attempts = [dict(payload, is_paused=True), dict(payload, host_ip="https://127.0.0.2")]
    for bad in attempts:
        assert_refused(await call("POST", reg, json=bad), 403)       # allowed net, other address
        assert_refused(await call("POST", reg, json=bad, source="127.0.0.3"), 403)
        assert_refused(await call("POST", reg, json=bad, source="127.0.0.3",
                                  headers={"Authorization": f"Bearer {BAD}"}), 401)
    (w,) = (await admin_get(r, "/registered"))["mixed"]
    assert (w["url"], w["is_paused"]) == (inst.url, False)
    status, _, headers = await call("POST", r.url + "/v1/chat/completions", json=CHAT,
                                    headers={"x-api-key": KEY})
    assert status == 200 and headers["X-Router-Mixed-URL"] == inst.url

    # the admin token may pause it
    status, _, _ = await call("POST", reg, json=attempts[0], headers=ADMIN_H)
    assert status == 200
    assert (await admin_get(r, "/registered_number"))["mixed"] == 0


@bounded(40)
async def test_fastdeploy_instances_on_an_allowed_network_register_and_heartbeat(
        fleet: Fleet, tmp_path: Path) -> None:
    """``kvrouter sim --router`` instances (FastDeploy's heartbeat, no header) on 127.0.0.1."""
    r = await fleet.router(auth_config(**{"register-allow-cidrs": ["127.0.0.0/8"]}))
    err_path = tmp_path / "sim.err"
    with open(err_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvrouter", "sim", "--instances", "2", "--router",
            f"127.0.0.1:{r.port}", "--heartbeat-period", "0.3", "--first-heartbeat-delay", "0",
            "--time-scale", "0.01", stdout=asyncio.subprocess.DEVNULL, stderr=err)
    try:
        async def both() -> bool:
            return (await admin_get(r, "/registered_number"))["mixed"] == 2

        await wait_for(both, timeout=15)
        await asyncio.sleep(1.0)            # a few more heartbeats of each
        assert_refused(await call("GET", r.url + "/registered_number"), 401)
        status, _, _ = await call("POST", r.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200
        assert (await admin_get(r, "/registered_number"))["mixed"] == 2
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert "answered" not in err_path.read_text(), "every heartbeat was accepted"


# --- the keys file ------------------------------------------------------------------------------


@bounded(40)
async def test_keys_file_is_reread_on_change(fleet: Fleet, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# clients\nsk-file-alice-0001 alice\n\nsk-file-nameless-02\n")
    r = await fleet.router({"auth": {"api-keys-file": str(keys), "admin-token": TOKEN}})
    inst = await fleet.sim()
    assert (await call("POST", r.url + "/register", json=inst.registration_payload(),
                       headers=ADMIN_H))[0] == 200
    models = r.url + "/v1/models"

    async def status_with(key: str) -> int:
        return (await call("GET", models, headers={"x-api-key": key}))[0]

    assert await status_with("sk-file-alice-0001") == 200
    assert await status_with("sk-file-nameless-02") == 200
    assert await status_with("sk-file-bob-000003") == 401

    new = tmp_path / "keys.new"
    new.write_text("sk-file-bob-000003 bob\n")
    os.replace(new, keys)

    async def bob_in() -> bool:
        return await status_with("sk-file-bob-000003") == 200

    await wait_for(bob_in, timeout=5, interval=0.2)
    assert await status_with("sk-file-alice-0001") == 401

    # a broken version keeps the previous keys and says so (without any key)
    new.write_text("sk-file-carol-0004 carol extra-field\n")
    os.replace(new, keys)

    async def error_logged() -> bool:        # a timer checks the file: no request needed
        return "keeping the previous keys" in r.log()

    await wait_for(error_logged, timeout=5, interval=0.2)
    assert f"{keys}: line 1: expected '<key> [name]'" in r.log()
    assert await status_with("sk-file-bob-000003") == 200
    assert await status_with("sk-file-carol-0004") == 401

    metrics = await admin_get(r, "/metrics")
    assert 'kvrouter_client_requests_total{key="alice"} 1.0' in metrics
    assert 'kvrouter_client_requests_total{key="key2"} 1.0' in metrics   # by position
    assert 'kvrouter_client_requests_total{key="bob"}' in metrics
    log = r.log()
    assert "sk-file-" not in log and TOKEN not in log


@bounded(40)
async def test_keys_file_change_is_applied_without_any_request(fleet: Fleet,
                                                               tmp_path: Path) -> None:
    """The file is re-read by a timer within about a second of a change, not inside the first
    request that follows (which used to wait for up to 1 MiB to be read and hashed)."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-file-alice-0001 alice\nsk-file-nameless-02\n")
    r = await fleet.router({"auth": {"api-keys-file": str(keys), "admin-token": TOKEN}})
    assert "auth: 2 client keys from" in r.log()
    new = tmp_path / "keys.new"
    new.write_text("sk-file-bob-000003 bob\n")
    os.replace(new, keys)

    async def reloaded() -> bool:
        return "auth: 1 client keys from" in r.log()

    await wait_for(reloaded, timeout=5, interval=0.1)      # not a single request was sent
    models = r.url + "/v1/models"
    assert (await call("GET", models, headers={"x-api-key": "sk-file-bob-000003"}))[0] == 200
    assert_refused(await call("GET", models, headers={"x-api-key": "sk-file-alice-0001"}), 401)


@bounded(60)
async def test_every_key_up_to_the_limits_is_recognised_by_name(fleet: Fleet,
                                                                 tmp_path: Path) -> None:
    """1024 keys in ``api-keys`` and 1024 more in the keys file (the documented limits), and
    the admin token: each is found (one lookup, whatever their number) and counted by its
    name; the admin token opens the admin routes, a client key does not."""
    listed = [f"sk-listed-{i:05d}-abcdef" for i in range(1024)]
    filed = [f"sk-filed-{i:05d}-abcdef" for i in range(1024)]
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{k} file{i}\n" if i % 2 else f"{k}\n"
                            for i, k in enumerate(filed)))
    r = await fleet.router({"auth": {"api-keys": listed, "api-keys-file": str(keys),
                                     "admin-token": TOKEN}})
    models = r.url + "/v1/models"
    for key in (listed[0], listed[1023], filed[0], filed[1], filed[1023]):
        assert (await call("GET", models, headers={"x-api-key": key}))[0] == 200, key
    assert_refused(await call("GET", models, headers={"x-api-key": listed[0] + "x"}), 401)
    assert_refused(await call("GET", r.url + "/registered",
                              headers={"x-api-key": filed[1023]}), 403)
    metrics = await admin_get(r, "/metrics")
    for name in ("key1", "key1024", "key1025", "file1", "file1023"):
        assert f'kvrouter_client_requests_total{{key="{name}"}} 1.0' in metrics, name
    log = r.log()
    assert "sk-listed-" not in log and "sk-filed-" not in log


# --- secrets never logged -----------------------------------------------------------------------


@bounded(40)
async def test_secrets_from_the_environment_are_never_logged(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    env_key, env_token = "sk-from-env-0123456789", "env-admin-token-0123456789"
    monkeypatch.setenv("KVROUTER_API_KEYS", f" {env_key} , ")
    monkeypatch.setenv("KVROUTER_ADMIN_TOKEN", env_token)
    r = await fleet.router({"auth": {"api-keys": [KEY], "admin-token": TOKEN},
                            "log": {"level": "debug"}})
    url = r.url + "/v1/models"
    assert (await call("GET", url, headers={"x-api-key": env_key}))[0] == 200
    assert (await call("GET", url, headers={"x-api-key": KEY}))[0] == 200
    env_admin = {"Authorization": f"Bearer {env_token}"}
    assert (await call("GET", r.url + "/registered", headers=env_admin))[0] == 200
    assert_refused(await call("GET", r.url + "/registered", headers=ADMIN_H), 401)  # replaced
    for headers in ({"x-api-key": BAD}, {"Authorization": f"Bearer {TOKEN}x"}):
        assert (await call("GET", url, headers=headers))[0] == 401
    await r.stop()
    log = r.log()
    assert "auth is on" in log
    for secret in (KEY, env_key, TOKEN, env_token, BAD):
        assert secret not in log


@bounded(30)
async def test_config_errors_name_the_key_never_the_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def start(cfg: str) -> tuple[int, str]:
        path = tmp_path / "config.yaml"
        path.write_text(cfg)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvrouter", "--port", "0", "--config_path", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        return proc.returncode, (out + err).decode()

    cfg = tmp_path / "config.yaml"
    rc, out = await start('auth:\n  api-keys: ["sk-ok-0123456789", "sk secret with spaces"]\n')
    assert rc == 1
    assert f"config error: {cfg}: auth.api-keys: item 2 must be 1 to 512 visible ASCII" in out
    assert "with spaces" not in out
    rc, out = await start('auth:\n  register-allow-cidrs: ["10.0.0.1/8"]\n')
    assert (rc, f"config error: {cfg}: auth.register-allow-cidrs: invalid network '10.0.0.1/8'"
            in out) == (1, True), out
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-fine-0123456789\nsk-\u00e9-secret-key\n")
    rc, out = await start(f"auth:\n  api-keys-file: {keys}\n")
    assert rc == 1
    assert f"config error: {cfg}: auth.api-keys-file: {keys}: line 2: not ASCII" in out
    assert "secret-key" not in out
    monkeypatch.setenv("KVROUTER_ADMIN_TOKEN", "env secret token")
    rc, out = await start("{}\n")
    assert rc == 1
    assert "config error: $KVROUTER_ADMIN_TOKEN: auth.admin-token: must be 1 to 512" in out
    assert "secret token" not in out


def test_source_addresses_are_normalised() -> None:
    assert str(source_address("::ffff:10.0.0.5")) == "10.0.0.5"
    assert str(source_address("::FFFF:7f00:1")) == "127.0.0.1"
    assert source_address("localhost") is None
    assert names_source("10.0.0.5", "10.0.0.5")
    assert names_source("::ffff:10.0.0.5", "10.0.0.5")
    assert not names_source("localhost", "127.0.0.1")
    assert not names_source("10.0.0.6", "10.0.0.5")
