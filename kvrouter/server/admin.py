"""Control-plane endpoints: registration, listings, health, models, decode instances, abort
fan-out and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from kvrouter.backends.base import loads
from kvrouter.backends.engines import DEFAULT_ENGINE
from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.instance import RegistrationError, Role, parse_registration_bytes
from kvrouter.registry import HEALTHY, Instance
from kvrouter.router import Router
from kvrouter.server.auth import forbidden, names_source
from kvrouter.server.context import Context

log = logging.getLogger("kvrouter.admin")


def _json(obj: object, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status)


def _msg(code: int, msg: str) -> Response:
    return _json({"code": code, "msg": msg}, status=code)


async def register(ctx: Context, req: Request, source: str | None = None) -> Response:
    """``POST /register``. ``source`` (auth.register-source-must-match): the connection's
    address, which an anonymous registration or heartbeat must name, so that it cannot add,
    pause or re-point another address; None: any address."""
    router = ctx.router
    try:
        info = parse_registration_bytes(req.body, splitwise=router.splitwise)
    except RegistrationError as e:
        log.error("Failed to register instance: %s", e.body.get("msg"))
        return _json(e.body, status=e.status)
    if source is not None and not names_source(info.host, source):
        log.warning("Refused registration of %s from %s: without the admin token an "
                    "instance may only register its own address", info.url, source)
        raise forbidden(f"Registration of {info.host} from {source or 'an unknown address'} "
                        "refused: without the admin token host_ip must be the source address")
    resp = await apply_registration(router, info)
    if resp.status == 200:
        await router.shared.registered()    # applied by every router sharing the registry
    return resp


async def apply_registration(router: Router, info) -> Response:
    """Store a registration (docs/fastdeploy.md#identity-and-re-registration): probe new and
    unhealthy instances, never healthy ones."""
    timeout = min(router.cfg.manager.health_check_timeout_secs, 3.0)
    inst = router.registry.get(info.identity)
    if inst is None:
        res = await router.health.probe_url(info.url, timeout)
        if not res.ok:
            log.error("Failed to register instance: %s service is not healthy (%s)",
                      info.url, res.error)
            return _msg(503, f"{info.url} service is not healthy")
        inst = router.registry.get(info.identity)  # a concurrent heartbeat may have won
        if inst is None:
            router.registry.add(info)
            log.info("Registered %s instance: %s", info.role.value, info.url)
            return _msg(200, "Register success")
    router.registry.update(inst, info)
    if inst.state == HEALTHY:
        return _msg(200, "Register success")
    if await router.health.probe(inst, timeout):
        return _msg(200, "Register success")
    return _msg(503, f"{info.url} service is not healthy")


def worker_record(inst: Instance) -> dict:
    i = inst.info
    return {
        "url": inst.url, "worker_type": i.role.value, "host_ip": i.host, "port": i.port,
        "connector_port": i.connector_port or "", "engine_worker_queue_port":
            i.engine_worker_queue_port or "", "transfer_protocol": list(i.transfer_protocol),
        "rdma_ports": list(i.rdma_ports), "device_ids": list(i.device_ids),
        "metrics_port": i.metrics_port or i.port, "tp_size": i.tp, "version": i.version,
        "is_paused": i.is_paused, "state": inst.state, "static": inst.static,
        "in_flight_requests": inst.load.requests, "in_flight_tokens": inst.load.tokens,
        "connected_decodes": list(i.connected_decodes), "engine": i.engine,
    }


async def registered(ctx: Context, req: Request) -> Response:
    router = ctx.router
    out: dict = {"code": 200, "msg": "success", "prefill": [], "decode": [], "mixed": [],
                 "unavailable": []}
    for inst in router.registry.all():
        key = inst.role.value if inst.routable else "unavailable"
        out[key].append(worker_record(inst))
    return _json(out)


async def registered_number(ctx: Context, req: Request) -> Response:
    return _json(ctx.router.registry.count_routable())


async def health(ctx: Context, req: Request) -> Response:
    """``GET /health``; 503 ``"draining"`` once a graceful shutdown began, so that load
    balancers stop sending new work here while the requests in progress finish."""
    router = ctx.router
    counts = router.registry.count_routable()
    ready = (counts["prefill"] > 0 and counts["decode"] > 0) if router.splitwise \
        else counts["mixed"] > 0
    draining = req.conn.server.draining
    return _json({"status": "draining" if draining else "ok", "mode": router.mode,
                  "routable": counts, "ready": ready, **router.shared.health_info()},
                 503 if draining else 200)


async def health_generate(ctx: Context, req: Request) -> Response:
    """Probe every known instance; observational only (no state change)."""
    router = ctx.router
    instances = router.registry.all()
    timeout = router.cfg.manager.health_check_timeout_secs
    results = await asyncio.gather(*(router.health.probe_url(i.url, timeout) for i in instances))
    rows = [{"url": i.url, "worker_type": i.role.value, "healthy": r.ok,
             "status_code": r.status_code, "latency_ms": round(r.latency_ms, 3),
             "error": r.error} for i, r in zip(instances, results, strict=True)]
    healthy = sum(r.ok for r in results)
    return _json({"code": 200, "msg": "Health check complete", "results": rows,
                  "healthy": healthy, "unhealthy": len(rows) - healthy})


async def models(ctx: Context, req: Request) -> Response:
    return _json({"object": "list", "data": ctx.router.models.union()})


async def decode_instances(ctx: Context, req: Request) -> Response:
    router = ctx.router
    if not router.splitwise:
        return _json([])
    version = req.query.get("version")
    out = []
    for inst in router.registry.candidates(Role.DECODE):
        i = inst.info
        if version is not None and i.version != version:
            continue
        out.append({
            "role": "DECODE", "host_ip": i.host, "port": i.port,
            "metrics_port": i.metrics_port or i.port, "connector_port": i.connector_port or "",
            "engine_worker_queue_port": i.engine_worker_queue_port or "",
            "transfer_protocol": list(i.transfer_protocol), "rdma_ports": list(i.rdma_ports),
            "device_ids": list(i.device_ids), "tp_size": i.tp, "version": i.version,
        })
    return _json(out)


def _abort_body_valid(body: object) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("abort_all") is True:
        return True
    ids = body.get("req_ids")
    return isinstance(ids, list) and bool(ids) and all(isinstance(x, str) for x in ids)


async def abort_requests(ctx: Context, req: Request) -> Response:
    """Forward the abort to every known instance concurrently, each the way its engine takes
    it, and report each answer.

    A FastDeploy instance gets the client's body unchanged (the router's abort API is
    FastDeploy's); another engine gets its own path and bodies (``AbortApi.bodies``; SGLang
    takes one id per call: sent one after the other, all within the one timeout). An engine
    without an abort endpoint, or one that cannot do what is asked (vLLM cannot abort all), is
    reported as ``skipped`` rather than sent a call it would answer 404."""
    router = ctx.router
    raw = req.body
    try:
        body = loads(raw)
    except ValueError:
        body = None
    if not _abort_body_valid(body):
        return _json({"error": {"message": "body must hold a non-empty string list 'req_ids' "
                                           "or 'abort_all': true",
                                "type": "invalid_request_error", "code": "invalid_value"}}, 400)
    assert isinstance(body, dict)
    abort_all = body.get("abort_all") is True
    req_ids: list[str] = [] if abort_all else body["req_ids"]
    headers = {"Content-Type": "application/json"}
    if auth := req.header_str(b"authorization"):
        headers["Authorization"] = auth
    timeout = router.cfg.manager.health_check_timeout_secs
    instances = router.registry.all()

    async def one(inst: Instance) -> dict:
        row: dict[str, object] = {"url": inst.url, "worker_type": inst.role.value,
                                  "engine": inst.info.engine, "status_code": None,
                                  "body": None, "error": None}
        engine = await router.scraper.detect(inst)
        if engine is None:
            row["error"] = "engine not recognised: its /metrics did not answer"
            return row
        row["engine"] = engine.name
        api = engine.abort
        if api is None:
            row["skipped"] = "no abort endpoint"
            return row
        calls = [raw] if engine.name == DEFAULT_ENGINE else \
            [orjson.dumps(b) for b in api.bodies(req_ids, abort_all)]
        if not calls:
            row["skipped"] = "cannot abort all requests"
            return row
        try:
            async with asyncio.timeout(timeout):
                for call in calls:
                    status, data = await router.transport.get(
                        inst.url + api.path, timeout, headers, method="POST", body=call)
                    if not 200 <= status < 300:
                        break
        except Exception as e:
            row["error"] = str(e) or type(e).__name__
            return row
        row["status_code"] = status
        try:
            row["body"] = loads(data)
        except ValueError:
            row["body"] = data.decode("utf-8", "replace")
        return row

    rows = await asyncio.gather(*(one(i) for i in instances))
    return _json({"code": 200, "msg": "success", "results": list(rows)})


async def metrics(ctx: Context, req: Request) -> Response:
    router = ctx.router
    return Response(await router.shared.render_metrics(router.metrics),
                    content_type=CONTENT_TYPE_LATEST)
