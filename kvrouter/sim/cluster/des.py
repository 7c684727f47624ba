"""The event loop: arrivals routed by real kvrouter policies onto engine cores stepped in
virtual time, router-side lease accounting, PD hand-offs, scrapes and index sweeps
(see :mod:`kvrouter.sim.cluster` for the model)."""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Sequence
from functools import partial
from typing import Any

from kvrouter.admission import AdmissionQueue, Headroom, Pace, Reject, Ticket
from kvrouter.backends.snapshot import MetricsSnapshot
from kvrouter.config import SchedulerConfig
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import Load
from kvrouter.policies import make_policy
from kvrouter.policies.base import Policy, RequestView
from kvrouter.prefix.hashing import block_hashes
from kvrouter.prefix.index import PrefixIndex
from kvrouter.registry import Instance
from kvrouter.sim.cluster.nodes import (
    CoreFactory,
    Flight,
    Node,
    cached_prefix_tokens,
    calibrate_prefill,
    core_param,
    gauge,
)
from kvrouter.sim.cluster.oracle import OraclePolicy
from kvrouter.sim.cluster.results import ClusterResult, CoreStats, RequestResult
from kvrouter.sim.core import (
    PHASE_DECODE,
    PHASE_FULL,
    PHASE_PREFILL,
    CoreRequest,
    EngineCoreAPI,
    EngineParams,
    Step,
    TokenEvent,
    make_engine_core,
)
from kvrouter.sim.workloads import WorkloadRequest

__all__ = ["Sim", "run_cluster"]

# event kinds (ints: cheap to compare; the heap orders by (time, seq) only)
_ARRIVE, _STEP_END, _WAKE, _RELEASE_PREFILL, _TIMEOUT, _SCRAPE, _SWEEP, _SAMPLE, _EXPIRE = range(9)

#: seconds between the admission queue's timeout checks while requests wait (the server's
#: ``kvrouter.server.queueing.EXPIRY_PERIOD``; each check also pumps the queue)
EXPIRY_PERIOD = 0.1



