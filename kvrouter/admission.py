"""The router-side admission queue: late binding, priorities, fairness, bounded overload.

A request pushed to an instance early is stuck behind that instance's queue while another one
frees up first (the reason FastDeploy's Global Scheduler lets idle instances take queued work).
Here a request waits *in the router* while no candidate instance has headroom, and is bound to
an instance only when it leaves the queue: the policy runs then, with prefix affinity and load
as they are at dispatch.

One implementation, two drivers: the server (:mod:`kvrouter.server.inference`) and the
virtual-time cluster (:mod:`kvrouter.sim.cluster`) both use :class:`AdmissionQueue`, with their
own clock and their own ``admit``/``reject`` callbacks. It never blocks and never awaits.

* **Headroom** of an instance (:class:`Headroom`): its in-flight requests under
  ``max_inflight`` and its queued uncached prefill work under ``max_prefill_tokens`` (router-side
  accounting, :class:`kvrouter.load.Load`), and no requests waiting in the engine's own queue
  by its latest fresh ``/metrics`` snapshot. A limit of 0 means none; ``max_inflight`` 0 takes
  twice the engine's reported batch size when it reports one (the live server turns the queue
  on only when a limit is configured).
* **Order**: strict priority between classes (``interactive`` > ``default`` > ``batch``); within
  a class, weighted deficit round robin between tenants (API keys), FCFS within a tenant.
* **Overload**: at most ``queue_size`` requests wait; beyond, the request is rejected at once
  (429 with ``Retry-After``); a request that waited ``timeout`` seconds, or whose deadline
  cannot be met, is rejected (the caller answers 429 or 503).
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrouter.load import Load

if TYPE_CHECKING:
    from kvrouter.registry import Instance


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    DEFAULT = 1
    BATCH = 2


PRIORITY_NAMES = {p.name.lower(): p for p in Priority}
PRIORITY_HEADER = b"x-kvrouter-priority"


def parse_priority(value: bytes | str | None) -> Priority | None:
    """``interactive|default|batch`` (case-insensitive) → :class:`Priority`; else ``None``."""
    if value is None:
        return Priority.DEFAULT
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return PRIORITY_NAMES.get(text.strip().lower())


class Reject(enum.Enum):
    """Why a request left the queue without an instance."""

    FULL = "queue_full"          # no room in the queue: 429
    TIMEOUT = "queue_timeout"    # waited ``timeout`` seconds: 429
    DEADLINE = "deadline"        # would miss its deadline anyway: 429
    DRAIN = "draining"           # the router is shutting down: 503


@dataclass(frozen=True, slots=True)
class Headroom:
    """Per-instance limits on router-side load (0: no limit)."""

    max_inflight: int = 0
    max_prefill_tokens: int = 0

    def has_room(self, load: Load, batch_size: float | None, waiting: float | None) -> bool:
        limit = self.max_inflight or (2 * int(batch_size) if batch_size else 0)
        if limit and load.requests >= limit:
            return False
        if self.max_prefill_tokens and load.prefill_tokens >= self.max_prefill_tokens:
            return False
        return not waiting  # the engine queues requests itself: it is full

    def any_room(self, instances: Iterable[Instance], now: float) -> bool:
        """Whether one of ``instances`` has room, by router-side load corrected by the
        engine's gauges in its latest snapshot fresh at ``now``."""
        for inst in instances:
            snap = inst.fresh_snapshot(now)
            if snap is None:
                if self.has_room(inst.load, None, None):
                    return True
            elif self.has_room(inst.load, snap.max_batch_size, snap.waiting):
                return True
        return False


