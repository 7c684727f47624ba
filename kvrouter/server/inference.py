"""``POST /v1/chat/completions`` and ``/v1/completions``: parse, choose, dispatch, relay, account.

Mixed mode is here (contract §1.3, §5.3); PD mode is in :mod:`kvrouter.server.pd`.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from kvrouter import errors
from kvrouter.backends.fastdeploy import loads
from kvrouter.instance import Role
from kvrouter.router import Router
from kvrouter.server import pd
from kvrouter.server.accounting import account
from kvrouter.server.relay import relay
from kvrouter.server.transport import (BodyFailed, ConnectFailed, FirstByteTimeout,
                                       forward_headers)

log = logging.getLogger("kvrouter.inference")

ROUTER_KEY = web.AppKey("router", Router)


async def read_json_object(request: web.Request, max_mb: float) -> tuple[bytes, dict]:
    """The raw body and its parsed JSON object, or a 400/413 :class:`RouterError`."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.too_large(max_mb) from None
    except Exception as e:  # noqa: BLE001 - a broken upload
        raise errors.invalid_body(str(e)) from None
    try:
        body = loads(raw)
    except ValueError as e:
        raise errors.invalid_json(str(e) or "empty body") from None
    if not isinstance(body, dict):
        raise errors.invalid_json("the body must be a JSON object")
    return raw, body


async def handle(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    received = time.perf_counter()
    raw, body = await read_json_object(request, router.cfg.server.max_body_mb)
    endpoint = request.match_info.route.resource.canonical
    if router.splitwise:
        return await pd.handle(router, request, body, endpoint, received)
    return await handle_mixed(router, request, raw, body, endpoint, received)


async def handle_mixed(router: Router, request: web.Request, raw: bytes, body: dict,
                       endpoint: str, received: float) -> web.StreamResponse:
    view = await router.request_view(body, endpoint, (Role.MIXED,))
    retries = router.cfg.server.connect_retries
    excluded: set[str] = set()
    last_error: errors.RouterError | None = None
    for attempt in range(retries + 1):
        try:
            inst = router.select(Role.MIXED, view, excluded).instance
        except errors.RouterError:
            if last_error is not None:
                raise last_error from None
            raise
        tag = {"X-Router-Mixed-URL": inst.url}
        lease = inst.load.acquire(view.token_estimate)
        headers = forward_headers(request.headers, inst.identity)
        try:
            up, first = await router.transport.open(inst.url + request.path_qs, raw, headers)
        except ConnectFailed as e:
            lease.release()
            excluded.add(inst.identity)
            router.health.probe_soon(inst)
            router.metrics.errors.labels("connect_failed").inc()
            last_error = errors.connect_failed(inst.url, str(e))
            last_error.headers = tag
            if attempt < retries:
                router.metrics.retries.labels("connect").inc()
            continue
        except (FirstByteTimeout, BodyFailed) as e:
            lease.release()
            err = (errors.first_byte_timeout(inst.url, router.cfg.server.first_byte_timeout_secs)
                   if isinstance(e, FirstByteTimeout) else errors.connect_failed(inst.url, str(e)))
            err.headers = tag
            raise err from None
        try:
            lease.release_tokens()
            resp, outcome = await relay(request, up, first, tag)
        finally:
            lease.release()
        account(router, endpoint, received, resp.status, outcome, body, mixed=inst)
        return resp
    assert last_error is not None
    raise last_error
