"""TLS: HTTPS on the router's listening sockets (``server.tls-*``) and TLS, mutual or not, to
instances registered as ``https://`` (``manager.tls-*``), over real sockets on 127.0.0.1 with
a throwaway CA made at test time (trustme)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme

from harness import bounded, wait_for
from kvrouter.config import ConfigError, load_config

CHAT = {"model": "default", "stream": True, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello over TLS"}]}


@dataclass
class Pki:
    """PEM files: the CA, a server certificate for 127.0.0.1, a client certificate."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def trusting(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("router.client.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, leaf in (("server", server), ("client", client)):
        (d / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key",
               d / "client.pem", d / "client.key")


def https_url(router) -> str:
    # the startup line reads ``Starting server on https://<host>:<port>``: keep the port only
    return f"https://127.0.0.1:{router.port}"


async def register(base: str, inst, ctx: ssl.SSLContext | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/register", json=inst.registration_payload(), ssl=ctx) as r:
            return r.status, await r.json(content_type=None)


async def stream_chat(base: str, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/chat/completions", json=CHAT, ssl=ctx) as r:
            return r.status, await r.read()


# --- inbound: the router serves HTTPS -------------------------------------------------------

@bounded(60)
async def test_router_serves_https_only(router_factory, sims, pki):
    router = await router_factory({"server": {"host": "127.0.0.1",
                                              "tls-cert-path": str(pki.server_cert),
                                              "tls-key-path": str(pki.server_key)}})
    assert f"Starting server on https://127.0.0.1:{router.port}" in router.log()
    base, ctx = https_url(router), pki.trusting()
    (inst,) = await sims(1)
    assert (await register(base, inst, ctx))[0] == 200

    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/health", ssl=ctx) as r:
            assert r.status == 200
            assert (await r.json())["ready"] is True
    status, body = await stream_chat(base, ctx)
    assert status == 200
    assert body.count(b"data: ") > 2 and body.rstrip().endswith(b"data: [DONE]")
    assert len(inst.inference_requests) == 1

    # ALPN: the router speaks HTTP/1.1 only, and says so
    alpn = pki.trusting()
    alpn.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("127.0.0.1", router.port, ssl=alpn)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()

    # a plain-HTTP client gets no answer, only a closed connection
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        got = await asyncio.wait_for(reader.read(1024), 10)
    except ConnectionResetError:
        got = b""
    writer.close()
    assert not got.startswith(b"HTTP/")
    # a client that does not trust the certificate fails its handshake
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with aiohttp.ClientSession() as s:
            await s.get(base + "/health")
    # neither failed handshake left a traceback or an error line, and the router still serves
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/health", ssl=ctx) as r:
            assert r.status == 200
    log = router.log()
    assert "Traceback" not in log and " ERROR " not in log


@bounded(60)
async def test_https_with_worker_processes(router_factory, pki):
    router = await router_factory({"server": {"host": "127.0.0.1", "workers": 2,
                                              "tls-cert-path": str(pki.server_cert),
                                              "tls-key-path": str(pki.server_key)}})
    ctx = pki.trusting()
    # every connection is new, so the kernel spreads them over both workers: each must serve TLS
    for _ in range(8):
        async with aiohttp.ClientSession() as s:
            async with s.get(https_url(router) + "/health", ssl=ctx) as r:
                assert r.status == 200
                assert (await r.json())["worker"]["workers"] == 2


# --- outbound: https:// instances -----------------------------------------------------------

@bounded(60)
async def test_mutual_tls_to_instance(router_factory, sim, pki):
    inst = await sim(time_scale=0.01, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                     tls_client_ca=str(pki.ca))
    assert inst.url.startswith("https://")
    router = await router_factory({"manager": {"tls-ca": str(pki.ca),
                                               "tls-client-cert": str(pki.client_cert),
                                               "tls-client-key": str(pki.client_key)}})
    status, body = await register(router.url, inst)
    assert (status, body["msg"]) == (200, "Register success")     # the probe passed over mTLS

    async def models() -> list:
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/v1/models") as r:
                return (await r.json())["data"]

    assert [m["id"] for m in await wait_for(models)] == ["default"]   # control plane: aiohttp
    status, body = await stream_chat(router.url)                       # data plane: the pool
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert len(inst.inference_requests) == 1


@bounded(60)
async def test_instance_requiring_a_client_certificate_the_router_lacks(router_factory, sim,
                                                                        pki):
    inst = await sim(time_scale=0.01, tls_cert=str(pki.server_cert),
                     tls_key=str(pki.server_key))
    router = await router_factory({"manager": {"tls-ca": str(pki.ca)}})
    status, _ = await register(router.url, inst)
    assert status == 200              # verified against manager.tls-ca, not the system CAs
    # the instance comes back on the same port and now asks for a client certificate
    await inst.close_port()
    inst.config.tls_client_ca = str(pki.ca)
    await inst.start()
    async with aiohttp.ClientSession() as s:
        async with s.post(router.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 502
            error = (await r.json())["error"]
    assert (error["type"], error["code"]) == ("backend_error", "backend_connection_error")
    assert inst.inference_requests == []
    # the connect failure triggered a probe, which fails the same way (control plane)

    async def unavailable() -> bool:
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/registered") as r:
                return [i["url"] for i in (await r.json())["unavailable"]] == [inst.url]

    await wait_for(unavailable)
    status, body = await register(router.url, inst)      # unhealthy: probed again, fails
    assert status == 503 and body["msg"].endswith("service is not healthy")


# --- configuration ------------------------------------------------------------------------

def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\n" + text)
    return str(path)


def config_error(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_tls_files_resolve_from_the_config_directory(tmp_path, pki, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_dir = pki.dir          # relative names, found next to the config file
    path = cfg_dir / "tls-config.yaml"
    path.write_text("server:\n  port: 9000\n  tls-cert-path: server.pem\n"
                    "  tls-key-path: server.key\nmanager:\n  tls-ca: ca.pem\n"
                    "  tls-client-cert: client.pem\n  tls-client-key: client.key\n")
    cfg, _ = load_config(str(path))
    assert cfg.server.tls_cert_path == str(pki.server_cert)
    assert cfg.manager.tls_client_key == str(pki.client_key)


@pytest.mark.parametrize("text, key, reason", [
    ("  tls-cert-path: {cert}\n", "server.tls-key-path", "required with server.tls-cert-path"),
    ("  tls-key-path: {key}\n", "server.tls-cert-path", "required with server.tls-key-path"),
    ("  tls-cert-path: nope.pem\n  tls-key-path: {key}\n", "server.tls-cert-path",
     "file not found: nope.pem"),
    ("  tls-cert-path: {key}\n  tls-key-path: {key}\n", "server.tls-cert-path",
     "not a PEM certificate"),
    ("  tls-cert-path: {cert}\n  tls-key-path: {client_key}\n", "server.tls-key-path",
     "not a PEM private key matching server.tls-cert-path"),
    ("manager:\n  tls-ca: {key}\n", "manager.tls-ca", "not a PEM CA bundle"),
    ("manager:\n  tls-client-key: {client_key}\n", "manager.tls-client-cert",
     "required with manager.tls-client-key"),
    ("manager:\n  tls-client-cert: {client_cert}\n  tls-client-key: {key}\n",
     "manager.tls-client-key", "not a PEM private key matching manager.tls-client-cert"),
])
def test_bad_tls_configuration_names_the_key(tmp_path, pki, text, key, reason):
    path = write_config(tmp_path, text.format(cert=pki.server_cert, key=pki.server_key,
                                              client_cert=pki.client_cert,
                                              client_key=pki.client_key))
    message = config_error(path)
    assert message.startswith(f"config error: {path}: {key}: {reason}"), message
