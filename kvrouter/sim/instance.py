"""A simulated FastDeploy instance: the aiohttp HTTP surface of an instance
(docs/fastdeploy.md#instance-surface) over an :class:`~kvrouter.sim.engine.Engine`, plus the PD
connector and the registration heartbeat.

Designed to run inside a test's event loop::

    inst = SimInstance(SimConfig(role="mixed", port=0))
    await inst.start()            # inst.port / inst.url are set
    ...
    await inst.stop()

Requests without ``disaggregate_info`` on a prefill or decode instance are served like on a
mixed instance. A mixed instance ignores ``disaggregate_info``.

The engine is :class:`~kvrouter.sim.engine.RealtimeEngine` (the engine core of
:mod:`kvrouter.sim.core` in real time). On a prefill instance the core request has phase
``prefill`` and is released once the hand-off is sent; on a decode instance it has phase
``decode`` with the modelled KV transfer time
(:meth:`SimInstance.transfer_delay`). ``GET /sim/requests`` (API port) serves the per-request
ground truth for reports; the router never calls it.

``SimConfig.engine`` (``kvrouter sim --engine``) shows another engine's HTTP surface over the
same engine model, as /work/shared/research/real-engines.md describes it; vllm and sglang
also in the prefill and decode roles, with their PD hand-offs (:mod:`kvrouter.sim.pd`: the
decode pulls the prefill's KV from its connector port, for SGLang its bootstrap port):

=============  ============================  ============================  ==================
               vllm                          sglang                        llamacpp
=============  ============================  ============================  ==================
/metrics       ``vllm:*`` ``{engine,         ``sglang:*`` ``{model_name,   ``llamacpp:*``, no
               model_name}``                 tp_rank}``                    labels
/health        200 empty                     200 empty                     200 ``{"status":
                                                                           "ok"}``; else 503
                                                                           ``Loading model``
tokenize       ``/tokenize`` ``{"prompt"}``  ``/tokenize`` ``{"prompt"}``  ``/tokenize``
               or ``{"messages"}`` →         → ``{"tokens"}``              ``{"content"}`` →
               ``{"tokens"}``                                              ``{"tokens"}``
abort          ``/inference/v1/abort_        ``/abort_request``            none (404)
               requests`` ``{"request_ids"   ``{"rid"}`` or
               :[…]}``                       ``{"abort_all":true}``
stream usage   ``include_usage``             ``include_usage``             chat:
                                                                           ``include_usage``;
                                                                           completions: always;
               ``system_fingerprint`` on the                               ``timings`` on the
               last event                                                  last event
=============  ============================  ============================  ==================

None of them registers with a router (no heartbeat), answers 429 over ``max_concurrency``
(requests queue) or adds FastDeploy's space after the first chat event. Answer bodies keep
FastDeploy's fields. A vllm instance takes the request id from ``X-Request-Id`` over the
body's ``request_id``, as vLLM does; with ``kv_connector="P2pNcclConnector"`` its PD legs pair
by the addresses in that id (:mod:`kvrouter.sim.pd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from kvrouter.sim import protocol as P
from kvrouter.sim.config import Knobs, SimConfig, knobs_to_json, update_knobs
from kvrouter.sim.core.engine import EngineCore
from kvrouter.sim.engine import Engine, GenRequest, Phase, RealtimeEngine, TokenOut
from kvrouter.sim.metrics import HttpStats, render
from kvrouter.sim.pd import (
    DisaggError,
    DisaggTarget,
    HandoffAborted,
    HandoffError,
    HandoffStore,
    KvSource,
    block_key,
    p2p_key,
    p2p_peer,
    parse_disaggregate_info,
    parse_kv_source,
    parse_room,
    pull_kv,
    room_key,
    send_handoff,
)
from kvrouter.sim.tokens import render_chat, tokenize

log = logging.getLogger("kvrouter.sim")


@dataclass
class ReceivedRequest:
    """One request as the instance received it (API or metrics listener)."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes
    time: float            # time.time() at receipt
    listener: str = "api"  # "api" | "metrics"

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class HeartbeatRecord:
    time: float
    health_status: int | None     # status of the own /health probe (None: probe failed)
    register_status: int | None   # status of POST /register (None: not sent or failed)
    error: str | None = None


@dataclass
class _Parsed:
    request_id: str
    explicit_id: bool
    model: str
    prompt_ids: list[int]
    completion_ids: list[int]
    max_tokens: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool


class _BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = P.error_body(message, code=code, param=param)


