"""``POST /v1/chat/completions`` and ``/v1/completions``: parse, choose, dispatch, relay, account.

Mixed mode is here (contract §1.3, §5.3); PD mode is in :mod:`kvrouter.server.pd`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from kvrouter import errors
from kvrouter.backends.fastdeploy import loads
from kvrouter.http.request import Request
from kvrouter.http.upstream import BodyFailed, ConnectFailed, FirstByteTimeout
from kvrouter.instance import Role
from kvrouter.server import pd
from kvrouter.server.accounting import account
from kvrouter.server.forward import forward_block, upstream_request
from kvrouter.server.relay import relay
from kvrouter.server.view import fast_view

if TYPE_CHECKING:
    from kvrouter.server.app import App

log = logging.getLogger("kvrouter.inference")

MIXED = (Role.MIXED,)


def parse_json_object(raw: bytes) -> dict:
    """The parsed JSON object of a request body, or a 400 :class:`RouterError`."""
    try:
        body = loads(raw)
    except ValueError as e:
        raise errors.invalid_json(str(e) or "empty body") from None
    if not isinstance(body, dict):
        raise errors.invalid_json("the body must be a JSON object")
    return body


def handle(app: App, req: Request, endpoint: str) -> Awaitable[None]:
    """Parse the body (a 400 is raised here) and return the mode's handler coroutine."""
    raw = req.body
    body = parse_json_object(raw)
    if app.router.splitwise:
        return pd.handle(app, req, body, endpoint, req.received)
    return handle_mixed(app, req, raw, body, endpoint, req.received)


async def handle_mixed(app: App, req: Request, raw: bytes, body: dict, endpoint: str,
                       received: float) -> None:
    router = app.router
    view = fast_view(body, endpoint) if app.fast_views else None
    if view is None:
        view = await router.request_view(body, endpoint, MIXED)
    retries = router.cfg.server.connect_retries
    excluded: set[str] = set()
    last_error: errors.RouterError | None = None
    headers = forward_block(req)
    for attempt in range(retries + 1):
        try:
            inst = router.select(Role.MIXED, view, excluded).instance
        except errors.RouterError:
            if last_error is not None:
                raise last_error from None
            raise
        ref = app.refs.get(inst)
        lease = inst.load.acquire(view.token_estimate)
        try:
            up, first = await app.pool.open(ref.target, upstream_request(req, ref.target, headers,
                                                                         raw))
        except ConnectFailed as e:
            lease.release()
            excluded.add(ref.identity)
            router.health.probe_soon(inst)
            router.metrics.errors.labels("connect_failed").inc()
            last_error = errors.connect_failed(ref.url, str(e))
            last_error.headers = {"X-Router-Mixed-URL": ref.url}
            if attempt < retries:
                router.metrics.retries.labels("connect").inc()
            continue
        except (FirstByteTimeout, BodyFailed) as e:
            lease.release()
            err = (errors.first_byte_timeout(ref.url, router.cfg.server.first_byte_timeout_secs)
                   if isinstance(e, FirstByteTimeout) else errors.connect_failed(ref.url, str(e)))
            err.headers = {"X-Router-Mixed-URL": ref.url}
            raise err from None
        except BaseException:
            lease.release()
            raise
        status = up.status
        try:
            lease.release_tokens()
            outcome = await relay(req, up, first, ref.mixed_tag)
        finally:
            lease.release()
        account(router, endpoint, received, status, outcome, body, mixed=(inst, ref))
        return
    assert last_error is not None
    raise last_error

