"""Health checking: periodic non-overlapping probe rounds, the state machine,
out-of-cycle probes after connect failures, and timed removal of unhealthy instances."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvrouter.config import ManagerConfig
from kvrouter.control.transport import Transport
from kvrouter.metrics import RouterMetrics
from kvrouter.registry import HEALTHY, UNHEALTHY, Instance, Registry

log = logging.getLogger("kvrouter.health")


@dataclass
class ProbeResult:
    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None


class HealthMonitor:
    """Owns every health probe and every health state transition."""

    def __init__(self, registry: Registry, transport: Transport, cfg: ManagerConfig,
                 metrics: RouterMetrics, owns: Callable[[Instance], bool] = lambda i: True
                 ) -> None:
        self.registry = registry
        self.owns = owns        # probe and remove it here (routers sharing state split them)
        self.transport = transport
        self.cfg = cfg
        self.metrics = metrics
        self._round_running = False
        self._soon: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    async def probe_url(self, url: str, timeout: float) -> ProbeResult:
        """``GET {url}{endpoint}``; only 200 counts as healthy."""
        start = time.perf_counter()
        try:
            status, _ = await self.transport.get(url + self.cfg.health_check_endpoint, timeout)
            err = None if status == 200 else f"status {status}"
        except TimeoutError:
            status, err = None, f"timeout after {timeout:g}s"
        except Exception as e:  # any failure is an unhealthy probe
            status, err = None, str(e) or type(e).__name__
        return ProbeResult(status == 200, status, (time.perf_counter() - start) * 1e3, err)

    async def probe(self, inst: Instance, timeout: float | None = None) -> bool:
        """Probe one instance and count the result as one round observation."""
        res = await self.probe_url(inst.url, timeout or self.cfg.health_check_timeout_secs)
        if self.registry.get(inst.identity) is inst:  # removed meanwhile: its series stay deleted
            self.metrics.health_checks.labels(inst.url, "success" if res.ok else "failure").inc()
            self.observe(inst, res.ok)
        return res.ok

    def observe(self, inst: Instance, ok: bool) -> None:
        change = self.registry.observe_health(
            inst, ok, failure_threshold=self.cfg.health_failure_threshold,
            success_threshold=self.cfg.health_success_threshold)
        if change == UNHEALTHY:
            log.warning("Instance %s marked unhealthy after %d consecutive failed health checks",
                        inst.url, inst.fail_streak)
            if self.cfg.unhealthy_removal_secs == 0:
                self.remove(inst)
        elif change == HEALTHY:
            log.info("Instance %s healthy again", inst.url)

    def remove(self, inst: Instance) -> None:
        """Remove an unhealthy instance, unless it is a ``register.yaml`` entry: those stay
        and recover (docs/fastdeploy.md#health-checking), however soon removal is due."""
        if inst.static or not self.owns(inst):
            return
        log.info("Removed unhealthy %s instance: %s", inst.role.value, inst.url)
        self.registry.remove(inst, "instance_removed")

    def probe_soon(self, inst: Instance) -> None:
        """Schedule one out-of-cycle probe (deduplicated), e.g. after a connect failure."""
        if inst.identity in self._soon:
            return
        self._soon.add(inst.identity)

        async def run() -> None:
            try:
                await self.probe(inst)
            finally:
                self._soon.discard(inst.identity)

        self._spawn(run())

    async def run_round(self) -> None:
        instances = [i for i in self.registry.all() if self.owns(i)]
        if instances:
            await asyncio.gather(*(self.probe(i) for i in instances))

    async def run(self) -> None:
        """Rounds start every interval (start to start); a tick during a running round is
        skipped."""
        interval = self.cfg.health_check_interval_secs
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            if self._round_running:
                log.info("health round still running; tick skipped")
                continue
            self._round_running = True
            task = self._spawn(self.run_round())
            task.add_done_callback(lambda _t: setattr(self, "_round_running", False))
            if next_at < loop.time():
                next_at = loop.time() + interval

    async def run_removals(self, period: float = 0.25) -> None:
        """Remove instances that stayed unhealthy for ``unhealthy-removal-secs`` (:meth:`remove`
        spares static ones)."""
        limit = self.cfg.unhealthy_removal_secs
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for inst in self.registry.all():
                if (inst.state == UNHEALTHY and inst.unhealthy_since is not None
                        and now - inst.unhealthy_since >= limit):
                    self.remove(inst)
            self.registry.purge_idle_loads()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
