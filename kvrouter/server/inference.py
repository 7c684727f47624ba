"""``POST /v1/chat/completions`` and ``/v1/completions``: parse, choose, dispatch, relay, account.

Mixed mode is here (contract §1.3, §5.3); PD mode is in :mod:`kvrouter.server.pd`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kvrouter import errors
from kvrouter.backends.fastdeploy import loads
from kvrouter.http.request import Request
from kvrouter.http.upstream import (
    ConnectFailed,
    Exchange,
    FirstByteTimeout,
    TransportError,
    Upstream,
)
from kvrouter.instance import Role
from kvrouter.load import Lease
from kvrouter.policies.base import RequestView
from kvrouter.registry import Instance
from kvrouter.server import pd
from kvrouter.server.accounting import account
from kvrouter.server.forward import InstanceRef, forward_block, upstream_request
from kvrouter.server.relay import Relay, start_relay
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


def start(app: App, req: Request, endpoint: str) -> Awaitable[None] | None:
    """Parse the body (a 400 is raised here) and start the request.

    A mixed-mode request whose scheduling view needs no await is driven by callbacks:
    ``None`` is returned and ``app.inference_done`` is called when it is over. Otherwise the
    returned coroutine handles it (PD mode, or a view that needs the tokenizer)."""
    raw = req.body
    body = parse_json_object(raw)
    if app.router.splitwise:
        return pd.handle(app, req, body, endpoint, req.received)
    view = (fast_view(body, endpoint) if app.fast_views else None) or \
        app.router.request_view_now(body, endpoint, MIXED)
    if view is None:
        return _mixed_after_view(app, req, raw, body, endpoint)
    MixedRequest(app, req, raw, body, endpoint, view, None).start()
    return None


async def _mixed_after_view(app: App, req: Request, raw: bytes, body: dict,
                            endpoint: str) -> None:
    view = await app.router.request_view(body, endpoint, MIXED)
    fut = req.conn.loop.create_future()

    def done(error: errors.RouterError | None) -> None:
        if not fut.done():
            fut.set_result(error)

    mixed = MixedRequest(app, req, raw, body, endpoint, view, done)
    mixed.start()
    try:
        error = await fut
    except asyncio.CancelledError:
        mixed.client_lost()
        raise
    if error is not None:
        raise error


class MixedRequest:
    """One mixed-mode request (contract §5.3), driven by callbacks: choose an instance, send,
    relay the answer, account. A connect failure excludes that instance, asks for a probe and
    retries on another one (``server.connect-retries`` times). ``done(error)`` is called once
    (``app.inference_done(req, endpoint, error)`` if ``done`` is ``None``): with the error to
    answer, or ``None`` (answered, or the client left)."""

    __slots__ = ("app", "attempt", "body", "done", "endpoint", "excluded", "exchange", "headers",
                 "inst", "last_error", "lease", "pending", "raw", "ref", "req", "status", "view")

    def __init__(self, app: App, req: Request, raw: bytes, body: dict, endpoint: str,
                 view: RequestView,
                 done: Callable[[errors.RouterError | None], None] | None) -> None:
        self.app = app
        self.req = req
        self.raw = raw
        self.body = body
        self.endpoint = endpoint
        self.view = view
        self.done = done
        self.pending = True
        self.attempt = 0
        self.excluded: set[str] = set()
        self.last_error: errors.RouterError | None = None
        self.headers = forward_block(req)
        self.exchange: Exchange | None = None
        self.inst: Instance | None = None
        self.ref: InstanceRef | None = None
        self.lease: Lease | None = None
        self.status = 0

    def start(self) -> None:
        self.req.conn.on_lost = self.client_lost
        self._attempt()

    def _attempt(self) -> None:
        app = self.app
        try:
            inst = app.router.select(Role.MIXED, self.view, self.excluded).instance
        except errors.RouterError as e:
            self._end(self.last_error or e)
            return
        except Exception:
            self._crashed()
            return
        ref = app.refs.get(inst)
        self.inst, self.ref = inst, ref
        self.lease = inst.load.acquire(self.view.token_estimate)
        data = upstream_request(self.req, ref.target, self.headers, self.raw)
        self.exchange = app.pool.request(ref.target, data, self._answered)

    def _answered(self, up: Upstream | None, first: bytes, error: TransportError | None) -> None:
        self.exchange = None
        try:
            if error is not None:
                self._failed(error)
                return
            self.status = up.status
            self.lease.release_tokens()
            start_relay(self.req, up, first, self.ref.mixed_tag, self._relayed)
        except Exception:
            if up is not None:
                up.close()
            self._crashed()

    def _failed(self, error: TransportError) -> None:
        router, ref = self.app.router, self.ref
        self.lease.release()
        if isinstance(error, ConnectFailed):
            self.excluded.add(ref.identity)
            router.health.probe_soon(self.inst)
            router.metrics.errors.labels("connect_failed").inc()
            err = errors.connect_failed(ref.url, str(error))
            err.headers = {"X-Router-Mixed-URL": ref.url}
            self.last_error = err
            if self.attempt < router.cfg.server.connect_retries:
                self.attempt += 1
                router.metrics.retries.labels("connect").inc()
                self._attempt()
            else:
                self._end(err)
            return
        err = (errors.first_byte_timeout(ref.url, router.cfg.server.first_byte_timeout_secs)
               if isinstance(error, FirstByteTimeout) else errors.connect_failed(ref.url, str(error)))
        err.headers = {"X-Router-Mixed-URL": ref.url}
        self._end(err)

    def _relayed(self, outcome: Relay) -> None:
        try:
            self.lease.release()
            account(self.app.router, self.endpoint, self.req.received, self.status, outcome,
                    self.body, mixed=(self.inst, self.ref))
        except Exception:
            log.exception("accounting failed")
        self._end(None)

    def client_lost(self) -> None:
        """The client left before the answer started: drop the exchange and its lease."""
        if not self.pending:
            return
        if self.exchange is not None:
            self.exchange.cancel()
            self.exchange = None
        if self.lease is not None:
            self.lease.release()
        self._end(None)

    def _crashed(self) -> None:
        log.exception("unhandled error on %s %s", self.req.method, self.req.path)
        if self.lease is not None:
            self.lease.release()
        self._end(errors.RouterError(*errors.INTERNAL_ERROR))

    def _end(self, error: errors.RouterError | None) -> None:
        if not self.pending:
            return
        self.pending = False
        conn = self.req.conn
        if conn.on_lost == self.client_lost:
            conn.on_lost = None
        if self.done is None:
            self.app.inference_done(self.req, self.endpoint, error)
        else:
            self.done(error)
