"""The admission queue's rules (kvrouter.admission), on a fake clock and a capacity counter."""

from __future__ import annotations

import math

from kvrouter.admission import AdmissionQueue, Headroom, Priority, Reject, Ticket, parse_priority
from kvrouter.load import Load


class Fleet:
    """``free`` request slots; admitted tickets take one, ``finish`` gives one back."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.now = 0.0
        self.order: list[str] = []
        self.rejected: list[tuple[str, Reject]] = []

    def queue(self, size: int = 100, timeout: float = 10.0, **kw) -> AdmissionQueue:
        return AdmissionQueue(lambda: self.free > 0, queue_size=size, timeout=timeout,
                              clock=lambda: self.now, **kw)

    def ticket(self, name: str, priority: Priority = Priority.DEFAULT, tenant: str = "t",
               deadline: float = math.inf) -> Ticket:
        def admit() -> None:
            self.free -= 1
            self.order.append(name)
        return Ticket(priority, tenant, admit, lambda why: self.rejected.append((name, why)),
                      deadline)

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


def test_timeout_and_deadline_reject_waiting_requests():
    f = Fleet(free=0)
    q = f.queue(timeout=5.0, service_time=lambda: 1.0)
    f.offer(q, "a")
    f.offer(q, "b", deadline=3.0)
    assert not f.offer(q, "c", deadline=1.5)   # 2 ahead × 1 s: cannot start before 2.0
    assert f.rejected == [("c", Reject.DEADLINE)]
    f.now = 3.0
    q.expire()
    assert ("b", Reject.DEADLINE) in f.rejected
    f.now = 5.0
    q.expire()
    assert ("a", Reject.TIMEOUT) in f.rejected and q.size == 0


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


def test_headroom_limits():
    load = Load()
    room = Headroom(max_inflight=2, max_prefill_tokens=1000)
    assert room.has_room(load, None, None)
    leases = [load.acquire(10, prefill=400) for _ in range(2)]
    assert not room.has_room(load, None, None)                 # 2 in flight
    leases[0].release()
    assert room.has_room(load, None, None)
    load.acquire(10, prefill=700)
    assert not room.has_room(load, None, None)                 # 1100 prefill tokens queued
    auto = Headroom()
    assert auto.has_room(Load(), None, None)
    busy = Load()
    for _ in range(16):
        busy.acquire(1)
    assert not auto.has_room(busy, 8, None)                    # 2 × the engine's batch of 8
    assert not auto.has_room(Load(), None, 3)                  # the engine queues requests


def test_parse_priority():
    assert parse_priority(None) is Priority.DEFAULT
    assert parse_priority(b"Interactive") is Priority.INTERACTIVE
    assert parse_priority("batch") is Priority.BATCH
    assert parse_priority(b"urgent") is None
