"""The router's HTTP application: the route table, error answers, access log, HTTP metrics,
and the ``serve`` entry point.

Every request ends in :meth:`App._finish` (the error answer if any, HTTP metrics, the access
line). Control-plane routes are coroutines that return their response; the inference routes
hand the request to its owner (:class:`kvrouter.server.inference.InferenceRequest`), which
completes it through ``Context.complete``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from kvrouter import errors
from kvrouter.backends.adapters import Adapters
from kvrouter.config import ConfigError, RouterConfig
from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.http.routing import METHOD_NOT_ALLOWED, Route, Routes
from kvrouter.http.server import NONE, HttpServer, Limits, Listener, shutdown, start_server
from kvrouter.http.sockets import connection_cap
from kvrouter.http.tls import server_context
from kvrouter.http.upstream import UpstreamPool
from kvrouter.instance import InstanceInfo, RegistrationError, Role, parse_registration_bytes
from kvrouter.metrics import CounterChild, HistogramChild
from kvrouter.prefix.tokenizer import TokenizerError
from kvrouter.registry import HEALTHY, Instance
from kvrouter.router import Router
from kvrouter.server import admin, auth, dashboard, inference
from kvrouter.server.accesslog import AccessLog
from kvrouter.server.context import Context
from kvrouter.server.forward import InstanceRefs
from kvrouter.server.queueing import Admission
from kvrouter.server.retry import RetryRatio

if TYPE_CHECKING:
    from kvrouter.shared import SharedState
    from kvrouter.shared.redis import RedisState
    from kvrouter.tracing import Tracer
    from kvrouter.workers.worker import WorkerContext

log = logging.getLogger("kvrouter.server")

INFERENCE = ("/v1/chat/completions", "/v1/completions")
#: successful answers that may be routine polls, logged at DEBUG (:meth:`App._routine`)
QUIET = frozenset({"/register", "/dashboard/state"})
MAX_HEARTBEATS = 1024             # registration bodies remembered per process
MAX_HEARTBEAT_BYTES = 8192        # a larger body is never taken for a heartbeat
GC_THRESHOLD = (20000, 20, 20)   # young collections every 20k allocations, not 700


class App:
    """The route table and the end of every request."""

    def __init__(self, router: Router, pool: UpstreamPool) -> None:
        self.router = router
        self.pool = pool
        roles = (Role.PREFILL, Role.DECODE) if router.splitwise else (Role.MIXED,)
        self.ctx = Context(router, pool, InstanceRefs(),
                           Adapters(router.cfg.server.disaggregate_info_format),
                           fast_views=router.load_only(roles), complete=self._complete,
                           retries=RetryRatio(router.cfg.server.retry_budget_percent),
                           admission=admission_queue(router), tracer=tracer(router))
        self.access = AccessLog()
        self._heartbeats: dict[bytes, Instance] = {}    # registration body → its instance
        self.max_body_mb = router.cfg.server.max_body_mb
        m = router.metrics
        self._http_requests = m.http_requests
        self._http_duration = m.http_duration
        self._http_children: dict[tuple[str, str, int],
                                  tuple[CounterChild, HistogramChild]] = {}
        self._errors = m.errors
        # None when auth.* configures nothing (fd-router's open router, with a warning)
        guard = self.auth = auth.build(router.cfg, m.client_requests,
                                       announce=router.shared.leader)
        routes = self.routes = Routes()
        for path in INFERENCE:
            routes.add("POST", path, inference.start, takes_over=True)
        routes.add("POST", "/register", admin.register if guard is None else
                   lambda ctx, req: admin.register(ctx, req, guard.register_source(req)))
        routes.add("GET", "/registered", admin.registered)
        routes.add("GET", "/registered_number", admin.registered_number)
        routes.add("GET", "/health", admin.health)
        routes.add("GET", "/health_generate", admin.health_generate)
        routes.add("GET", "/metrics", admin.metrics)
        routes.add("GET", "/v1/models", admin.models)
        routes.add("GET", "/decode_instances", admin.decode_instances)
        routes.add("POST", "/v1/abort_requests", admin.abort_requests)
        dash = dashboard.Dashboard()        # README "Operator's view"
        for path in dashboard.STATIC:
            routes.add("GET", path, dash.static)
        routes.add("GET", "/dashboard/state", dash.state)
        routes.add("POST", "/v1/route/explain", dash.explain)
        router.registry.on_removed.append(self._on_removed)

    def _on_removed(self, inst: Instance, reason: str) -> None:
        self.pool.forget(self.ctx.refs.pop(inst).target.key)

    def handle(self, req: Request) -> Awaitable[None] | None:
        """The server's handler: ``None`` when the route's handler took the request over
        (it completes it through :meth:`_complete`), else the coroutine answering it."""
        req.received = time.perf_counter()
        found = self.routes.resolve(req.method, req.path)
        if self.auth is not None and type(found) is Route:
            denied = self.auth.check(req, found.endpoint)
            if denied is not None:       # before the route's handler: nothing else runs
                self._finish(req, found.endpoint, self._error_response(denied))
                req.conn.handler_done()
                return None
        if type(found) is Route and found.takes_over and not req.too_large:
            try:
                found.handler(self.ctx, req, found.endpoint)
            except Exception as e:       # the owner completes what it took over, but for this
                self._finish(req, found.endpoint, self._failure_response(req, e))
                req.conn.handler_done()
            return None
        return self._answer(req, found)

    def _complete(self, req: Request, endpoint: str, error: errors.RouterError | None) -> None:
        """The end of a request a handler took over."""
        conn = req.conn
        if error is None and conn.closed and conn.mode == NONE:
            conn.handler_done()     # the client left before the answer: nothing to count
            return
        self._finish(req, endpoint, self._error_response(error) if error is not None else None)
        conn.handler_done()

    async def _answer(self, req: Request, found: Route | int) -> None:
        """Answer one request with a coroutine handler; never raises but for cancellation."""
        endpoint = "unmatched"
        resp: Response | None = None
        try:
            if isinstance(found, int):
                resp = (errors.error_response(
                    405, f"Method {req.method} not allowed on {req.path}",
                    "invalid_request_error", "method_not_allowed",
                    {"Allow": ", ".join(self.routes.allowed(req.path))})
                    if found == METHOD_NOT_ALLOWED else
                    errors.error_response(404, f"Not found: {req.path}",
                                          "invalid_request_error", "not_found"))
            else:
                endpoint = found.endpoint
                if req.too_large:
                    raise errors.too_large(self.max_body_mb)
                resp = await found.handler(self.ctx, req)
        except Exception as e:
            resp = self._failure_response(req, e)
        self._finish(req, endpoint, resp)

    def _failure_response(self, req: Request, e: Exception) -> Response:
        if isinstance(e, errors.RouterError):
            return self._error_response(e)
        log.error("unhandled error on %s %s", req.method, req.path, exc_info=e)
        return errors.error_response(*errors.INTERNAL_ERROR)

    def _error_response(self, e: errors.RouterError) -> Response:
        if e.kind:
            self._errors.labels(e.kind).inc()
        return errors.error_response(e.status, e.message, e.type, e.code, e.headers or None)

    def _finish(self, req: Request, endpoint: str, resp: Response | None) -> None:
        """Send ``resp`` (an error) if any; count the request; write its access line."""
        conn = req.conn
        if resp is not None:
            if conn.mode == NONE:
                conn.send_response(resp)
            else:
                conn.abort()  # an error after the answer started: the client sees it broken
        elapsed = time.perf_counter() - req.received
        status = conn.status
        key = (endpoint, req.method, status)
        children = self._http_children.get(key)
        if children is None:
            children = self._http_children[key] = (
                self._http_requests.labels(*key), self._http_duration.labels(*key[:2]))
        children[0].value += 1
        children[1].observe(elapsed)
        if self.access.enabled():
            if endpoint in QUIET and status == 200 and self._routine(req, endpoint):
                self.access.debug(req.method, req.path, req.version, status, elapsed, conn.peer)
            else:
                self.access.add(req.method, req.path, req.version, status, elapsed, conn.peer)

    def _routine(self, req: Request, endpoint: str) -> bool:
        """A poll that repeats all day, logged at DEBUG: the dashboard's state, and the
        heartbeat of an instance already registered with the same body (FastDeploy sends one
        every few seconds per instance). A new or changed registration stays at INFO (per
        worker process: each remembers the bodies it answered)."""
        if endpoint != "/register":
            return True
        beats, body = self._heartbeats, req.body
        inst = beats.get(body)
        registry = self.router.registry
        if inst is not None and registry.get(inst.identity) is inst:
            return True
        if len(body) <= MAX_HEARTBEAT_BYTES:
            try:
                info = parse_registration_bytes(body, splitwise=self.router.splitwise)
            except RegistrationError:
                return False
            known = registry.get(info.identity)
            if known is not None:
                if len(beats) >= MAX_HEARTBEATS:
                    beats.clear()
                beats[body] = known
        return False


def tracer(router: Router) -> Tracer | None:
    """The OpenTelemetry tracer when ``tracing.enabled`` (README "Tracing"); off, nothing of
    OpenTelemetry is imported."""
    cfg = router.cfg.tracing
    if not cfg.enabled:
        return None
    from kvrouter.tracing import Tracer

    made = Tracer(cfg)
    if router.shared.leader:
        log.info("tracing %s of new requests to %s as %s", f"{cfg.sample_ratio:.0%}",
                 made.target, cfg.service_name)
    return made


def admission_queue(router: Router) -> Admission | None:
    """The admission queue, when a headroom limit is set (``queue-size`` 0: nothing waits, a
    request without headroom is answered 429 at once); without one, requests skip it at no
    cost (an instance's own queue is then the only one, as in fd-router)."""
    sch = router.cfg.scheduler
    if not (sch.max_inflight_per_instance or sch.max_queued_prefill_tokens_per_instance):
        return None
    return Admission(router, Role.PREFILL if router.splitwise else Role.MIXED)


async def add_static_instances(router: Router, infos: list[InstanceInfo]) -> None:
    """register.yaml entries: probed once, concurrently; static, recovered by the health loop."""
    timeout = router.cfg.manager.health_check_timeout_secs
    results = await asyncio.gather(*(router.health.probe_url(i.url, timeout) for i in infos))
    for info, res in zip(infos, results, strict=True):
        inst = router.registry.add(info, static=True, healthy=res.ok)
        if inst.state != HEALTHY:
            log.warning("static instance %s is not healthy at startup (%s)", info.url, res.error)


async def run_server(cfg: RouterConfig, static: list[InstanceInfo],
                     worker: WorkerContext | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code. ``worker``: a
    :class:`kvrouter.workers.worker.WorkerContext` when this is one of several processes."""
    shared: SharedState | None = worker.shared if worker is not None else None
    replica: RedisState | None = None
    if cfg.state.redis_url:        # a router replica sharing its state through Redis
        from kvrouter.shared.redis import RedisState  # redis-py only when configured

        shared = replica = RedisState(cfg.state)
    try:
        router = Router(cfg, shared=shared)
        tls = server_context(cfg)      # HTTPS listeners; None: plain HTTP
    except TokenizerError as e:
        print(f"config error: {cfg.config_path}: scheduler.tokenizer-path: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:           # a TLS file changed since the configuration was loaded
        print(e, file=sys.stderr)
        return 1
    s = cfg.server
    pool = UpstreamPool(s.connect_timeout_secs, s.first_byte_timeout_secs,
                        s.stream_idle_timeout_secs, tls=router.transport.tls)
    app = App(router, pool)
    if worker is not None:
        worker.start()          # routing state shared with the sibling processes
    served: tuple[Listener, HttpServer] | None = None
    max_body = int(s.max_body_mb * (1 << 20))
    limits = Limits(max_url=s.max_url_bytes, max_head=s.max_header_bytes,
                    max_headers=s.max_headers, header_timeout=s.header_timeout_secs,
                    keepalive=s.keepalive_timeout_secs,
                    max_connections=connection_cap(s.max_connections))
    try:
        if replica is not None:
            try:
                await replica.open()   # reads the shared registry and recent prefix records
            except ConfigError as e:   # Redis unreachable, and not state.redis-optional
                print(e, file=sys.stderr)
                return 1
        await add_static_instances(router, static)
        try:
            if worker is None:
                served = await start_server(app.handle, s.host, s.port or 0, max_body=max_body,
                                            ssl=tls, limits=limits)
            else:
                served = await worker.listen(app.handle, max_body, ssl=tls, limits=limits)
        except OSError as e:
            print(f"Failed to start server on {s.host}:{s.port}: {e}", file=sys.stderr)
            return 1
        served[1].on_refused = router.metrics.connections_refused.inc
        port = served[0].sockets[0].getsockname()[1]
        shown = ("https://" if tls else "") + (f"[{s.host}]" if ":" in s.host else s.host)
        if worker is None:      # with workers, the supervisor prints it once all serve
            print(f"Starting server on {shown}:{port}", flush=True)
        log.info("Starting server on %s:%d (mode %s)", shown, port, router.mode)
        await router.start(leader=router.shared.leader)
        gc.collect()
        gc.freeze()          # startup objects are never scanned again
        gc.set_threshold(*GC_THRESHOLD)
        stop, hurry = asyncio.Event(), asyncio.Event()   # drain, then exit; exit at once
        signalled = asyncio.Event()

        def on_signal() -> None:
            """The first signal drains, a second one exits at once. The supervisor's stop
            message (worker mode), which may arrive before the same signal, sets only stop."""
            (hurry if signalled.is_set() else stop).set()
            signalled.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        if worker is not None:
            worker.ready(stop, hurry)
        await stop.wait()
        queue = app.ctx.admission
        await shutdown(*served, s.shutdown_grace_secs, hurry,
                       queue.drain if queue is not None else None)
        return 0
    finally:
        if served is not None:
            served[0].close()
            served[1].close_all()
        pool.close()
        app.access.flush()
        if app.ctx.tracer is not None:
            app.ctx.tracer.close()
        if worker is not None:
            worker.close()
        if replica is not None:
            await replica.aclose()
        await router.close()


def serve(cfg: RouterConfig, static: list[InstanceInfo] | None = None,
          worker: WorkerContext | None = None) -> int:
    """Run the router until SIGINT/SIGTERM (uvloop when available); returns the exit code."""
    main = run_server(cfg, static or [], worker)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