class Pace:
    """The recent pace of admissions: the queue's estimate of seconds between two of them
    (for ``Retry-After`` and for answering early a request that would miss its deadline)."""

    KEEP = 64

    def __init__(self) -> None:
        self._times: list[float] = []

    def admitted(self, now: float) -> None:
        times = self._times
        times.append(now)
        if len(times) > self.KEEP:
            del times[:self.KEEP // 2]

    def service_time(self) -> float:
        """Seconds between two recent admissions (0 while unknown)."""
        times = self._times
        if len(times) < 2:
            return 0.0
        return (times[-1] - times[0]) / (len(times) - 1)


class Ticket:
    """One request waiting for an instance. ``admit()`` binds and dispatches it; ``reject(why)``
    answers it; exactly one of them is called, once (or neither, after :meth:`cancel`)."""

    __slots__ = ("admit", "deadline", "enqueued", "priority", "queue", "reject", "tenant")

    def __init__(self, priority: Priority, tenant: str, admit: Callable[[], None],
                 reject: Callable[[Reject], None], deadline: float = math.inf) -> None:
        self.priority = priority
        self.tenant = tenant
        self.admit = admit
        self.reject = reject
        self.deadline = deadline
        self.enqueued = 0.0
        self.queue: AdmissionQueue | None = None    # while it waits

    def cancel(self) -> None:
        """The client left: forget the request, call nothing."""
        if self.queue is not None:
            self.queue.remove(self)


class _Class:
    """One priority class: tenants served by weighted deficit round robin."""

    __slots__ = ("active", "deficit", "size", "tenants")

    def __init__(self) -> None:
        self.tenants: dict[str, collections.deque[Ticket]] = {}
        self.active: collections.deque[str] = collections.deque()   # tenants with requests
        self.deficit: dict[str, float] = {}
        self.size = 0

    def push(self, t: Ticket) -> None:
        q = self.tenants.get(t.tenant)
        if q is None:
            q = self.tenants[t.tenant] = collections.deque()
        if not q:
            self.active.append(t.tenant)
        q.append(t)
        self.size += 1

    def pop(self, weight: Callable[[str], float]) -> Ticket:
        """The next request: the tenant at the front spends one credit per request; a turn
        gives it ``weight`` credits; it goes to the back when they run out."""
        while True:
            tenant = self.active[0]
            credit = self.deficit.get(tenant, 0.0)
            if credit < 1.0:                       # a new turn
                credit += weight(tenant)
                if credit < 1.0:
                    self.deficit[tenant] = credit
                    self.active.rotate(-1)
                    continue
            q = self.tenants[tenant]
            t = q.popleft()
            self.size -= 1
            credit -= 1.0
            if not q:
                self.active.popleft()
                del self.tenants[tenant]
                self.deficit.pop(tenant, None)   # an idle tenant keeps no credit
            else:
                self.deficit[tenant] = credit
                if credit < 1.0:
                    self.active.rotate(-1)       # its turn is over
            return t

    def remove(self, t: Ticket) -> bool:
        q = self.tenants.get(t.tenant)
        if q is None:
            return False
        try:
            q.remove(t)
        except ValueError:
            return False
        self.size -= 1
        if not q:
            self.active.remove(t.tenant)
            del self.tenants[t.tenant]
            self.deficit.pop(t.tenant, None)
        return True

    def all(self) -> Iterable[Ticket]:
        for q in self.tenants.values():
            yield from q


class AdmissionQueue:
    """The queue (see the module docstring). ``has_room()`` answers whether some candidate
    instance has headroom now; the driver calls :meth:`pump` whenever capacity may have freed
    (a request finished or got its first byte, an instance joined) and :meth:`expire`
    periodically."""

    def __init__(self, has_room: Callable[[], bool], *, queue_size: int, timeout: float,
                 clock: Callable[[], float], weight: Callable[[str], float] | None = None,
                 service_time: Callable[[], float] | None = None) -> None:
        self.has_room = has_room
        self.queue_size = queue_size
        self.timeout = timeout
        self.clock = clock
        self.weight = weight or (lambda tenant: 1.0)
        self.service_time = service_time    # estimated seconds between two admissions
        self.classes = [_Class() for _ in Priority]
        self.size = 0
        self.admitted = 0
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self._pumping = False

    def offer(self, t: Ticket) -> bool:
        """Admit ``t`` now (``True``: the caller dispatches it), or queue it, or reject it
        (``t.reject`` was called; ``False``). Nothing waits ahead of a request admitted now."""
        if self.size == 0 and self.has_room():
            self.admitted += 1
            return True
        if self.size >= self.queue_size:
            self._reject(t, Reject.FULL)
            return False
        now = self.clock()
        if self._misses_deadline(t, now):
            self._reject(t, Reject.DEADLINE)
            return False
        t.enqueued = now
        t.queue = self
        self.classes[t.priority].push(t)
        self.size += 1
        return False

    def remove(self, t: Ticket) -> None:
        if t.queue is self and self.classes[t.priority].remove(t):
            self.size -= 1
        t.queue = None

    def pump(self) -> int:
        """Admit waiting requests, best first, while some instance has headroom."""
        if self._pumping:          # an admit() that finishes at once re-enters: one loop
            return 0
        self._pumping = True
        n = 0
        try:
            while self.size and self.has_room():
                t = self._pop()
                self.size -= 1
                t.queue = None
                self.admitted += 1
                n += 1
                t.admit()
        finally:
            self._pumping = False
        return n

    def expire(self) -> int:
        """Reject the requests that waited ``timeout`` or can no longer meet their deadline."""
        if not self.size:
            return 0
        now = self.clock()
        late = [t for c in self.classes for t in c.all()
                if now - t.enqueued >= self.timeout or now >= t.deadline]
        for t in late:
            self.remove(t)
            self._reject(t, Reject.TIMEOUT if now - t.enqueued >= self.timeout
                         else Reject.DEADLINE)
        return len(late)

    def drain(self) -> None:
        """Shutdown: answer every waiting request (503)."""
        for t in [t for c in self.classes for t in c.all()]:
            self.remove(t)
            self._reject(t, Reject.DRAIN)

    def depth(self, priority: Priority) -> int:
        return self.classes[priority].size

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's expected drain time, 1..60."""
        per = self.service_time() if self.service_time is not None else 0.0
        return max(1, min(60, math.ceil(self.size * per) if per > 0 else 1))

    # -- internals ------------------------------------------------------------------------------
    def _pop(self) -> Ticket:
        for c in self.classes:
            if c.size:
                return c.pop(self.weight)
        raise IndexError("empty admission queue")

    def _misses_deadline(self, t: Ticket, now: float) -> bool:
        if t.deadline == math.inf or self.service_time is None:
            return False
        ahead = sum(self.classes[p].size for p in Priority if p <= t.priority)
        return now + ahead * self.service_time() > t.deadline

    def _reject(self, t: Ticket, why: Reject) -> None:
        self.rejected[why] += 1
        t.reject(why)
