"""Routing state shared between the worker processes of one router.

Every worker runs the full application (its own event loop, :class:`~kvrouter.router.Router`,
upstream pool) and keeps a full local copy of the routing state, so a decision reads only
local memory and never waits on a sibling. :class:`WorkerSync`, the workers'
:class:`~kvrouter.shared.SharedState`, keeps the copies converging:

* **registry** (registrations, pause flags, health state, removals): every local change is
  broadcast as a versioned record (``reg``/``hl``/``del``, last writer wins,
  :class:`~kvrouter.workers.replica.RegistryReplica`); a registration answers only once every
  live sibling has applied it (a barrier, ≤ :data:`BARRIER_SECS`), so a ``200`` from
  ``/register`` means every worker routes to the instance;
* **health rounds, timed removals and ``/metrics`` scrapes** run in the leader (worker 0)
  only, which broadcasts their results (one probe per instance per round, not one per
  worker); the probes a worker makes on its own (registration of an unhealthy instance, after
  a connect failure) are broadcast the same way;
* **prefix index**: every ``record`` (block hashes → chosen instance) is forwarded, so a
  prefix routed by one worker is found by the others (``rec``);
* **in-flight load**: every :data:`LOAD_PERIOD` each worker sends its shares of the
  instances whose counters moved (``load`` with ``p``: only those, an all-zero one for a
  share that went to zero), and its whole share every :data:`LOAD_REFRESH` (``load`` without
  ``p``); the receiver adds the siblings' shares into the same :class:`~kvrouter.load.Load`
  fields the policies read (:class:`~kvrouter.shared.loads.LoadShares`), so a decision costs
  nothing more; a sibling that exits takes its share with it;
* **session affinity** observations (``sess``), so ``router_cache_hit_total`` means "same
  instance as the session's previous request" whichever worker served that one;
* **counters**: ``/metrics`` answers with the sum over the workers (the answering worker asks
  the others, :data:`GATHER_SECS` at most); the leader's ``[stats]`` line adds the totals
  the others push every second.

Outgoing events are batched: at most one message per link every :data:`FLUSH_INTERVAL`
(usually one per event-loop tick under load), so the lag of any shared state is a few ms.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.metrics_core import Metric

from kvrouter.instance import Role
from kvrouter.metrics import CounterSamples, RouterMetrics, StatsTotals
from kvrouter.prefix.index import PrefixIndex
from kvrouter.shared import SharedState
from kvrouter.shared.loads import LoadShares
from kvrouter.workers import events as ev
from kvrouter.workers.channel import Link
from kvrouter.workers.replica import RegistryReplica, SharedPrefixIndex

if TYPE_CHECKING:
    from kvrouter.load import LoadShare
    from kvrouter.registry import Instance
    from kvrouter.router import Router

log = logging.getLogger("kvrouter.workers")

FLUSH_INTERVAL = 0.001   # at most one message per link per ms
LOAD_PERIOD = 0.002      # the load shares that moved are sent this often …
IDLE_PERIOD = 0.02       # … or this often once our share has been zero for IDLE_AFTER
IDLE_AFTER = 1.0
LOAD_REFRESH = 1.0       # … and the whole share, rebuilt, this often (self-healing)
SNAPSHOT_PERIOD = 0.05   # the leader looks for new metrics snapshots to send this often
REGISTRY_REFRESH = 5.0   # the leader re-sends the whole registry this often (self-healing)
COUNTERS_PERIOD = 1.0    # counter totals for the leader's [stats] line
BARRIER_SECS = 0.25      # a registration waits this long at most for the siblings
GATHER_SECS = 1.0        # a /metrics answer waits this long at most for the siblings
DUMP_CHUNK = 20_000      # prefix-index entries per dump message

_Waiter = tuple[asyncio.Future[None], set[int], list]


class WorkerSync(SharedState):
    """Worker ``me`` of ``workers``: its end of the shared routing state (see the module
    docstring). ``peers``: the links to the initial siblings (sockets made before the fork),
    started by :meth:`start`; ``share_prefix=False`` keeps this worker's prefix records to
    itself."""

    router: Router
    replica: RegistryReplica
    loads: LoadShares

    def __init__(self, me: int, workers: int, peers: Mapping[int, socket.socket] | None = None,
                 *, share_prefix: bool = True) -> None:
        self.me = me
        self.workers = workers
        self.share_prefix = share_prefix
        self.links: dict[int, Link] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._peers = dict(peers or {})
        self._scrapes = False
        self._replaying = False          # applying a sibling's prefix records
        self._events: list[dict] = []
        self._records: dict[tuple, Sequence[int]] = {}
        self._sessions: list[list] = []
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = 0.0
        self._load_sent_at = 0.0
        self._next_snaps = 0.0
        self._active_at = 0.0
        self._load_seq = 0
        self._snaps_sent: dict[str, object] = {}
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._handlers: dict[str, Callable[[Link, dict], None]] = {
            "reg": self._apply_reg, "hl": self._apply_health, "del": self._apply_del,
            "snap": self._apply_snap, "load": self._apply_load, "rec": self._apply_records,
            "dump": self._apply_records, "sess": self._apply_sessions, "ctr": self._apply_ctr,
            "hello": self._apply_hello, "bar": self._apply_barrier, "ack": self._apply_reply,
            "mreq": self._apply_metrics_request, "mrep": self._apply_reply,
        }

    # -- SharedState: lifecycle ----------------------------------------------------------------
    @property
    def leader(self) -> bool:
        """Worker 0 runs health rounds, removals, metrics scrapes and the [stats] line."""
        return self.me == 0

    def make_index(self, max_entries: int, ttl_secs: float) -> PrefixIndex:
        return SharedPrefixIndex(max_entries, ttl_secs,
                                 on_record=self.recorded if self.share_prefix else None)

    def attach(self, router: Router) -> None:
        self.router = router
        self.replica = RegistryReplica(router.registry, self.me, self._emit)
        self.loads = LoadShares(router.registry)
        self._scrapes = self.leader and router.needs_remote_metrics()

    def start(self) -> None:
        """Start the links to the initial siblings (inside the worker's loop)."""
        self.loop = loop = asyncio.get_running_loop()
        self.replica.seed()                 # instances added before the links existed
        peers, self._peers = self._peers, {}
        for peer, sock in peers.items():
            self.add_peer(peer, sock)
        self._timer = loop.call_later(LOAD_PERIOD, self._tick)
        self._spawn(self._slow_loop())

    def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for t in list(self._tasks):
            t.cancel()
        for link in list(self.links.values()):
            link.close()
        for sock in self._peers.values():   # never started
            sock.close()
        self._peers = {}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- SharedState: local changes ------------------------------------------------------------
    def instance_added(self, inst: Instance) -> None:
        self.replica.added(inst)

    def instance_changed(self, inst: Instance, what: str) -> None:
        self.replica.changed(inst, what)

    def instance_removed(self, inst: Instance, reason: str) -> None:
        self._snaps_sent.pop(inst.identity, None)
        self.replica.removed(inst, reason)

    def recorded(self, hashes: Sequence[int], identity: str) -> None:
        if not self.links or self._replaying or not len(hashes):
            return
        key = (identity, hashes[-1], len(hashes))
        records = self._records
        if key in records:
            del records[key]        # keep the latest position
        records[key] = hashes
        self._schedule()

    def observed(self, role: Role, session_id: str, identity: str) -> None:
        if not self.links:
            return
        self._sessions.append([role.value, session_id, identity])
        self._schedule()

    def peer_totals(self) -> StatsTotals | None:
        total: StatsTotals | None = None
        for link in self.links.values():
            c = link.state.get("ctr")
            if c:
                totals = StatsTotals(*c)
                total = totals if total is None else total + totals
        return total

    # -- SharedState: admin endpoints ----------------------------------------------------------
    async def registered(self) -> None:
        await self.barrier()

    async def render_metrics(self, metrics: RouterMetrics) -> bytes:
        dumps: list[CounterSamples] = await self._ask_all("mreq", GATHER_SECS)
        answered = Metric("kvrouter_worker_processes",
                          "Worker processes configured / whose counters this answer sums.",
                          "gauge")
        answered.add_sample("kvrouter_worker_processes", {"state": "configured"}, self.workers)
        answered.add_sample("kvrouter_worker_processes", {"state": "merged"}, 1 + len(dumps))
        return metrics.render_merged(dumps, [answered])

    def health_info(self) -> dict[str, object]:
        return {"worker": {"id": self.me, "pid": os.getpid(), "workers": self.workers,
                           "linked": sorted(self.links)}}

    # -- links ---------------------------------------------------------------------------------
    def add_peer(self, peer: int, sock: socket.socket) -> None:
        """A link to sibling ``peer`` (a restarted one gets a new link)."""
        old = self.links.get(peer)
        if old is not None:
            old.close()
        link = Link(sock, peer, self._on_message, self._on_link_closed)
        self.links[peer] = link
        link.start()
        self.flush()     # queued changes go first: our load events reach every link in order
        self._send_to(link, [{"t": "hello", "w": self.me, "pid": os.getpid()},
                             *self.replica.state(snapshots=self.leader),
                             self._load_event(self.loads.own())])
        others = [p for p in self.links if p != peer]
        if self.router.index.size and self.me == min([self.me, *others]):
            self._send_dump(link)

    def _on_link_closed(self, link: Link) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        if not self._closing:
            log.info("worker %d: worker %d left; its load share is dropped", self.me, link.peer)
        self.loads.drop(link)
        for fut, waiting, _ in list(self._waiters.values()):
            waiting.discard(link.peer)
            if not waiting and not fut.done():
                fut.set_result(None)

    # -- sending -------------------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        if self.links:              # with no sibling linked, a (re)joining one gets full state
            self._events.append(event)
            self._schedule()

    def _schedule(self) -> None:
        loop = self.loop
        if self._flush_handle is None and loop is not None and self.links:
            delay = self._last_flush + FLUSH_INTERVAL - loop.time()
            self._flush_handle = (loop.call_soon(self.flush) if delay <= 0
                                  else loop.call_later(delay, self.flush))

    def flush(self) -> None:
        """Send the queued events to every sibling as one message."""
        self._flush_handle = None
        if self.loop is not None:
            self._last_flush = self.loop.time()
        events = self._events
        if events or self._records or self._sessions:
            self._load_if_changed()          # ride along: shorter lag than the next tick
        if self._records:
            events.append({"t": "rec", "r": [[key[0], hashes]
                                             for key, hashes in self._records.items()]})
            self._records = {}
        if self._sessions:
            events.append({"t": "sess", "s": self._sessions})
            self._sessions = []
        if not events:
            return
        self._events = []
        if self.links:
            payload = orjson.dumps(events)
            for link in list(self.links.values()):
                link.send(payload)

    def _send_to(self, link: Link, events: list[dict]) -> None:
        """Send to one sibling now, after whatever was queued for all (keeps the order)."""
        self.flush()
        link.send(orjson.dumps(events))

    def _send_dump(self, link: Link) -> None:
        index = self.router.index
        try:
            if not isinstance(index, SharedPrefixIndex):
                raise AttributeError("the prefix index cannot list its entries")
            runs = index.runs()
        except (AttributeError, KeyError) as e:   # the index changed shape: skip the transfer
            log.warning("worker %d: cannot dump the prefix index: %r", self.me, e)
            return
        chunk: list[list] = []
        size = 0
        for ident, hashes in runs:
            for i in range(0, len(hashes), DUMP_CHUNK):
                part = hashes[i:i + DUMP_CHUNK]
                chunk.append([ident, part])
                size += len(part)
                if size >= DUMP_CHUNK:
                    self._send_to(link, [{"t": "dump", "r": chunk}])
                    chunk, size = [], 0
        if chunk:
            self._send_to(link, [{"t": "dump", "r": chunk}])
        log.info("worker %d: sent the prefix index (%d entries) to worker %d",
                 self.me, index.size, link.peer)

    # -- periodic work -------------------------------------------------------------------------
    def _load_event(self, shares: dict[str, LoadShare], partial: bool = False) -> dict:
        """A ``load`` event: our whole share, or with ``partial`` the shares that changed."""
        self._load_seq += 1
        event: dict = {"t": "load", "n": self._load_seq, "l": ev.shares_to_json(shares)}
        if partial:
            event["p"] = 1
        else:
            self._load_sent_at = time.monotonic()
        return event

    def _load_if_changed(self) -> None:
        """Our shares that moved since the last call; the whole share, rebuilt, every
        LOAD_REFRESH (a message the link dropped, or a missed change, heals within it)."""
        shares = self.loads
        changed = shares.changes()
        now = time.monotonic()
        if changed or shares.busy:
            self._active_at = now
        if now - self._load_sent_at > LOAD_REFRESH:
            self._emit(self._load_event(shares.own(rebuild=True)))
        elif changed:
            self._emit(self._load_event(changed, partial=True))

    def _tick(self) -> None:
        """Every LOAD_PERIOD: our load shares that moved; every SNAPSHOT_PERIOD the leader's
        new metrics snapshots."""
        now = time.monotonic()
        idle = now - self._active_at > IDLE_AFTER
        if self.loop is not None:
            self._timer = self.loop.call_later(IDLE_PERIOD if idle else LOAD_PERIOD, self._tick)
        if not self.links:
            return
        self._load_if_changed()
        if self._scrapes and now >= self._next_snaps:
            self._next_snaps = now + SNAPSHOT_PERIOD
            registry, sent = self.router.registry, self._snaps_sent
            for ident in registry.loads():           # unsorted: registry.all() sorts
                inst = registry.get(ident)
                snap = inst.snapshot if inst is not None else None
                if inst is not None and snap is not None and sent.get(ident) is not snap:
                    sent[ident] = snap
                    self._emit(self.replica.snapshot_event(inst))

    async def _slow_loop(self) -> None:
        last_registry = time.monotonic()
        while True:
            await asyncio.sleep(COUNTERS_PERIOD)
            if not self.links:
                continue
            if not self.leader and self.router.cfg.scheduler.stats_interval_secs > 0:
                self._emit({"t": "ctr", "c": self.router.metrics.stats_totals().as_list()})
            now = time.monotonic()
            if self.leader and now - last_registry >= REGISTRY_REFRESH:
                last_registry = now
                for event in self.replica.state(snapshots=True):
                    self._emit(event)
            self.replica.expire_tombstones()

    # -- receiving -----------------------------------------------------------------------------
    def _on_message(self, link: Link, payload: bytes) -> None:
        handlers = self._handlers
        for event in orjson.loads(payload):
            handler = handlers.get(event.get("t"))
            if handler is not None:
                handler(link, event)

    def _apply_reg(self, link: Link, e: dict) -> None:
        self.replica.apply_reg(e)

    def _apply_health(self, link: Link, e: dict) -> None:
        self.replica.apply_health(e, link.peer)

    def _apply_del(self, link: Link, e: dict) -> None:
        self.replica.apply_del(e)

    def _apply_snap(self, link: Link, e: dict) -> None:
        self.replica.apply_snap(e)

    def _apply_load(self, link: Link, e: dict) -> None:
        self.loads.update(link, e["n"], ev.shares_from_json(e["l"]), partial="p" in e)

    def _apply_records(self, link: Link, e: dict) -> None:
        record = self.router.index.record
        now = time.monotonic()
        self._replaying = True
        try:
            if e["t"] == "dump":             # runs, oldest first (SharedPrefixIndex.runs)
                for ident, hashes in e["r"]:
                    record(hashes[::-1], ident, now)
            else:
                for ident, hashes in e["r"]:
                    record(hashes, ident, now)
        finally:
            self._replaying = False

    def _apply_sessions(self, link: Link, e: dict) -> None:
        sessions = self.router.sessions
        for role, sid, ident in e["s"]:
            memory = sessions.get(Role(role))
            if memory is not None:
                memory.remember(sid, ident)

    def _apply_ctr(self, link: Link, e: dict) -> None:
        link.state["ctr"] = e["c"]

    def _apply_hello(self, link: Link, e: dict) -> None:
        link.state["pid"] = e.get("pid")
        log.info("worker %d: linked with worker %d (pid %s)", self.me, link.peer, e.get("pid"))

    def _apply_barrier(self, link: Link, e: dict) -> None:
        self._send_to(link, [{"t": "ack", "id": e["id"]}])

    def _apply_metrics_request(self, link: Link, e: dict) -> None:
        self._send_to(link, [{"t": "mrep", "id": e["id"],
                              "m": self.router.metrics.counter_samples()}])

    def _apply_reply(self, link: Link, e: dict) -> None:
        waiter = self._waiters.get(e["id"])
        if waiter is None:
            return
        fut, waiting, replies = waiter
        if link.peer in waiting:
            waiting.discard(link.peer)
            if "m" in e:
                replies.append(e["m"])
            if not waiting and not fut.done():
                fut.set_result(None)

    # -- requests to every sibling -------------------------------------------------------------
    async def _ask_all(self, kind: str, timeout: float) -> list:
        """Send ``kind`` to every sibling and wait (at most ``timeout``) for their replies."""
        links = list(self.links.values())
        if not links:
            return []
        rid = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        replies: list = []
        self._waiters[rid] = (fut, {link.peer for link in links}, replies)
        try:
            for link in links:
                self._send_to(link, [{"t": kind, "id": rid}])
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            log.warning("worker %d: no %s reply from worker(s) %s within %gs", self.me, kind,
                        sorted(self._waiters[rid][1]), timeout)
        finally:
            self._waiters.pop(rid, None)
        return replies

    async def barrier(self, timeout: float = BARRIER_SECS) -> None:
        """Return once every live sibling has applied everything we sent before."""
        await self._ask_all("bar", timeout)


__all__ = ["SharedPrefixIndex", "WorkerSync"]
