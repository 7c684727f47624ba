"""The router's HTTP application: routes, error answers, access log, HTTP metrics, and the
``serve`` entry point (contract §4, §5.9, §9.1, §9.3)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable

from kvrouter import errors
from kvrouter.config import RouterConfig
from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.http.routing import METHOD_NOT_ALLOWED, Routes
from kvrouter.http.server import NONE, start_server
from kvrouter.http.upstream import UpstreamPool
from kvrouter.instance import InstanceInfo, Role
from kvrouter.prefix.tokenizer import TokenizerError
from kvrouter.registry import HEALTHY
from kvrouter.router import Router
from kvrouter.server import admin, inference
from kvrouter.server.accesslog import AccessLog
from kvrouter.server.forward import InstanceRefs
from kvrouter.server.view import load_only

log = logging.getLogger("kvrouter.server")

INFERENCE = ("/v1/chat/completions", "/v1/completions")
GC_THRESHOLD = (20000, 20, 20)   # young collections every 20k allocations, not 700


class App:
    """Everything a handler needs: the router, the upstream pool, per-instance constants."""

    def __init__(self, router: Router, pool: UpstreamPool) -> None:
        self.router = router
        self.pool = pool
        self.refs = InstanceRefs()
        self.access = AccessLog()
        roles = (Role.PREFILL, Role.DECODE) if router.splitwise else (Role.MIXED,)
        self.fast_views = load_only(router, roles)   # no prompt rendering needed
        self.max_body_mb = router.cfg.server.max_body_mb
        m = router.metrics
        self._http_requests = m.http_requests
        self._http_duration = m.http_duration
        self._http_children: dict[tuple[str, str, int], tuple] = {}
        self._errors = m.errors
        routes = self.routes = Routes()
        for path in INFERENCE:
            routes.add("POST", path, inference.start)
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

    def _on_removed(self, inst, reason: str) -> None:
        self.pool.forget(self.refs.pop(inst).target.key)

    def handle(self, req: Request) -> Awaitable[None] | None:
        """The server's handler. An inference request that needs no await is driven by
        callbacks (``None`` is returned; :meth:`inference_done` completes it); everything
        else runs as a coroutine (:meth:`_answer`)."""
        req.received = time.perf_counter()
        found = self.routes.resolve(req.method, req.path)
        if type(found) is not int and found[0] is inference.start and not req.too_large:
            endpoint = found[1]
            try:
                pending = inference.start(self, req, endpoint)
            except Exception as e:
                self._finish(req, endpoint, self._failure_response(req, e))
                req.conn.handler_done()
                return None
            return None if pending is None else self._settle(req, endpoint, pending)
        return self._answer(req, found)

    async def _settle(self, req: Request, endpoint: str, pending: Awaitable[None]) -> None:
        resp: Response | None = None
        try:
            await pending
        except Exception as e:
            resp = self._failure_response(req, e)
        self._finish(req, endpoint, resp)

    def inference_done(self, req: Request, endpoint: str,
                       error: errors.RouterError | None) -> None:
        """Completion of an inference request driven by callbacks."""
        conn = req.conn
        if error is None and conn.closed and conn.mode == NONE:
            conn.handler_done()     # the client left before the answer: nothing to count
            return
        self._finish(req, endpoint, self._error_response(error) if error is not None else None)
        conn.handler_done()

    async def _answer(self, req: Request, found) -> None:
        """Answer one request; never raises but for cancellation."""
        endpoint = "unmatched"
        resp: Response | None = None
        try:
            if type(found) is int:
                resp = (errors.error_response(
                    405, f"Method {req.method} not allowed on {req.path}",
                    "invalid_request_error", "method_not_allowed",
                    {"Allow": ", ".join(self.routes.allowed(req.path))})
                    if found == METHOD_NOT_ALLOWED else
                    errors.error_response(404, f"Not found: {req.path}",
                                          "invalid_request_error", "not_found"))
            else:
                handler, endpoint = found
                if req.too_large:   # inference routes come here only for this
                    raise errors.too_large(self.max_body_mb)
                resp = await handler(self, req)
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
    for info, res in zip(infos, results):
        inst = router.registry.add(info, static=True, healthy=res.ok)
        if inst.state != HEALTHY:
            log.warning("static instance %s is not healthy at startup (%s)", info.url, res.error)


async def run_server(cfg: RouterConfig, static: list[InstanceInfo], worker=None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code. ``worker``: a
    :class:`kvrouter.workers.worker.WorkerContext` when this is one of several processes."""
    try:
        router = Router(cfg, index=worker.make_index(cfg) if worker is not None else None)
    except TokenizerError as e:
        print(f"config error: {cfg.config_path}: scheduler.tokenizer-path: {e}", file=sys.stderr)
        return 1
    s = cfg.server
    pool = UpstreamPool(s.connect_timeout_secs, s.first_byte_timeout_secs,
                        s.stream_idle_timeout_secs)
    app = App(router, pool)
    if worker is not None:
        worker.attach(app)      # shared routing state (kvrouter.workers)
    server = http = None
    try:
        await add_static_instances(router, static)
        try:
            if worker is None:
                server, http = await start_server(app.handle, s.host, s.port,
                                                  max_body=int(s.max_body_mb * (1 << 20)))
            else:
                server, http = await worker.listen(app.handle, int(s.max_body_mb * (1 << 20)))
        except OSError as e:
            print(f"Failed to start server on {s.host}:{s.port}: {e}", file=sys.stderr)
            return 1
        port = server.sockets[0].getsockname()[1]
        shown = f"[{s.host}]" if ":" in s.host else s.host
        if worker is None:      # with workers, the supervisor prints it once all serve
            print(f"Starting server on {shown}:{port}", flush=True)
        log.info("Starting server on %s:%d (mode %s)", shown, port, router.mode)
        await router.start(leader=worker is None or worker.leader)
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
        if server is not None:
            server.close()
            http.close_all()
        pool.close()
        app.access.flush()
        if worker is not None:
            worker.close()
        await router.close()


def serve(cfg: RouterConfig, static: list[InstanceInfo] | None = None, worker=None) -> int:
    """Run the router until SIGINT/SIGTERM (uvloop when available); returns the exit code."""
    main = run_server(cfg, static or [], worker)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
