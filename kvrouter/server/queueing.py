"""The live server's driver of the admission queue (:mod:`kvrouter.admission`): the event loop's
clock and timers, the headroom of the router's instances, 429/503 answers and metrics.

``kvrouter_queue_wait_seconds{priority}`` observes every request the queue admits, with the
time it waited (0 for one admitted at arrival): its count is the admitted requests, its
quantiles the wait they saw. Rejected requests are in ``kvrouter_queue_rejections_total``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

from kvrouter import errors
from kvrouter.admission import AdmissionQueue, Headroom, Pace, Priority, Reject, Ticket
from kvrouter.instance import Role
from kvrouter.router import Router

EXPIRY_PERIOD = 0.1          # seconds between timeout checks while requests wait
_NAMES = [p.name.lower() for p in Priority]


class Admission:
    """The queue of one router process: requests of ``role`` (mixed, or the prefill side of
    PD) wait here while none of the instances they can be routed to has headroom."""

    def __init__(self, router: Router, role: Role) -> None:
        sch = router.cfg.scheduler
        self.router = router
        self.role = role
        self.headroom = Headroom(sch.max_inflight_per_instance,
                                 sch.max_queued_prefill_tokens_per_instance)
        self.pace = Pace(time.monotonic, sch.queue_timeout_secs)
        self.queue = AdmissionQueue(self.room, queue_size=sch.queue_size,
                                    timeout=sch.queue_timeout_secs, clock=time.monotonic,
                                    service_time=self.pace.service_time)
        #: admitted PD requests whose prefill lease is not taken yet (:meth:`hold`)
        self.unbound = 0
        self._timer: asyncio.TimerHandle | None = None
        m = router.metrics
        self._wait = [m.queue_wait.labels(name) for name in _NAMES]
        self._rejections = m.queue_rejections
        m.attach_queue(lambda name: self.queue.depth(Priority[name.upper()]), _NAMES)

    def room(self, model: str | None) -> bool:
        """Whether an instance a request for ``model`` (alias resolved) can be routed to has a
        slot: the role's routable instances serving it, less those ejected by outlier
        detection (as :meth:`Router.candidates <kvrouter.router.Router.candidates>` chooses
        among), beyond the :attr:`unbound` requests that will take one."""
        router = self.router
        registry = router.registry
        cands = registry.candidates(self.role, model)
        if not cands:       # a model nobody serves: routing answers 404 now, not a 429 later
            return model is not None and not registry.serves(model)
        if router.outliers.ejections:
            cands = router.outliers.filter(cands, self.role.value)
        return self.headroom.room(cands, time.monotonic(), self.unbound)

    def offer(self, ticket: Ticket) -> bool:
        """``True``: dispatch now. Else the ticket waits, or was admitted (its ``admit()``
        called) or rejected within this call."""
        ticket.admit = partial(self._admitted, ticket, ticket.admit)
        if self.queue.offer(ticket):
            self._wait[ticket.priority].observe(0.0)
            return True
        if ticket.queue is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(EXPIRY_PERIOD, self._expire)
        return False

    def _admitted(self, ticket: Ticket, go: Callable[[], None]) -> None:
        now = time.monotonic()
        self._wait[ticket.priority].observe(now - ticket.enqueued)
        self.pace.admitted(ticket.enqueued)
        go()

    def hold(self, admitted: asyncio.Future[None]) -> None:
        """Admit a PD request whose task takes the prefill lease when it next runs: until
        :meth:`bound`, it counts against the headroom (the load does not show it yet, and a
        pump would otherwise admit the whole queue on the same free slot)."""
        self.unbound += 1
        admitted.set_result(None)

    def bound(self) -> None:
        """The held request takes its lease now, before its task awaits anything (or it
        ended): the queue is pumped once that is done."""
        self.unbound -= 1
        if self.queue.size:
            asyncio.get_running_loop().call_soon(self.pump)

    def pump(self) -> None:
        """Capacity may have freed: admit what now fits."""
        if self.queue.size:
            self.queue.pump()

    def error(self, why: Reject) -> errors.RouterError:
        """The answer to a request the queue gave up on (counted here)."""
        self._rejections.labels(why.value).inc()
        if why is Reject.DRAIN:
            return errors.RouterError(503, "The router is shutting down", "service_unavailable",
                                      "draining", "queue_rejected")
        err = errors.RouterError(
            429, {Reject.FULL: "Too many requests are waiting for an instance",
                  Reject.TIMEOUT: "No instance had room for the request in time",
                  Reject.DEADLINE: "The request would miss its deadline in the queue",
                  }[why], "rate_limit_exceeded", why.value, "queue_rejected")
        err.headers = {"Retry-After": str(self.queue.retry_after())}
        return err

    def drain(self) -> None:
        self.queue.drain()

    def _expire(self) -> None:
        self._timer = None
        self.queue.expire()
        self.queue.pump()
        if self.queue.size:
            self._timer = asyncio.get_running_loop().call_later(EXPIRY_PERIOD, self._expire)
