"""One leg of an inference request: the dispatch to one instance of one role.

A mixed request is one leg (retried on another instance after a connect failure); a PD
request is two, a prefill and a decode leg, with the commit and reschedule rules of
:mod:`kvrouter.server.pd` on top. Every leg does the same steps: the role's policy selects an
instance, the leg takes a lease on its load, sends, and either gets the first answer bytes or a
failure that it classifies (one mapping for both modes), with what the failure implies (the
instance excluded from this request's next try, a health probe, a metric), and releases the
lease. Every answer or failure is reported to the outlier detector
(:mod:`kvrouter.control.outlier`): 5xx answers and transport failures count against the
instance, 4xx answers and client disconnects do not.

A request is retried on another instance only before any byte of an answer reached the client:
after a connect failure (``server.connect-retries``), or after a 500/502/503/504 answer
(``server.status-retries``, within the router-wide
:class:`~kvrouter.server.retry.RetryRatio`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from kvrouter import errors
from kvrouter.http.upstream import (
    Answered,
    ConnectFailed,
    Exchange,
    FirstByteTimeout,
    Target,
    TransportError,
    Upstream,
)
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Lease
from kvrouter.policies.base import RequestView
from kvrouter.registry import Instance
from kvrouter.server.context import Context
from kvrouter.server.forward import InstanceRef


class Failure(Enum):
    """How a leg failed before the instance's answer started."""

    CONNECT = "connect"        # no response status: another instance may serve it
    TIMEOUT = "timeout"        # no first body byte within the first-byte timeout: 504
    BROKEN = "broken"          # the answer broke off before its first body byte: 502


class Leg:
    """Select → lease → send → classify a failure → release, for one role of one request.

    After :meth:`choose`, ``inst``/``ref``/``lease`` describe the current instance; the lease is
    released once, by :meth:`release` (or its tokens at the first byte, :meth:`answered`).
    """

    __slots__ = ("ctx", "excluded", "inst", "lease", "ref", "role", "view")

    def __init__(self, ctx: Context, role: Role, view: RequestView,
                 excluded: set[str] | None = None) -> None:
        self.ctx = ctx
        self.role = role
        self.view = view
        self.excluded = set() if excluded is None else excluded   # shared by a request's tries
        self.inst: Instance | None = None
        self.ref: InstanceRef | None = None
        self.lease: Lease | None = None

    def choose(self, prefer: Callable[[Instance], bool] | None = None,
               require: Callable[[Instance], bool] | None = None) -> InstanceRef:
        """Ask the role's policy for an instance (not an excluded one, nor one ``require``
        refuses) and take a lease on it; raises the 503 :class:`RouterError` when none is
        left."""
        sel = self.ctx.router.select(self.role, self.view, self.excluded, prefer, require)
        if self.ctx.tracer is not None:
            self.ctx.tracer.chose(self, sel)
        inst = sel.instance
        self.inst = inst
        ref = self.ref = self.ctx.refs.get(inst)
        self.lease = inst.load.acquire(self.view.token_estimate, prefill=sel.prefill_estimate)
        return ref

    # what the chosen instance is (after :meth:`choose`)
    @property
    def info(self) -> InstanceInfo:
        assert self.ref is not None
        return self.ref.info

    @property
    def url(self) -> str:
        assert self.ref is not None
        return self.ref.url

    @property
    def identity(self) -> str:
        assert self.ref is not None
        return self.ref.identity

    @property
    def target(self) -> Target:
        assert self.ref is not None
        return self.ref.target

    def send(self, data: bytes, answered: Answered) -> Exchange:
        """Send a complete request; ``answered(up, first, error)`` is called once."""
        assert self.ref is not None
        return self.ctx.pool.request(self.ref.target, data, answered)

    async def open(self, data: bytes) -> tuple[Upstream, bytes]:
        """:meth:`send` awaited: the connection and first body bytes, or the failure raised."""
        assert self.ref is not None
        return await self.ctx.pool.open(self.ref.target, data)

    def answered(self) -> None:
        """The answer started: the instance's prefill for this leg is done."""
        if self.lease is not None:
            self.lease.release_tokens()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def observe(self, failed: bool) -> None:
        """Report how the instance answered to the outlier detector."""
        if self.ref is not None:
            self.ctx.router.outliers.observe(self.ref.identity, failed)

    def exclude(self) -> None:
        """Leave the current instance out of this request's next tries."""
        if self.ref is not None:
            self.excluded.add(self.ref.identity)

    def failed(self, error: TransportError) -> tuple[Failure, errors.RouterError]:
        """Release the lease and classify ``error``: a connect failure excludes the instance
        from this request's next try and asks for a health probe."""
        self.release()
        self.observe(True)
        router = self.ctx.router
        ref, inst = self.ref, self.inst
        assert ref is not None and inst is not None
        if isinstance(error, ConnectFailed):
            self.exclude()
            router.health.probe_soon(inst)
            router.metrics.errors.labels("connect_failed").inc()
            return Failure.CONNECT, errors.connect_failed(ref.url, str(error))
        if isinstance(error, FirstByteTimeout):
            return Failure.TIMEOUT, errors.first_byte_timeout(
                ref.url, router.cfg.server.first_byte_timeout_secs)
        if self.role is Role.PREFILL:
            return Failure.BROKEN, errors.prefill_failed(ref.url, str(error))
        return Failure.BROKEN, errors.connect_failed(ref.url, str(error))
