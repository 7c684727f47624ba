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
from kvrouter.backends.fastdeploy import FastDeployAdapter
from kvrouter.config import RouterConfig
from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.http.routing import METHOD_NOT_ALLOWED, Route, Routes
from kvrouter.http.server import NONE, HttpServer, Listener, start_server
from kvrouter.http.upstream import UpstreamPool
from kvrouter.instance import InstanceInfo, Role
from kvrouter.prefix.tokenizer import TokenizerError
from kvrouter.registry import HEALTHY, Instance
from kvrouter.router import Router
from kvrouter.server import admin, inference
from kvrouter.server.accesslog import AccessLog
from kvrouter.server.context import Context
from kvrouter.server.forward import InstanceRefs

if TYPE_CHECKING:
    from kvrouter.workers.worker import WorkerContext

log = logging.getLogger("kvrouter.server")

INFERENCE = ("/v1/chat/completions", "/v1/completions")
GC_THRESHOLD = (20000, 20, 20)   # young collections every 20k allocations, not 700


class App:
    """The route table and the end of every request."""

    def __init__(self, router: Router, pool: UpstreamPool) -> None:
        self.router = router
        self.pool = pool
        roles = (Role.PREFILL, Role.DECODE) if router.splitwise else (Role.MIXED,)
        self.ctx = Context(router, pool, InstanceRefs(),
                           FastDeployAdapter(router.cfg.server.disaggregate_info_format),
                           fast_views=router.load_only(roles), complete=self._complete)
        self.access = AccessLog()
        self.max_body_mb = router.cfg.server.max_body_mb
        m = router.metrics
        self._http_requests = m.http_requests
        self._http_duration = m.http_duration
        self._http_children: dict[tuple[str, str, int], tuple] = {}
        self._errors = m.errors
        routes = self.routes = Routes()
        for path in INFERENCE:
            routes.add("POST", path, inference.start, takes_over=True)
        routes.add("POST", "/register", admin.register)
        routes.add("GET", "/registered", admin.registered)
        routes.add("GET", "/registered_number", admin.registered_number)
        routes.add("GET", "/health", admin.health)
        routes.add("GET", "/health_generate", admin.health_generate)
        routes.add("GET", "/metrics", admin.metrics)
        routes.add("GET", "/v1/models", admin.models)
        routes.add("GET", "/decode_instances", admin.decode_instances)
        routes.add("POST", "/v1/abort_requests", admin.abort_requests)
        router.registry.on_removed.append(self._on_removed)

    def _on_removed(self, inst: Instance, reason: str) -> None:
        self.pool.forget(self.ctx.refs.pop(inst).target.key)

    def handle(self, req: Request) -> Awaitable[None] | None:
        """The server's handler: ``None`` when the route's handler took the request over
        (it completes it through :meth:`_complete`), else the coroutine answering it."""
        req.received = time.perf_counter()
        found = self.routes.resolve(req.method, req.path)
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
        children[0].inc()
        children[1].observe(elapsed)
        if self.access.enabled():
            self.access.add(req.method, req.path, req.version, status, elapsed, conn.peer)


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
    try:
        router = Router(cfg, shared=worker.shared if worker is not None else None)
    except TokenizerError as e:
        print(f"config error: {cfg.config_path}: scheduler.tokenizer-path: {e}", file=sys.stderr)
        return 1
    s = cfg.server
    pool = UpstreamPool(s.connect_timeout_secs, s.first_byte_timeout_secs,
                        s.stream_idle_timeout_secs)
    app = App(router, pool)
    if worker is not None:
        worker.start()          # routing state shared with the sibling processes
    served: tuple[Listener, HttpServer] | None = None
    max_body = int(s.max_body_mb * (1 << 20))
    try:
        await add_static_instances(router, static)
        try:
            if worker is None:
                served = await start_server(app.handle, s.host, s.port or 0, max_body=max_body)
            else:
                served = await worker.listen(app.handle, max_body)
        except OSError as e:
            print(f"Failed to start server on {s.host}:{s.port}: {e}", file=sys.stderr)
            return 1
        port = served[0].sockets[0].getsockname()[1]
        shown = f"[{s.host}]" if ":" in s.host else s.host
        if worker is None:      # with workers, the supervisor prints it once all serve
            print(f"Starting server on {shown}:{port}", flush=True)
        log.info("Starting server on %s:%d (mode %s)", shown, port, router.mode)
        await router.start(leader=router.shared.leader)
        gc.collect()
        gc.freeze()          # startup objects are never scanned again
        gc.set_threshold(*GC_THRESHOLD)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if worker is not None:
            worker.ready(stop)
        await stop.wait()
        log.info("shutting down")
        return 0
    finally:
        if served is not None:
            served[0].close()
            served[1].close_all()
        pool.close()
        app.access.flush()
        if worker is not None:
            worker.close()
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