class _Dropped(Exception):
    """The connection was reset on purpose (fault knob)."""


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _reset(request: web.Request) -> None:
    """Close the client connection abruptly (TCP RST)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=P.dumps(obj), content_type=P.JSON_CONTENT_TYPE)


def _json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; raises :class:`_BadRequest` (400) when it is
    not JSON or not an object."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"Invalid JSON format: {exc}") from exc
    if not isinstance(data, dict):
        raise _BadRequest("request body must be a JSON object")
    return data


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                           for x in value)


def build_engine(cfg: SimConfig) -> Engine:
    """The engine of an instance: the engine core, driven in real time."""
    return RealtimeEngine(EngineCore(cfg.engine_params(), seed=cfg.seed),
                          time_scale=cfg.time_scale, output_tokens=cfg.output_tokens)


def normalize_router_url(router: str) -> str:
    router = router.strip().rstrip("/")
    if not router.startswith(("http://", "https://")):
        router = "http://" + router
    return router


class SimInstance:
    def __init__(self, config: SimConfig | None = None, *, knobs: Knobs | None = None,
                 engine: Engine | None = None) -> None:
        self.config = config or SimConfig()
        self.knobs = knobs or Knobs()
        cfg = self.config
        self.core_params = cfg.engine_params()
        self.engine: Engine = engine or build_engine(cfg)
        self.handoffs = HandoffStore(ttl=cfg.handoff_ttl)
        # vLLM/SGLang prefill: finished prefills' KV, kept for the decode's pull (by key)
        self.kv_outbox = HandoffStore(ttl=cfg.handoff_ttl)
        self.engine_id = f"sim-{uuid.uuid4().hex[:12]}"   # vLLM's remote_engine_id
        self._next_block = 0     # vLLM remote_block_ids: never reused, so they name a transfer
        self.http_stats = HttpStats()
        self.received: list[ReceivedRequest] = []
        self.handoffs_received: list[dict[str, Any]] = []   # payloads POSTed to our connector
        self.handoffs_sent: list[dict[str, Any]] = []       # payloads we (as prefill) sent
        self.heartbeats: list[HeartbeatRecord] = []
        self.host = cfg.host
        self.port: int = cfg.port
        self.metrics_port: int | None = cfg.metrics_port
        self.connector_port: int | None = cfg.connector_port
        if self.connector_port is None and cfg.role != "mixed":
            self.connector_port = 0
        self.created = int(time.time())
        self.inference_count = 0      # ordinal of inference calls (1-based after increment)
        self.in_flight = 0            # inference calls being served (the max_concurrency count)
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{_bracket(self._local_host())}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return (f"{self.scheme}://{_bracket(self._local_host())}:"
                f"{self.metrics_port or self.port}/metrics")

    @property
    def advertise_host(self) -> str:
        return self.config.advertise_host or self._local_host()

    @property
    def running(self) -> bool:
        return bool(self._runners)

    def _local_host(self) -> str:
        if self.host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    async def start(self) -> None:
        """Bind the API (and metrics / connector) ports. Re-binds the same ports after
        :meth:`close_port` or :meth:`stop`."""
        if self._runners:
            return
        if self.config.load_delay > 0:
            await asyncio.sleep(self.config.load_delay)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            api = self._make_app("api")
            tls = self._tls()
            self.port = await self._bind(api, self.port, tls)
            if self.metrics_port is not None:
                self.metrics_port = await self._bind(self._make_app("metrics"), self.metrics_port,
                                                     tls)
            if self.connector_port is not None:
                self.connector_port = await self._bind(self._make_connector_app(),
                                                       self.connector_port)
        except BaseException:
            await self.close_port()
            raise
        log.info("sim %s instance listening on %s", self.config.role, self.url)

    def _tls(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ctx.load_verify_locations(cafile=cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def _bind(self, app: web.Application, port: int,
                    tls: ssl.SSLContext | None = None) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.config.shutdown_timeout)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port, reuse_address=True, ssl_context=tls)
        await site.start()
        return int(runner.addresses[0][1])

    async def close_port(self) -> None:
        """Stop listening (all ports); the object, its records and its heartbeat task stay."""
        runners, self._runners = self._runners, []
        self.engine.abort_all()
        self.handoffs.abort_all()
        self.kv_outbox.abort_all()
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()

    async def stop(self) -> None:
        await self.stop_heartbeat()
        await self.close_port()
        aclose = getattr(self.engine, "aclose", None)
        if aclose is not None:
            await aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SimInstance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ registration
    def registration_payload(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "role": cfg.role,
            "host_ip": (f"https://{_bracket(self.advertise_host)}" if cfg.tls_cert
                        else self.advertise_host),
            "port": self.port,
            "connector_port": self.connector_port,
            "engine_worker_queue_port": cfg.engine_worker_queue_port,
            "transfer_protocol": list(cfg.transfer_protocol),
            "rdma_ports": list(cfg.rdma_ports),
            "device_ids": list(cfg.device_ids),
            "metrics_port": self.metrics_port if self.metrics_port is not None else self.port,
            "tp_size": cfg.tp_size,
            "is_paused": cfg.is_paused,
            "version": cfg.version,
            "connected_decodes": list(cfg.connected_decodes),
        }

    @property
    def bootstrap_port(self) -> int | None:
        """An SGLang prefill's bootstrap server: its connector port."""
        if self.config.engine == "sglang" and self.config.role == "prefill":
            return self.connector_port
        return None

    @property
    def kv_zmq_address(self) -> str | None:
        """A P2pNcclConnector instance's ZMQ address (vLLM's ``kv_ip:kv_port``): its connector
        port."""
        if self.config.kv_connector != "P2pNcclConnector":
            return None
        return f"{_bracket(self.advertise_host)}:{self.connector_port}"

    def register_entry(self) -> dict[str, Any]:
        """This instance as a router's register.yaml entry (vLLM and SGLang never call
        ``/register``): role, address, engine, an SGLang prefill's ``bootstrap_port`` and a
        P2pNcclConnector instance's ``kv_zmq_address``."""
        entry: dict[str, Any] = {"role": self.config.role, "host_ip": self.advertise_host,
                                 "port": self.port, "engine": self.config.engine}
        if self.bootstrap_port is not None:
            entry["bootstrap_port"] = self.bootstrap_port
        if self.kv_zmq_address is not None:
            entry["kv_zmq_address"] = self.kv_zmq_address
        return entry

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def register_once(self, router_url: str) -> int:
        """One heartbeat (docs/fastdeploy.md#registration-and-heartbeat): GET the own ``/health``
        (3 s timeout); if 200, POST the payload to ``{router}/register`` (5 s timeout).
        Returns the POST status, or 0 when the probe failed (nothing POSTed) or the POST did
        not get a status."""
        self._check_registers()
        cfg = self.config
        session = self._client()
        rec = HeartbeatRecord(time=time.time(), health_status=None, register_status=None)
        self.heartbeats.append(rec)
        try:
            if cfg.tls_cert:   # over TLS it would need to trust its own CA (and certificate)
                rec.health_status = self.knobs.health_status
            else:
                probe_timeout = aiohttp.ClientTimeout(total=cfg.health_probe_timeout)
                async with session.get(self.url + "/health", timeout=probe_timeout) as r:
                    await r.read()
                    rec.health_status = r.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            rec.error = f"health probe failed: {exc!r}"
            return 0
        if rec.health_status != 200:
            rec.error = f"health probe answered {rec.health_status}"
            return 0
        url = normalize_router_url(router_url) + "/register"
        try:
            async with session.post(url, json=self.registration_payload(),
                                    timeout=aiohttp.ClientTimeout(total=cfg.register_timeout)) as r:
                await r.read()
                rec.register_status = r.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            rec.error = f"register failed: {exc!r}"
            log.warning("sim %s: register to %s failed: %r", self.url, url, exc)
            return 0
        if not 200 <= r.status < 300:
            log.warning("sim %s: register to %s answered %s", self.url, url, r.status)
        return r.status

    def start_heartbeat(self, router_url: str, period: float | None = None,
                        first_delay: float | None = None) -> asyncio.Task[None]:
        """Loop for the instance's life: sleep → :meth:`register_once`. The first sleep is
        ``first_delay`` (default: ``period``), like FastDeploy."""
        self._check_registers()
        if self._heartbeat_task is not None and not self._heartbeat_task.done():
            self._heartbeat_task.cancel()
        period = self.config.heartbeat_period if period is None else period
        delay = period if first_delay is None else first_delay

        async def loop() -> None:
            wait = delay
            while True:
                await asyncio.sleep(wait)
                try:
                    await self.register_once(router_url)
                except Exception:  # never let the loop die
                    log.exception("sim heartbeat failed")
                wait = period

        self._heartbeat_task = asyncio.get_running_loop().create_task(loop())
        return self._heartbeat_task

    def _check_registers(self) -> None:
        """Only FastDeploy instances register with a router; the others are listed in its
        register.yaml."""
        if self.config.engine != "fastdeploy":
            raise ValueError(f"a {self.config.engine} instance never calls /register")

    async def stop_heartbeat(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ test helpers
    def requests_to(self, path: str) -> list[ReceivedRequest]:
        return [r for r in self.received if r.path == path]

    @property
    def inference_requests(self) -> list[ReceivedRequest]:
        return [r for r in self.received if r.path in ("/v1/chat/completions", "/v1/completions")]

    def gauges(self) -> dict[str, float]:
        """The gauges of docs/fastdeploy.md#instance-surface as served on /metrics. Decode calls
        waiting for their hand-off count as waiting requests."""
        g = self.engine.gauges()
        pending = self.handoffs.waiting()
        if pending:
            waiting = g.get("fastdeploy:num_requests_waiting", 0.0)
            g["fastdeploy:num_requests_waiting"] = waiting + pending
        return g

    # ------------------------------------------------------------------ apps
    def _make_app(self, listener: str) -> web.Application:
        app = web.Application(middlewares=[self._middleware_for(listener)], client_max_size=1 << 30)
        if listener == "metrics":
            app.router.add_get("/metrics", self._metrics)
            return app
        engine = self.config.engine
        app.router.add_get("/health", self._health)
        if engine in ("fastdeploy", "vllm"):
            app.router.add_route("GET", "/ping", self._health)
            app.router.add_route("POST", "/ping", self._health)
        app.router.add_get("/v1/models", self._models)
        if self.metrics_port is None:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        if engine == "fastdeploy":
            app.router.add_post("/v1/abort_requests", self._abort)
        elif engine == "vllm":
            app.router.add_post("/inference/v1/abort_requests", self._abort_vllm)
        elif engine == "sglang":
            app.router.add_post("/abort_request", self._abort_sglang)
        # probes of peer routers, so sglang-router / vllm-router can
        # sit in front of the same instances
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self._server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self._model_info)
        app.router.add_get("/health_generate", self._health)
        app.router.add_get("/get_load", self._get_load)
        app.router.add_post("/v1/completions/render", self._render_completion)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/sim/requests", self._sim_requests)
        app.router.add_get("/sim/knobs", self._get_knobs)
        app.router.add_post("/sim/knobs", self._set_knobs)
        return app

    def _make_connector_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/handoff", self._handoff)
        app.router.add_post("/kv/pull", self._kv_pull)
        return app

    def _middleware_for(self, listener: str) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read()
            self.received.append(ReceivedRequest(
                method=request.method, path=request.path, query=request.query_string,
                headers=CIMultiDict(request.headers), body=body, time=time.time(),
                listener=listener))
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else request.path
            t0 = time.perf_counter()
            status = 500
            try:
                key = self.config.api_key
                if key and request.path.startswith("/v1") and \
                        request.headers.get("Authorization", "") != f"Bearer {key}":
                    status = 401
                    return _json({"error": "Unauthorized"}, 401)
                try:
                    resp = await handler(request)
                except web.HTTPNotFound:
                    status = 404
                    if self.config.engine == "llamacpp":
                        return _json({"error": {"code": 404, "message": "File Not Found",
                                                "type": "not_found_error"}}, 404)
                    return _json({"detail": "Not Found"}, 404)
                except web.HTTPMethodNotAllowed:
                    status = 405
                    return _json({"detail": "Method Not Allowed"}, 405)
                status = resp.status
                return resp
            finally:
                self.http_stats.observe(request.method, path, status, time.perf_counter() - t0)
        return middleware

    # ------------------------------------------------------------------ simple routes
    async def _health(self, request: web.Request) -> web.Response:
        k = self.knobs
        if k.health_delay > 0:
            await asyncio.sleep(k.health_delay)
        if self.config.engine == "llamacpp" and not k.health_body:
            if k.health_status == 200:
                return _json({"status": "ok"})
            return _json({"error": {"code": 503, "message": "Loading model",
                                    "type": "unavailable_error"}}, k.health_status)
        return web.Response(status=k.health_status, body=k.health_body)

    async def _models(self, request: web.Request) -> web.Response:
        cfg = self.config
        name = cfg.served_model_name
        owner = "FastDeploy" if cfg.engine == "fastdeploy" else cfg.engine
        card = {
            "id": name, "object": "model", "created": self.created, "owned_by": owner,
            "root": cfg.model_root or name, "parent": None, "max_model_len": cfg.max_model_len,
            "permission": [{
                "id": f"modelperm-{name}", "object": "model_permission", "created": self.created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}],
        }
        if cfg.engine == "llamacpp":    # llama-server also lists the model ollama-style
            return _json({"models": [{"name": name, "model": name, "type": "model"}],
                          "object": "list", "data": [card]})
        return _json({"object": "list", "data": [card]})

    # ------------------------------------------------------------------ peer-router probes
    async def _server_info(self, request: web.Request) -> web.Response:
        """SGLang-style ``/server_info``: SGLang's router reads the model id, ``dp_size``,
        ``tp_size`` and ``disaggregation_mode`` from it at worker registration."""
        cfg = self.config
        name = cfg.served_model_name
        return _json({
            "model_path": cfg.model_root or name, "served_model_name": name,
            "tokenizer_path": None, "dp_size": 1, "tp_size": cfg.tp_size,
            "disaggregation_mode": "null" if cfg.role == "mixed" else cfg.role,
            "disaggregation_bootstrap_port": None, "max_model_len": cfg.max_model_len,
            "page_size": self.core_params.block_size, "preset": self.core_params.name,
            "version": cfg.version or "sim",
        })

    async def _model_info(self, request: web.Request) -> web.Response:
        cfg = self.config
        return _json({"model_path": cfg.model_root or cfg.served_model_name,
                      "tokenizer_path": None, "is_generation": True, "model_type": "sim",
                      "architectures": ["SimForCausalLM"]})

    async def _get_load(self, request: web.Request) -> web.Response:
        """SGLang-style ``/get_load`` (power_of_two load monitors): requests in the engine and
        the KV tokens they use."""
        g = self.gauges()
        running = g.get("fastdeploy:num_requests_running", 0.0)
        waiting = g.get("fastdeploy:num_requests_waiting", 0.0)
        total = g.get("fastdeploy:max_gpu_block_num", 0.0)
        available = g.get("fastdeploy:available_gpu_block_num", total)
        tokens = max(0.0, total - available) * self.core_params.block_size
        return _json([{"dp_rank": 0, "num_reqs": int(running + waiting),
                       "num_waiting_reqs": int(waiting), "num_tokens": int(tokens)}])

    async def _render(self, request: web.Request, kind: str) -> web.Response:
        """vLLM-style ``/v1/{chat/}completions/render`` (vllm-router's cache_aware calls it on
        every worker for every request): the prompt's token ids, nothing generated."""
        try:
            req = self._parse(kind, _json_object(await request.read()))
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        return _json({"token_ids": req.prompt_ids, "count": len(req.prompt_ids),
                      "max_model_len": self.config.max_model_len})

    async def _render_completion(self, request: web.Request) -> web.Response:
        return await self._render(request, "completion")

    async def _render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, "chat")

    async def _tokenize(self, request: web.Request) -> web.Response:
        """``/tokenize`` with the same tokens as the inference path, in the engine's shape:

        * fastdeploy: ``prompt``, ``text`` or ``messages`` → ``{"tokens", "input_ids",
          "count", "max_model_len"}`` (a FastDeploy-style tokenizer service's ``input_ids``,
          and vllm-router's fallback when render is missing reads ``tokens``);
        * vllm: ``prompt`` or ``messages`` → ``{"count", "max_model_len", "tokens",
          "token_strs"}``, neither → 400;
        * sglang: ``prompt`` → ``{"tokens", "count", "max_model_len"}``, none → 400;
        * llamacpp: ``content`` → ``{"tokens"}`` (no ``content``: ``{"tokens":[]}``, 200).
        """
        try:
            data = _json_object(await request.read())
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        cfg = self.config
        engine = cfg.engine
        if engine == "llamacpp":
            content = data.get("content", "")
            ids = list(content) if _int_list(content) else \
                tokenize(str(content), cfg.chars_per_token) if content else []
            return _json({"tokens": ids})
        if engine != "sglang" and isinstance(data.get("messages"), list):
            ids = tokenize(render_chat(data["messages"]), cfg.chars_per_token)
        else:
            prompt = data.get("prompt") if engine != "fastdeploy" else \
                data.get("prompt", data.get("text", data.get("message", "")))
            if prompt is None:
                return _json(P.error_body("prompt is required", param="prompt",
                                          code="missing_required_parameter"), 400)
            ids = list(prompt) if _int_list(prompt) else tokenize(str(prompt), cfg.chars_per_token)
        answer: dict[str, Any] = {"tokens": ids, "count": len(ids),
                                  "max_model_len": cfg.max_model_len}
        if engine == "fastdeploy":
            answer["input_ids"] = ids
        elif engine == "vllm":
            answer["token_strs"] = None
        return _json(answer)

    async def _metrics(self, request: web.Request) -> web.Response:
        k = self.knobs
        if k.metrics_delay > 0:
            await asyncio.sleep(k.metrics_delay)
        text = render(self.gauges(), self.engine.stats, self.http_stats, k.metrics_override,
                      self.config.engine, self.config.served_model_name)
        return web.Response(status=k.metrics_status, body=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _get_knobs(self, request: web.Request) -> web.Response:
        return _json(knobs_to_json(self.knobs))

    async def _set_knobs(self, request: web.Request) -> web.Response:
        """Change fault knobs of a running instance (e.g. of a ``kvrouter sim`` process):
        ``{"health_status": 500}``, ``{"itl": 0.5}``, ``{"reset_before_response": true}``."""
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            update_knobs(self.knobs, changes)
        except KeyError as e:
            return _json({"error": f"unknown knob: {e.args[0]}"}, 400)
        except (ValueError, TypeError) as e:
            return _json({"error": str(e)}, 400)
        return _json(knobs_to_json(self.knobs))

    async def _sim_requests(self, request: web.Request) -> web.Response:
        """Ground truth the router never sees: per finished request, the prompt and cached
        tokens, queue time, TTFT and end-to-end time in *model* seconds (``*_real``: wall clock),
        preemptions and finish reason; plus the engine core's gauges. ``?request_id=`` filters."""
        truth = getattr(self.engine, "requests_truth", None)
        rows = truth() if truth is not None else []
        rid = request.query.get("request_id")
        if rid:
            rows = [r for r in rows if r.get("request_id") == rid]
        core = getattr(self.engine, "core", None)
        return _json({
            "role": self.config.role, "preset": self.core_params.name,
            "time_scale": self.config.time_scale, "block_size": self.core_params.block_size,
            "num_gpu_blocks": self.core_params.total_blocks,
            "core": core.gauges() if core is not None else None,
            "requests": rows,
        })

    def transfer_delay(self, protocol: str, tokens: int) -> float:
        """Modelled KV transfer to this decode, in model seconds: setup + tokens × KV bytes
        per token / link bandwidth (``transfer_*_per_token`` replaces the bandwidth term)."""
        cfg = self.config
        kv_bytes = self.core_params.kv_bytes_per_token
        if protocol == "ipc":
            per = cfg.transfer_ipc_per_token if cfg.transfer_ipc_per_token is not None \
                else kv_bytes / cfg.transfer_ipc_bw
            return cfg.transfer_ipc_base + per * tokens
        per = cfg.transfer_rdma_per_token if cfg.transfer_rdma_per_token is not None \
            else kv_bytes / cfg.transfer_rdma_bw
        return cfg.transfer_rdma_base + per * tokens

    async def _abort(self, request: web.Request) -> web.Response:
        try:
            data = _json_object(await request.read())
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        abort_all = data.get("abort_all") is True
        req_ids = data.get("req_ids")
        ids: list[str] = req_ids if isinstance(req_ids, list) \
            and all(isinstance(r, str) for r in req_ids) else []
        if not abort_all and not ids:
            return _json(P.error_body("req_ids must be a non-empty list of strings or abort_all "
                                      "must be true", code="missing_required_parameter",
                                      param="req_ids"), 400)
        return _json({"code": 200, "msg": "success", **self._abort_ids(ids, abort_all)})

    def _abort_ids(self, ids: list[str], abort_all: bool = False) -> dict[str, list]:
        """Abort running, waiting and hand-off-waiting requests by id (with or without the
        ``chatcmpl-``/``cmpl-`` prefix), or all: ``{"aborted": [...], "not_found": [...]}``."""
        if abort_all:
            done = self.engine.abort_all()
            waiting = self.handoffs.abort_all()
            not_found: list[str] = []
        else:
            done, waiting, not_found = [], [], []
            for given in ids:
                raw = given
                for prefix in ("chatcmpl-", "cmpl-"):
                    if raw.startswith(prefix):
                        raw = raw[len(prefix):]
                hit = self.engine.abort([given])
                if not hit and raw != given:
                    hit = self.engine.abort([raw])
                done.extend(hit)
                if self.handoffs.abort(given) or (raw != given and self.handoffs.abort(raw)):
                    waiting.append(raw)
                elif not hit:
                    not_found.append(given)
        aborted = [{"request_id": rid, "generated_tokens": n} for rid, n in done]
        aborted += [{"request_id": rid, "generated_tokens": 0} for rid in waiting]
        return {"aborted": aborted, "not_found": not_found}

    async def _abort_vllm(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /inference/v1/abort_requests`` ``{"request_ids": [...]}`` (the engine's
        own ids; no abort-all). The answer lists what was found (the sim's report)."""
        try:
            data = _json_object(await request.read())
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        ids = data.get("request_ids")
        if not isinstance(ids, list) or not all(isinstance(r, str) for r in ids):
            return _json(P.error_body("request_ids must be a list of strings",
                                      param="request_ids"), 400)
        return _json(self._abort_ids(ids))

    async def _abort_sglang(self, request: web.Request) -> web.Response:
        """SGLang's ``POST /abort_request`` ``{"rid": id}`` or ``{"abort_all": true}``: 200 with
        an empty body, found or not."""
        try:
            data = _json_object(await request.read())
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        rid = data.get("rid", "")
        if not isinstance(rid, str):
            return _json(P.error_body("rid must be a string", param="rid"), 400)
        self._abort_ids([rid] if rid else [], abort_all=data.get("abort_all") is True)
        return web.Response(status=200)

    async def _handoff(self, request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"code": 400, "msg": "invalid JSON"}, 400)
        if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str):
            return _json({"code": 400, "msg": "request_id required"}, 400)
        self.handoffs_received.append(payload)
        self.handoffs.deliver(payload)
        return _json({"code": 200, "msg": "success"})

    async def _kv_pull(self, request: web.Request) -> web.Response:
        """A vLLM/SGLang decode takes a prefill's KV (kvrouter.sim.pd): an SGLang room is
        awaited up to ``handoff_timeout`` (the prefill leg may still run), vLLM blocks must
        be there already; 404 when there is none."""
        try:
            data = _json_object(await request.read())
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        key = data.get("key")
        if not isinstance(key, str) or not key or len(key) > 1 << 20:
            return _json(P.error_body("key must be a non-empty string", param="key"), 400)
        wait = self.config.handoff_timeout if key.startswith("room:") else 0.0
        try:
            record = await self.kv_outbox.wait(key, wait)
        except (TimeoutError, HandoffAborted):
            return _json(P.error_body(f"no KV cache held for {key[:100]}", code="not_found"),
                         404)
        return _json(record)

    def _engine_pd(self, data: dict[str, Any],
                   req: _Parsed) -> tuple[str | None, dict[str, Any] | None, KvSource | None]:
        """A vLLM/SGLang PD leg: (the key a prefill keeps its KV under, fields added to its
        answer, the decode's KV source); all ``None`` for a request served whole."""
        cfg = self.config
        if cfg.kv_connector == "P2pNcclConnector":
            return self._p2p_pd(req.request_id)
        if cfg.role == "decode":
            assert cfg.num_gpu_blocks is not None   # resolved by SimConfig
            return None, None, parse_kv_source(cfg.engine, data, cfg.num_gpu_blocks)
        if cfg.engine == "sglang":
            room = data.get("bootstrap_room")
            return (None if room is None else room_key(parse_room(room))), None, None
        params = data.get("kv_transfer_params")
        if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
            return None, None, None
        assert cfg.block_size is not None
        n = max(1, -(-(len(req.prompt_ids) + len(req.completion_ids)) // cfg.block_size))
        ids = list(range(self._next_block, self._next_block + n))
        self._next_block += n
        return block_key(ids), {"kv_transfer_params": {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": ids,
            "remote_engine_id": self.engine_id, "remote_host": self.advertise_host,
            "remote_port": self.connector_port, "tp_size": cfg.tp_size}}, None

    def _p2p_pd(self, request_id: str) -> tuple[str | None, None, KvSource | None]:
        """A P2pNcclConnector leg (every request on its prefill or decode is one): the prefill
        keeps its KV under the id, the decode pulls it from the prefill the id names. The id
        must name this decode too: a real prefill pushes the KV to the decode it names (with
        ``send_type: PUT``), and this one would wait for it forever."""
        host, port = p2p_peer(request_id, prefill=True)
        if self.config.role == "prefill":
            return p2p_key(request_id), None, None
        if f"{_bracket(host)}:{port}" != self.kv_zmq_address:
            raise DisaggError(f"the request id names decode {_bracket(host)}:{port}, not this "
                              f"one ({self.kv_zmq_address})")
        host, port = p2p_peer(request_id, prefill=False)
        return None, None, KvSource(host, port, p2p_key(request_id), wait=False)

    # ------------------------------------------------------------------ inference
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "completion")

    async def _inference(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.inference_count += 1
        ordinal = self.inference_count
        k = self.knobs
        if k.header_delay > 0:
            await asyncio.sleep(k.header_delay)
        if k.reset_before_response:
            _reset(request)
            return web.Response(status=500)
        if k.reply_status is not None:
            body = k.reply_body
            if not isinstance(body, (bytes, str)):
                body = P.dumps(body if body is not None else {})
            raw_body = body if isinstance(body, bytes) else body.encode()
            try:                        # a text body that is not JSON is labelled as text
                orjson.loads(raw_body)
                ctype = P.JSON_CONTENT_TYPE
            except orjson.JSONDecodeError:
                ctype = "text/plain"
            return web.Response(status=k.reply_status, body=raw_body, content_type=ctype)
        if k.sse_script is not None:
            return await self._script(request, list(k.sse_script))
        raw = await request.read()
        try:
            data = _json_object(raw)
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        if self.in_flight >= self.config.max_concurrency and self.config.engine == "fastdeploy":
            return _json(P.too_many_requests_body(self.config.max_concurrency), 429)
        self.in_flight += 1
        try:
            return await self._serve(request, kind, data, raw, ordinal)
        finally:
            self.in_flight -= 1

    def _parse(self, kind: str, data: dict[str, Any]) -> _Parsed:
        cfg = self.config
        rid = data.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise _BadRequest("request_id must be a string", param="request_id")
        explicit = bool(rid)
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise _BadRequest("model must be a string", param="model")
        if cfg.strict_model and model not in (None, "", "default", cfg.served_model_name):
            raise _BadRequest(f"Unsupported model: {model}", code="model_not_support",
                              param="model")
        if _int_list(data.get("prompt_token_ids")) and data["prompt_token_ids"]:
            prompt_ids = list(data["prompt_token_ids"])
        elif kind == "chat":
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("messages is required and must be a non-empty list",
                                  code="missing_required_parameter", param="messages")
            prompt_ids = tokenize(render_chat(messages), cfg.chars_per_token)
        else:
            prompt = data.get("prompt")
            if isinstance(prompt, list) and prompt:
                if _int_list(prompt):
                    prompt_ids = list(prompt)
                elif _int_list(prompt[0]):
                    prompt_ids = list(prompt[0])
                elif isinstance(prompt[0], str):
                    prompt_ids = tokenize(prompt[0], cfg.chars_per_token)
                else:
                    raise _BadRequest("prompt must be a string or a list", param="prompt")
            elif isinstance(prompt, str):
                prompt_ids = tokenize(prompt, cfg.chars_per_token)
            else:
                raise _BadRequest("prompt is required", code="missing_required_parameter",
                                  param="prompt")
        completion_ids = data.get("completion_token_ids")
        if completion_ids is None:
            completion_ids = []
        elif not _int_list(completion_ids):
            raise _BadRequest("completion_token_ids must be a list of integers",
                              param="completion_token_ids")
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int)
                                       or isinstance(max_tokens, bool) or max_tokens < 1):
            raise _BadRequest("max_tokens must be a positive integer", param="max_tokens")
        n_prompt = len(prompt_ids) + len(completion_ids)
        if n_prompt >= cfg.max_model_len:
            raise _BadRequest(f"Input text is too long, input_ids_len ({n_prompt}) should be less "
                              f"than max_model_len ({cfg.max_model_len})",
                              code="context_length_exceeded")
        block_size, num_blocks = cfg.block_size, cfg.num_gpu_blocks
        assert block_size is not None and num_blocks is not None  # resolved by SimConfig
        if -(-(max(1, n_prompt) + 1) // block_size) > num_blocks:
            raise _BadRequest("prompt needs more KV blocks than the instance has",
                              code="context_length_exceeded")
        opts = data.get("stream_options")
        opts = opts if isinstance(opts, dict) else {}
        return _Parsed(
            request_id=rid or str(uuid.uuid4()), explicit_id=explicit,
            model=model or cfg.served_model_name, prompt_ids=prompt_ids,
            completion_ids=list(completion_ids), max_tokens=max_tokens,
            ignore_eos=data.get("ignore_eos") is True, stream=data.get("stream") is True,
            include_usage=opts.get("include_usage") is True,
            # vLLM adds per-event usage only with include_usage too
            continuous_usage=opts.get("continuous_usage_stats") is True
            and (cfg.engine != "vllm" or opts.get("include_usage") is True),
            return_token_ids=data.get("return_token_ids") is True)

    async def _serve(self, request: web.Request, kind: str, data: dict[str, Any], raw: bytes,
                     ordinal: int) -> web.StreamResponse:
        cfg, k = self.config, self.knobs
        try:
            req = self._parse(kind, data)
        except _BadRequest as exc:
            return _json(exc.body, exc.status)
        if cfg.engine == "vllm":     # vLLM's request id: the header's, over the body's
            req.request_id = request.headers.get("X-Request-Id", req.request_id)
        target: DisaggTarget | None = None
        phase: Phase = "full"
        info = data.get("disaggregate_info")
        if info is not None and cfg.role != "mixed":
            try:
                target = parse_disaggregate_info(info)
            except DisaggError as exc:
                return _json(P.error_body(f"invalid disaggregate_info: {exc}",
                                          param="disaggregate_info"), 400)
            if not req.explicit_id:
                return _json(P.error_body("request_id is required with disaggregate_info",
                                          code="missing_required_parameter",
                                          param="request_id"), 400)
            phase = "prefill" if cfg.role == "prefill" else "decode"
        publish: str | None = None
        extra: dict[str, Any] | None = None
        source: KvSource | None = None
        if cfg.engine in ("vllm", "sglang") and cfg.role != "mixed":
            try:
                publish, extra, source = self._engine_pd(data, req)
            except DisaggError as exc:
                return _json(P.error_body(f"invalid PD fields: {exc}"), 400)
            if publish is not None:
                phase = "prefill"
            elif source is not None:
                phase = "decode"
        ctx = P.ResponseContext(
            kind=kind, id=("chatcmpl-" if kind == "chat" else "cmpl-") + req.request_id,
            created=int(time.time()), model=req.model, prompt_token_ids=req.prompt_ids,
            return_token_ids=req.return_token_ids, include_usage=req.include_usage,
            continuous_usage=req.continuous_usage, extra_space=cfg.engine == "fastdeploy",
            usage_in_final=cfg.engine == "llamacpp" and kind == "completion",
            timings=cfg.engine == "llamacpp",
            fingerprint="vllm-sim" if cfg.engine == "vllm" else None)
        gen = GenRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_ids + req.completion_ids,
            max_tokens=req.max_tokens, ignore_eos=req.ignore_eos,
            start_index=len(req.completion_ids),
            phase=phase, ttft_override=k.ttft, itl_override=k.itl)
        if ordinal in k.pd_reschedule_on:
            gen.reschedule_after = max(1, k.pd_reschedule_after)

        resp: web.StreamResponse | None = None
        if k.first_byte_delay > 0:
            resp = await self._prepare(request, req.stream)
            await asyncio.sleep(k.first_byte_delay)

        if phase == "decode" and target is not None:
            timeout = k.handoff_timeout if k.handoff_timeout is not None else cfg.handoff_timeout
            try:
                handoff = await self.handoffs.wait(req.request_id, timeout)
            except TimeoutError:
                return await self._fail(request, resp, req.stream, 504, P.error_body(
                    f"decode timed out after {timeout}s waiting for the prefill hand-off of "
                    f"{req.request_id}",
                    type_="timeout_error", code="timeout"))
            except HandoffAborted:
                return await self._fail(request, resp, req.stream, 500, P.error_body(
                    f"request {req.request_id} aborted", type_="internal_error",
                    code="internal_error"))
            first = handoff.get("first_token")
            if isinstance(first, int) and not isinstance(first, bool):
                gen.first_token_id = first
            proto = handoff.get("transfer_protocol")
            proto = proto if proto in ("ipc", "rdma") else target.transfer_protocol
            gen.transfer_delay = self.transfer_delay(proto, len(gen.prompt_token_ids))
        elif source is not None:
            timeout = k.handoff_timeout if k.handoff_timeout is not None else cfg.handoff_timeout
            try:
                kv = await pull_kv(self._client(), source, timeout=timeout)
            except TimeoutError:
                return await self._fail(request, resp, req.stream, 504, P.error_body(
                    f"decode timed out after {timeout}s pulling the KV cache of "
                    f"{source.key[:100]}", type_="timeout_error", code="timeout"))
            except HandoffError as exc:
                return await self._fail(request, resp, req.stream, 500, P.error_body(
                    str(exc), type_="internal_error", code="connection_error"))
            if kv.get("prompt_tokens") != len(gen.prompt_token_ids):
                return await self._fail(request, resp, req.stream, 400, P.error_body(
                    f"the pulled KV cache holds {kv.get('prompt_tokens')!r} tokens, the prompt "
                    f"has {len(gen.prompt_token_ids)}"))
            first = kv.get("first_token")
            if isinstance(first, int) and not isinstance(first, bool):
                gen.first_token_id = first
            gen.transfer_delay = self.transfer_delay("rdma", len(gen.prompt_token_ids))

        if req.stream:
            return await self._stream(request, ctx, gen, target, resp, publish)
        return await self._non_stream(request, ctx, gen, target, resp, raw, publish, extra)

    async def _tokens(self, gen: GenRequest, target: DisaggTarget | None,
                      publish: str | None = None) -> AsyncGenerator[TokenOut, None]:
        """Engine tokens; a prefill hands the request to the decode before its first token
        (FastDeploy: pushed to ``target``; vLLM/SGLang: kept under ``publish`` for the pull)."""
        async with contextlib.aclosing(self.engine.generate(gen)) as tokens:
            async for tok in tokens:
                if publish is not None and gen.phase == "prefill":
                    self.kv_outbox.deliver({"request_id": publish, "first_token": tok.token_id,
                                            "prompt_tokens": len(gen.prompt_token_ids),
                                            "engine_id": self.engine_id})
                    publish = None
                    release = getattr(self.engine, "release_prefill", None)
                    if release is not None:
                        release(gen.request_id, gen)   # the KV is in the outbox now
                elif gen.phase == "decode" and self.config.engine != "fastdeploy":
                    # the pulled KV counts as cached, as vLLM counts a connector's tokens
                    gen.cached_tokens = len(gen.prompt_token_ids)
                if target is not None and gen.phase == "prefill":
                    payload = {"request_id": gen.request_id, "first_token": tok.token_id,
                               "prompt_tokens": len(gen.prompt_token_ids),
                               "transfer_protocol": target.transfer_protocol,
                               "prefill": f"{_bracket(self.advertise_host)}:{self.port}"}
                    try:
                        await send_handoff(self._client(), target, payload,
                                           timeout=self.config.handoff_connect_timeout)
                    except HandoffError:
                        self.engine.stats.inc("fastdeploy:send_cache_failed_num")
                        raise
                    self.handoffs_sent.append(payload)
                    target = None
                    release = getattr(self.engine, "release_prefill", None)
                    if release is not None:
                        release(gen.request_id, gen)   # the KV is with the decode now
                    if self.knobs.post_handoff_delay > 0:
                        await asyncio.sleep(self.knobs.post_handoff_delay)
                yield tok

    async def _prepare(self, request: web.Request, stream: bool,
                       content_length: int | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        if stream:
            resp.headers["Content-Type"] = P.SSE_CONTENT_TYPE
        else:
            resp.headers["Content-Type"] = P.JSON_CONTENT_TYPE
        if content_length is not None:
            resp.content_length = content_length
        await resp.prepare(request)
        return resp

    async def _fail(self, request: web.Request, resp: web.StreamResponse | None, stream: bool,
                    status: int, body: dict[str, Any]) -> web.StreamResponse:
        if resp is None:
            return _json(body, status)
        with contextlib.suppress(ConnectionError):
            if stream:
                err = body["error"]
                await resp.write(P.ResponseContext.stream_error(
                    err["message"], err.get("code") or "internal_error"))
                await resp.write(P.DONE)
            else:
                await resp.write(P.dumps(body))
            await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, ctx: P.ResponseContext, gen: GenRequest,
                      target: DisaggTarget | None, resp: web.StreamResponse | None,
                      publish: str | None = None) -> web.StreamResponse:
        k = self.knobs
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        events = 0
        n_prompt = len(gen.prompt_token_ids)

        async def emit(chunk: bytes) -> None:
            nonlocal resp, events
            if resp is None:
                resp = await self._prepare(request, True)
            await resp.write(chunk)
            events += 1
            if k.drop_after_events is not None and events >= k.drop_after_events:
                await asyncio.sleep(k.drop_delay)
                _reset(request)
                raise _Dropped

        first_sent = False
        final_sent = False
        n_out = 0
        try:
            async with contextlib.aclosing(self._tokens(gen, target, publish)) as tokens:
                async for tok in tokens:
                    if not first_sent:
                        first = ctx.first_chunk(P.usage(n_prompt, 0, gen.cached_tokens))
                        if first is not None:
                            await emit(first)
                        first_sent = True
                    n_out += 1
                    await emit(ctx.token_chunk(tok.text, tok.token_id, tok.finish_reason,
                                               round(loop.time() - t0, 6),
                                               P.usage(n_prompt, n_out, gen.cached_tokens)))
                    final_sent = tok.finish_reason is not None
            if not first_sent:
                first = ctx.first_chunk(P.usage(n_prompt, 0, gen.cached_tokens))
                if first is not None:
                    await emit(first)
            if not final_sent:
                await emit(ctx.token_chunk("", None, gen.finish_reason or "abort",
                                           round(loop.time() - t0, 6),
                                           P.usage(n_prompt, n_out, gen.cached_tokens)))
            if ctx.include_usage and not ctx.usage_in_final:
                await emit(ctx.usage_chunk(P.usage(n_prompt, n_out, gen.cached_tokens)))
            await emit(P.DONE)
            assert resp is not None
            await resp.write_eof()
            return resp
        except HandoffError as exc:
            return await self._fail(request, resp, True, 500, P.error_body(
                str(exc), type_="internal_error", code="connection_error"))
        except (_Dropped, ConnectionError):
            return resp if resp is not None else web.Response(status=500)

    async def _non_stream(self, request: web.Request, ctx: P.ResponseContext, gen: GenRequest,
                          target: DisaggTarget | None, resp: web.StreamResponse | None,
                          raw: bytes, publish: str | None = None,
                          extra: dict[str, Any] | None = None) -> web.StreamResponse:
        k = self.knobs
        texts: list[str] = []
        ids: list[int] = []
        try:
            async with contextlib.aclosing(self._tokens(gen, target, publish)) as tokens:
                async for tok in tokens:
                    texts.append(tok.text)
                    ids.append(tok.token_id)
        except HandoffError as exc:
            return await self._fail(request, resp, False, 500, P.error_body(
                str(exc), type_="internal_error", code="connection_error"))
        body = ctx.full_response("".join(texts), ids, gen.finish_reason or "abort",
                                 P.usage(len(gen.prompt_token_ids), len(ids), gen.cached_tokens))
        if extra:
            body.update(extra)
        if k.echo:
            body["echo"] = {"body": raw.decode("utf-8", "replace"),
                            "headers": {str(k): v for k, v in request.headers.items()}}
        payload = P.dumps(body)
        try:
            if k.drop_after_events is not None:
                if resp is None:
                    resp = await self._prepare(request, False, content_length=len(payload))
                await resp.write(payload[: len(payload) // 2])
                await asyncio.sleep(k.drop_delay)
                _reset(request)
                return resp
            if resp is not None:
                await resp.write(payload)
                await resp.write_eof()
                return resp
        except ConnectionError:
            return resp if resp is not None else web.Response(status=500)
        return web.Response(body=payload, content_type=P.JSON_CONTENT_TYPE)

    async def _script(self, request: web.Request, script: list[bytes]) -> web.StreamResponse:
        k = self.knobs
        resp = await self._prepare(request, True)
        try:
            for i, item in enumerate(script):
                if i and k.sse_script_delay > 0:
                    await asyncio.sleep(k.sse_script_delay)
                await resp.write(item)
                if k.drop_after_events is not None and i + 1 >= k.drop_after_events:
                    await asyncio.sleep(k.drop_delay)
                    _reset(request)
                    return resp
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp
