"""PD (prefill/decode) dispatch (contract §1.4, §5.4–5.6).

Per attempt: choose P and D, send both the same body concurrently, commit to the client at D's
first body byte (or D's whole body for non-stream requests, which may ask to be rescheduled),
drain P in the background and release its load at its first byte. Failures before the commit
cancel the other leg and retry on a new pair; nothing is retried after the commit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrouter import errors
from kvrouter.backends import fastdeploy as fd
from kvrouter.http.request import Request
from kvrouter.http.response import header_block
from kvrouter.http.upstream import BodyFailed, ConnectFailed, FirstByteTimeout, Upstream
from kvrouter.instance import Role
from kvrouter.registry import Instance
from kvrouter.server.accounting import account, count_usage
from kvrouter.server.forward import InstanceRef, forward_block, upstream_request
from kvrouter.server.relay import Relay, relay, usage_of
from kvrouter.server.view import fast_view

if TYPE_CHECKING:
    from kvrouter.server.app import App

log = logging.getLogger("kvrouter.pd")

PD_ROLES = (Role.PREFILL, Role.DECODE)
RESCHEDULE_BUFFER = 64 << 20
PREFILL_SCAN = 1 << 20
RETRYABLE_PREFILL_STATUS = frozenset({429, 502, 503, 504})


@dataclass
class PrefillResult:
    """How the prefill leg ended: ``ok``, ``connect``, ``timeout``, ``status``, ``body_error``."""

    kind: str
    detail: str = ""
    status: int = 0
    content_type: bytes = b"application/json"
    body: bytes = b""


@dataclass
class DecodeStart:
    up: Upstream
    first: bytes
    eof: bool


async def handle(app: App, req: Request, body: dict, endpoint: str, received: float) -> None:
    router = app.router
    base = fd.base_request_id(body)
    view = fast_view(body, endpoint) if app.fast_views else None
    if view is None:
        view = await router.request_view(body, endpoint, PD_ROLES)
    stream = body.get("stream") is True
    fmt = router.cfg.server.disaggregate_info_format
    sch = router.cfg.scheduler
    connect_budget = router.cfg.server.connect_retries
    reschedule_budget = sch.pd_retry_count
    excl_p: set[str] = set()
    excl_d: set[str] = set()
    last_error: errors.RouterError | None = None
    attempt = 0
    headers = forward_block(req, identity=True)
    while True:
        try:
            p = router.select(Role.PREFILL, view, excl_p).instance
            d = router.select(Role.DECODE, view, excl_d,
                              prefer=lambda c, p=p: fd.can_pair(p.info, c.info)).instance
        except errors.RouterError:
            if last_error is not None:
                raise last_error from None
            raise
        rid = fd.attempt_request_id(base, attempt)
        body["request_id"] = rid
        body["disaggregate_info"] = fd.disaggregate_info(p.info, d.info, fmt)
        payload = fd.dumps(body)
        p_ref, d_ref = app.refs.get(p), app.refs.get(d)
        tags = {"X-Router-Prefill-URL": p_ref.url, "X-Router-Decode-URL": d_ref.url,
                "X-Router-Request-ID": rid}
        pair = _Pair(app, req, p, d, p_ref, d_ref, rid, payload, headers, view.token_estimate,
                     stream)
        try:
            outcome = await pair.run()
        except errors.RouterError as e:
            e.headers = tags
            raise
        if outcome.retry is not None:
            reason, err = outcome.retry
            budget_left = reschedule_budget if reason == "pd_reschedule" else connect_budget
            if err is not None:
                err.headers = tags
                last_error = err
            if budget_left <= 0:
                if err is not None:
                    raise err
            else:
                router.metrics.retries.labels(reason).inc()
                if reason == "pd_reschedule":
                    reschedule_budget -= 1
                    if sch.pd_retry_exclude_decode:
                        excl_d.add(d.identity)
                    body["completion_token_ids"] = (
                        list(body.get("completion_token_ids") or []) + outcome.tokens)
                    outcome.start.up.release()
                    log.info("[request_id:%s] decode %s asked to reschedule; retrying",
                             rid, d.url)
                    attempt += 1
                    continue
                connect_budget -= 1
                (excl_p if outcome.failed_side == "prefill" else excl_d).add(
                    (p if outcome.failed_side == "prefill" else d).identity)
                attempt += 1
                continue
        if outcome.prefill_reply is not None:
            r = outcome.prefill_reply
            req.conn.send(r.status, r.body, r.content_type, header_block(tags))
            account(router, endpoint, received, r.status, Relay(req.conn, None, False, False),
                    body, prefill=p_ref, decode=d_ref)
            return
        start = outcome.start
        status = start.up.status
        try:
            relayed = await relay(req, start.up, start.first, header_block(tags),
                                  scan_usage=False)
        finally:
            pair.d_lease.release()
        if relayed.client_gone:
            pair.cancel_prefill()
        account(router, endpoint, received, status, relayed, body, prefill=p_ref, decode=d_ref)
        return


def _content_type(up: Upstream) -> bytes:
    ctype = up.header(b"content-type")
    return ctype.split(b";")[0].strip() if ctype else b"application/json"


@dataclass
class _Outcome:
    start: DecodeStart | None = None
    retry: tuple[str, errors.RouterError | None] | None = None
    failed_side: str = ""
    tokens: list[int] | None = None
    prefill_reply: PrefillResult | None = None


class _Pair:
    """One attempt on one (P, D) pair."""

    def __init__(self, app: App, req: Request, p: Instance, d: Instance, p_ref: InstanceRef,
                 d_ref: InstanceRef, request_id: str, payload: bytes, headers: bytes,
                 tokens: int, stream: bool) -> None:
        self.app = app
        self.router = app.router
        self.req = req
        self.request_id = request_id
        self.p, self.d = p, d
        self.p_ref, self.d_ref = p_ref, d_ref
        self.payload = payload
        self.headers = headers
        self.stream = stream
        self.p_lease = p.load.acquire(tokens)
        self.d_lease = d.load.acquire(tokens)
        self.p_task: asyncio.Task | None = None

    def cancel_prefill(self) -> None:
        if self.p_task is not None and not self.p_task.done():
            self.p_task.cancel()

    async def run(self) -> _Outcome:
        self.p_task = asyncio.ensure_future(self._prefill())
        d_task = asyncio.ensure_future(self._decode())
        outcome: _Outcome | None = None
        try:
            pending = {self.p_task, d_task}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if d_task in done:
                    outcome = self._after_decode(d_task)
                    return outcome
                result: PrefillResult = self.p_task.result()
                if result.kind == "ok":
                    continue
                d_task.cancel()
                outcome = self._after_prefill_failure(result)
                return outcome
        finally:
            if not d_task.done():
                d_task.cancel()
            elif (not d_task.cancelled() and d_task.exception() is None
                  and (outcome is None or outcome.start is not d_task.result())):
                d_task.result().up.close()  # a decode answer nobody will relay
            committed = outcome is not None and outcome.start is not None and \
                outcome.retry is None
            if not committed:
                self.cancel_prefill()
                self.d_lease.release()
            self._watch_prefill()

    def _after_decode(self, d_task: asyncio.Task) -> _Outcome:
        router = self.router
        exc = d_task.exception()
        if exc is None:
            start: DecodeStart = d_task.result()
            tokens = None
            if not self.stream and start.eof and start.up.status == 200:
                tokens = fd.reschedule_tokens(start.first)
            if tokens is not None:
                return _Outcome(start=start, retry=("pd_reschedule", None), tokens=tokens)
            return _Outcome(start=start)
        self.cancel_prefill()
        if isinstance(exc, ConnectFailed):
            router.health.probe_soon(self.d)
            router.metrics.errors.labels("connect_failed").inc()
            return _Outcome(retry=("connect", errors.connect_failed(self.d.url, str(exc))),
                            failed_side="decode")
        if isinstance(exc, FirstByteTimeout):
            router.metrics.errors.labels("first_byte_timeout").inc()
            raise errors.first_byte_timeout(self.d.url,
                                            router.cfg.server.first_byte_timeout_secs)
        if isinstance(exc, BodyFailed):
            raise errors.connect_failed(self.d.url, str(exc))
        raise exc

    def _after_prefill_failure(self, r: PrefillResult) -> _Outcome:
        router = self.router
        url = self.p.url
        if r.kind == "connect":
            router.health.probe_soon(self.p)
            router.metrics.errors.labels("connect_failed").inc()
            return _Outcome(retry=("connect", errors.connect_failed(url, r.detail)),
                            failed_side="prefill")
        if r.kind == "status" and r.status in RETRYABLE_PREFILL_STATUS:
            err = errors.prefill_failed(url, f"status {r.status}: {r.body[:200]!r}")
            return _Outcome(retry=("prefill_status", err), failed_side="prefill")
        if r.kind == "status":
            return _Outcome(prefill_reply=r)
        if r.kind == "timeout":
            router.metrics.errors.labels("first_byte_timeout").inc()
            raise errors.first_byte_timeout(url, router.cfg.server.first_byte_timeout_secs)
        router.metrics.errors.labels("prefill_failed").inc()
        raise errors.prefill_failed(url, r.detail)

    def _watch_prefill(self) -> None:
        """Log the background prefill drain's end (never shown to the client)."""
        task = self.p_task
        if task is None:
            return
        router = self.router

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            r = t.result()
            if r.kind != "ok":
                log.warning("[request_id:%s] prefill %s ended with %s %s",
                            self.request_id, self.p.url, r.kind, r.detail)

        task.add_done_callback(done)
        router.track(task)

    async def _prefill(self) -> PrefillResult:
        """Send to P, release its load at its first byte, drain its body to the end."""
        target = self.p_ref.target
        data = upstream_request(self.req, target, self.headers, self.payload)
        try:
            try:
                up, first = await self.app.pool.open(target, data)
            except ConnectFailed as e:
                return PrefillResult("connect", str(e))
            except FirstByteTimeout as e:
                return PrefillResult("timeout", str(e))
            except BodyFailed as e:
                return PrefillResult("connect", str(e))
            self.p_lease.release()
            parts, size, chunk = [first], len(first), first
            try:
                while chunk:
                    chunk = await up.read_chunk()
                    if size < PREFILL_SCAN:
                        parts.append(chunk)
                        size += len(chunk)
            except BodyFailed as e:
                up.close()
                return PrefillResult("body_error", str(e))
            status, sse, ctype = up.status, up.is_sse, _content_type(up)
            up.release()
            raw = b"".join(parts)
            if not 200 <= status < 300:
                return PrefillResult("status", status=status, content_type=ctype, body=raw)
            msg = fd.in_body_error(raw, sse)
            if msg is not None:
                return PrefillResult("body_error", msg)
            self._count_usage(raw)
            return PrefillResult("ok")
        finally:
            self.p_lease.release()

    def _count_usage(self, raw: bytes) -> None:
        prompt, cached = usage_of(raw)
        if prompt is not None:
            count_usage(self.router, self.p, self.p_ref, prompt, cached)

    async def _decode(self) -> DecodeStart:
        """Send to D; return at its first body byte, or its whole body for non-stream answers."""
        target = self.d_ref.target
        up, first = await self.app.pool.open(
            target, upstream_request(self.req, target, self.headers, self.payload))
        if self.stream or up.is_sse or not first:
            return DecodeStart(up, first, eof=not first)
        parts, size = [first], len(first)
        while size <= RESCHEDULE_BUFFER:
            chunk = await up.read_chunk()
            if not chunk:
                return DecodeStart(up, b"".join(parts), eof=True)
            parts.append(chunk)
            size += len(chunk)
        return DecodeStart(up, b"".join(parts), eof=False)