class Sim:
    def __init__(self, workload: Sequence[WorkloadRequest], *, policy: str, instances: int,
                 seed: int, pd: tuple[int, int] | None, cfg: SchedulerConfig,
                 core_factory: CoreFactory, decode_policy: str | None,
                 scrape_interval: float | None, request_timeout: float | None,
                 link_bandwidth: float | None, transfer_setup: float | None,
                 kv_bytes_per_token: float | None, sample_interval: float | None,
                 admission: bool = False) -> None:
        self.workload = sorted(workload, key=lambda r: r.arrival)
        self.cfg = cfg
        self.now = 0.0
        self.pd = pd
        self.request_timeout = request_timeout
        self.sample_interval = sample_interval
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = 0
        self.index = PrefixIndex(cfg.cache_max_blocks, cfg.eviction_duration_mins * 60)
        stale_after = 3 * cfg.metrics_scrape_interval_secs
        clock = self.clock

        roles: list[Role]
        if pd is None:
            if instances < 1:
                raise ValueError("instances must be >= 1")
            roles = [Role.MIXED] * instances
        else:
            p, d = pd
            if p < 1 or d < 1:
                raise ValueError("pd needs at least one prefill and one decode instance")
            if instances not in (0, p + d):
                raise ValueError(f"instances={instances} does not match pd={pd}")
            roles = [Role.PREFILL] * p + [Role.DECODE] * d
        self.nodes: list[Node] = []
        for i, role in enumerate(roles):
            info = InstanceInfo(role=role, host="10.0.0.1", scheme="http", port=str(20000 + i))
            inst = Instance(info=info, load=Load(), stale_after=stale_after)
            core = core_factory(i)
            self.nodes.append(Node(i, inst, core, role.value, CoreStats(inst.url, role.value)))
        self.nodes_by_identity = {n.inst.identity: n for n in self.nodes}
        self.candidates: dict[Role, list[Instance]] = {}
        for n in self.nodes:
            self.candidates.setdefault(n.inst.role, []).append(n.inst)
        for cands in self.candidates.values():
            cands.sort(key=lambda inst: inst.url)

        names = ({Role.MIXED: policy} if pd is None else
                 {Role.PREFILL: policy, Role.DECODE: decode_policy or cfg.decode_policy})
        self.policies: dict[Role, Policy] = {}
        for role, name in sorted(names.items(), key=lambda kv: kv[0].value):
            rng = random.Random(f"policy:{seed}:{role.value}")
            if name == "oracle":
                self.policies[role] = OraclePolicy(role.value, self)
            else:
                self.policies[role] = make_policy(name, role.value, cfg, self.index, rng,
                                                  clock=clock)
        self.needs_prefix = any(p.needs_prefix for p in self.policies.values())
        self.needs_metrics = any(p.needs_remote_metrics for p in self.policies.values())
        self.uses_oracle = any(isinstance(p, OraclePolicy) for p in self.policies.values())
        self.scrape_interval = (scrape_interval if scrape_interval is not None
                                else cfg.metrics_scrape_interval_secs)
        if self.uses_oracle:
            for n in self.nodes:
                if n.role != Role.DECODE.value:
                    n.sec_per_prefill_token = calibrate_prefill(core_factory, n.index)
                    if cached_prefix_tokens(n.core, [0]) is None:
                        raise ValueError("the oracle policy needs cores with "
                                         "cached_prefix_tokens(tokens)")
        core0 = self.nodes[0].core
        self.kv_bytes = (kv_bytes_per_token if kv_bytes_per_token is not None
                         else core_param(core0, "kv_bytes_per_token") or 131072.0)
        if link_bandwidth is None:
            link_bandwidth = core_param(core0, "pd_rdma_bw") or 50e9
        if transfer_setup is None:
            transfer_setup = core_param(core0, "pd_rdma_setup") or 0.01
        self.link_bandwidth = link_bandwidth
        self.transfer_setup = transfer_setup

        self.flights: dict[str, Flight] = {}
        self.results: list[RequestResult] = []
        self.next_arrival = 0
        self.outstanding = 0
        self.start = self.workload[0].arrival if self.workload else 0.0
        self.last_change = self.start
        self.end = self.start
        self.in_system_integral = 0.0
        self.router_integral = 0.0
        self._router_inflight = 0
        self.samples: list[tuple[float, int, float]] = []

        # the admission queue (kvrouter.admission, the server's code) in front of the mixed
        # (PD: prefill) instances; None: every request is bound at arrival, as before
        self.admission: AdmissionQueue | None = None
        self.pace = Pace(clock, cfg.queue_timeout_secs)
        if admission:
            self.admit_role = Role.MIXED if pd is None else Role.PREFILL
            self.headroom = Headroom(cfg.max_inflight_per_instance,
                                     cfg.max_queued_prefill_tokens_per_instance)
            self.admission = AdmissionQueue(self._room, queue_size=cfg.queue_size,
                                            timeout=cfg.queue_timeout_secs, clock=clock,
                                            service_time=self.pace.service_time)
        self._pump_due = False              # capacity may have freed during this event
        self._expiry_pending = False
        self.queue_peak = 0

    # -- infrastructure ----------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def _account_time(self) -> None:
        """Integrate the in-system counts up to ``now`` (call before any count changes)."""
        dt = self.now - self.last_change
        if dt > 0:
            queued = self.admission.size if self.admission is not None else 0
            self.in_system_integral += (self.outstanding + queued) * dt
            self.router_integral += self._router_inflight * dt
            self.last_change = self.now

    def _router_inflight_now(self) -> int:
        return sum(n.inst.load.requests for n in self.nodes)

    def _occupy(self, node: Node, delta: int) -> None:
        """Change a node's request count, integrating the time it holds any request."""
        if node.inflight == 0 and delta > 0:
            node.occupied_since = self.now
        node.inflight += delta
        if node.inflight == 0 and delta < 0:
            node.stats.occupied_time += self.now - node.occupied_since

    def cached(self, node: Node, tokens: list[int],
               memo: dict[int, list[int]] | None = None) -> int:
        hit = cached_prefix_tokens(node.core, tokens, memo)
        return 0 if hit is None else hit

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> ClusterResult:
        if self.workload:
            self._push(self.workload[0].arrival, _ARRIVE, 0)
            if self.needs_metrics and self.scrape_interval > 0:
                self._push(0.0, _SCRAPE)
            if self.cfg.eviction_interval_secs > 0:
                self._push(self.cfg.eviction_interval_secs, _SWEEP)
            if self.sample_interval:
                self._push(self.start, _SAMPLE)
        heap = self._heap
        pop = heapq.heappop
        while heap:
            t, _, kind, a, b = pop(heap)
            if self.next_arrival >= len(self.workload) and self.outstanding == 0 and (
                    self.admission is None or not self.admission.size):
                break
            self.now = t
            if kind == _STEP_END:
                self._on_step_end(a, b)
            elif kind == _ARRIVE:
                self._on_arrive(a)
            elif kind == _WAKE:
                if a.wake_at == t:
                    a.wake_at = None
                    self._kick(a)
            elif kind == _RELEASE_PREFILL:
                self._release_prefill(a)
            elif kind == _TIMEOUT:
                self._on_timeout(a)
            elif kind == _SCRAPE:
                self._scrape()
                self._push(t + self.scrape_interval, _SCRAPE)
            elif kind == _SWEEP:
                self.index.sweep(t)
                self._push(t + self.cfg.eviction_interval_secs, _SWEEP)
            elif kind == _SAMPLE and self.sample_interval:   # only queued when set
                self._sample()
                self._push(t + self.sample_interval, _SAMPLE)
            elif kind == _EXPIRE:
                self._expire()
            if self._pump_due:
                self._pump()
        self._account_time()
        if self.admission is not None:      # bound late or rejected: back in arrival order
            self.results.sort(key=lambda r: r.index)
        return ClusterResult(
            results=self.results,
            policy=next(iter(self.policies.values())).name if self.pd is None
            else self.policies[Role.PREFILL].name,
            instances=[n.inst.url for n in self.nodes],
            pd=self.pd,
            start=self.start,
            end=self.end,
            core_stats=[n.stats for n in self.nodes],
            in_system_integral=self.in_system_integral,
            router_inflight_integral=self.router_integral,
            samples=self.samples,
            final_load={n.inst.url: (n.inst.load.requests, n.inst.load.tokens)
                        for n in self.nodes},
            admission=self.admission is not None,
            rejections=({r.value: n for r, n in self.admission.rejected.items()}
                        if self.admission is not None else {}),
            queue_peak=self.queue_peak,
        )

    # -- cores -------------------------------------------------------------------------------
    def _kick(self, node: Node) -> None:
        """Start the node's next step if it is idle; else arrange a wake-up."""
        if node.busy:
            return
        step = node.core.next_step(self.now)
        if step is not None:
            node.busy = True
            node.wake_at = None
            self._push(self.now + max(0.0, step.duration), _STEP_END, node, step)
            self._check_handoffs(node)
            return
        w = node.core.next_wakeup()
        if w is not None:
            w = max(w, self.now)
            if w == self.now:   # due now yet nothing to run: avoid a busy loop
                w = math.nextafter(self.now, math.inf)
            if node.wake_at is None or w < node.wake_at:
                node.wake_at = w
                self._push(w, _WAKE, node)
        self._check_handoffs(node)

    def _on_step_end(self, node: Node, step: Step) -> None:
        node.busy = False
        st = node.stats
        st.steps += 1
        st.busy_time += step.duration
        st.prefill_tokens += step.prefill_tokens
        st.decode_tokens += step.decode_tokens
        events = node.core.finish_step(step, self.now)
        st.token_events += len(events)
        touched: list[Node] = []
        for ev in events:
            self._on_token(node, ev, touched)
        self._kick(node)
        for other in touched:
            if other is not node:
                self._kick(other)

    def _on_token(self, node: Node, ev: TokenEvent, touched: list[Node]) -> None:
        fl = self.flights.get(ev.request_id)
        if fl is None or fl.done:
            return
        now = self.now
        if ev.index < 0:                    # the core ended the request without a token
            self._finish(fl, ev.finish_reason or "error", error=ev.finish_reason or "error")
            touched.extend(n for n in (fl.node, fl.pnode) if n is not None)
            return
        if fl.pnode is node and node is not fl.node:       # the prefill leg (PD)
            if fl.creq is None:
                assert fl.p_lease is not None
                fl.p_lease.release()                         # P released at its first token
                self._pump_due = self.admission is not None
                self._prefill_done(fl, node)
                self._start_decode(fl)
                touched.append(fl.node)
            return
        res = fl.res
        if res.ttft is None:
            res.ttft = now - res.arrival
            fl.lease.release_tokens()                        # mixed: tokens at the first token
            self._pump_due = self.admission is not None
            if fl.pnode is None:
                self._prefill_done(fl, node)
        elif fl.last_token_at is not None:
            res.itls.append(now - fl.last_token_at)
        fl.last_token_at = now
        if ev.finished:
            self._finish(fl, ev.finish_reason or "length")

    def _prefill_done(self, fl: Flight, node: Node) -> None:
        if fl.prefill_estimate:
            node.pending_prefill -= fl.prefill_estimate
            fl.prefill_estimate = 0

    def _start_decode(self, fl: Flight) -> None:
        """The prefill's token is out: hand the request to its decode core.

        The decode core continues from output index 1 (the prefill produced index 0, as in
        FastDeploy splitwise) and first waits for the KV of the prompt tokens it lacks."""
        node = fl.node
        prompt = fl.req.prompt_tokens
        missing = max(0, len(prompt) - self.cached(node, prompt))
        xfer = self.transfer_setup + missing * float(self.kv_bytes) / self.link_bandwidth
        fl.res.transfer_time = xfer
        creq = CoreRequest(request_id=fl.res.request_id, prompt_tokens=prompt,
                           max_tokens=max(1, fl.req.max_tokens - 1), phase=PHASE_DECODE,
                           transfer_time=xfer, start_index=1, arrival=self.now)
        fl.creq = creq
        if not self._add(node, creq, fl):
            return
        node.handoffs[creq.request_id] = fl

    def _add(self, node: Node, creq: CoreRequest, fl: Flight) -> bool:
        """Add a request to a core; a refusal (e.g. a prompt that can never fit) fails it."""
        try:
            node.core.add_request(creq, self.now)
        except ValueError:
            self._finish(fl, "rejected", error="rejected")
            return False
        node.stats.requests += 1
        return True

    def _check_handoffs(self, node: Node) -> None:
        """Schedule the prefill release of decode requests whose transfer has started."""
        if not node.handoffs:
            return
        started = [rid for rid, fl in node.handoffs.items()
                   if fl.creq is not None and fl.creq.first_scheduled_at is not None]
        for rid in started:
            fl = node.handoffs.pop(rid)
            assert fl.creq is not None and fl.creq.first_scheduled_at is not None
            at = max(self.now, fl.creq.first_scheduled_at + fl.creq.transfer_time)
            self._push(at, _RELEASE_PREFILL, fl)

    def _release_prefill(self, fl: Flight) -> None:
        if fl.p_released or fl.pnode is None:
            return
        fl.p_released = True
        fl.pnode.core.release_prefill(fl.res.request_id)
        self._kick(fl.pnode)

    def _finish(self, fl: Flight, reason: str, error: str | None = None) -> None:
        """The request ended (last token, error or timeout): record it, release its leases."""
        self._account_time()
        fl.done = True
        res = fl.res
        res.end = self.now
        res.finish_reason = reason
        res.error = error
        if fl.pnode is None:
            if fl.creq is not None:
                res.output_tokens = fl.creq.output_tokens
                res.preemptions = fl.creq.preemptions
                res.cached_tokens = fl.creq.cached_tokens
                if fl.creq.first_scheduled_at is not None:
                    res.queue_time = fl.creq.first_scheduled_at - res.arrival - res.router_wait
            self._prefill_done(fl, fl.node)
        else:
            p = fl.p_creq
            assert p is not None
            res.cached_tokens = p.cached_tokens
            res.preemptions = p.preemptions
            res.output_tokens = p.output_tokens
            if p.first_scheduled_at is not None:
                res.queue_time = p.first_scheduled_at - res.arrival - res.router_wait
            if fl.creq is not None:
                res.output_tokens += fl.creq.output_tokens
                res.preemptions += fl.creq.preemptions
            fl.node.handoffs.pop(res.request_id, None)
            if not fl.p_released:
                self._release_prefill(fl)
            self._occupy(fl.pnode, -1)
            self._prefill_done(fl, fl.pnode)
        fl.lease.release()
        if fl.p_lease is not None:
            fl.p_lease.release()
        self._occupy(fl.node, -1)
        del self.flights[res.request_id]
        self.outstanding -= 1
        self._router_inflight = self._router_inflight_now()
        self.end = max(self.end, self.now)
        self._pump_due = self.admission is not None

    def _on_timeout(self, fl: Flight) -> None:
        if fl.done:
            return
        rid = fl.res.request_id
        touched = [fl.node]
        if fl.creq is not None:
            fl.node.core.abort(rid, self.now)
        if fl.pnode is not None:
            if not fl.p_released:
                fl.pnode.core.abort(rid, self.now)     # frees held or unfinished prefill
                fl.p_released = True
            touched.append(fl.pnode)
        self._finish(fl, "abort", error="timeout")
        for n in touched:
            self._kick(n)

    # -- routing -----------------------------------------------------------------------------
    def _on_arrive(self, i: int) -> None:
        self._account_time()
        self.next_arrival = i + 1
        if self.next_arrival < len(self.workload):
            self._push(max(self.now, self.workload[self.next_arrival].arrival), _ARRIVE,
                       self.next_arrival)
        if self.admission is None:
            self._bind(i)
        else:
            self._offer(i)

    def _bind(self, i: int, router_wait: float = 0.0) -> None:
        """Route request ``i`` now (the policy runs, leases are taken) and hand it to its
        core(s); ``router_wait``: how long it waited in the admission queue."""
        req = self.workload[i]
        prompt = req.prompt_tokens
        view = RequestView(prompt=prompt, tokens=prompt, token_estimate=len(prompt),
                           hashes=(block_hashes(prompt, self.cfg.cache_block_size)
                                   if self.needs_prefix else []),
                           session_id=req.session_id)
        rid = f"req-{i}"
        now = self.now
        if self.pd is None:
            sel = self.policies[Role.MIXED].select(self.candidates[Role.MIXED], view)
            node = self.nodes_by_identity[sel.instance.identity]
            lease = node.inst.load.acquire(len(prompt), now, prefill=sel.prefill_estimate)
            res = RequestResult(i, rid, req.arrival, node.inst.url, len(prompt), req.max_tokens,
                                req.session_id, strategy=sel.strategy, router_wait=router_wait)
            fl = Flight(req, res, node, lease)
            creq = CoreRequest(request_id=rid, prompt_tokens=prompt, max_tokens=req.max_tokens,
                               phase=PHASE_FULL, arrival=now)
            fl.creq = creq
            self._enter(fl, node)
            if self._add(node, creq, fl):
                self._kick(node)
        else:
            sel = self.policies[Role.PREFILL].select(self.candidates[Role.PREFILL], view)
            pnode = self.nodes_by_identity[sel.instance.identity]
            dsel = self.policies[Role.DECODE].select(self.candidates[Role.DECODE], view)
            dnode = self.nodes_by_identity[dsel.instance.identity]
            p_lease = pnode.inst.load.acquire(len(prompt), now, prefill=sel.prefill_estimate)
            lease = dnode.inst.load.acquire(len(prompt), now, prefill=dsel.prefill_estimate)
            res = RequestResult(i, rid, req.arrival, dnode.inst.url, len(prompt), req.max_tokens,
                                req.session_id, prefill_instance=pnode.inst.url,
                                strategy=sel.strategy, router_wait=router_wait)
            fl = Flight(req, res, dnode, lease, pnode=pnode, p_lease=p_lease)
            p_creq = CoreRequest(request_id=rid, prompt_tokens=prompt, max_tokens=1,
                                 phase=PHASE_PREFILL, arrival=now)
            fl.p_creq = p_creq
            self._occupy(dnode, 1)
            self._enter(fl, pnode)
            if self._add(pnode, p_creq, fl):
                self._kick(pnode)
        self._router_inflight = self._router_inflight_now()

    def _enter(self, fl: Flight, prefill_node: Node) -> None:
        self.flights[fl.res.request_id] = fl
        self.results.append(fl.res)
        self.outstanding += 1
        self._occupy(prefill_node, 1)
        if self.uses_oracle:
            est = len(fl.req.prompt_tokens) - self.cached(prefill_node, fl.req.prompt_tokens)
            fl.prefill_estimate = est
            prefill_node.pending_prefill += est
        if self.request_timeout is not None:         # from arrival: queue time counts
            self._push(max(self.now, fl.res.arrival + self.request_timeout), _TIMEOUT, fl)

    # -- admission (kvrouter.admission: the queue the server runs, driven in virtual time) ---
    def _room(self, model: str | None) -> bool:
        """Every simulated instance serves every model, and none is ever ejected; binding is
        synchronous, so no admitted request is ever without its lease."""
        return self.headroom.room(self.candidates[self.admit_role], self.now)

    def _offer(self, i: int) -> None:
        q = self.admission
        assert q is not None
        req = self.workload[i]
        t = Ticket(req.priority, req.tenant, lambda: self._admitted(i, t),
                   partial(self._rejected, i))
        if q.offer(t):
            self._bind(i)
            return
        if t.queue is None:                      # rejected, or admitted, at once
            return
        self.queue_peak = max(self.queue_peak, q.size)
        if not self._expiry_pending:
            self._expiry_pending = True
            self._push(self.now + EXPIRY_PERIOD, _EXPIRE)

    def _admitted(self, i: int, t: Ticket) -> None:
        self.pace.admitted(t.enqueued)
        self._bind(i, self.now - t.enqueued)

    def _rejected(self, i: int, why: Reject) -> None:
        """The queue answered request ``i`` (429/503 in the server): it never meets the SLO."""
        req = self.workload[i]
        res = RequestResult(i, f"req-{i}", req.arrival, "", len(req.prompt_tokens),
                            req.max_tokens, req.session_id, end=self.now,
                            finish_reason="rejected", error=why.value, rejected=why.value,
                            router_wait=self.now - req.arrival)
        self.results.append(res)
        self.end = max(self.end, self.now)

    def _pump(self) -> None:
        """Admit what fits now; deferred to the end of the event that freed capacity, so that
        a core is never handed a request in the middle of its own step's events."""
        self._pump_due = False
        if self.admission is not None and self.admission.size:
            self._account_time()
            self.admission.pump()

    def _expire(self) -> None:
        q = self.admission
        assert q is not None
        self._account_time()
        q.expire()
        self._pump()
        self._expiry_pending = bool(q.size)
        if q.size:
            self._push(self.now + EXPIRY_PERIOD, _EXPIRE)

    # -- background tasks --------------------------------------------------------------------
    def _scrape(self) -> None:
        now = self.now
        for n in self.nodes:
            g = n.core.gauges()
            running = gauge(g, "running")
            waiting = gauge(g, "waiting")
            if running is None or waiting is None:
                continue   # like a failed scrape: keep the previous snapshot
            n.inst.snapshot = MetricsSnapshot(
                running=running, waiting=waiting, taken_at=now,
                available_gpu_block_num=gauge(g, "available_gpu_block_num"),
                max_batch_size=gauge(g, "max_batch_size"),
                gpu_cache_usage_perc=gauge(g, "gpu_cache_usage_perc"))
            n.inst.load.on_snapshot(now)
        self._pump_due = self.admission is not None      # the engines' queues may be empty now

    def _sample(self) -> None:
        total = 0.0
        for n in self.nodes:
            g = n.core.gauges()
            total += (gauge(g, "running") or 0.0) + (gauge(g, "waiting") or 0.0)
        self.samples.append((self.now, self.outstanding, total))



