"""Background refresh of per-instance remote data: ``/metrics`` snapshots and the
``/v1/models`` cache. Decisions only ever read what these tasks stored."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace

from kvrouter.backends.base import loads
from kvrouter.backends.engines import (
    ENGINES,
    FALLBACK_ENGINE,
    EngineControl,
    detect_engine,
    metric_names,
    parse_metrics,
)
from kvrouter.config import is_model_name
from kvrouter.control.transport import Transport
from kvrouter.metrics import RouterMetrics
from kvrouter.registry import Instance, Registry

log = logging.getLogger("kvrouter.scraper")


class MetricsScraper:
    """Scrapes every known instance's ``/metrics`` each interval into an immutable snapshot,
    reading the gauges its engine serves.

    An instance whose engine is not known yet (a ``register.yaml`` entry without ``engine``)
    gets the one its first answered page shows (:func:`detect_engine`; none recognisable, or
    no ``/metrics`` at all: ``openai``), stored in its registration so that ``/registered``,
    the abort fan-out and sibling workers see it. A page that lacks its engine's gauges is an
    error logged once per instance (it would otherwise only show as failed scrapes, with the
    metrics policies falling back to local counters)."""

    def __init__(self, registry: Registry, transport: Transport, interval: float, timeout: float,
                 metrics: RouterMetrics) -> None:
        self.registry = registry
        self.transport = transport
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        self._stale: set[str] = set()
        self._reported: set[str] = set()     # identities whose unusable page was logged
        # forgotten with the instance: a re-registration starts afresh, and identities that
        # come and go (heartbeats from ever-new ports) cannot grow these sets
        registry.on_removed.append(self._forget)

    def _forget(self, inst: Instance, reason: str) -> None:
        self._stale.discard(inst.identity)
        self._reported.discard(inst.identity)

    def engine_for(self, inst: Instance) -> EngineControl | None:
        """The engine ``inst`` runs, or ``None`` while it is still to be recognised."""
        name = inst.info.engine
        return ENGINES[name] if name is not None else None

    async def detect(self, inst: Instance) -> EngineControl | None:
        """The engine of ``inst``, recognised from its ``/metrics`` now if not known yet
        (``None``: the instance did not answer)."""
        engine = self.engine_for(inst)
        if engine is None:
            await self.scrape(inst, snapshot=False)
            engine = self.engine_for(inst)
        return engine

    async def scrape(self, inst: Instance, snapshot: bool = True) -> None:
        """One scrape; ``snapshot=False`` only recognises an unknown engine."""
        engine = self.engine_for(inst)
        if engine is not None and (engine.metrics is None or not snapshot):
            return  # nothing to scrape: the policies use local counters
        taken_at = time.monotonic()
        try:
            status, body = await self.transport.get(inst.info.metrics_url, self.timeout)
        except Exception:  # a failed scrape keeps the previous snapshot
            status, body = 0, b""
        if self.registry.get(inst.identity) is not inst:
            return  # removed while scraping: its series stay deleted
        text = body.decode("utf-8", "replace") if status == 200 else ""
        if engine is None:
            engine = self._recognise(inst, status, text)
            if engine is not None and (engine.metrics is None or not snapshot):
                return
        snap = parse_metrics(text, taken_at, engine) if engine is not None and text else None
        self.metrics.scrapes.labels(inst.url, "success" if snap else "failure").inc()
        if snap is None:
            if engine is not None and status == 200:
                self._report_unusable(inst, engine, text)
            return
        inst.snapshot = snap
        inst.load.on_snapshot(taken_at)
        if inst.identity in self._stale:
            self._stale.discard(inst.identity)
            log.info("metrics of %s fresh again", inst.url)

    def _recognise(self, inst: Instance, status: int, text: str) -> EngineControl | None:
        """Store the engine a first answer shows; ``None`` if there was no usable answer (a
        connection failure or a server error: tried again next time)."""
        if status == 200:
            names = metric_names(text)
            engine = detect_engine(names)
            if engine is None:
                engine = ENGINES[FALLBACK_ENGINE]
                if names:
                    self._reported.add(inst.identity)
                    log.error("metrics of %s use no known engine's names (%s); treating it as "
                              "engine %s, without metrics; set its engine in register.yaml",
                              inst.url, _some(names), engine.name)
        elif status in (404, 405, 501):    # no /metrics (llama.cpp without --metrics: 501)
            engine = ENGINES[FALLBACK_ENGINE]
        else:
            return None
        self.registry.update(inst, replace(inst.info, engine=engine.name))
        log.info("engine of %s recognised from its /metrics: %s", inst.url, engine.name)
        return engine

    def _report_unusable(self, inst: Instance, engine: EngineControl, text: str) -> None:
        if inst.identity in self._reported:
            return
        self._reported.add(inst.identity)
        assert engine.metrics is not None
        names = engine.metrics.running + engine.metrics.waiting
        log.error("metrics of %s (engine %s) lack %s; names on the page: %s; the metrics "
                  "policies use local counters for it", inst.url, engine.name,
                  " / ".join(names), _some(metric_names(text)) or "none")

    def _check_stale(self) -> None:
        now = time.monotonic()
        for inst in self.registry.all():
            if inst.snapshot is not None and inst.fresh_snapshot(now) is None \
                    and inst.identity not in self._stale:
                self._stale.add(inst.identity)
                log.warning("metrics snapshot of %s is stale; using local counters", inst.url)

    async def run(self, snapshots: bool = True) -> None:
        """Scrape every interval; ``snapshots=False`` (no policy reads metrics) only
        recognises the engines not known yet."""
        while True:
            started = time.monotonic()
            instances = self.registry.all()
            if not snapshots:
                instances = [i for i in instances if i.info.engine is None]
            if instances:
                await asyncio.gather(*(self.scrape(i, snapshots) for i in instances))
            self._check_stale()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))


def _some(names: list[str], limit: int = 5) -> str:
    """A few of ``names`` for a log line (a page has hundreds; each name is clipped)."""
    shown = ", ".join(ascii(n[:80])[1:-1] for n in names[:limit])
    return shown + (f", … ({len(names)} names)" if len(names) > limit else "")


MAX_CARDS = 256            # model cards kept per instance (an answer may list any number)
UNKNOWN_RETRY_SECS = 5.0   # an instance serving unknown models is asked again this often


class ModelsCache:
    """Each instance's ``/v1/models`` cards and model ids (``Instance.fetched_models``, which
    ``Router.select`` filters on), fetched when it becomes known and refreshed every
    ``models-refresh-secs``; an instance whose models are unknown is asked every few seconds,
    so a fleet's lists are known soon after an instance was down at registration."""

    def __init__(self, registry: Registry, transport: Transport, refresh: float,
                 timeout: float, aliases: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.transport = transport
        self.refresh = refresh
        self.timeout = timeout
        self.aliases = dict(aliases or {})

    async def fetch(self, inst: Instance) -> None:
        """A failed call (no answer, not a 200) keeps what was known, so a briefly unreachable
        instance keeps its models; an answer that lists none makes them unknown."""
        try:
            status, body = await self.transport.get(inst.url + "/v1/models", self.timeout)
        except Exception:
            return
        if status != 200 or self.registry.get(inst.identity) is not inst:
            return
        try:
            data = loads(body)      # nesting bounded: the cards are re-serialised later
        except ValueError:
            data = None
        items = data.get("data") if isinstance(data, dict) else None
        cards = [m for m in items if isinstance(m, dict) and is_model_name(m.get("id"))] \
            if isinstance(items, list) else []
        inst.models = cards[:MAX_CARDS]
        ids = frozenset(card["id"] for card in inst.models) or None
        if ids != inst.fetched_models:
            inst.fetched_models = ids
            self.registry.changed()        # the candidate lists per model are rebuilt
            log.info("models of %s: %s", inst.url,
                     ", ".join(sorted(ascii(i)[1:-1] for i in ids)) if ids else "unknown")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.refresh
        while True:
            await asyncio.sleep(min(self.refresh, UNKNOWN_RETRY_SECS))
            everyone = loop.time() >= due
            if everyone:
                due = loop.time() + self.refresh
            instances = [i for i in self.registry.all() if everyone or i.served is None]
            await asyncio.gather(*(self.fetch(i) for i in instances))

    def union(self) -> list[dict]:
        """The ``/v1/models`` listing: model cards of routable instances, de-duplicated by id
        (first seen wins); a minimal card for a registered model no card lists; then, for each
        alias of a listed model, the model's card under the alias's id."""
        seen: dict[str, dict] = {}
        routable = [inst for inst in self.registry.all() if inst.routable]
        for inst in routable:
            for card in inst.models:
                seen.setdefault(card["id"], card)
        for inst in routable:
            for name in inst.info.models:
                seen.setdefault(name, {"id": name, "object": "model", "owned_by": "kvrouter"})
        for alias, model in self.aliases.items():
            target = seen.get(model)
            if target is not None and alias not in seen:
                seen[alias] = {**target, "id": alias}
        return list(seen.values())
