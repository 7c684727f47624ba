"""Routing state shared between the worker processes of one router.

Every worker runs the full application (its own event loop, :class:`~kvrouter.router.Router`,
upstream pool) and keeps a full local copy of the routing state, so a decision reads only
local memory and never waits on a sibling. :class:`WorkerSync` keeps the copies converging:

* **registry** (registrations, pause flags, health state, removals): every local change is
  broadcast as a versioned record (``reg``/``hl``/``del``, last writer wins); a registration
  answers only once every live sibling has applied it (a barrier, ≤ :data:`BARRIER_SECS`), so
  a ``200`` from ``/register`` means every worker routes to the instance;
* **health rounds, timed removals and ``/metrics`` scrapes** run in the leader (worker 0)
  only, which broadcasts their results (one probe per instance per round, not one per
  worker); the probes a worker makes on its own (registration of an unhealthy instance, after
  a connect failure) are broadcast the same way;
* **prefix index**: every ``record`` (block hashes → chosen instance) is forwarded, so a
  prefix routed by one worker is found by the others (``rec``);
* **in-flight load**: every :data:`LOAD_PERIOD` each worker sends its own share of each
  instance's counters when it changed (``load``); the receiver adds the siblings' shares into
  the same :class:`~kvrouter.load.Load` fields the policies read (``Load.remote`` remembers
  how much), so a decision costs nothing more; a sibling that exits takes its share with it;
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
import time
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from kvrouter.http.response import Response
from kvrouter.instance import Role
from kvrouter.load import Load
from kvrouter.metrics import _Family
from kvrouter.prefix.index import PrefixIndex
from kvrouter.registry import Instance
from kvrouter.router import _total
from kvrouter.server import admin
from kvrouter.workers import events as ev
from kvrouter.workers.channel import Link

if TYPE_CHECKING:
    from kvrouter.http.request import Request
    from kvrouter.server.app import App

log = logging.getLogger("kvrouter.workers")

FLUSH_INTERVAL = 0.001   # at most one message per link per ms
LOAD_PERIOD = 0.002      # load shares are compared (and sent if changed) this often …
IDLE_PERIOD = 0.02       # … or this often once our share has been zero for IDLE_AFTER
IDLE_AFTER = 1.0
LOAD_REFRESH = 1.0       # … and sent unchanged this often (self-healing)
REGISTRY_REFRESH = 5.0   # the leader re-sends the whole registry this often (self-healing)
COUNTERS_PERIOD = 1.0    # counter totals for the leader's [stats] line
BARRIER_SECS = 0.25      # a registration waits this long at most for the siblings
GATHER_SECS = 1.0        # a /metrics answer waits this long at most for the siblings
DUMP_CHUNK = 20_000      # prefix-index entries per dump message
TOMBSTONE_SECS = 300.0   # removals remembered this long (a late, older record cannot revive)
_ZERO7 = (0,) * 7
_NO_VERSION = (0.0, -1)


class SharedPrefixIndex(PrefixIndex):
    """The prefix index of a worker: local records are also handed to ``sink``."""

    __slots__ = ("sink",)

    def __init__(self, max_entries: int, ttl_secs: float) -> None:
        super().__init__(max_entries, ttl_secs)
        self.sink = None

    def record(self, hashes, identity: str, now: float) -> None:
        super().record(hashes, identity, now)
        sink = self.sink
        if sink is not None and hashes:
            sink(hashes, identity)

    def record_remote(self, hashes, identity: str, now: float) -> None:
        super().record(hashes, identity, now)

    def runs(self) -> list[list]:
        """The whole index as ``[[identity, [hash, …]], …]``, oldest entry first, consecutive
        entries of one instance in one run. Replaying each run with ``record(run[::-1], …)``
        rebuilds the same entries in the same eviction order.

        PrefixIndex has no public iteration; this reads its internals (both the OrderedDict
        layout and the numpy table layout) and raises AttributeError for any other."""
        names = {num: ident for ident, num in self._ids.items()}
        if hasattr(self, "_entries"):                       # OrderedDict layout
            mask = (1 << 64) - 1
            pairs = ((key >> 64, key & mask) for key in self._entries)
        else:                                               # numpy table layout
            if not self.size:
                return []
            stamps, slots = self._live_positions()
            nums = self._instances_of(stamps)
            hashes = self._tk[slots] ^ self._salts[nums]
            pairs = zip(nums.tolist(), hashes.tolist())
        out: list[list] = []
        cur_num, cur = None, None
        for num, h in pairs:
            if num != cur_num:
                cur_num, cur = num, []
                out.append([names[num], cur])
            cur.append(h)
        return out


class _SharedSessions:
    """Wraps a policy's session memory: local observations are also handed to ``sink``."""

    __slots__ = ("inner", "role", "sink")

    def __init__(self, inner, role: str, sink) -> None:
        self.inner, self.role, self.sink = inner, role, sink

    def observe(self, session_id: str, identity: str) -> bool:
        hit = self.inner.observe(session_id, identity)
        self.sink(self.role, session_id, identity)
        return hit

    def __len__(self) -> int:
        return len(self.inner)


