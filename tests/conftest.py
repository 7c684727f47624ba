"""Shared fixtures: simulated instances started in the test's event loop and stopped after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from harness import Factory
from kvrouter.sim import SimConfig, SimInstance


@pytest.fixture
async def sims():
    """``await sims(n, role=..., **SimConfig fields)`` → started instances, sorted by URL."""
    started: list[SimInstance] = []

    async def make(n: int = 1, **cfg) -> list[SimInstance]:
        cfg.setdefault("time_scale", 0.01)
        batch = []
        for _ in range(n):
            inst = SimInstance(SimConfig(**cfg))
            await inst.start()
            started.append(inst)
            batch.append(inst)
        return sorted(batch, key=lambda i: i.url)

    yield make
    for inst in started:
        await inst.stop()


@pytest.fixture
async def router_factory(tmp_path):
    """``await router_factory(config, *args)`` → a running router process, stopped after."""
    from harness import start_router

    started = []

    async def make(config: dict | None = None, *args: str, **kw):
        sub = tmp_path / f"r{len(started)}"
        sub.mkdir()
        router = await start_router(sub, config, *args, **kw)
        started.append(router)
        return router

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def fleet(tmp_path):
    """A :class:`harness.Fleet`: routers, instances and fakes of one test, stopped after it."""
    from harness import Fleet

    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
async def sim() -> AsyncIterator[Factory]:
    """``await sim(**SimConfig fields, knobs=Knobs(...))`` → one started instance."""
    made: list[SimInstance] = []

    async def factory(**kw: Any) -> SimInstance:
        knobs = kw.pop("knobs", None)
        inst = SimInstance(SimConfig(**kw), knobs=knobs)
        await inst.start()
        made.append(inst)
        return inst

    yield factory
    await asyncio.gather(*(i.stop() for i in made))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
