"""``POST /v1/chat/completions`` and ``/v1/completions``: the one owner of an inference request.

:class:`InferenceRequest` follows a request from its parsed body to its accounting, in mixed
and in PD mode: parse → scheduling view → legs dispatched (:mod:`kvrouter.server.leg`; the PD
pair and its retry rules in :mod:`kvrouter.server.pd`) → the chosen answer relayed
(:mod:`kvrouter.server.relay`) → accounting → ``ctx.complete``. A mixed request whose view needs
no tokenizer call is driven by callbacks from start to end (no task: the client's read callback
sends, the instance's read callback relays); views that wait for a tokenizer and PD dispatch
run in one task, and hand back to the same callbacks for the relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from kvrouter import errors
from kvrouter.admission import PRIORITY_HEADER, Priority, Reject, Ticket, parse_priority
from kvrouter.backends.base import loads
from kvrouter.backends.usage import with_usage
from kvrouter.http.request import Request
from kvrouter.http.upstream import Exchange, TransportError, Upstream
from kvrouter.instance import Role
from kvrouter.policies.base import RequestView
from kvrouter.prefix.view import fast_view
from kvrouter.server import pd
from kvrouter.server.accounting import Outcome, account
from kvrouter.server.context import Context
from kvrouter.server.forward import forward_block, upstream_request
from kvrouter.server.leg import Failure, Leg
from kvrouter.server.relay import start_relay
from kvrouter.server.retry import RETRY_STATUSES, RetryBudget

if TYPE_CHECKING:
    from kvrouter.tracing import Trace

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


def start(ctx: Context, req: Request, endpoint: str) -> None:
    """The route handler: the request is :class:`InferenceRequest`'s from here on."""
    InferenceRequest(ctx, req, endpoint).start()