class WorkerSync:
    """One worker's end of the shared routing state (see the module docstring)."""

    def __init__(self, app: App, worker: int, workers: int, *, share_prefix: bool = True) -> None:
        self.app = app
        self.router = router = app.router
        self.me = worker
        self.workers = workers
        self.leader = worker == 0
        self._scrapes = self.leader and router.needs_remote_metrics()
        self.links: dict[int, Link] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._applying = False
        self._events: list[dict] = []
        self._records: dict[tuple, object] = {}
        self._sessions: list[list] = []
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = 0.0
        self._last_stamp = 0.0
        self._versions: dict[str, list[tuple]] = {}      # id → [info version, health version]
        self._tombstones: dict[str, tuple] = {}
        self._load_sent: dict[str, list[int]] = {}
        self._load_sent_at = 0.0
        self._active_at = 0.0
        self._load_seq = 0
        self._snaps_sent: dict[str, object] = {}
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[asyncio.Future, set[int], list]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

        reg = router.registry
        reg.on_added.append(self._on_added)
        reg.on_removed.append(self._on_removed)
        reg.on_changed.append(self._on_changed)
        index = router.index
        if share_prefix and isinstance(index, SharedPrefixIndex):
            index.sink = self._on_record
        for role, policy in router.policies.items():
            sessions = getattr(policy, "sessions", None)
            if sessions is not None:
                policy.sessions = _SharedSessions(sessions, role.value, self._on_session)
        router.remote_totals = self._remote_totals
        routes = app.routes
        for method in ("GET", "HEAD"):
            routes.add(method, "/metrics", self._metrics_route)
            routes.add(method, "/health", self._health_route)
        routes.add("POST", "/register", self._register_route)
        self._handlers = {
            "reg": self._apply_reg, "hl": self._apply_health, "del": self._apply_del,
            "snap": self._apply_snap, "load": self._apply_load, "rec": self._apply_records,
            "dump": self._apply_records, "sess": self._apply_sessions, "ctr": self._apply_ctr,
            "hello": self._apply_hello, "bar": self._apply_barrier, "ack": self._apply_reply,
            "mreq": self._apply_metrics_request, "mrep": self._apply_reply,
        }

    # -- links -----------------------------------------------------------------------------
    def start(self, peers: dict[int, object]) -> None:
        """Start the links to the initial siblings (sockets made before the fork)."""
        self.loop = asyncio.get_running_loop()
        for inst in self.router.registry.all():      # added before the links existed
            self._versions.setdefault(inst.identity, [self._stamp(), self._stamp()])
        for peer, sock in peers.items():
            self.add_peer(peer, sock)
        self._timer = self.loop.call_later(LOAD_PERIOD, self._tick)
        self._spawn(self._slow_loop())

    def add_peer(self, peer: int, sock) -> None:
        """A link to sibling ``peer`` (a restarted one gets a new link)."""
        old = self.links.get(peer)
        if old is not None:
            old.close()
        link = Link(sock, peer, self._on_message, self._on_link_closed)
        link.state.update(loads={}, seq=-1, ctr=None)
        self.links[peer] = link
        link.start()
        self._send_to(link, [{"t": "hello", "w": self.me, "pid": os.getpid()},
                             *self._registry_state(),
                             self._load_event(self._local_loads())])
        others = [p for p in self.links if p != peer]
        if self.router.index.size and self.me == min([self.me, *others]):
            self._send_dump(link)

    def _on_link_closed(self, link: Link) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        if not self._closing:
            log.info("worker %d: worker %d left; its load share is dropped", self.me, link.peer)
        old = link.state.get("loads") or {}
        link.state["loads"] = {}
        for ident in old:
            self._refresh_remote(ident)
        for fut, waiting, _ in list(self._waiters.values()):
            waiting.discard(link.peer)
            if not waiting and not fut.done():
                fut.set_result(None)

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

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sending ---------------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        if self.links:              # with no sibling linked, a (re)joining one gets full state
            self._events.append(event)
            self._schedule()

    def _schedule(self) -> None:
        if self._flush_handle is None and self.loop is not None and self.links:
            delay = self._last_flush + FLUSH_INTERVAL - self.loop.time()
            self._flush_handle = (self.loop.call_soon(self.flush) if delay <= 0
                                  else self.loop.call_later(delay, self.flush))

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

    def _stamp(self) -> tuple[float, int]:
        now = time.time()
        if now <= self._last_stamp:
            now = self._last_stamp + 1e-6
        self._last_stamp = now
        return (now, self.me)

    # -- local changes → events ------------------------------------------------------------
    def _reg_event(self, inst: Instance, v: tuple) -> dict:
        return {"t": "reg", "id": inst.identity, "v": v, "i": ev.info_to_json(inst.info),
                "st": inst.static}

    def _health_event(self, inst: Instance, v: tuple) -> dict:
        since = inst.unhealthy_since
        return {"t": "hl", "id": inst.identity, "v": v, "s": inst.state, "f": inst.fail_streak,
                "ok": inst.success_streak, "since": None if since is None else ev.wall(since)}

    def _on_added(self, inst: Instance) -> None:
        if self._applying:
            return
        v = self._stamp()
        self._versions[inst.identity] = [v, v]
        self._tombstones.pop(inst.identity, None)
        self._emit(self._reg_event(inst, v))
        self._emit(self._health_event(inst, v))

    def _on_changed(self, inst: Instance, what: str) -> None:
        if self._applying:
            return
        v = self._stamp()
        vers = self._versions.setdefault(inst.identity, [v, v])
        if what == "info":
            vers[0] = v
            self._emit(self._reg_event(inst, v))
        else:
            vers[1] = v
            self._emit(self._health_event(inst, v))

    def _on_removed(self, inst: Instance, reason: str) -> None:
        if self._applying:
            return
        v = self._stamp()
        self._versions.pop(inst.identity, None)
        self._tombstones[inst.identity] = v
        self._emit({"t": "del", "id": inst.identity, "v": v, "r": reason})

    def _on_record(self, hashes, identity: str) -> None:
        if not self.links:
            return
        key = (identity, hashes[-1], len(hashes))
        records = self._records
        if key in records:
            del records[key]        # keep the latest position
        records[key] = hashes
        self._schedule()

    def _on_session(self, role: str, session_id: str, identity: str) -> None:
        if not self.links:
            return
        self._sessions.append([role, session_id, identity])
        self._schedule()

    def _registry_state(self) -> list[dict]:
        """The registry as events (with the leader's snapshots), for a (re)started sibling."""
        out: list[dict] = []
        for inst in self.router.registry.all():
            vers = self._versions.setdefault(inst.identity, [self._stamp(), self._stamp()])
            out.append(self._reg_event(inst, vers[0]))
            out.append(self._health_event(inst, vers[1]))
            if inst.snapshot is not None and self.leader:
                out.append({"t": "snap", "id": inst.identity,
                            "s": ev.snapshot_to_json(inst.snapshot)})
        return out

    def _send_dump(self, link: Link) -> None:
        index = self.router.index
        try:
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

    # -- periodic work -----------------------------------------------------------------------
    def _local_loads(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for ident, load in self.router.registry.loads().items():
            vals = [load.requests, load.tokens, load.prefill_tokens, load.prefill_leases,
                    load.pending, load.pending_prefill, load.pending_prefill_leases]
            r = load.remote
            if r is not None:
                vals = [max(0, a - b) for a, b in zip(vals, r)]
            if any(vals):
                out[ident] = vals
        return out

    def _load_event(self, loads: dict[str, list[int]]) -> dict:
        self._load_seq += 1
        self._load_sent = loads
        self._load_sent_at = time.monotonic()
        return {"t": "load", "n": self._load_seq, "l": loads}

    def _load_if_changed(self) -> None:
        loads = self._local_loads()
        now = time.monotonic()
        if loads or loads != self._load_sent:
            self._active_at = now
        if loads != self._load_sent or now - self._load_sent_at > LOAD_REFRESH:
            self._emit(self._load_event(loads))

    def _tick(self) -> None:
        """Every LOAD_PERIOD: our load share if it changed; the leader's new snapshots."""
        idle = time.monotonic() - self._active_at > IDLE_AFTER
        self._timer = self.loop.call_later(IDLE_PERIOD if idle else LOAD_PERIOD, self._tick)
        if not self.links:
            return
        self._load_if_changed()
        if self._scrapes:
            sent = self._snaps_sent
            for inst in self.router.registry.all():
                snap = inst.snapshot
                if snap is not None and sent.get(inst.identity) is not snap:
                    sent[inst.identity] = snap
                    self._emit({"t": "snap", "id": inst.identity,
                                "s": ev.snapshot_to_json(snap)})

    async def _slow_loop(self) -> None:
        last_registry = time.monotonic()
        while True:
            await asyncio.sleep(COUNTERS_PERIOD)
            if not self.links:
                continue
            if not self.leader and self.router.cfg.scheduler.stats_interval_secs > 0:
                self._emit({"t": "ctr", "c": self._counter_totals()})
            now = time.monotonic()
            if self.leader and now - last_registry >= REGISTRY_REFRESH:
                last_registry = now
                for event in self._registry_state():
                    self._emit(event)
            cutoff = time.time() - TOMBSTONE_SECS
            for ident in [i for i, v in self._tombstones.items() if v[0] < cutoff]:
                del self._tombstones[ident]

    def _counter_totals(self) -> list[float]:
        m = self.router.metrics
        return [_total(m.cache_hit), _total(m.cache_request), _total(m.hit_blocks),
                _total(m.lookup_blocks), _total(m.backend_cached_tokens),
                _total(m.backend_prompt_tokens)]

    def _remote_totals(self) -> tuple[float, ...]:
        sums = [0.0] * 6
        for link in self.links.values():
            c = link.state.get("ctr")
            if c:
                sums = [a + b for a, b in zip(sums, c)]
        return tuple(sums)

    # -- receiving ---------------------------------------------------------------------------
    def _on_message(self, link: Link, payload: bytes) -> None:
        handlers = self._handlers
        for event in orjson.loads(payload):
            handler = handlers.get(event.get("t"))
            if handler is not None:
                handler(link, event)

    def _apply_reg(self, link: Link, e: dict) -> None:
        ident, v = e["id"], tuple(e["v"])
        if v <= self._tombstones.get(ident, _NO_VERSION):
            return                                  # removed after this registration
        vers = self._versions.get(ident)
        if vers is not None and v <= vers[0]:
            return
        info = ev.info_from_json(e["i"])
        reg = self.router.registry
        inst = reg.get(ident)
        self._applying = True
        try:
            if inst is None:
                inst = reg.add(info, static=bool(e.get("st")))
                self._versions[ident] = [v, _NO_VERSION]
            else:
                inst.static = bool(e.get("st"))
                if info != inst.info:
                    reg.update(inst, info)
                self._versions.setdefault(ident, [v, _NO_VERSION])[0] = v
        finally:
            self._applying = False

    def _apply_health(self, link: Link, e: dict) -> None:
        ident, v = e["id"], tuple(e["v"])
        inst = self.router.registry.get(ident)
        vers = self._versions.get(ident)
        if inst is None or vers is None or v <= vers[1]:
            return
        vers[1] = v
        old = inst.state
        inst.state = e["s"]
        inst.fail_streak = e["f"]
        inst.success_streak = e["ok"]
        inst.unhealthy_since = None if e["since"] is None else ev.mono(e["since"])
        if inst.state != old:
            self.router.registry.changed()
            log.debug("worker %d: %s is %s (from worker %d)", self.me, inst.url, inst.state,
                      link.peer)

    def _apply_del(self, link: Link, e: dict) -> None:
        ident, v = e["id"], tuple(e["v"])
        vers = self._versions.get(ident)
        if vers is not None and max(vers) > v:
            return                                  # registered again since
        if v > self._tombstones.get(ident, _NO_VERSION):
            self._tombstones[ident] = v
        self._versions.pop(ident, None)
        inst = self.router.registry.get(ident)
        if inst is not None:
            self._applying = True
            try:
                self.router.registry.remove(inst, e["r"])
            finally:
                self._applying = False

    def _apply_snap(self, link: Link, e: dict) -> None:
        inst = self.router.registry.get(e["id"])
        if inst is None:
            return
        snap = ev.snapshot_from_json(e["s"])
        inst.snapshot = snap
        inst.load.on_snapshot(snap.taken_at)

    def _apply_load(self, link: Link, e: dict) -> None:
        state = link.state
        if e["n"] <= state["seq"]:
            return
        state["seq"] = e["n"]
        old, new = state["loads"], e["l"]
        state["loads"] = new
        for ident in old.keys() | new.keys():
            if old.get(ident) != new.get(ident):
                self._refresh_remote(ident)

    def _refresh_remote(self, ident: str) -> None:
        """Re-sum the siblings' shares of one instance into its Load counters."""
        total = [0] * 7
        for link in self.links.values():
            share = link.state["loads"].get(ident)
            if share:
                total = [a + b for a, b in zip(total, share)]
        loads = self.router.registry.loads()
        load = loads.get(ident)
        if load is None:
            if not any(total):
                return
            load = loads[ident] = Load()
        old = load.remote or _ZERO7
        if total == list(old):
            return
        for name, new_v, old_v in zip(ev.LOAD_FIELDS, total, old):
            if new_v != old_v:
                setattr(load, name, max(0, getattr(load, name) + new_v - old_v))
        load.remote = total if any(total) else None

    def _apply_records(self, link: Link, e: dict) -> None:
        index = self.router.index
        record = index.record_remote if isinstance(index, SharedPrefixIndex) else None
        if record is None:
            return
        now = time.monotonic()
        if e["t"] == "dump":                 # runs, oldest first (SharedPrefixIndex.runs)
            for ident, hashes in e["r"]:
                record(hashes[::-1], ident, now)
        else:
            for ident, hashes in e["r"]:
                record(hashes, ident, now)

    def _apply_sessions(self, link: Link, e: dict) -> None:
        policies = self.router.policies
        for role, sid, ident in e["s"]:
            sessions = getattr(policies.get(Role(role)), "sessions", None)
            if isinstance(sessions, _SharedSessions):
                sessions.inner.observe(sid, ident)

    def _apply_ctr(self, link: Link, e: dict) -> None:
        link.state["ctr"] = e["c"]

    def _apply_hello(self, link: Link, e: dict) -> None:
        link.state["pid"] = e.get("pid")
        log.info("worker %d: linked with worker %d (pid %s)", self.me, link.peer, e.get("pid"))

    def _apply_barrier(self, link: Link, e: dict) -> None:
        self._send_to(link, [{"t": "ack", "id": e["id"]}])

    def _apply_metrics_request(self, link: Link, e: dict) -> None:
        self._send_to(link, [{"t": "mrep", "id": e["id"], "m": counter_samples(self.router)}])

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

    async def _ask_all(self, kind: str, timeout: float) -> list:
        """Send ``kind`` to every sibling and wait (at most ``timeout``) for their replies."""
        links = list(self.links.values())
        if not links:
            return []
        rid = next(self._ids)
        fut = self.loop.create_future()
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

    # -- routes overridden in worker mode ----------------------------------------------------
    async def _register_route(self, app: App, req: Request) -> Response:
        resp = await admin.register(app, req)
        if resp.status == 200:
            await self.barrier()
        return resp

    async def _metrics_route(self, app: App, req: Request) -> Response:
        dumps = await self._ask_all("mreq", GATHER_SECS)
        body = render_merged(self.router, dumps, self.workers)
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    async def _health_route(self, app: App, req: Request) -> Response:
        resp = await admin.health(app, req)
        body = orjson.loads(resp.body)
        body["worker"] = {"id": self.me, "pid": os.getpid(), "workers": self.workers,
                          "linked": sorted(self.links)}
        return Response(orjson.dumps(body), resp.status)


# -- /metrics over all workers ---------------------------------------------------------------
def _summed_families(router) -> list[_Family]:
    """The counter and histogram families updated by events (summed over workers). The
    gauges computed from the registry already show cluster-wide values, and the prefix-index
    series describe this worker's copy of the index."""
    return [v for v in vars(router.metrics).values() if isinstance(v, _Family)]


def counter_samples(router) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in _summed_families(router):
        for metric in family.collect():
            out[metric.name] = [[s.name, s.labels, s.value] for s in metric.samples]
    return out


class _Collected:
    def __init__(self, metrics: list) -> None:
        self._metrics = metrics

    def collect(self):
        return self._metrics


def render_merged(router, dumps: list[dict], workers: int) -> bytes:
    """This worker's exposition with the siblings' counter and histogram samples added."""
    summed = {f._name for f in _summed_families(router)}
    merged = []
    for metric in router.metrics.registry.collect():
        if metric.name in summed and dumps:
            acc: dict[tuple, list] = {}
            for s in metric.samples:
                acc[(s.name, tuple(sorted(s.labels.items())))] = [s.labels, s.value]
            for dump in dumps:
                for name, labels, value in dump.get(metric.name, ()):
                    key = (name, tuple(sorted(labels.items())))
                    slot = acc.get(key)
                    if slot is None:
                        acc[key] = [labels, value]
                    else:
                        slot[1] += value
            out = Metric(metric.name, metric.documentation, metric.type)
            for (name, _), (labels, value) in acc.items():
                out.add_sample(name, labels, value)
            metric = out
        merged.append(metric)
    answered = Metric("kvrouter_worker_processes",
                      "Worker processes configured / whose counters this answer sums.", "gauge")
    answered.add_sample("kvrouter_worker_processes", {"state": "configured"}, workers)
    answered.add_sample("kvrouter_worker_processes", {"state": "merged"}, 1 + len(dumps))
    merged.append(answered)
    return generate_latest(_Collected(merged))


__all__ = ["SharedPrefixIndex", "WorkerSync", "counter_samples", "render_merged"]
