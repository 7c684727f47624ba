"""PD (prefill/decode) dispatch, up to the decode answer the client will get.

Per attempt: the prefill and decode policies choose a pair (the decode among those that can
take the prefill's KV cache), both legs get their body at once (the engine adapter writes it),
and the request commits to the decode at its first body byte (or its whole body for non-stream
requests, which may ask to be rescheduled). The prefill is drained in the background and its
lease released at its first byte. A failure before the commit cancels the other leg and, where
the rules allow, tries a new pair: a connect failure (either side) or a prefill answering 429
or 500/502/503/504 within ``server.connect-retries``, a decode answering 500/502/503/504
within ``server.status-retries`` (and the router-wide retry budget), a decode asking to be
rescheduled within ``scheduler.pd-retry-count``. Nothing is retried after the commit.
:class:`kvrouter.server.inference.InferenceRequest` relays the committed answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from kvrouter import errors
from kvrouter.backends.base import EngineAdapter, PdAttempt
from kvrouter.backends.usage import usage_of
from kvrouter.http.request import Request
from kvrouter.http.response import header_block
from kvrouter.http.upstream import TransportError, Upstream
from kvrouter.instance import InstanceInfo, Role
from kvrouter.policies.base import RequestView
from kvrouter.registry import Instance
from kvrouter.server.accounting import count_usage
from kvrouter.server.context import Context
from kvrouter.server.forward import forward_block, upstream_request
from kvrouter.server.leg import Failure, Leg
from kvrouter.server.retry import RETRY_STATUSES, RetryBudget

log = logging.getLogger("kvrouter.pd")

PD_ROLES = (Role.PREFILL, Role.DECODE)
RESCHEDULE_BUFFER = 64 << 20     # a non-stream decode answer is read whole up to this size
PREFILL_SCAN = 1 << 20           # prefill answer bytes kept for the error and usage scan
RETRYABLE_PREFILL_STATUS = RETRY_STATUSES | {429}


@dataclass(slots=True)
class PrefillResult:
    """How the prefill leg ended: ``failure`` with the error it maps to, an HTTP error
    ``status`` with its body, or neither (answered, drained)."""

    failure: Failure | None = None
    error: errors.RouterError | None = None
    status: int = 0
    content_type: bytes = b"application/json"
    body: bytes = b""       # an error status's body
    answer: bytes = b""     # a successful answer (its first MiB)


@dataclass(slots=True)
class DecodeStart:
    up: Upstream
    first: bytes
    eof: bool


@dataclass(slots=True)
class Commit:
    """What the client gets: the decode's answer to relay (``up``, ``first``), or the
    prefill's own error reply (``reply``), with the router's header lines."""

    pair: Pair
    tags: bytes
    up: Upstream | None = None
    first: bytes = b""
    reply: PrefillResult | None = None


async def dispatch(ctx: Context, req: Request, body: dict, stream: bool,
                   view: RequestView) -> Commit:
    """Try pairs until one commits or an error is final (raised, with the router headers of
    the last pair)."""
    router = ctx.router
    base = ctx.adapters.default.base_request_id(body)
    connect = RetryBudget(router, "connect", router.cfg.server.connect_retries)
    reschedule = RetryBudget(router, "pd_reschedule", router.cfg.scheduler.pd_retry_count)
    status = RetryBudget(router, "status", router.cfg.server.status_retries)
    excl_p: set[str] = set()
    excl_d: set[str] = set()
    last_error: errors.RouterError | None = None
    headers = forward_block(req, identity=True)
    attempt = 0
    while True:
        prefill = Leg(ctx, Role.PREFILL, view, excl_p)
        decode = Leg(ctx, Role.DECODE, view, excl_d)
        try:
            p_ref = prefill.choose()
            adapter = _adapter_of(ctx, p_ref.info)
            decode.choose(require=partial(must_pair, adapter, p_ref.info),
                          prefer=partial(pairs_well, adapter, p_ref.info))
        except errors.RouterError:
            prefill.release()
            if last_error is not None:
                raise last_error from None
            raise
        try:
            rid = adapter.attempt_request_id(base, attempt)
            try_ = PdAttempt(rid, prefill.info, decode.info)
            p_body = adapter.prefill_body(body, try_)
            d_body: bytes | Callable[[bytes], bytes] = (
                adapter.decode_body(body, try_, p_body, None) if adapter.concurrent_pd
                else partial(adapter.decode_body, body, try_, p_body))
            tags = {"X-Router-Prefill-URL": p_ref.url, "X-Router-Decode-URL": decode.url,
                    "X-Router-Request-ID": rid}
            pair = Pair(ctx, req, stream, adapter, prefill, decode, rid, p_body, d_body,
                        _with_fields(headers, adapter.leg_headers(try_)))
        except BaseException:
            prefill.release()       # the pair owns both leases only once it exists
            decode.release()
            raise
        try:
            step = await pair.run()
        except errors.RouterError as e:
            e.headers = tags
            raise
        if step.error is not None:
            step.error.headers = tags
            last_error = step.error
        if step.status_retry:
            assert step.start is not None
            if (status.left > 0
                    and router.can_route(Role.DECODE, excl_d | {decode.identity}, view.model)
                    and ctx.retries.take() and status.take()):
                log.info("[request_id:%s] decode %s answered %d; retrying", rid, decode.url,
                         step.start.up.status)
                step.start.up.close()
                decode.observe(True)
                decode.exclude()
                attempt += 1
                continue
        elif step.reschedule is not None:
            if reschedule.take():
                if router.cfg.scheduler.pd_retry_exclude_decode:
                    excl_d.add(decode.identity)
                adapter.continue_with(body, step.reschedule)
                assert step.start is not None
                step.start.up.release()
                log.info("[request_id:%s] decode %s asked to reschedule; retrying",
                         rid, decode.url)
                attempt += 1
                continue
        elif step.retry_reason is not None:
            if not connect.take(step.retry_reason):
                assert step.error is not None
                raise step.error
            attempt += 1
            continue
        if step.prefill_reply is not None:
            return Commit(pair, header_block(tags), reply=step.prefill_reply)
        assert step.start is not None
        return Commit(pair, header_block(tags), step.start.up, step.start.first)


@dataclass(slots=True)
class Step:
    """What one attempt came to: a decode answer (``start``), maybe asking to be rescheduled
    with the tokens generated so far; a retry for ``retry_reason`` after ``error``; or the
    prefill's own error reply."""

    start: DecodeStart | None = None
    status_retry: bool = False           # the decode answered 5xx: another pair may do better
    reschedule: list[int] | None = None
    retry_reason: str | None = None
    error: errors.RouterError | None = None
    prefill_reply: PrefillResult | None = None


