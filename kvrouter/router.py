"""The router's composition root: configuration, registry, policies, prefix index, background
tasks and metrics, and the one place where a policy is asked to choose."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable

from kvrouter import errors
from kvrouter.config import RouterConfig
from kvrouter.control import outlier
from kvrouter.control.health import HealthMonitor
from kvrouter.control.scraper import MetricsScraper, ModelsCache
from kvrouter.control.static import StaticInstances
from kvrouter.control.transport import Transport
from kvrouter.http.tls import client_context
from kvrouter.instance import Role
from kvrouter.metrics import CounterChild, RouterMetrics, StatsTotals
from kvrouter.policies import make_policy
from kvrouter.policies.base import Policy, RequestView, Selection
from kvrouter.policies.cache_aware import SessionAffinity
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.tokenizer import make_tokenizer
from kvrouter.prefix.view import build_request_view, build_request_view_now
from kvrouter.registry import Instance, Registry
from kvrouter.shared import SharedState

log = logging.getLogger("kvrouter.router")

#: One recorded decision: (``time.perf_counter()`` when made, role, policy, instance URL,
#: strategy, matched blocks, looked-up blocks); see :meth:`Router.watch_decisions`.
Decision = tuple[float, str, str, str, str, int, int]
DECISIONS_KEPT = 100          # the dashboard's "recent decisions"
DECISIONS_WATCH_SECS = 60.0   # decisions are recorded this long after the dashboard last asked


class Router:
    """Everything a request handler needs, built once from the configuration."""

    def __init__(self, cfg: RouterConfig, index: PrefixIndex | None = None,
                 shared: SharedState | None = None) -> None:
        """``shared``: the routing state shared with other routers (:mod:`kvrouter.shared`;
        default: nothing shared). ``index``: a prefix index to use instead of
        ``shared.make_index(...)``."""
        self.cfg = cfg
        self.shared = shared if shared is not None else SharedState()
        s, sch, m = cfg.server, cfg.scheduler, cfg.manager
        self.splitwise = s.splitwise
        self.mode = "splitwise" if s.splitwise else "mixed"
        self.metrics = RouterMetrics()
        # one client TLS context for both planes: run_server gives it to the upstream pool
        self.transport = Transport(s.connect_timeout_secs, tls=client_context(cfg))
        self.registry = Registry(stale_after=3 * sch.metrics_scrape_interval_secs)
        self.index = index if index is not None else self.shared.make_index(
            sch.cache_max_blocks, sch.eviction_duration_mins * 60)
        self.tokenizer = make_tokenizer(sch, lambda: self.transport.session)
        names = ({Role.PREFILL: sch.prefill_policy, Role.DECODE: sch.decode_policy}
                 if s.splitwise else {Role.MIXED: sch.policy})
        self.policies: dict[Role, Policy] = {
            role: make_policy(name, role.value, sch, self.index) for role, name in names.items()}
        self.health = HealthMonitor(self.registry, self.transport, m, self.metrics,
                                    owns=self.shared.probes)
        self.scraper = MetricsScraper(self.registry, self.transport,
                                      sch.metrics_scrape_interval_secs,
                                      sch.metrics_scrape_timeout_secs, self.metrics)
        self.aliases = sch.model_aliases          # alias → model (README "Models")
        self.models = ModelsCache(self.registry, self.transport, m.models_refresh_secs,
                                  m.health_check_timeout_secs, self.aliases)
        self.metrics.attach_state(self.registry, self.index)
        self.outliers = outlier.for_router(cfg.outlier, self.registry, self.metrics)
        self.registry.on_added.append(self._on_added)
        self.registry.on_removed.append(self._on_removed)
        self.registry.on_changed.append(self._on_changed)
        # per role, fixed for the router's life: its policy, its name, the role's label value
        # and the decision-time histogram child (no enum property or labels() per decision)
        self._roles = {role: (policy, policy.name, role.value,
                              self.metrics.decision.labels(role.value, policy.name))
                       for role, policy in self.policies.items()}
        #: ``kvrouter_selections_total`` children by (role, instance, strategy); cleared when an
        #: instance is removed or re-registered, so its URL label is never stale
        self._chosen: dict[tuple[Role, Instance, str], CounterChild] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stats_prev = StatsTotals()
        #: the last decisions, recorded only while a dashboard watches (:meth:`watch_decisions`)
        self.decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._record_decisions_until = 0.0     # time.perf_counter()
        # the routing state other routers see: registry changes, session observations (the
        # index made by shared.make_index reports its records itself)
        shared_ = self.shared
        self.registry.on_added.append(shared_.instance_added)
        self.registry.on_changed.append(shared_.instance_changed)
        self.registry.on_removed.append(shared_.instance_removed)
        #: the session-affinity memory of each role whose policy keeps one
        self.sessions: dict[Role, SessionAffinity] = {}
        for role, policy in self.policies.items():
            sessions = getattr(policy, "sessions", None)
            if isinstance(sessions, SessionAffinity):
                sessions.add_listener(functools.partial(shared_.observed, role))
                self.sessions[role] = sessions
        shared_.attach(self)

    # -- scheduling ---------------------------------------------------------------------------
    async def request_view(self, body: dict, endpoint: str, roles: tuple[Role, ...]) -> RequestView:
        """The scheduling view of a request for the policies of ``roles``: rendered prompt,
        tokens, token estimate and (if a policy needs them) block hashes."""
        return await build_request_view(
            body, endpoint, self.tokenizer, self.cfg.scheduler.cache_block_size,
            need_prefix=any(self.policies[r].needs_prefix for r in roles),
            tokenize_for_estimate=self.tokenizer.kind == "local", aliases=self.aliases)

    def request_view_now(self, body: dict, endpoint: str,
                         roles: tuple[Role, ...]) -> RequestView | None:
        """:meth:`request_view` if it needs no tokenizer call (no tokenizer configured, or
        token-id prompts), else ``None``."""
        return build_request_view_now(
            body, endpoint, self.tokenizer, self.cfg.scheduler.cache_block_size,
            need_prefix=any(self.policies[r].needs_prefix for r in roles),
            tokenize_for_estimate=self.tokenizer.kind == "local", aliases=self.aliases)

    def load_only(self, roles: tuple[Role, ...]) -> bool:
        """True when the views of ``roles`` need no prompt: no policy uses the prefix and no
        local tokenizer would count tokens (mirrors :meth:`request_view`)."""
        tok = self.tokenizer
        return (not any(self.policies[r].needs_prefix for r in roles)
                and not (tok.kind == "local" and tok.real))

    def can_route(self, role: Role, exclude: set[str], model: str | None = None) -> bool:
        """Whether an instance of ``role`` outside ``exclude`` (serving ``model``, as
        :meth:`select` reads ``view.model``) is routable (a retry target)."""
        if model is not None:
            model = self.aliases.get(model, model)
        return any(c.identity not in exclude for c in self.registry.candidates(role, model))

    def select(self, role: Role, view: RequestView, exclude: set[str] | None = None,
               prefer: Callable[[Instance], bool] | None = None,
               require: Callable[[Instance], bool] | None = None) -> Selection:
        """Ask the role's policy to choose among its :meth:`candidates`."""
        cands = self.candidates(role, view, exclude, prefer, require)
        policy, name, role_name, decided = self._roles[role]
        started = time.perf_counter()
        sel = policy.select(cands, view)
        decided.observe(time.perf_counter() - started)
        key = (role, sel.instance, sel.strategy)
        chosen = self._chosen.get(key)
        if chosen is None:
            if len(self._chosen) > 4096:
                self._chosen.clear()
            chosen = self._chosen[key] = self.metrics.selections.labels(
                role_name, name, sel.instance.url, sel.strategy)
        chosen.value += 1
        if sel.lookup_blocks:
            m = self.metrics
            m.lookup_blocks.labels(role_name).inc(sel.lookup_blocks)
            m.hit_blocks.labels(role_name).inc(sel.hit_blocks)
        if sel.session_hit is not None:
            self.metrics.cache_request.inc()
            if sel.session_hit:
                self.metrics.cache_hit.inc()
        if started < self._record_decisions_until:      # a dashboard watches: one tuple
            self.decisions.append((started, role_name, name, sel.instance.url,
                                   sel.strategy, sel.hit_blocks, sel.lookup_blocks))
        return sel

    def watch_decisions(self) -> None:
        """Record the decisions of the next :data:`DECISIONS_WATCH_SECS` in :attr:`decisions`
        (the dashboard asks at every refresh; unwatched, a decision costs one comparison)."""
        self._record_decisions_until = time.perf_counter() + DECISIONS_WATCH_SECS

    def candidates(self, role: Role, view: RequestView, exclude: set[str] | None = None,
                   prefer: Callable[[Instance], bool] | None = None,
                   require: Callable[[Instance], bool] | None = None) -> list[Instance]:
        """The instances the role's policy chooses among: its routable candidates (minus
        ``exclude``); raises the 404/503 :class:`RouterError` when none is left.

        Instances ejected by outlier detection are left out, unless none would be left
        (:meth:`OutlierDetector.filter <kvrouter.control.outlier.OutlierDetector.filter>`).
        ``require`` leaves out the candidates it refuses (a decode that cannot take the chosen
        prefill's KV cache); ``prefer`` optionally narrows the rest (FastDeploy's transfer
        protocol match); if it leaves none, all of them are used. ``view.model`` (its alias
        resolved) narrows them to the instances serving it (``Registry.candidates``); a model
        no instance serves is a 404.
        """
        asked = view.model
        model = self.aliases.get(asked, asked) if asked is not None and self.aliases else asked
        cands = self.registry.candidates(role, model)
        if exclude:
            cands = [c for c in cands if c.identity not in exclude]
        if require is not None:
            cands = [c for c in cands if require(c)]
            if not cands:
                log.warning("no %s instance can pair with the chosen prefill", role.value)
        if self.outliers.ejections:          # none ejected (the rule): nothing to filter
            cands = self.outliers.filter(cands, role.value)
        if prefer is not None and cands:
            preferred = [c for c in cands if prefer(c)]
            if preferred:
                cands = preferred
            else:
                log.warning("no %s instance can pair with the chosen prefill; using any",
                            role.value)
        if not cands:
            if asked is not None and model is not None and not self.registry.serves(model):
                raise errors.model_not_found(asked)
            raise errors.no_instance("No available prefill/decode workers" if self.splitwise
                                     else "No available mixed workers")
        return cands

    # -- lifecycle ----------------------------------------------------------------------------
    def _on_added(self, inst: Instance) -> None:
        self._spawn(self.models.fetch(inst))

    def _on_removed(self, inst: Instance, reason: str) -> None:
        self.index.remove_instance(inst.identity)
        self.metrics.forget_instance(inst.url)
        self._chosen.clear()
        for policy in self.policies.values():
            policy.forget(inst.identity)

    def _on_changed(self, inst: Instance, what: str) -> None:
        if what == "info":          # a re-registration may change the URL label
            self._chosen.clear()

    def _spawn(self, coro) -> None:
        self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it ends; cancelled at shutdown."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def needs_remote_metrics(self) -> bool:
        return any(p.needs_remote_metrics for p in self.policies.values())

    async def start(self, leader: bool = True) -> None:
        """Start the background tasks (health, removals, scrapes, models, sweep, stats, the
        ``register.yaml`` watch).

        ``leader=False`` (a worker process other than the first, :mod:`kvrouter.workers`)
        leaves health rounds, removals, scrapes, the ``[stats]`` line and the
        ``register.yaml`` watch (its changes reach the others as registry changes) to the
        leader."""
        if leader:
            self._spawn(self.health.run())
            self._spawn(self.health.run_removals())
        m = self.cfg.manager
        if leader and m.register_path:
            self._spawn(StaticInstances(self.registry, self.health, m.register_path,
                                        splitwise=self.splitwise,
                                        probe_timeout=m.health_check_timeout_secs).run())
        self._spawn(self.models.run())
        if leader:      # recognises engines; snapshots only when a policy reads them
            self._spawn(self.scraper.run(snapshots=self.needs_remote_metrics()))
        if self.cfg.scheduler.eviction_interval_secs > 0:
            self._spawn(self._sweep_loop())
        if leader and self.cfg.scheduler.stats_interval_secs > 0:
            self._spawn(self._stats_loop())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.close()
        await self.transport.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.scheduler.eviction_interval_secs)
            self.index.sweep(time.monotonic())
            self.registry.purge_idle_loads()

    async def _stats_loop(self) -> None:
        """The ``[stats]`` line every ``stats-interval-secs``, quiet while the router is idle:
        a line is written when a request was in flight or ended in the interval, when the
        instances or their states changed since the last line, and once more when activity
        stops (its counts are then zero); an idle router writes nothing."""
        shown: tuple = ()               # the instances and states the last line showed
        was_busy = False
        while True:
            await asyncio.sleep(self.cfg.scheduler.stats_interval_secs)
            line, busy = self._stats()
            fleet = tuple((i.url, i.state, i.paused) for i in self.registry.all())
            if busy or was_busy or fleet != shown:
                log.info(line)
                shown = fleet
            was_busy = busy

    def stats_line(self) -> str:
        """The periodic ``[stats]`` line (docs/fastdeploy.md#logs; every field in the README's
        "Logs"), per interval: it starts the interval of the next line."""
        return self._stats()[0]

    def _stats(self) -> tuple[str, bool]:
        """The ``[stats]`` line, and whether a request was in flight or ended in its interval.

        fd-router's fields come first, for existing parsers: ``total_running``, per instance
        ``running`` (``R``), ``cache_hit_rate`` (session affinity) and ``prefix_hit_rate`` (the
        hit rate *predicted* by the router's prefix index). kvrouter adds per instance
        ``prefill_tokens`` (``T``: the estimated tokens of its requests that have not started
        answering; ``T`` is released at the first byte, so a running stream counts in
        ``decoding``), ``decoding`` (requests past their first byte) and ``state``; then
        ``measured_hit_rate`` (cached / prompt tokens the instances reported,
        ``kvrouter_backend_cached_tokens_total`` / ``_prompt_tokens_total``, ``0.00%`` when no
        usage was seen) and ``requests`` (inference requests that ended in the interval).
        """
        instances = self.registry.all()
        workers = ", ".join(
            f"{i.url}: running={i.load.requests} prefill_tokens={i.load.tokens} "
            f"decoding={i.load.decoding} "
            f"state={'paused' if i.paused and i.state == 'healthy' else i.state}"
            for i in instances)
        d = self._interval_deltas()
        hits, total = int(d.cache_hits), int(d.cache_requests)
        rate = 100.0 * hits / total if total else 0.0
        prefix_rate = 100.0 * d.hit_blocks / d.lookup_blocks if d.lookup_blocks else 0.0
        measured = 100.0 * d.cached_tokens / d.prompt_tokens if d.prompt_tokens > 0 else 0.0
        running = sum(i.load.requests for i in instances)
        ended = int(d.requests)
        return (f"[stats] total_running={running}, workers: [{workers}], "
                f"cache_hit_rate={rate:.2f}% (hits={hits}/total={total}), "
                f"prefix_hit_rate={prefix_rate:.2f}%, measured_hit_rate={measured:.2f}%, "
                f"requests={ended}", running > 0 or ended > 0)

    def _interval_deltas(self) -> StatsTotals:
        """The :class:`StatsTotals` counted since the previous stats line (other routers'
        included), none negative."""
        now = self.metrics.stats_totals()
        others = self.shared.peer_totals()
        if others is not None:               # the other routers' counters
            now = now + others
        prev, self._stats_prev = self._stats_prev, now
        # a removed instance's series vanish, so a delta can go negative: count it as 0
        return StatsTotals(*(max(0.0, v) for v in (now - prev).as_list()))
