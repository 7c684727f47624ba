"""The live server's driver of the admission queue (:mod:`kvrouter.admission`): the event loop's
clock and timers, the headroom of the router's instances, 429/503 answers and metrics."""

from __future__ import annotations

import asyncio
import time

from kvrouter import errors
from kvrouter.admission import AdmissionQueue, Headroom, Pace, Priority, Reject, Ticket
from kvrouter.instance import Role
from kvrouter.router import Router

EXPIRY_PERIOD = 0.1          # seconds between timeout checks while requests wait
_NAMES = [p.name.lower() for p in Priority]


class Admission:
    """The queue of one router process: requests of ``role`` (mixed, or the prefill side of
    PD) wait here while none of its instances has headroom."""

    def __init__(self, router: Router, role: Role) -> None:
        sch = router.cfg.scheduler
        self.router = router
        self.role = role
        self.headroom = Headroom(sch.max_inflight_per_instance,
                                 sch.max_queued_prefill_tokens_per_instance)
        self.pace = Pace()
        self.queue = AdmissionQueue(self.has_room, queue_size=sch.queue_size,
                                    timeout=sch.queue_timeout_secs, clock=time.monotonic,
                                    service_time=self.pace.service_time)
        self._timer: asyncio.TimerHandle | None = None
        m = router.metrics
        self._wait = [m.queue_wait.labels(name) for name in _NAMES]
        self._rejections = m.queue_rejections
        m.attach_queue(lambda name: self.queue.depth(Priority[name.upper()]), _NAMES)

    def has_room(self) -> bool:
        return self.headroom.any_room(self.router.registry.candidates(self.role),
                                      time.monotonic())

    def offer(self, ticket: Ticket) -> bool:
        """``True``: dispatch now. Else the ticket waits (or was rejected at once)."""
        if self.queue.offer(ticket):
            return True
        if ticket.queue is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(EXPIRY_PERIOD, self._expire)
        return False

    def admitted(self, ticket: Ticket) -> None:
        """Book-keeping of a ticket that left the queue for an instance."""
        now = time.monotonic()
        self._wait[ticket.priority].observe(now - ticket.enqueued)
        self.pace.admitted(now)

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
