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
  by its latest fresh ``/metrics`` snapshot. A limit of 0 means none (the live server turns the
  queue on only when a limit is configured). Headroom is judged per request, over the
  instances that request can be routed to (the driver's ``room(model)``): an instance serving
  another model, or one left out of routing, cannot make room for it.
* **Order**: strict priority between classes (``interactive`` > ``default`` > ``batch``); within
  a class, weighted deficit round robin between tenants (API keys), FCFS within a tenant. A
  request with no room is passed over by one of a later turn that has room (another model).
* **Overload**: at most ``queue_size`` requests wait (0: none; a request without room is
  rejected at once); beyond, the request is rejected at once (429 with ``Retry-After``), and so
  is one that the queue's pace says would wait longer than ``timeout`` (``deadline``); a
  request that waited ``timeout`` seconds is rejected (the caller answers 429 or 503).
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

    def slots(self, inst: Instance, now: float) -> int:
        """How many more requests ``inst`` takes now: none while the engine reports requests
        waiting in its own queue (its latest snapshot fresh at ``now``: it is full) or its
        queued prefill work reached the limit; else what the in-flight limit leaves, or one
        without that limit (one more surely fits; how many more is not known)."""
        snap = inst.fresh_snapshot(now)
        if snap is not None and snap.waiting:
            return 0
        load = inst.load
        if self.max_prefill_tokens and load.prefill_tokens >= self.max_prefill_tokens:
            return 0
        if self.max_inflight:
            return max(0, self.max_inflight - load.requests)
        return 1

    def room(self, instances: Iterable[Instance], now: float, unbound: int = 0) -> bool:
        """Whether ``instances`` have a slot left beyond the ``unbound`` requests admitted but
        not on an instance yet (their lease is taken later: until then the load does not show
        them)."""
        free = 0
        for inst in instances:
            free += self.slots(inst, now)
            if free > unbound:
                return True
        return False


class Pace:
    """How fast the queue drains: the mean of the last :attr:`KEEP` intervals between two
    admissions of waiting requests (for ``Retry-After`` and for answering at once a request
    that would wait longer than the timeout).

    Only intervals during which requests kept waiting count: a request queued after the
    previous admission starts a new run (the quiet time before it is not service time), and
    intervals older than ``horizon`` (the queue timeout) are forgotten (a past burst says
    little about the next one). Requests admitted at arrival are not counted: they measure
    arrivals, not the drain."""

    KEEP = 64

    def __init__(self, clock: Callable[[], float], horizon: float) -> None:
        self.clock = clock
        self.horizon = horizon
        self._last: float | None = None         # the previous admission of a waiting request
        self._gaps: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.KEEP)

    def admitted(self, enqueued: float) -> None:
        """A request that waited since ``enqueued`` leaves the queue now."""
        now = self.clock()
        last = self._last
        if last is not None and enqueued <= last:     # it waited through the interval
            self._gaps.append((now, now - last))
        self._last = now

    def service_time(self) -> float:
        """Seconds between two admissions (0 while unknown)."""
        gaps = self._gaps
        oldest = self.clock() - self.horizon
        while gaps and gaps[0][0] < oldest:
            gaps.popleft()
        if not gaps:
            return 0.0
        return sum(gap for _, gap in gaps) / len(gaps)


