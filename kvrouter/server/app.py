"""The HTTP server: routes, error middleware, access log, and the ``serve`` entry point."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from aiohttp import web

from kvrouter import errors
from kvrouter.config import RouterConfig
from kvrouter.instance import InstanceInfo
from kvrouter.prefix.tokenizer import TokenizerError
from kvrouter.registry import HEALTHY
from kvrouter.router import Router
from kvrouter.server import admin, inference
from kvrouter.server.inference import ROUTER_KEY

log = logging.getLogger("kvrouter.server")
access_log = logging.getLogger("kvrouter.access")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """OpenAI-style JSON for router errors, 404/405 and crashes; access log; HTTP metrics."""
    started = time.perf_counter()
    router: Router = request.app[ROUTER_KEY]
    try:
        resp = await handler(request)
    except errors.RouterError as e:
        if e.kind:
            router.metrics.errors.labels(e.kind).inc()
        resp = errors.error_response(e.status, e.message, e.type, e.code, e.headers or None)
    except web.HTTPNotFound:
        resp = errors.error_response(404, f"Not found: {request.path}", "invalid_request_error",
                                     "not_found")
    except web.HTTPMethodNotAllowed:
        resp = errors.error_response(405, f"Method {request.method} not allowed on "
                                     f"{request.path}", "invalid_request_error",
                                     "method_not_allowed")
    except web.HTTPException as e:
        resp = errors.error_response(e.status, e.reason, "invalid_request_error", "http_error")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        resp = errors.error_response(*errors.INTERNAL_ERROR)
    elapsed = time.perf_counter() - started
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    m = router.metrics
    m.http_requests.labels(endpoint, request.method, str(resp.status)).inc()
    m.http_duration.labels(endpoint, request.method).observe(elapsed)
    access_log.info("[%s] %s HTTP/%d.%d %d %.3fms %s", request.method, request.path,
                    request.version.major, request.version.minor, resp.status, elapsed * 1e3,
                    request.remote)
    return resp


def build_app(router: Router) -> web.Application:
    max_body = int(router.cfg.server.max_body_mb * (1 << 20))
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/chat/completions", inference.handle)
    app.router.add_post("/v1/completions", inference.handle)
    app.router.add_post("/register", admin.register)
    app.router.add_get("/registered", admin.registered)
    app.router.add_get("/registered_number", admin.registered_number)
    app.router.add_get("/health", admin.health)
    app.router.add_get("/health_generate", admin.health_generate)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/v1/models", admin.models)
    app.router.add_get("/decode_instances", admin.decode_instances)
    app.router.add_post("/v1/abort_requests", admin.abort_requests)
    return app


async def add_static_instances(router: Router, infos: list[InstanceInfo]) -> None:
    """register.yaml entries: probed once, concurrently; static, recovered by the health loop."""
    timeout = router.cfg.manager.health_check_timeout_secs
    results = await asyncio.gather(*(router.health.probe_url(i.url, timeout) for i in infos))
    for info, res in zip(infos, results):
        inst = router.registry.add(info, static=True, healthy=res.ok)
        if inst.state != HEALTHY:
            log.warning("static instance %s is not healthy at startup (%s)", info.url, res.error)


async def run_server(cfg: RouterConfig, static: list[InstanceInfo]) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    try:
        router = Router(cfg)
    except TokenizerError as e:
        print(f"config error: {cfg.config_path}: scheduler.tokenizer-path: {e}", file=sys.stderr)
        return 1
    runner: web.AppRunner | None = None
    try:
        await add_static_instances(router, static)
        runner = web.AppRunner(build_app(router), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, cfg.server.host, cfg.server.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            print(f"Failed to start server on {cfg.server.host}:{cfg.server.port}: {e}",
                  file=sys.stderr)
            return 1
        port = site._server.sockets[0].getsockname()[1]
        host = cfg.server.host
        shown = f"[{host}]" if ":" in host else host
        print(f"Starting server on {shown}:{port}", flush=True)
        log.info("Starting server on %s:%d (mode %s)", shown, port, router.mode)
        await router.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        await router.close()


def serve(cfg: RouterConfig, static: list[InstanceInfo] | None = None) -> int:
    """Run the router until SIGINT/SIGTERM (uvloop when available); returns the exit code."""
    main = run_server(cfg, static or [])
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
