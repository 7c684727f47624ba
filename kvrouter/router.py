"""The router's composition root: configuration, registry, policies, prefix index, background
tasks and metrics, and the one place where a policy is asked to choose."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from kvrouter import errors
from kvrouter.config import RouterConfig
from kvrouter.control.health import HealthMonitor
from kvrouter.control.scraper import MetricsScraper, ModelsCache
from kvrouter.control.transport import Transport
from kvrouter.instance import Role
from kvrouter.metrics import RouterMetrics, StatsTotals
from kvrouter.policies import make_policy
from kvrouter.policies.base import Policy, RequestView, Selection
from kvrouter.policies.cache_aware import SessionAffinity
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.tokenizer import make_tokenizer
from kvrouter.prefix.view import build_request_view, build_request_view_now
from kvrouter.registry import Instance, Registry
from kvrouter.shared import SharedState

log = logging.getLogger("kvrouter.router")


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
        self.transport = Transport(s.connect_timeout_secs)
        self.registry = Registry(stale_after=3 * sch.metrics_scrape_interval_secs)
        self.index = index if index is not None else self.shared.make_index(
            sch.cache_max_blocks, sch.eviction_duration_mins * 60)
        self.tokenizer = make_tokenizer(sch, lambda: self.transport.session)
        names = ({Role.PREFILL: sch.prefill_policy, Role.DECODE: sch.decode_policy}
                 if s.splitwise else {Role.MIXED: sch.policy})
        self.policies: dict[Role, Policy] = {
            role: make_policy(name, role.value, sch, self.index) for role, name in names.items()}
        self.health = HealthMonitor(self.registry, self.transport, m, self.metrics)
        self.scraper = MetricsScraper(self.registry, self.transport,
                                      sch.metrics_scrape_interval_secs,
                                      sch.metrics_scrape_timeout_secs, self.metrics)
        self.models = ModelsCache(self.registry, self.transport, m.models_refresh_secs,
                                  m.health_check_timeout_secs)
        self.metrics.attach_state(self.registry, self.index)
        self.registry.on_added.append(self._on_added)
        self.registry.on_removed.append(self._on_removed)
        self._tasks: set[asyncio.Task] = set()
        self._stats_prev = StatsTotals()
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
            tokenize_for_estimate=self.tokenizer.kind == "local")

    def request_view_now(self, body: dict, endpoint: str,
                         roles: tuple[Role, ...]) -> RequestView | None:
        """:meth:`request_view` if it needs no tokenizer call (no tokenizer configured, or
        token-id prompts), else ``None``."""
        return build_request_view_now(
            body, endpoint, self.tokenizer, self.cfg.scheduler.cache_block_size,
            need_prefix=any(self.policies[r].needs_prefix for r in roles),
            tokenize_for_estimate=self.tokenizer.kind == "local")

    def load_only(self, roles: tuple[Role, ...]) -> bool:
        """True when the views of ``roles`` need no prompt: no policy uses the prefix and no
        local tokenizer would count tokens (mirrors :meth:`request_view`)."""
        tok = self.tokenizer
        return (not any(self.policies[r].needs_prefix for r in roles)
                and not (tok.kind == "local" and tok.real))

    def select(self, role: Role, view: RequestView, exclude: set[str] | None = None,
               prefer: Callable[[Instance], bool] | None = None) -> Selection:
        """Ask the role's policy to choose among its routable candidates (minus ``exclude``).

        ``prefer`` optionally narrows candidates (the PD pair filter); if it leaves none, all
        candidates are used.
        """
        cands = self.registry.candidates(role)
        if exclude:
            cands = [c for c in cands if c.identity not in exclude]
        if prefer is not None and cands:
            preferred = [c for c in cands if prefer(c)]
            if preferred:
                cands = preferred
            else:
                log.warning("no %s instance can pair with the chosen prefill; using any",
                            role.value)
        if not cands:
            raise errors.no_instance("No available prefill/decode workers" if self.splitwise
                                     else "No available mixed workers")
        policy = self.policies[role]
        started = time.perf_counter()
        sel = policy.select(cands, view)
        m = self.metrics
        m.decision.labels(role.value, policy.name).observe(time.perf_counter() - started)
        m.selections.labels(role.value, policy.name, sel.instance.url, sel.strategy).inc()
        if sel.lookup_blocks:
            m.lookup_blocks.labels(role.value).inc(sel.lookup_blocks)
            m.hit_blocks.labels(role.value).inc(sel.hit_blocks)
        if sel.session_hit is not None:
            m.cache_request.inc()
            if sel.session_hit:
                m.cache_hit.inc()
        return sel

    # -- lifecycle ----------------------------------------------------------------------------
    def _on_added(self, inst: Instance) -> None:
        self._spawn(self.models.fetch(inst))

    def _on_removed(self, inst: Instance, reason: str) -> None:
        self.index.remove_instance(inst.identity)
        self.metrics.forget_instance(inst.url)

    def _spawn(self, coro) -> None:
        self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it ends; cancelled at shutdown."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def needs_remote_metrics(self) -> bool:
        return any(p.needs_remote_metrics for p in self.policies.values())

    async def start(self, leader: bool = True) -> None:
        """Start the background tasks (health, removals, scrapes, models, sweep, stats).

        ``leader=False`` (a worker process other than the first, :mod:`kvrouter.workers`)
        leaves health rounds, removals, scrapes and the ``[stats]`` line to the leader."""
        if leader:
            self._spawn(self.health.run())
            self._spawn(self.health.run_removals())
        self._spawn(self.models.run())
        if leader and self.needs_remote_metrics():
            self._spawn(self.scraper.run())
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
        while True:
            await asyncio.sleep(self.cfg.scheduler.stats_interval_secs)
            log.info(self.stats_line())

    def stats_line(self) -> str:
        """The periodic ``[stats]`` line (docs/fastdeploy.md#logs), per interval.

        After fd-router's ``prefix_hit_rate`` (hit rate *predicted* by the router's prefix
        index) kvrouter appends ``measured_hit_rate``: cached / prompt tokens reported by the
        instances (``kvrouter_backend_cached_tokens_total`` / ``_prompt_tokens_total``) in the
        same interval, ``0.00%`` when no usage was seen.
        """
        instances = self.registry.all()
        workers = ", ".join(
            f"{i.url}: running={i.load.requests} tokens={i.load.tokens} "
            f"state={'paused' if i.paused and i.state == 'healthy' else i.state}"
            for i in instances)
        hits, total, hit_blocks, looked, cached, prompt = self._interval_deltas()
        rate = 100.0 * hits / total if total else 0.0
        prefix_rate = 100.0 * hit_blocks / looked if looked else 0.0
        measured = 100.0 * cached / prompt if prompt > 0 else 0.0
        running = sum(i.load.requests for i in instances)
        return (f"[stats] total_running={running}, workers: [{workers}], "
                f"cache_hit_rate={rate:.2f}% (hits={hits}/total={total}), "
                f"prefix_hit_rate={prefix_rate:.2f}%, measured_hit_rate={measured:.2f}%")

    def _interval_deltas(self) -> tuple[int, int, float, float, float, float]:
        """Since the previous stats line: session hits/requests, predicted prefix hit/lookup
        blocks, and cached/prompt tokens reported by the instances."""
        now = self.metrics.stats_totals()
        others = self.shared.peer_totals()
        if others is not None:               # the other routers' counters
            now = now + others
        prev, self._stats_prev = self._stats_prev, now
        d = now - prev
        # a removed instance's series vanish, so a delta can go negative: count it as 0
        return (int(max(0.0, d.cache_hits)), int(max(0.0, d.cache_requests)),
                max(0.0, d.hit_blocks), max(0.0, d.lookup_blocks), max(0.0, d.cached_tokens),
                max(0.0, d.prompt_tokens))
