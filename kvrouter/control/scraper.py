"""Background refresh of per-instance remote data: ``/metrics`` snapshots and the
``/v1/models`` cache. Decisions only ever read what these tasks stored."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from kvrouter.backends.engines import DEFAULT_ENGINE, ENGINES, EngineControl, parse_metrics
from kvrouter.control.transport import Transport
from kvrouter.metrics import RouterMetrics
from kvrouter.registry import Instance, Registry

log = logging.getLogger("kvrouter.scraper")


class MetricsScraper:
    """Scrapes every known instance's ``/metrics`` each interval into an immutable snapshot,
    reading the gauges its engine serves."""

    def __init__(self, registry: Registry, transport: Transport, interval: float, timeout: float,
                 metrics: RouterMetrics) -> None:
        self.registry = registry
        self.transport = transport
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        self._stale: set[str] = set()

    def engine_for(self, inst: Instance) -> EngineControl:
        """The engine ``inst`` runs: FastDeploy for every instance until instances name theirs."""
        return ENGINES[DEFAULT_ENGINE]

    async def scrape(self, inst: Instance) -> None:
        engine = self.engine_for(inst)
        if engine.metrics is None:
            return  # nothing to scrape: the policies use local counters
        taken_at = time.monotonic()
        try:
            status, body = await self.transport.get(inst.info.metrics_url, self.timeout)
            snap = parse_metrics(body.decode("utf-8", "replace"), taken_at, engine) \
                if status == 200 else None
        except Exception:  # a failed scrape keeps the previous snapshot
            snap = None
        if self.registry.get(inst.identity) is not inst:
            return  # removed while scraping: its series stay deleted
        self.metrics.scrapes.labels(inst.url, "success" if snap else "failure").inc()
        if snap is not None:
            inst.snapshot = snap
            inst.load.on_snapshot(taken_at)
            if inst.identity in self._stale:
                self._stale.discard(inst.identity)
                log.info("metrics of %s fresh again", inst.url)

    def _check_stale(self) -> None:
        now = time.monotonic()
        for inst in self.registry.all():
            if inst.snapshot is not None and inst.fresh_snapshot(now) is None \
                    and inst.identity not in self._stale:
                self._stale.add(inst.identity)
                log.warning("metrics snapshot of %s is stale; using local counters", inst.url)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            instances = self.registry.all()
            if instances:
                await asyncio.gather(*(self.scrape(i) for i in instances))
            self._check_stale()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))


class ModelsCache:
    """Each instance's ``/v1/models`` cards, fetched when it becomes known and refreshed."""

    def __init__(self, registry: Registry, transport: Transport, refresh: float,
                 timeout: float) -> None:
        self.registry = registry
        self.transport = transport
        self.refresh = refresh
        self.timeout = timeout

    async def fetch(self, inst: Instance) -> None:
        try:
            status, body = await self.transport.get(inst.url + "/v1/models", self.timeout)
            data = orjson.loads(body).get("data") if status == 200 else None
        except Exception:  # keep the previous cards
            return
        if isinstance(data, list):
            inst.models = [m for m in data if isinstance(m, dict) and "id" in m]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            await asyncio.gather(*(self.fetch(i) for i in self.registry.all()))

    def union(self) -> list[dict]:
        """Model cards of routable instances, de-duplicated by id (first seen wins)."""
        seen: dict[str, dict] = {}
        for inst in self.registry.all():
            if inst.routable:
                for card in inst.models:
                    seen.setdefault(card["id"], card)
        return list(seen.values())
