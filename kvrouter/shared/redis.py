"""Routing state shared by router replicas on any hosts, through Redis (``state.redis-url``).

Every replica keeps the whole routing state in memory and routes from it alone: nothing on the
request path waits for Redis. :class:`RedisState`, the replicas' :class:`SharedState`, keeps
the copies converging with two background tasks on redis-py's asyncio client:

* the **writer** sends everything this replica has to say as one pipeline per tick (at most
  one per :data:`FLUSH_INTERVAL`, only when there is something to send): one ``XADD`` to the
  stream ``<p>:events`` of its new events (registry records, prefix records, session
  observations) and of its in-flight shares that changed (the loads mark themselves as they
  move, so this costs nothing per idle instance), the registry keys those events change, and
  every ``load-interval-secs`` one script that stores its whole share in its load key and
  returns the others' (the slow path: presence, expiry of a dead replica's share, and repair
  of a change a reader missed), and the lease of the health rounds;
* the **reader** blocks on the stream (``XREAD BLOCK``) and applies the others' events, then
  pauses :data:`READ_PAUSE`, so that one read takes what several replicas sent.

Keys (``p`` = ``state.key-prefix``):

===================  ========================================================================
``p:events``         stream; entry = ``r`` sender, ``ld`` its load shares that changed, as
                     in ``p:load`` (an all-zero one: gone; older versions sent ``l``, the
                     whole share), ``e`` JSON events (``reg``/``hl``/``del``/``sess``,
                     :mod:`kvrouter.workers.events`), ``pi`` + ``ph`` prefix records
                     (``[[identity, n], …]`` and the n block hashes of each, 8 bytes LE);
                     capped at ``max(prefix-history, 1000)`` entries
``p:inst:<id>``      hash: ``reg`` and ``hl``, the latest registry records of one instance;
                     expires ``registry-ttl-secs`` after the last heartbeat or leader refresh
``p:instances``      set of the ids above; ``p:tomb:<id>``: a removal's version (300 s)
``p:load:<replica>`` a replica's in-flight share, ``[seq, {id: [R, T, …]}]``, expires after
                     ``load-ttl-secs``; ``p:replicas``: set of the replicas that wrote one
                     (one script per tick writes ours and reads the others')
``p:leader``         the replica leading the health rounds (``SET NX PX``, renewed)
===================  ========================================================================

Registry records are versioned (``[wall clock, replica number]``, last writer wins, removals
leave tombstones: :class:`~kvrouter.workers.replica.RegistryReplica`), so the order in which
replicas see them does not matter. A replica that starts (or comes back after Redis was lost)
reads the keys, and the first time also the prefix records of the stream's recent entries.
``register.yaml`` instances are each replica's own: never published, probed by their replica.

Faults: Redis lost → the replica logs once, routes on its local state, runs every health round
itself, drops the others' load shares after ``load-ttl-secs``, queues what it has to say
(bounded) and reconnects with backoff (:data:`BACKOFF_MAX`); back, it re-reads the keys and
publishes its whole registry, which refills a restarted Redis. A replica killed loses nothing:
registrations live in Redis; its load share expires; its lease lapses and another replica
takes the health rounds over.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from kvrouter.backends.engines import ENGINES
from kvrouter.config import ConfigError, StateConfig, redact_url
from kvrouter.instance import Role, kv_address, normalise_host
from kvrouter.prefix.hashing import HashList
from kvrouter.prefix.index import PrefixIndex, as_hash_array
from kvrouter.shared import SharedState
from kvrouter.shared.loads import LoadShares
from kvrouter.workers import events as ev
from kvrouter.workers.replica import TOMBSTONE_SECS, RegistryReplica

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from kvrouter.metrics import RouterMetrics
    from kvrouter.registry import Instance
    from kvrouter.router import Router

__all__ = ["RedisState"]

log = logging.getLogger("kvrouter.replicas")

FLUSH_INTERVAL = 0.01      # at most one pipeline of news per 10 ms
READ_PAUSE = 0.02          # between two stream reads that found news
BLOCK_MS = 1000            # the reader's XREAD BLOCK
READ_COUNT = 128           # stream entries per XREAD
HISTORY_CHUNK = 256        # stream entries per XRANGE when a replica starts
MIN_STREAM = 1000          # the stream keeps at least this many entries (readers' slack)
KEYS_CHUNK = 500           # instances per pipeline when the registry is read
MAX_EVENTS = 20_000        # queued while Redis is lost (newest kept) …
MAX_RECORDS = 20_000       # … prefix records
MAX_SESSIONS = 20_000      # … session observations
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0   # reconnection attempts, doubling
REGISTERED_WAIT = 0.5      # POST /register waits this long at most for its write
IDLE_AFTER = 1.0           # our load shares that moved are sent every FLUSH_INTERVAL, or,
IDLE_SHARE_PERIOD = 0.05   # once ours has been zero and unchanged this long, every 50 ms
LOAD_REBUILD = 1.0         # our whole share is recomputed from every instance this often
TOMBSTONE_EXPIRY = 60.0    # every replica forgets its old removals this often
RESTART_AFTER = 2.0        # a sync task that failed is started again after this long
MAX_SKIP_KINDS = 64        # kinds of unreadable entries logged as warnings (then debug)

# one command per load tick: store our share (ARGV[3], unless ""), then return the live
# replicas' shares, dropping the members whose key expired
_LOADS = """
if ARGV[3] ~= '' then
  redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3], 'PX', ARGV[4])
  redis.call('SADD', KEYS[1], ARGV[2])