def _normalise_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    for k, v in (overrides or {}).items():
        key = k.replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown scheduler setting '{k}'")
        out[key] = v
    return out


def run_cluster(workload: Sequence[WorkloadRequest], *, policy: str, instances: int,
                preset: str | EngineParams, seed: int, pd: tuple[int, int] | None = None,
                scheduler_overrides: dict[str, Any] | None = None,
                core_overrides: dict[str, Any] | None = None,
                decode_policy: str | None = None,
                core_factory: CoreFactory | None = None,
                scrape_interval: float | None = None,
                request_timeout: float | None = None,
                link_bandwidth: float | None = None,
                transfer_setup: float | None = None,
                kv_bytes_per_token: float | None = None,
                sample_interval: float | None = None,
                admission: bool = False) -> ClusterResult:
    """Simulate ``workload`` on a routed cluster in virtual time; deterministic per ``seed``.

    ``policy``: any ``kvrouter.policies`` name or ``"oracle"`` (mixed policy, or the prefill
    policy in PD; the decode policy is ``decode_policy`` or the config's ``decode-policy``).
    ``instances`` mixed cores of ``preset`` (a preset name or parameters for
    ``make_engine_core``), or with ``pd=(P, D)`` P prefill + D decode cores (``instances`` is
    then 0 or P + D). ``scheduler_overrides``: ``SchedulerConfig`` fields (dashes or
    underscores). ``core_overrides``: keyword overrides for ``make_engine_core``.
    ``core_factory(i)`` replaces ``make_engine_core`` (tests). ``scrape_interval`` defaults to
    ``metrics-scrape-interval-secs``. ``request_timeout``: abort requests not finished that
    many seconds after arrival (counted as failed). PD transfer: ``transfer_setup +
    missing_tokens × kv_bytes_per_token / link_bandwidth`` (bytes/s); each defaults to the
    core's ``params`` (``pd_rdma_setup``, ``kv_bytes_per_token``, ``pd_rdma_bw``: 10 ms,
    preset KV size, 50 GB/s). ``sample_interval``: record in-system counts periodically.

    ``admission``: requests wait in the router's admission queue (:mod:`kvrouter.admission`,
    the server's code) while no mixed (PD: prefill) instance has headroom, and are routed
    when they leave it; the limits are the scheduler settings ``max-inflight-per-instance``,
    ``max-queued-prefill-tokens-per-instance``, ``queue-size`` and ``queue-timeout-secs``
    (0 = no limit, as in the server); a request's ``priority`` and ``tenant`` order the
    queue. Rejected requests end with ``rejected`` set (``ClusterResult.rejections``).
    Off (the default), every request is routed at arrival and results are as before.
    """
    cfg = dataclasses.replace(SchedulerConfig(), **_normalise_overrides(scheduler_overrides))
    if core_factory is None:
        overrides = dict(core_overrides or {})

        def core_factory(i: int) -> EngineCoreAPI:
            return make_engine_core(preset, seed=seed * 1_000_003 + i, **overrides)

    sim = Sim(workload, policy=policy, instances=instances, seed=seed, pd=pd, cfg=cfg,
               core_factory=core_factory, decode_policy=decode_policy,
               scrape_interval=scrape_interval, request_timeout=request_timeout,
               link_bandwidth=link_bandwidth, transfer_setup=transfer_setup,
               kv_bytes_per_token=kv_bytes_per_token, sample_interval=sample_interval,
               admission=admission)
    return sim.run()