class InferenceRequest:
    """One inference request, from its body to ``ctx.complete`` (see the module docstring).

    ``_end(error)`` is the single exit: it runs once, with the error to answer or ``None``
    (answered, or the client left), after every lease was released.
    """

    __slots__ = ("asked_usage", "body", "ctx", "endpoint", "exchange", "leg", "outcome", "pair",
                 "pending", "priority", "req", "retries", "status_retries", "stream", "task",
                 "ticket", "trace", "usage_body")

    def __init__(self, ctx: Context, req: Request, endpoint: str) -> None:
        self.ctx = ctx
        self.req = req
        self.endpoint = endpoint
        self.body: dict = {}
        self.stream = False
        self.pending = True
        self.leg: Leg | None = None
        self.retries: RetryBudget | None = None          # after connect failures
        self.status_retries: RetryBudget | None = None   # after 5xx answers
        self.exchange: Exchange | None = None
        self.pair: pd.Pair | None = None
        self.task: asyncio.Task | None = None
        self.ticket: Ticket | None = None       # while it waits in the admission queue
        self.priority = Priority.DEFAULT
        self.outcome = Outcome()
        self.trace: Trace | None = None         # its span, when tracing is on
        self.usage_body: bytes | None = None    # the body asking for stream usage, once made
        self.asked_usage = False                # this try's body asks for it

    def start(self) -> None:
        ctx = self.ctx
        if ctx.tracer is not None:
            self.trace = ctx.tracer.start(self.req, self.endpoint, ctx.router.mode)
        ctx.retries.request()
        try:
            if ctx.admission is not None:      # only the queue reads it: no cost without
                priority = parse_priority(self.req.header(PRIORITY_HEADER))
                if priority is None:
                    raise errors.invalid_value(
                        "x-kvrouter-priority must be one of interactive, default, batch")
                self.priority = priority
            body = self.body = parse_json_object(self.req.body)
            self.stream = body.get("stream") is True
            view = fast_view(body, self.endpoint) if ctx.fast_views else None
            if view is None and not ctx.router.splitwise:
                view = ctx.router.request_view_now(body, self.endpoint, MIXED)
        except errors.RouterError as e:
            self._end(e)
            return
        except Exception:
            self._crashed()
            return
        if view is not None and not ctx.router.splitwise:
            self._mixed(view)
            return
        self.req.conn.attach(self._client_lost)
        self.task = asyncio.ensure_future(self._run(view))

    async def _run(self, view: RequestView | None) -> None:
        """The awaited part: a tokenizer call for the view, and PD dispatch up to its commit."""
        router = self.ctx.router
        commit: pd.Commit | None = None
        try:
            if router.splitwise:
                if view is None:
                    view = await router.request_view(self.body, self.endpoint, pd.PD_ROLES)
                admission = self.ctx.admission
                if admission is not None:
                    admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._admit(partial(admission.hold, admitted), view)
                    try:
                        await admitted  # a rejection ends the request and cancels this task
                    finally:
                        if admitted.done() and not admitted.cancelled():
                            admission.bound()   # pd.dispatch takes the lease before it awaits
                if self.trace is not None:
                    self.trace.bind(view)
                commit = await pd.dispatch(self.ctx, self.req, self.body, self.stream, view)
            else:
                if view is None:
                    view = await router.request_view(self.body, self.endpoint, MIXED)
        except errors.RouterError as e:
            self._end(e)
            return
        except asyncio.CancelledError:
            return              # the client left: _client_lost ended the request
        except Exception:
            self._crashed()
            return
        finally:
            self.task = None
        if commit is None:
            assert view is not None
            self._mixed(view)
        else:
            self._answer_pd(commit)

    # -- admission: wait in the router while no instance has headroom --------------------------
    def _admit(self, go: Callable[[], None], view: RequestView) -> None:
        """``go()`` now, or once the admission queue admits the request (or end it)."""
        admission = self.ctx.admission
        if admission is None:
            go()
            return
        model, aliases = view.model, self.ctx.router.aliases
        if model is not None and aliases:
            model = aliases.get(model, model)
        ticket = Ticket(self.priority, self.req.tenant or "default",
                        partial(self._admitted, go), self._rejected, model)
        if admission.offer(ticket):
            go()
        elif ticket.queue is not None:     # waiting: a client that leaves takes it out
            self.ticket = ticket
            self.req.conn.attach(self._client_lost)

    def _admitted(self, go: Callable[[], None]) -> None:
        self.ticket = None
        go()

    def _rejected(self, why: Reject) -> None:
        self.ticket = None
        assert self.ctx.admission is not None
        self._end(self.ctx.admission.error(why))
        if self.task is not None:
            self.task.cancel()

    # -- mixed: one leg, retried on another instance after a connect failure --------------------
    def _mixed(self, view: RequestView) -> None:
        if self.ctx.admission is None:
            self._dispatch_mixed(view)
        else:
            self._admit(partial(self._dispatch_mixed, view), view)

    def _dispatch_mixed(self, view: RequestView) -> None:
        ctx = self.ctx
        if self.trace is not None:
            self.trace.bind(view)
        self.leg = Leg(ctx, Role.MIXED, view)
        self.req.conn.attach(self._client_lost)
        self._send_mixed(None)

    def _budget(self, status: bool) -> RetryBudget:
        """The request's retries left after connect failures or 5xx answers (made when first
        needed: most requests never fail)."""
        budget = self.status_retries if status else self.retries
        if budget is None:
            router = self.ctx.router
            if status:
                budget = self.status_retries = RetryBudget(
                    router, "status", router.cfg.server.status_retries)
            else:
                budget = self.retries = RetryBudget(
                    router, "connect", router.cfg.server.connect_retries)
        return budget

    def _send_mixed(self, last_error: errors.RouterError | None) -> None:
        leg = self.leg
        assert leg is not None
        try:
            ref = leg.choose()
            body = self.req.body
            self.asked_usage = False
            if self.stream and ref.stream_usage.ask:
                if self.usage_body is None:
                    self.usage_body = with_usage(body, self.body) or b""
                if self.usage_body:
                    body = self.usage_body
                    self.asked_usage = True
            data = upstream_request(self.req, ref.target, forward_block(self.req), body)
        except errors.RouterError as e:
            self._end(last_error or e)
            return
        except Exception:
            self._crashed()
            return
        self.exchange = leg.send(data, self._answered)

    def _answered(self, up: Upstream | None, first: bytes, error: TransportError | None) -> None:
        self.exchange = None
        leg = self.leg
        assert leg is not None and leg.ref is not None
        if error is not None or up is None:
            assert error is not None
            failure, err = leg.failed(error)
            err.headers = {"X-Router-Mixed-URL": leg.ref.url}
            if failure is Failure.CONNECT and self._budget(status=False).take():
                self._send_mixed(err)
            else:
                self._end(err)
            return
        if up.status in RETRY_STATUSES and self._retry_status(leg, up):
            return
        try:
            leg.answered()
            if self.ctx.admission is not None:
                self.ctx.admission.pump()  # its prefill is done: room for another one
            start_relay(self.req.conn, up, first, leg.ref.mixed_tag, self.outcome,
                        self._relayed_mixed, asked_usage=self.asked_usage,
                        timings=leg.ref.stream_usage.timings)
        except Exception:
            up.close()
            self._crashed()

    def _retry_status(self, leg: Leg, up: Upstream) -> bool:
        """An instance answered 5xx before anything reached the client: try another one if
        this request and the router-wide budget allow it (else the answer is relayed)."""
        budget = self._budget(status=True)
        assert leg.ref is not None
        router = self.ctx.router
        if (budget.left <= 0
                or not router.can_route(Role.MIXED, leg.excluded | {leg.identity}, leg.view.model)
                or not self.ctx.retries.take() or not budget.take()):
            return False
        log.info("%s answered %d; retrying on another instance", leg.url, up.status)
        if up.done:
            up.release()
        else:
            up.close()
        leg.release()
        leg.observe(True)
        leg.exclude()
        err = errors.RouterError(502, f"Backend {leg.url} answered {up.status}",
                                 "backend_error", "backend_status")
        err.headers = {"X-Router-Mixed-URL": leg.url}
        self._send_mixed(err)
        return True

    def _relayed_mixed(self) -> None:
        leg = self.leg
        assert leg is not None
        leg.release()
        outcome = self.outcome
        if not outcome.client_gone or outcome.status >= 500:
            leg.observe(outcome.status >= 500 or outcome.failure is not None)
        try:
            account(self.ctx.router, self.endpoint, self.req.received, self.outcome, self.stream,
                    mixed=leg.ref)
        except Exception:
            log.exception("accounting failed")
        self._end(None)

    # -- PD: the decode's answer, once dispatch committed to it ---------------------------------
    def _answer_pd(self, commit: pd.Commit) -> None:
        self.pair = commit.pair
        reply = commit.reply
        if reply is not None:     # the prefill's own error reply
            self.outcome.status = reply.status
            self.req.conn.send(reply.status, reply.body, reply.content_type, commit.tags)
            self._account_pd(commit.pair)
            self._end(None)
            return
        assert commit.up is not None
        try:
            start_relay(self.req.conn, commit.up, commit.first, commit.tags, self.outcome,
                        self._relayed_pd, scan_usage=False)
        except Exception:
            commit.up.close()
            self._crashed()

    def _relayed_pd(self) -> None:
        pair = self.pair
        assert pair is not None
        pair.decode.release()
        outcome = self.outcome
        if outcome.client_gone:
            pair.cancel_prefill()
        if not outcome.client_gone or outcome.status >= 500:
            pair.decode.observe(outcome.status >= 500 or outcome.failure is not None)
        self._account_pd(pair)
        self._end(None)

    def _account_pd(self, pair: pd.Pair) -> None:
        try:
            account(self.ctx.router, self.endpoint, self.req.received, self.outcome, self.stream,
                    prefill=pair.prefill.ref, decode=pair.decode.ref)
        except Exception:
            log.exception("accounting failed")

    # -- the end --------------------------------------------------------------------------------
    def _client_lost(self) -> None:
        """The client left before the answer started: drop whatever is in flight."""
        if not self.pending:
            return
        self.outcome.client_gone = True
        if self.ticket is not None:
            self.ticket.cancel()
            self.ticket = None
        if self.task is not None:
            self.task.cancel()     # PD: the pair's own cleanup releases its legs
        if self.exchange is not None:
            self.exchange.cancel()
            self.exchange = None
        if self.leg is not None:
            self.leg.release()
        self._end(None)

    def _crashed(self) -> None:
        log.exception("unhandled error on %s %s", self.req.method, self.req.path)
        if self.leg is not None:
            self.leg.release()
        if self.pair is not None:
            self.pair.release()
        self._end(errors.RouterError(*errors.INTERNAL_ERROR))

    def _end(self, error: errors.RouterError | None) -> None:
        if not self.pending:
            return
        self.pending = False
        self.req.conn.detach()
        if self.trace is not None:
            self.trace.end(error, self.req.conn.status, self.outcome)
        self.ctx.complete(self.req, self.endpoint, error)
        if self.ctx.admission is not None:
            self.ctx.admission.pump()      # this request's instance may have room now