class Pair:
    """One attempt on one (prefill, decode) pair: both legs run as tasks, at once, or the
    decode once the prefill answered (``d_body`` is then made from that answer)."""

    def __init__(self, ctx: Context, req: Request, stream: bool, adapter: EngineAdapter,
                 prefill: Leg, decode: Leg, request_id: str, p_body: bytes,
                 d_body: bytes | Callable[[bytes], bytes], headers: bytes) -> None:
        self.ctx = ctx
        self.req = req
        self.stream = stream
        self.adapter = adapter
        self.prefill = prefill
        self.decode = decode
        self.request_id = request_id
        self.p_body = p_body
        self.d_body = d_body
        self.headers = headers
        self.p_task: asyncio.Task | None = None

    def cancel_prefill(self) -> None:
        if self.p_task is not None and not self.p_task.done():
            self.p_task.cancel()

    def release(self) -> None:
        self.cancel_prefill()
        self.prefill.release()
        self.decode.release()

    async def run(self) -> Step:
        p_task = self.p_task = asyncio.ensure_future(self._prefill())
        d_task: asyncio.Task | None = None
        step: Step | None = None
        try:
            if not isinstance(self.d_body, bytes):      # the decode waits for the prefill
                result: PrefillResult = await p_task
                if result.failure is not None or result.status:
                    step = self._after_prefill_failure(result)
                    return step
                self.d_body = self.d_body(result.answer)
            d_task = asyncio.ensure_future(self._decode())
            pending: set[asyncio.Task] = {p_task, d_task}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if d_task in done:
                    step = self._after_decode(d_task)
                    if (step.status_retry and p_task.done() and not p_task.cancelled()
                            and p_task.exception() is None):
                        result = p_task.result()    # a decode error the prefill caused
                        if result.failure is not None or result.status:
                            step = self._after_prefill_failure(result)
                    return step
                result = p_task.result()
                if result.failure is None and result.status == 0:
                    continue        # prefill answered: wait for the decode
                d_task.cancel()
                step = self._after_prefill_failure(result)
                return step
        finally:
            if d_task is not None and not d_task.done():
                d_task.cancel()
            elif (d_task is not None and not d_task.cancelled() and d_task.exception() is None
                  and (step is None or step.start is not d_task.result())):
                d_task.result().up.close()  # a decode answer nobody will relay
            committed = (step is not None and step.start is not None
                         and step.retry_reason is None and step.reschedule is None
                         and not step.status_retry)
            if not committed:
                self.cancel_prefill()
                self.decode.release()
            self._watch_prefill()

    def _after_decode(self, d_task: asyncio.Task) -> Step:
        exc = d_task.exception()
        if exc is None:
            start: DecodeStart = d_task.result()
            if not self.stream and start.eof and start.up.status == 200:
                tokens = self.adapter.reschedule_tokens(start.first)
                if tokens is not None:
                    return Step(start=start, reschedule=tokens)
            return Step(start=start, status_retry=start.up.status in RETRY_STATUSES)
        self.cancel_prefill()
        if not isinstance(exc, TransportError):
            raise exc
        failure, err = self.decode.failed(exc)
        if failure is Failure.CONNECT:
            return Step(retry_reason="connect", error=err)
        raise err

    def _after_prefill_failure(self, r: PrefillResult) -> Step:
        if r.failure is Failure.CONNECT:
            return Step(retry_reason="connect", error=r.error)
        if r.error is not None:
            raise r.error
        if r.status in RETRYABLE_PREFILL_STATUS:
            self.prefill.excluded.add(self.prefill.identity)
            err = errors.prefill_failed(self.prefill.url, f"status {r.status}: {r.body[:200]!r}")
            return Step(retry_reason="prefill_status", error=err)
        return Step(prefill_reply=r)

    def _watch_prefill(self) -> None:
        """Log the background prefill drain's end (never shown to the client)."""
        task = self.p_task
        if task is None:
            return

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("[request_id:%s] prefill drain of %s failed", self.request_id,
                          self.prefill.url, exc_info=exc)
                return
            r = t.result()
            if r.failure is not None or r.status:
                log.warning("[request_id:%s] prefill %s ended with %s", self.request_id,
                            self.prefill.url, r.error.message if r.error else r.status)

        task.add_done_callback(done)
        self.ctx.router.track(task)

    async def _prefill(self) -> PrefillResult:
        """Send to the prefill, release its lease at its first byte, drain its body."""
        leg = self.prefill
        req = self.req
        lease = leg.lease     # this attempt's, whatever the request does meanwhile
        data = upstream_request(req, leg.target, self.headers, self.p_body)
        try:
            try:
                up, first = await leg.open(data)
            except TransportError as e:
                failure, err = leg.failed(e)
                return PrefillResult(failure, err)
            if lease is not None:
                lease.release()
            if self.ctx.admission is not None:
                self.ctx.admission.pump()          # the prefill is done: room for another
            parts, size, chunk = [first], len(first), first
            try:
                while chunk:
                    chunk = await up.read_chunk()
                    if size < PREFILL_SCAN:
                        parts.append(chunk)
                        size += len(chunk)
            except TransportError as e:
                up.close()
                leg.observe(True)
                return PrefillResult(Failure.BROKEN, errors.prefill_failed(leg.url, str(e)))
            status, sse, ctype = up.status, up.is_sse, _content_type(up)
            up.release()
            raw = b"".join(parts)
            if not 200 <= status < 300:
                leg.observe(status >= 500)
                return PrefillResult(status=status, content_type=ctype, body=raw)
            msg = self.adapter.prefill_error(raw, sse)
            leg.observe(msg is not None)
            if msg is not None:
                return PrefillResult(Failure.BROKEN, errors.prefill_failed(leg.url, msg))
            prompt, cached = usage_of(raw)
            if prompt is not None and leg.ref is not None:
                count_usage(self.ctx.router, leg.ref, prompt, cached)
            return PrefillResult(answer=raw)
        finally:
            if lease is not None:
                lease.release()

    async def _decode(self) -> DecodeStart:
        """Send to the decode; return at its first body byte, or its whole body for
        non-stream answers (which may ask for a reschedule)."""
        leg = self.decode
        assert isinstance(self.d_body, bytes)
        up, first = await leg.open(
            upstream_request(self.req, leg.target, self.headers, self.d_body))
        if self.stream or up.is_sse or not first or not self.adapter.reschedules:
            return DecodeStart(up, first, eof=not first)
        parts, size = [first], len(first)
        while size <= RESCHEDULE_BUFFER:
            chunk = await up.read_chunk()
            if not chunk:
                return DecodeStart(up, b"".join(parts), eof=True)
            parts.append(chunk)
            size += len(chunk)
        return DecodeStart(up, b"".join(parts), eof=False)