end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then out[#out + 1] = id; out[#out + 1] = v else redis.call('SREM', KEYS[1], id) end
end
return out
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_Records = dict[tuple[str, int, int], Sequence[int]]
_RedisDown = (RedisError, OSError, TimeoutError)


class RedisState(SharedState):
    """One router replica's end of the state shared through Redis (see the module docstring).
    Built by ``run_server``; :meth:`open` connects (or raises :class:`ConfigError`)."""

    router: Router
    replica: RegistryReplica
    loads: LoadShares

    def __init__(self, cfg: StateConfig) -> None:
        self.cfg = cfg
        self.url = redact_url(cfg.redis_url)
        self.me = secrets.randbits(62)          # the tie-break of registry versions
        self.rid = f"{self.me:016x}"            # this replica's name in Redis
        self._rid_b = self.rid.encode()
        p = cfg.key_prefix
        self.k_events, self.k_instances = f"{p}:events", f"{p}:instances"
        self.k_replicas, self.k_leader = f"{p}:replicas", f"{p}:leader"
        self.k_inst, self.k_tomb, self.k_load = f"{p}:inst:", f"{p}:tomb:", f"{p}:load:"
        timeout = cfg.redis_timeout_secs
        no_retry = Retry(NoBackoff(), 0)          # our own backoff decides when to retry
        self._w = aioredis.Redis.from_url(cfg.redis_url, socket_connect_timeout=timeout,
                                          socket_timeout=timeout, retry=no_retry)
        self._r = aioredis.Redis.from_url(cfg.redis_url, socket_connect_timeout=timeout,
                                          socket_timeout=timeout + BLOCK_MS / 1000,
                                          retry=no_retry)
        self.connected = False
        self.leads = False           # holds the lease of the health rounds
        self.replicas = 1            # live replicas (load keys), this one included
        self.commands = 0            # Redis commands sent (pipelined ones one by one)
        self._synced = False         # the registry and the history were read once
        self._gen = 0                # connection number: a reader error of an older one
        self._up = asyncio.Event()   # does not count; set while connected
        self._wake = asyncio.Event()
        self._lost_at = 0.0
        self._backoff = BACKOFF_MIN
        self._retry_at = 0.0
        self._last_flush = 0.0
        self._next_load = self._next_lease = self._next_refresh = 0.0
        self._next_expiry = self._next_rebuild = 0.0
        self._events: list[dict] = []
        self._records: _Records = {}
        self._sessions: list[list] = []
        self._touch: dict[str, dict] = {}        # unchanged heartbeats: key refresh only
        self._published: dict[str, dict] = {}    # id → the registration every replica has
        self._waiters: list[asyncio.Future[None]] = []
        self._replaying = False
        self._load_version = -1      # LoadShares.version of the share in our load key
        self._share_active_at = 0.0
        self._next_share = 0.0
        self._load_sent_at = 0.0
        self._load_seq = 0
        self._senders: set[str] = set()
        self._last_id: bytes | str = b"0-0"
        self._refused = ""           # the last refusal logged
        self._skip_kinds: set[tuple[str, str]] = set()   # unreadable entries logged
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- SharedState: lifecycle ----------------------------------------------------------------
    @property
    def leader(self) -> bool:
        """Every replica runs its own static-file watch, scrapes and ``[stats]`` line; the
        health rounds and timed removals follow the Redis lease (:meth:`probes`)."""
        return True

    @property
    def leads_health(self) -> bool:
        """Whether this replica probes every instance: it holds the lease, or Redis is lost
        (then every replica keeps its own registry healthy)."""
        return self.leads or not self.connected

    def probes(self, inst: Instance) -> bool:
        """The lease holder probes (and removes) every instance, its results reach the others
        as registry records, so N replicas do not probe each instance N times; the others
        probe only their own ``register.yaml`` instances. While Redis is lost, every replica
        probes everything."""
        return inst.static or self.leads_health

    def make_index(self, max_entries: int, ttl_secs: float) -> PrefixIndex:
        return PrefixIndex(max_entries, ttl_secs, on_record=self.recorded)

    def attach(self, router: Router) -> None:
        self.router = router
        self.replica = RegistryReplica(router.registry, self.me, self._emit)
        self.loads = LoadShares(router.registry)

    async def open(self) -> None:
        """Connect, read the shared registry and the recent prefix records, start sharing (the
        first tick tries the lease). Redis unreachable: :class:`ConfigError` naming the URL
        (without its password), or, with ``state.redis-optional``, a warning and a start on
        local state."""
        try:
            await self._connect()
        except _RedisDown as e:
            if not self.cfg.redis_optional:
                raise ConfigError(
                    f"config error: state.redis-url: cannot connect to Redis at {self.url}: "
                    f"{self._reason(e)} (start it, or set state.redis-optional: true to start "
                    f"without it)") from None
            log.warning("Redis at %s is unreachable (%s); state.redis-optional: routing on "
                        "this replica's own state, reconnecting in the background", self.url,
                        self._reason(e))
            self._down(time.monotonic())
        self.start()

    def start(self) -> None:
        self._spawn(self._writer)
        self._spawn(self._reader)

    def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """Stop; leave Redis tidy: the last news, our load share and the lease (≤ 1 s)."""
        self.close()
        if self.connected:
            try:
                async with asyncio.timeout(1.0):
                    await self._tick(final=True)
            except (*_RedisDown, asyncio.CancelledError):
                pass
        for client in (self._w, self._r):
            try:
                await client.aclose()
            except _RedisDown:
                pass

    def _spawn(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one of the sync loops; one that ends (a bug, not a Redis fault: those are
        handled inside) is logged and started again (:meth:`_ended`)."""
        task = asyncio.ensure_future(loop())
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._ended(t, loop))

    def _ended(self, task: asyncio.Task, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A sync loop ended: without this its replica would stop sharing silently, still
        saying "connected". Log it, count Redis as lost (the reconnection re-reads the
        registry and publishes ours, so nothing missed meanwhile stays missed) and start the
        loop again after :data:`RESTART_AFTER`."""
        self._tasks.discard(task)
        if self._closing or task.cancelled():
            return
        error = task.exception()
        log.error("replica %s: the Redis %s task stopped (%r); resynchronising and restarting "
                  "it in %g s", self.rid, loop.__name__.strip("_"), error, RESTART_AFTER,
                  exc_info=error)
        if self.connected:
            self._down(time.monotonic())
        asyncio.get_running_loop().call_later(RESTART_AFTER, self._restart, loop)

    def _restart(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if not self._closing:
            self._spawn(loop)

    # -- SharedState: local changes (on the event loop; they only queue) -----------------------
    def instance_added(self, inst: Instance) -> None:
        if not inst.static:
            self.replica.added(inst)

    def instance_changed(self, inst: Instance, what: str) -> None:
        if not inst.static:
            self.replica.changed(inst, what)

    def instance_removed(self, inst: Instance, reason: str) -> None:
        if not inst.static:
            self.replica.removed(inst, reason)
        self._published.pop(inst.identity, None)

    def recorded(self, hashes: Sequence[int], identity: str) -> None:
        if self._replaying or not len(hashes):
            return
        records = self._records
        key = (identity, hashes[-1], len(hashes))
        if key in records:
            del records[key]                 # keep the latest position
        elif len(records) >= MAX_RECORDS:    # Redis lost for long: the oldest go
            del records[next(iter(records))]
        records[key] = hashes
        self._kick()

    def observed(self, role: Role, session_id: str, identity: str) -> None:
        if len(self._sessions) < MAX_SESSIONS:
            self._sessions.append([role.value, session_id, identity])
            self._kick()

    def _emit(self, event: dict) -> None:
        """A local registry change (RegistryReplica): queue its event, except a heartbeat
        that changes nothing, which only refreshes the key's TTL."""
        if event["t"] == "reg":
            if self._published.get(event["id"]) == event["i"]:
                self._touch[event["id"]] = event
                self._kick()
                return
            self._published[event["id"]] = event["i"]
        events = self._events
        events.append(event)
        if len(events) > MAX_EVENTS + 1000:  # Redis lost for long: the oldest go
            del events[:len(events) - MAX_EVENTS]
        self._kick()

    def _kick(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    # -- SharedState: admin endpoints ----------------------------------------------------------
    async def registered(self) -> None:
        """Return once the registration is in Redis (≤ :data:`REGISTERED_WAIT`); the other
        replicas apply it as they read the stream, within milliseconds."""
        if not self.connected:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._kick()
        try:
            await asyncio.wait_for(fut, REGISTERED_WAIT)
        except TimeoutError:
            pass

    async def render_metrics(self, metrics: RouterMetrics) -> bytes:
        """This replica's own counters (a Prometheus sums the replicas), plus the replicas'
        gauges. The registry and in-flight gauges already show the shared values."""
        extra = [
            GaugeMetricFamily("kvrouter_replicas", "Router replicas sharing state through "
                              "Redis (live load keys, this one included; 1 while Redis is "
                              "lost).", value=self.replicas if self.connected else 1),
            GaugeMetricFamily("kvrouter_redis_connected", "1 while this replica reaches Redis.",
                              value=int(self.connected)),
            GaugeMetricFamily("kvrouter_redis_leader", "1 while this replica holds the lease "
                              "of the health rounds.", value=int(self.leads)),
            CounterMetricFamily("kvrouter_redis_commands", "Redis commands this replica sent "
                                "(each command of a pipeline counted).", value=self.commands),
        ]
        return metrics.render_merged([], extra)

    def health_info(self) -> dict[str, object]:
        return {"replica": {"id": self.rid, "redis": "connected" if self.connected else "lost",
                            "leader": self.leads, "replicas": self.replicas}}

    # -- connection ------------------------------------------------------------------------------
    def _reason(self, e: BaseException) -> str:
        """An exception as text, never with the password in it."""
        text = str(e) or type(e).__name__
        password = self._w.connection_pool.connection_kwargs.get("password")
        return text.replace(password, "***") if password else text

    async def _connect(self) -> None:
        """Ping, read the shared registry (the first time also the stream's recent prefix
        records); after a loss, publish our whole registry again."""
        await self._w.ping()
        self.commands += 1
        instances = await self._read_registry()
        again = self._synced
        if not again:
            await self._read_history()
            self._synced = True
        self._gen += 1
        self.connected = True
        self._backoff = BACKOFF_MIN
        self._up.set()
        if again:   # the others missed our changes, and a restarted Redis has none: all again
            registry = self.router.registry
            self._events[:0] = [e for e in self.replica.state(snapshots=False)
                                if (inst := registry.get(e["id"])) is not None
                                and not inst.static]
        self._load_version = -1      # our whole share goes into our load key at once
        self._next_load = self._next_lease = self._next_refresh = 0.0
        log.info("replica %s: shared state in Redis at %s (%d instances read)", self.rid,
                 self.url, instances)
        self._kick()

    def _down(self, now: float) -> None:
        self.connected = False
        self.leads = False
        self._up.clear()
        self._lost_at = now
        self._retry_at = now + self._backoff

    def _lost(self, e: BaseException, gen: int) -> None:
        """A command failed: log once, route on local state, reconnect with backoff."""
        if not self.connected or gen != self._gen:
            return
        log.warning("lost Redis at %s (%s): routing on this replica's own state, "
                    "reconnecting", self.url, self._reason(e))
        self._down(time.monotonic())
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters = []

    async def _reconnect(self) -> None:
        try:
            for client in (self._w, self._r):   # pooled connections may have died with Redis
                await client.connection_pool.disconnect()
            await self._connect()
        except _RedisDown:
            self._backoff = min(2 * self._backoff, BACKOFF_MAX)
            self._retry_at = time.monotonic() + self._backoff
            return
        log.warning("Redis at %s is back after %.1f s: shared state resynchronised", self.url,
                    time.monotonic() - self._lost_at)

    # -- the writer --------------------------------------------------------------------------------
    async def _writer(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._next_expiry:     # every replica, leader or not, Redis or not
                self._next_expiry = now + TOMBSTONE_EXPIRY
                self.replica.expire_tombstones()
            if not self.connected:
                stale_at = self._lost_at + self.cfg.load_ttl_secs
                if self._senders and now >= stale_at:
                    for sender in self._senders:     # stale by now: route on our own load
                        self.loads.drop(sender)
                    self._senders = set()
                    self.replicas = 1
                wake = min(self._retry_at, stale_at) if self._senders else self._retry_at
                await asyncio.sleep(max(0.0, wake - now))
                if time.monotonic() >= self._retry_at:
                    await self._reconnect()
                continue
            if not self._wake.is_set():
                due = min(self._next_share, self._next_load, self._next_lease,
                          self._next_expiry)
                if self.leads:
                    due = min(due, self._next_refresh)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, due - now))
                except TimeoutError:
                    pass
            wait = self._last_flush + FLUSH_INTERVAL - time.monotonic()
            if wait > 0:                             # batch what arrives meanwhile
                await asyncio.sleep(wait)
            self._wake.clear()
            self._last_flush = time.monotonic()
            try:
                await self._tick()
            except ResponseError as e:       # refused, not lost (e.g. a key of another type)
                if str(e) != self._refused:
                    self._refused = str(e)
                    log.error("replica %s: Redis at %s refused a write: %s", self.rid, self.url,
                              self._reason(e))
            except _RedisDown as e:
                self._lost(e, self._gen)

    async def _tick(self, final: bool = False) -> None:
        """One pipeline: the news, the registry keys, the load shares, the lease."""
        now = time.monotonic()
        cfg = self.cfg
        events, self._events = self._events, []
        records, self._records = self._records, {}
        touch, self._touch = self._touch, {}
        waiters, self._waiters = self._waiters, []
        if self._sessions:
            events.append({"t": "sess", "s": self._sessions})
            self._sessions = []
        pipe = self._w.pipeline(transaction=False)
        loads = self.loads
        changed = loads.changes()
        if changed or loads.busy:
            self._share_active_at = now
        self._next_share = now + (FLUSH_INTERVAL if now - self._share_active_at < IDLE_AFTER
                                  else IDLE_SHARE_PERIOD)
        if events or records or changed:
            fields: dict[str, bytes | str] = {"r": self.rid}
            if changed:                          # our shares that moved ride on the stream:
                self._load_seq += 1              # the others see each change within ms
                fields["ld"] = orjson.dumps([self._load_seq, ev.shares_to_json(changed)])
            if events:
                fields["e"] = orjson.dumps(events)
            if records:
                fields["pi"], fields["ph"] = encode_records(records)
            pipe.xadd(self.k_events, fields,  # type: ignore[arg-type]
                      maxlen=max(cfg.prefix_history, MIN_STREAM), approximate=True)
        self._write_keys(pipe, events, touch)
        if not final and self.leads and now >= self._next_refresh:
            self._next_refresh = now + cfg.registry_ttl_secs / 3
            self._refresh_keys(pipe)
        loads_at = lease_at = -1
        load_ms, lease_ms = int(cfg.load_ttl_secs * 1000), int(cfg.leader_ttl_secs * 1000)
        sent = -1
        if final:
            pipe.delete(self.k_load + self.rid)
            pipe.srem(self.k_replicas, self.rid)
            pipe.eval(_RELEASE, 1, self.k_leader, self.rid)
        elif now >= self._next_load:
            self._next_load = now + cfg.load_interval_secs
            share = b""
            if (loads.version != self._load_version
                    or now - self._load_sent_at >= cfg.load_ttl_secs / 3):
                rebuild = now >= self._next_rebuild
                if rebuild:
                    self._next_rebuild = now + LOAD_REBUILD
                own = loads.own(rebuild=rebuild)
                self._load_seq += 1
                share = orjson.dumps([self._load_seq, ev.shares_to_json(own)])
                sent = loads.version
            loads_at = len(pipe)
            pipe.eval(_LOADS, 1, self.k_replicas, self.k_load, self.rid, share, load_ms)
        if not final and now >= self._next_lease:
            self._next_lease = now + cfg.leader_ttl_secs / 3
            lease_at = len(pipe)
            if self.leads:
                pipe.eval(_RENEW, 1, self.k_leader, self.rid, lease_ms)
            else:
                pipe.set(self.k_leader, self.rid, nx=True, px=lease_ms)
        count = len(pipe)
        try:
            results = await pipe.execute() if count else []
        except BaseException as e:
            if not isinstance(e, ResponseError):   # sent again once Redis is back
                self._requeue(events, records, touch)
            raise
        finally:
            self.commands += count
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if sent >= 0:
            self._load_version, self._load_sent_at = sent, now
        if loads_at >= 0:
            self._apply_loads(results[loads_at])
        if lease_at >= 0:
            leads = bool(results[lease_at])
            if leads != self.leads:
                log.info("replica %s %s the health rounds", self.rid,
                         "now leads" if leads else "no longer leads")
            self.leads = leads

    def _write_keys(self, pipe: Pipeline, events: list[dict], touch: dict[str, dict]) -> None:
        """The registry keys that ``events`` (and unchanged heartbeats) change."""
        ttl = int(self.cfg.registry_ttl_secs * 1000)
        fields: dict[str, dict[str, bytes]] = {}
        for event in events:
            kind = event["t"]
            if kind == "sess":
                continue
            ident: str = event["id"]
            if kind == "reg" or kind == "hl":
                fields.setdefault(ident, {})["reg" if kind == "reg" else "hl"] = \
                    orjson.dumps(event)
            elif kind == "del":
                fields.pop(ident, None)
                pipe.delete(self.k_inst + ident)
                pipe.srem(self.k_instances, ident)
                pipe.set(self.k_tomb + ident, orjson.dumps(event["v"]),
                         px=int(TOMBSTONE_SECS * 1000))
        for ident, event in touch.items():
            fields.setdefault(ident, {}).setdefault("reg", orjson.dumps(event))
        for ident, mapping in fields.items():
            pipe.hset(self.k_inst + ident, mapping=mapping)  # type: ignore[arg-type]
            pipe.pexpire(self.k_inst + ident, ttl)
        if fields:
            pipe.sadd(self.k_instances, *fields)

    def _refresh_keys(self, pipe: Pipeline) -> None:
        """The lease holder rewrites every shared registration (their TTL restarts), so the
        keys outlive any replica while one of them runs."""
        registry = self.router.registry
        events = [e for e in self.replica.state(snapshots=False)
                  if (inst := registry.get(e["id"])) is not None and not inst.static]
        self._write_keys(pipe, events, {})

    def _requeue(self, events: list[dict], records: _Records, touch: dict[str, dict]) -> None:
        """Redis failed mid-tick: what was not sent goes back in front (bounded)."""
        self._events[:0] = events
        if len(self._events) > MAX_EVENTS:
            del self._events[:len(self._events) - MAX_EVENTS]
        merged = records | self._records
        while len(merged) > MAX_RECORDS:
            del merged[next(iter(merged))]
        self._records = merged
        self._touch = touch | self._touch

    def _apply_loads(self, flat: list[bytes]) -> None:
        """The live replicas' load shares (``_LOADS``: id, value, id, value, …)."""
        seen: set[str] = set()
        for i in range(0, len(flat) - 1, 2):
            rid = flat[i].decode()
            if rid == self.rid:
                continue
            try:
                seq, shares = orjson.loads(flat[i + 1])
                self.loads.update(rid, int(seq), ev.shares_from_json(shares))
            except Exception as e:          # any shape: never the end of the writer
                self._skipped(f"the unreadable load key of {rid!r}", e)
                continue
            seen.add(rid)
        for gone in self._senders - seen:
            self.loads.drop(gone)
        self._senders = seen
        self.replicas = 1 + len(seen)

    # -- the reader ------------------------------------------------------------------------------
    async def _reader(self) -> None:
        while True:
            await self._up.wait()
            gen = self._gen
            try:
                reply: Any = await self._r.xread({self.k_events: self._last_id}, count=READ_COUNT,
                                            block=BLOCK_MS)
            except _RedisDown as e:
                self._lost(e, gen)
                continue
            self.commands += 1
            if not reply:
                continue
            now = time.monotonic()
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    sender = fields.get(b"r")
                    if sender != self._rid_b:
                        self._apply_entry(fields, now, registry=True)
                        self._apply_share(sender, fields.get(b"l"))
                        self._apply_share(sender, fields.get(b"ld"), partial=True)
            await asyncio.sleep(READ_PAUSE)        # the next read takes several replicas' news

    def _apply_entry(self, fields: dict[bytes, bytes], now: float, *, registry: bool) -> None:
        """Another replica's stream entry (``registry=False``: history, records and sessions
        only). A malformed event or record batch is skipped, never fatal: Redis is reachable
        by more than the routers, and any exception here would end the reader."""
        try:
            raw = fields.get(b"e")
            for event in orjson.loads(raw) if raw else ():
                try:
                    kind = event["t"]
                    if kind == "sess":
                        self._apply_sessions(event["s"])
                    elif registry and kind in ("reg", "hl", "del"):
                        self._apply_registry(event)
                except Exception as e:
                    self._skipped("an unreadable stream entry", e)
            blob = fields.get(b"ph")
            if blob:
                self._apply_records(orjson.loads(fields[b"pi"]), blob, now)
        except Exception as e:
            self._skipped("an unreadable stream entry", e)

    def _skipped(self, what: str, e: Exception) -> None:
        """Log a skipped record: the first of each kind (exception type and message up to
        its first quoted value) as a warning, later ones at debug level, so a broken or
        hostile writer cannot flood the log."""
        kind = (type(e).__name__, str(e).split("'", 1)[0][:80])
        if kind not in self._skip_kinds and len(self._skip_kinds) < MAX_SKIP_KINDS:
            self._skip_kinds.add(kind)
            log.warning("replica %s: skipped %s: %r (more like it: debug level)", self.rid,
                        what, e)
        else:
            log.debug("replica %s: skipped %s: %r", self.rid, what, e)

    def _apply_share(self, sender: bytes | None, raw: bytes | None,
                     partial: bool = False) -> None:
        """The load share a stream entry carries: the sender's whole share when it sent the
        entry, or with ``partial`` its shares that changed."""
        if sender is None or raw is None:
            return
        try:
            seq, shares = orjson.loads(raw)
            rid = sender.decode()
            self.loads.update(rid, int(seq), ev.shares_from_json(shares), partial=partial)
        except Exception as e:
            self._skipped("an unreadable load share", e)
            return
        self._senders.add(rid)      # dropped at the next read if it has no load key

    def _apply_registry(self, event: dict) -> None:
        ident = event["id"]
        inst = self.router.registry.get(ident)
        if inst is not None and inst.static:
            return                   # this replica's own register.yaml entry
        kind = event["t"]
        if kind == "reg":
            check_info(event["i"])
            self.replica.apply_reg(event)
            self._published[ident] = event["i"]
        elif kind == "hl":
            self.replica.apply_health(event, -1)
        else:
            self.replica.apply_del(event)
            self._published.pop(ident, None)

    def _apply_records(self, index: list, blob: bytes, now: float) -> None:
        hashes = np.frombuffer(blob, dtype="<u8")
        record = self.router.index.record
        offset = 0
        self._replaying = True
        try:
            for ident, n in index:
                part = hashes[offset:offset + n]
                offset += n
                if len(part) == n and n:
                    record(HashList(part.tolist(), part), ident, now)
        finally:
            self._replaying = False

    def _apply_sessions(self, rows: list) -> None:
        sessions = self.router.sessions
        for role, sid, ident in rows:
            memory = sessions.get(Role(role))
            if memory is not None:
                memory.remember(sid, ident)

    # -- reading the shared state ------------------------------------------------------------------
    async def _read_registry(self) -> int:
        """Apply the registrations stored in Redis (a tombstone newer than one wins);
        forget the ids whose key expired. Returns how many were read."""
        w = self._w
        members: Any = await w.smembers(self.k_instances)
        ids = sorted(i.decode() for i in members)
        self.commands += 1
        read, gone = 0, []
        for start in range(0, len(ids), KEYS_CHUNK):
            chunk = ids[start:start + KEYS_CHUNK]
            pipe = w.pipeline(transaction=False)
            for ident in chunk:
                pipe.hgetall(self.k_inst + ident)
                pipe.get(self.k_tomb + ident)
            results = await pipe.execute()
            self.commands += len(pipe)
            for n, ident in enumerate(chunk):
                stored, tomb = results[2 * n], results[2 * n + 1]
                if not stored or b"reg" not in stored:
                    gone.append(ident)
                    continue
                try:
                    reg = orjson.loads(stored[b"reg"])
                    if tomb is not None and tuple(orjson.loads(tomb)) >= tuple(reg["v"]):
                        continue
                    self._apply_registry(reg)
                    if b"hl" in stored:
                        self._apply_registry(orjson.loads(stored[b"hl"]))
                    read += 1
                except Exception as e:      # any shape: never the end of open() or the writer
                    self._skipped(f"the unreadable record of {ident!r}", e)
        if gone:
            await w.srem(self.k_instances, *gone)
            self.commands += 1
        return read

    async def _read_history(self) -> None:
        """The prefix records of the stream's entries younger than the prefix index's TTL
        (a new replica starts warm); the reader then goes on from the newest entry."""
        w = self._w
        newest: Any = await w.xrevrange(self.k_events, count=1)
        self.commands += 1
        if not newest:
            self._last_id = b"0-0"
            return
        self._last_id = last = newest[0][0]
        if not self.cfg.prefix_history:
            return
        ttl = self.router.cfg.scheduler.eviction_duration_mins * 60
        start: bytes | str = f"{max(0, int((time.time() - ttl) * 1000))}-0"
        applied = 0
        while True:
            entries: Any = await w.xrange(self.k_events, min=start, max=last,
                                          count=HISTORY_CHUNK)
            self.commands += 1
            for entry_id, fields in entries:
                ms = int(entry_id.split(b"-", 1)[0])
                self._apply_entry(fields, ev.mono(ms / 1000), registry=False)
            applied += len(entries)
            if len(entries) < HISTORY_CHUNK or entries[-1][0] == last:
                break
            start = b"(" + entries[-1][0]
            await asyncio.sleep(0)
        log.info("replica %s: read %d recent stream entries (prefix index: %d entries)",
                 self.rid, applied, self.router.index.size)


_PORT_FIELDS = ("port", "metrics_port", "connector_port", "engine_worker_queue_port",
                "bootstrap_port")


def check_info(data: dict) -> None:
    """Raise ``ValueError`` unless a registration read from Redis has a host, scheme and
    ports that ``POST /register`` would have accepted: they end up in URLs and in the
    ``Host`` and ``X-Router-*-URL`` headers, and Redis is reachable by more than this router
    (the other fields only reach JSON answers)."""
    host, scheme = data.get("host"), data.get("scheme")
    if not isinstance(host, str) or normalise_host(host) != ("http", host):
        raise ValueError(f"invalid host {host!r}")
    if scheme not in ("http", "https"):
        raise ValueError(f"invalid scheme {scheme!r}")
    for name in _PORT_FIELDS:
        port = data.get(name)
        if port not in (None, "") and not (isinstance(port, str) and port.isascii()
                                           and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid {name} {port!r}")
    Role(data.get("role"))
    engine = data.get("engine")
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    kv = data.get("kv_zmq_address")        # sent in vLLM P2P legs' X-Request-Id
    if kv is not None and (not isinstance(kv, str) or kv_address(kv) != kv):
        raise ValueError(f"invalid kv_zmq_address {kv!r}")


def encode_records(records: _Records) -> tuple[bytes, bytes]:
    """Prefix records as a stream entry's ``pi`` (``[[identity, n], …]``) and ``ph`` (the
    hashes, 8 bytes little-endian each, in the same order)."""
    index: list[list] = []
    parts: list[bytes] = []
    for (ident, _last, n), hashes in records.items():
        index.append([ident, n])
        parts.append(as_hash_array(hashes).astype("<u8", copy=False).tobytes())
    return orjson.dumps(index), b"".join(parts)
