"""The admission queue's rules (kvrouter.admission), on a fake clock and a capacity counter."""

from __future__ import annotations

from kvrouter.admission import (
    AdmissionQueue,
    Headroom,
    Pace,
    Priority,
    Reject,
    Ticket,
    parse_priority,
)
from kvrouter.backends.snapshot import MetricsSnapshot
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Load
from kvrouter.registry import Instance


class Fleet:
    """``free`` request slots for any model, ``for_model[m]`` those of the instances serving
    model ``m`` only; admitted tickets take one."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.for_model: dict[str, int] = {}
        self.now = 0.0
        self.order: list[str] = []
        self.rejected: list[tuple[str, Reject]] = []
        self.asked: list[str | None] = []       # the models room() was asked about

    def room(self, model: str | None) -> bool:
        self.asked.append(model)
        if model in self.for_model:
            return self.for_model[model] > 0
        return self.free > 0

    def queue(self, size: int = 100, timeout: float = 10.0, **kw) -> AdmissionQueue:
        return AdmissionQueue(self.room, queue_size=size, timeout=timeout,
                              clock=lambda: self.now, **kw)

    def ticket(self, name: str, priority: Priority = Priority.DEFAULT, tenant: str = "t",
               model: str | None = None) -> Ticket:
        def admit() -> None:
            if model in self.for_model:
                self.for_model[model] -= 1
            else:
                self.free -= 1
            self.order.append(name)
        return Ticket(priority, tenant, admit, lambda why: self.rejected.append((name, why)),
                      model)

    def offer(self, q: AdmissionQueue, name: str, **kw) -> bool:
        t = self.ticket(name, **kw)
        if q.offer(t):
            t.admit()
            return True
        return False


def test_admits_at_once_while_there_is_room_then_queues_fcfs():
    f = Fleet(free=2)
    q = f.queue()
    assert f.offer(q, "a") and f.offer(q, "b")
    assert not f.offer(q, "c") and not f.offer(q, "d")
    assert q.size == 2 and f.order == ["a", "b"]
    f.free += 1
    assert q.pump() == 1 and f.order == ["a", "b", "c"]
    f.free += 5
    q.pump()
    assert f.order == ["a", "b", "c", "d"] and q.size == 0


def test_nothing_jumps_the_queue_while_requests_wait():
    f = Fleet(free=0)
    q = f.queue()
    assert not f.offer(q, "a")
    f.free = 1                       # room appears, but "a" waits: "b" must not pass it
    assert not f.offer(q, "b")
    q.pump()
    assert f.order == ["a"]


def test_priority_classes_are_strict():
    f = Fleet(free=0)
    q = f.queue()
    f.offer(q, "batch", priority=Priority.BATCH)
    f.offer(q, "default")
    f.offer(q, "interactive", priority=Priority.INTERACTIVE)
    f.free = 3
    q.pump()
    assert f.order == ["interactive", "default", "batch"]


def test_tenants_share_by_weight_not_by_arrival():
    f = Fleet(free=0)
    q = f.queue(weight=lambda tenant: 2.0 if tenant == "gold" else 1.0)
    for i in range(6):
        f.offer(q, f"flood{i}", tenant="flood")
    for i in range(4):
        f.offer(q, f"gold{i}", tenant="gold")
    f.free = 6
    q.pump()
    served = [n.rstrip("0123456789") for n in f.order]
    assert served.count("gold") == 4                    # 2 : 1, not FCFS (which gives 0)
    assert served[:3] in (["flood", "gold", "gold"], ["gold", "gold", "flood"])


def test_full_queue_rejects_at_once():
    f = Fleet(free=0)
    q = f.queue(size=2)
    for name in "abc":
        f.offer(q, name)
    assert f.rejected == [("c", Reject.FULL)] and q.size == 2
    assert q.rejected[Reject.FULL] == 1


def test_deadline_answers_at_once_what_would_wait_past_the_timeout():
    """``deadline``: the pace says the request would not leave the queue within the timeout,
    so it is answered at arrival; one that waits is answered ``queue_timeout`` after it."""
    f = Fleet(free=0)
    q = f.queue(timeout=5.0, service_time=lambda: 1.0)
    for name in "abcde":                       # up to 4 ahead × 1 s: within 5 s
        f.offer(q, name)
    f.offer(q, "f")                            # 5 ahead × 1 s = 5 s: still within
    assert f.rejected == [] and q.size == 6
    f.offer(q, "g")                            # 6 ahead × 1 s > 5 s: answered now
    f.offer(q, "h", priority=Priority.INTERACTIVE)     # nothing ahead of it in its class
    assert f.rejected == [("g", Reject.DEADLINE)] and q.size == 7
    f.now = 4.9
    assert q.expire() == 0
    f.now = 5.0
    assert q.expire() == 7
    assert {why for _, why in f.rejected[1:]} == {Reject.TIMEOUT}
    assert q.rejected == {Reject.DEADLINE: 1, Reject.TIMEOUT: 7}


def test_cancel_and_drain():
    f = Fleet(free=0)
    q = f.queue()
    t = f.ticket("gone")
    assert not q.offer(t)
    f.offer(q, "stays")
    t.cancel()
    assert q.size == 1
    q.drain()
    assert f.rejected == [("stays", Reject.DRAIN)] and q.size == 0


def test_an_admit_that_finishes_at_once_does_not_recurse():
    f = Fleet(free=0)
    q = f.queue()
    depth: list[int] = []

    def quick(name: str) -> Ticket:
        def admit() -> None:        # served and finished within admit(): room again at once
            f.order.append(name)
            depth.append(q.pump())  # the re-entrant pump does nothing; the outer loop goes on
        return Ticket(Priority.DEFAULT, "t", admit, lambda why: None)

    for name in "abc":
        assert not q.offer(quick(name))
    f.free = 1
    assert q.pump() == 3
    assert q.size == 0 and f.order == ["a", "b", "c"] and depth == [0, 0, 0]


def instance(port: int = 9001) -> Instance:
    return Instance(InstanceInfo(role=Role.MIXED, host="127.0.0.1", scheme="http",
                                 port=str(port)), Load(), stale_after=3.0)


def test_headroom_limits():
    inst = instance()
    load = inst.load
    room = Headroom(max_inflight=2, max_prefill_tokens=1000)
    assert room.slots(inst, 0.0) == 2
    leases = [load.acquire(10, prefill=400) for _ in range(2)]
    assert room.slots(inst, 0.0) == 0                          # 2 in flight
    leases[0].release()
    assert room.slots(inst, 0.0) == 1
    load.acquire(10, prefill=700)
    assert room.slots(inst, 0.0) == 0                          # 1100 prefill tokens queued
    inst.snapshot = MetricsSnapshot(running=1, waiting=3, taken_at=0.0)
    fresh = instance(9002)
    fresh.snapshot = inst.snapshot
    assert room.slots(fresh, 1.0) == 0                         # the engine queues requests
    assert room.slots(fresh, 10.0) == 2                        # ... said a stale snapshot


def test_zero_means_no_limit_whatever_the_engine_batch():
    """max-inflight-per-instance 0 is no in-flight limit (README), also when the engine
    reports its batch size: its own queue (``waiting``) is what says it is full."""
    inst = instance()
    for _ in range(16):
        inst.load.acquire(1, prefill=0)
    inst.snapshot = MetricsSnapshot(running=8, waiting=0, taken_at=0.0, max_batch_size=8)
    tokens_only = Headroom(max_prefill_tokens=1000)
    assert tokens_only.slots(inst, 0.0) == 1 and tokens_only.room([inst], 0.0)


def test_room_counts_the_admitted_requests_without_a_lease():
    """PD: an admitted request takes its lease later; until then it holds a slot."""
    a, b = instance(9001), instance(9002)
    room = Headroom(max_inflight=2)
    b.load.acquire(1)
    assert room.room([a, b], 0.0, unbound=2)                   # 3 slots free
    assert not room.room([a, b], 0.0, unbound=3)
    assert not room.room([], 0.0)
    assert Headroom(max_prefill_tokens=10).room([a, b], 0.0, unbound=1)
    assert not Headroom(max_prefill_tokens=10).room([a, b], 0.0, unbound=2)


def test_a_waiting_request_without_room_does_not_hold_up_one_with_room():
    """Room is per model: model-a's instances are full, model-b's are not. A model-b request
    goes at once past the model-a ones (in any class), which keep their order."""
    f = Fleet(free=0)
    f.for_model = {"a": 0, "b": 1}
    q = f.queue()
    assert not f.offer(q, "a1", model="a", priority=Priority.INTERACTIVE)
    assert not f.offer(q, "a2", model="a")
    assert not f.offer(q, "b1", model="b", priority=Priority.BATCH)  # admitted inside offer
    assert f.order == ["b1"] and q.size == 2
    assert not f.offer(q, "b2", model="b")           # b is full now: it waits
    f.for_model["a"] = 1
    f.for_model["b"] = 1
    f.asked.clear()
    assert q.pump() == 2
    assert f.order == ["b1", "a1", "b2"] and q.size == 1    # a1 first: interactive
    assert f.asked.count("a") <= 3                  # asked per model, not per ticket


def test_drr_skips_a_tenant_without_room_and_keeps_its_turn():
    f = Fleet(free=0)
    f.for_model = {"a": 0, "b": 0}
    q = f.queue()
    for i in range(2):
        f.offer(q, f"x{i}", tenant="x", model="a")
        f.offer(q, f"y{i}", tenant="y", model="b")
    f.for_model["b"] = 2
    q.pump()
    assert f.order == ["y0", "y1"]
    f.for_model["a"] = 2
    q.pump()
    assert f.order == ["y0", "y1", "x0", "x1"]


def test_queue_size_zero_sheds_what_has_no_room():
    """``queue-size: 0`` with a limit: nothing waits; without room, 429 at once."""
    f = Fleet(free=1)
    q = f.queue(size=0)
    assert f.offer(q, "a")
    assert not f.offer(q, "b")
    assert f.rejected == [("b", Reject.FULL)] and q.size == 0


def test_pace_counts_only_time_when_requests_waited():
    """A quiet hour between two bursts is no service time (the old pace averaged it in and
    answered the next burst's second waiting request ``deadline`` at once)."""
    now = [0.0]
    pace = Pace(lambda: now[0], horizon=30.0)
    for t in (1.0, 2.0, 3.0):            # a run: each one waited since before the previous
        now[0] = t
        pace.admitted(enqueued=0.5)
    assert pace.service_time() == 1.0
    now[0] = 3600.0
    pace.admitted(enqueued=3599.5)       # queued after the quiet hour: a new run
    assert pace.service_time() == 0.0    # the old intervals are older than the horizon
    now[0] = 3600.5
    pace.admitted(enqueued=3599.6)
    assert pace.service_time() == 0.5


def test_a_burst_after_a_quiet_hour_waits_instead_of_deadline():
    f = Fleet(free=0)
    pace = Pace(lambda: f.now, horizon=5.0)
    q = f.queue(timeout=5.0, service_time=pace.service_time)
    admitted: list[Ticket] = []

    def burst(n: int) -> None:
        tickets = [f.ticket(f"{f.now:g}-{i}") for i in range(n)]
        for t in tickets:
            inner = t.admit
            t.admit = lambda t=t, inner=inner: (pace.admitted(t.enqueued), admitted.append(t),
                                                inner())
            q.offer(t)

    burst(3)
    for _ in range(3):                   # one admitted per second
        f.now += 1.0
        f.free = 1
        q.pump()
    assert pace.service_time() == 1.0 and len(admitted) == 3
    f.now += 3600.0
    burst(3)
    f.now += 1.0
    f.free = 1
    q.pump()
    burst(1)                             # 2 waiting × 1 s: well within the 5 s
    assert f.rejected == [] and q.size == 3


def test_parse_priority():
    assert parse_priority(None) is Priority.DEFAULT
    assert parse_priority(b"Interactive") is Priority.INTERACTIVE
    assert parse_priority("batch") is Priority.BATCH
    assert parse_priority(b"urgent") is None