def _adapter_of(ctx: Context, prefill: InstanceInfo) -> EngineAdapter:
    adapter = ctx.adapters.get(prefill.engine)
    if adapter is None:
        raise errors.RouterError(
            501, f"PD dispatch is not supported for {prefill.engine} instances",
            "invalid_request_error", "pd_not_supported")
    return adapter


def must_pair(adapter: EngineAdapter, prefill: InstanceInfo, decode: Instance) -> bool:
    """A decode of the prefill's engine that can take its KV cache (no other is used)."""
    return decode.info.engine == prefill.engine and adapter.must_pair(prefill, decode.info)


def pairs_well(adapter: EngineAdapter, prefill: InstanceInfo, decode: Instance) -> bool:
    """A decode the prefill's engine prefers (any other that :func:`must_pair` if none is)."""
    return adapter.can_pair(prefill, decode.info)


def _with_fields(block: bytes, fields: dict[str, str]) -> bytes:
    """The client's header ``block`` with the adapter's ``fields`` in place of any client
    field of the same name (so the instance sees only the router's)."""
    if not fields:
        return block
    names = tuple(name.lower().encode("ascii") + b":" for name in fields)
    kept = [line + b"\r\n" for line in block.split(b"\r\n")
            if line and not line.lower().startswith(names)]
    return b"".join(kept) + header_block(fields)


def _content_type(up: Upstream) -> bytes:
    ctype = up.header(b"content-type")
    return ctype.split(b";")[0].strip() if ctype else b"application/json"