class Ticket:
    """One request waiting for an instance. ``admit()`` binds and dispatches it; ``reject(why)``
    answers it; exactly one of them is called, once (or neither, after :meth:`cancel`).
    ``model`` (alias resolved; ``None``: any) decides which instances can make room for it."""

    __slots__ = ("admit", "enqueued", "model", "priority", "queue", "reject", "tenant")

    def __init__(self, priority: Priority, tenant: str, admit: Callable[[], None],
                 reject: Callable[[Reject], None], model: str | None = None) -> None:
        self.priority = priority
        self.tenant = tenant
        self.admit = admit
        self.reject = reject
        self.model = model
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

    def pop(self, weight: Callable[[str], float], fits: Callable[[Ticket], bool]) -> Ticket | None:
        """The next request that ``fits`` (``None``: none does): the first tenant in turn
        order with one spends one credit per request; a turn gives it ``weight`` credits; it
        goes to the back when they run out. A tenant with none that fits keeps its place and
        its credit; within a tenant, the first that fits goes (FCFS among those with room)."""
        active = self.active
        blocked: set[str] = set()
        while len(blocked) < len(active):
            i, tenant = next((i, tn) for i, tn in enumerate(active) if tn not in blocked)
            q = self.tenants[tenant]
            t = next((t for t in q if fits(t)), None)
            if t is None:
                blocked.add(tenant)
                continue
            credit = self.deficit.get(tenant, 0.0)
            if credit < 1.0:                       # a new turn
                credit += weight(tenant)
                if credit < 1.0:
                    self.deficit[tenant] = credit
                    del active[i]
                    active.append(tenant)
                    continue
            if q[0] is t:
                q.popleft()
            else:
                q.remove(t)
            self.size -= 1
            credit -= 1.0
            if not q:
                del active[i]
                del self.tenants[tenant]
                self.deficit.pop(tenant, None)   # an idle tenant keeps no credit
            else:
                self.deficit[tenant] = credit
                if credit < 1.0:                 # its turn is over
                    del active[i]
                    active.append(tenant)
            return t
        return None

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
    """The queue (see the module docstring). ``room(model)`` answers whether an instance a
    request for ``model`` can be routed to has headroom now; the driver calls :meth:`pump`
    whenever capacity may have freed (a request finished or got its first byte, an instance
    joined) and :meth:`expire` periodically."""

    def __init__(self, room: Callable[[str | None], bool], *, queue_size: int, timeout: float,
                 clock: Callable[[], float], weight: Callable[[str], float] | None = None,
                 service_time: Callable[[], float] | None = None) -> None:
        self.room = room
        self.queue_size = queue_size
        self.timeout = timeout
        self.clock = clock
        self.weight = weight or (lambda tenant: 1.0)
        self.service_time = service_time    # estimated seconds between two admissions
        self.classes = [_Class() for _ in Priority]
        self.size = 0
        self.admitted = 0
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self._models: collections.Counter[str | None] = collections.Counter()   # waiting ones
        self._pumping = False

    def offer(self, t: Ticket) -> bool:
        """Admit ``t`` now (``True``: the caller dispatches it), or queue it, or reject it
        (``t.reject`` was called; ``False``). Only a request that finds the queue empty is
        admitted here; one with room that finds requests waiting is queued and the queue
        pumped at once, so that it goes now unless one before it takes the room (its
        ``admit()`` is then called before this returns)."""
        fits = self.room(t.model)
        if self.size == 0 and fits:
            self.admitted += 1
            return True
        if self.size >= self.queue_size:
            self._reject(t, Reject.FULL)
            return False
        if not fits and self._misses_deadline(t):
            self._reject(t, Reject.DEADLINE)
            return False
        t.enqueued = self.clock()
        t.queue = self
        self.classes[t.priority].push(t)
        self._models[t.model] += 1
        self.size += 1
        if fits:
            self.pump()
        return False

    def remove(self, t: Ticket) -> None:
        if t.queue is self and self.classes[t.priority].remove(t):
            self._left(t)
        t.queue = None

    def pump(self) -> int:
        """Admit waiting requests while one has room: each time the first, in the queue's
        order, whose model an instance with headroom serves."""
        if self._pumping:          # an admit() that finishes at once re-enters: one loop
            return 0
        self._pumping = True
        n = 0
        try:
            while self.size:
                t = self._pop()
                if t is None:
                    break
                self._left(t)
                t.queue = None
                self.admitted += 1
                n += 1
                t.admit()
        finally:
            self._pumping = False
        return n

    def expire(self) -> int:
        """Reject the requests that waited ``timeout``."""
        if not self.size:
            return 0
        now = self.clock()
        late = [t for c in self.classes for t in c.all() if now - t.enqueued >= self.timeout]
        for t in late:
            self.remove(t)
            self._reject(t, Reject.TIMEOUT)
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
    def _pop(self) -> Ticket | None:
        """The next request with room, taken out of its class (``None``: none has room).
        ``room`` is asked once per model waiting: while requests wait, usually none has."""
        memo: dict[str | None, bool] = {}

        def model_fits(model: str | None) -> bool:
            ok = memo.get(model)
            if ok is None:
                ok = memo[model] = self.room(model)
            return ok

        if not any(model_fits(m) for m in self._models):
            return None
        for c in self.classes:
            if c.size:
                t = c.pop(self.weight, lambda t: model_fits(t.model))
                if t is not None:
                    return t
        return None

    def _left(self, t: Ticket) -> None:
        """Book-keeping of ``t`` taken out of its class."""
        self.size -= 1
        models = self._models
        models[t.model] -= 1
        if not models[t.model]:
            del models[t.model]

    def _misses_deadline(self, t: Ticket) -> bool:
        """Whether, by the queue's pace, ``t`` would wait longer than ``timeout`` behind the
        requests of its class and above: then it is answered at once, not after the wait."""
        if self.service_time is None:
            return False
        ahead = sum(self.classes[p].size for p in Priority if p <= t.priority)
        return ahead * self.service_time() > self.timeout

    def _reject(self, t: Ticket, why: Reject) -> None:
        self.rejected[why] += 1
        t.reject(why)
