"""Outlier ejection (kvrouter.control.outlier): the detector's rules in fake time, its wiring
into the router, and a real router process in front of real simulated instances, one of which
answers every request at once with a 500."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from harness import bounded, metrics_text, sample, wait_for

from kvrouter.config import ConfigError, OutlierConfig, RouterConfig, load_config
from kvrouter.control.outlier import CONSECUTIVE, PROBATION, RATE, OutlierDetector
from kvrouter.instance import InstanceInfo, Role
from kvrouter.router import Router


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def detector(peers: list[str] | None = None, **cfg) -> tuple[OutlierDetector, Clock]:
    """A detector in fake time; ``peers``: the routable instances of the one role."""
    clock = Clock()
    names = peers
    det = OutlierDetector(OutlierConfig(**cfg),
                          None if names is None else (lambda _i: set(names)), clock)
    return det, clock


def fail(det: OutlierDetector, identity: str, n: int) -> None:
    for _ in range(n):
        det.observe(identity, True)


# -- the rules --------------------------------------------------------------------------------
def test_consecutive_failures_eject():
    det, _ = detector()
    events: list[tuple[str, str]] = []
    det.listeners.append(lambda i, r: events.append((i, r)))
    fail(det, "a:1", 4)
    det.observe("a:1", False)            # a success (or a 4xx) breaks the streak
    fail(det, "a:1", 4)
    assert not det.is_ejected("a:1") and det.ejected() == set()
    det.observe("a:1", True)
    assert det.is_ejected("a:1") and det.ejected() == {"a:1"}
    assert events == [("a:1", CONSECUTIVE)]


def test_answers_that_are_not_failures_never_eject():
    """4xx answers and client disconnects are reported as ``failed=False``."""
    det, _ = detector()
    for _ in range(500):
        det.observe("a:1", False)
    assert det.ejected() == set()


def test_failure_rate_ejects_without_a_streak():
    det, clock = detector(consecutive_failures=0, min_requests=20, failure_rate_percent=50)
    events: list[str] = []
    det.listeners.append(lambda i, r: events.append(r))
    for _ in range(9):                   # 18 answers, half failed, never 2 failures in a row
        det.observe("a:1", True)
        det.observe("a:1", False)
        clock.t += 0.1
    det.observe("a:1", False)
    assert not det.is_ejected("a:1")     # 19 answers: below min-requests
    det.observe("a:1", True)             # 20 answers, 10 failed: 50 %
    assert det.is_ejected("a:1") and events == [RATE]


def test_failure_rate_counts_only_the_last_interval():
    def run(gap: float) -> bool:
        det, clock = detector(consecutive_failures=0, min_requests=20, interval_secs=10)
        fail(det, "a:1", 10)             # 10 answers: below min-requests
        clock.t += gap
        for _ in range(14):
            det.observe("a:1", False)
        fail(det, "a:1", 6)              # 6 of the last 20 failed; 16 of all 30
        return det.is_ejected("a:1")

    assert run(0) is True
    assert run(30) is False              # the first 10 failures left the window


def test_ejection_time_grows_and_is_capped():
    det, clock = detector(base_ejection_secs=30, max_ejection_secs=100)
    fail(det, "a:1", 5)
    lengths = []
    for _ in range(5):
        start = clock.t
        while det.is_ejected("a:1"):
            clock.t += 1
        lengths.append(clock.t - start)
        det.observe("a:1", True)         # on probation: one failure ejects again
    assert lengths == [30, 60, 90, 100, 100]


def test_return_probation_and_re_ejection():
    det, clock = detector(base_ejection_secs=30, consecutive_successes=3)
    events: list[str] = []
    det.listeners.append(lambda i, r: events.append(r))
    fail(det, "a:1", 5)
    clock.t += 29.9
    assert det.is_ejected("a:1")
    fail(det, "a:1", 10)                 # answers of requests sent before: not counted
    clock.t += 0.1
    assert not det.is_ejected("a:1") and det.ejected() == set()
    det.observe("a:1", False)
    det.observe("a:1", True)             # still on probation: ejected at once, 2 × 30 s
    assert det.is_ejected("a:1")
    clock.t += 59.9
    assert det.is_ejected("a:1")
    clock.t += 0.1
    assert not det.is_ejected("a:1")
    for _ in range(3):                   # a success streak ends the probation ...
        det.observe("a:1", False)
    det.observe("a:1", True)
    assert not det.is_ejected("a:1")     # ... so one failure is not enough any more
    fail(det, "a:1", 4)
    assert det.is_ejected("a:1")
    clock.t += 30                        # ... and the multiplier starts again from 1
    assert not det.is_ejected("a:1")
    assert events == [CONSECUTIVE, PROBATION, CONSECUTIVE]


def test_never_more_than_max_ejection_percent_of_a_role(caplog):
    peers = ["a:1", "b:1", "c:1", "d:1"]
    det, clock = detector(peers, max_ejection_percent=50)
    with caplog.at_level(logging.WARNING, "kvrouter.outlier"):
        for p in peers:
            fail(det, p, 5)
    assert det.ejected() == {"a:1", "b:1"}
    assert any("c:1 not ejected" in r.getMessage() for r in caplog.records)
    clock.t += 30                        # a and b back in rotation: c and d may go now
    fail(det, "c:1", 5)
    fail(det, "d:1", 5)
    assert det.ejected() == {"c:1", "d:1"}
    alone, _ = detector(["a:1"])         # 50 % of one instance is none of it
    fail(alone, "a:1", 50)
    assert alone.ejected() == set()


def test_unknown_instances_and_forget():
    det = OutlierDetector(OutlierConfig(), lambda i: None if i == "gone:1" else {i})
    det2, _ = detector()
    fail(det, "gone:1", 10)              # removed from the registry: no state kept
    assert det._states == {}
    fail(det2, "a:1", 5)
    det2.forget("a:1")
    assert det2.ejected() == set() and not det2.is_ejected("a:1")
    fail(det2, "a:1", 4)                 # forgotten: the count starts again
    assert det2.ejected() == set()


def test_disabled_never_ejects():
    det, _ = detector(enabled=False)
    fail(det, "a:1", 100)
    assert det.ejected() == set()


def test_filter_keeps_all_when_all_are_ejected(caplog):
    class C:
        def __init__(self, identity: str) -> None:
            self.identity = identity

    a, b = C("a:1"), C("b:1")
    det, _ = detector(max_ejection_percent=100)
    assert det.filter([a, b], "mixed") == [a, b]
    fail(det, "a:1", 5)
    assert det.filter([a, b], "mixed") == [b]
    fail(det, "b:1", 5)
    with caplog.at_level(logging.WARNING, "kvrouter.outlier"):
        assert det.filter([a, b], "mixed") == [a, b]
        assert det.filter([a, b], "mixed") == [a, b]
    assert [r.getMessage() for r in caplog.records].count(
        "every routable mixed instance is ejected (outlier detection); routing to them "
        "anyway") == 1


def test_config_keys_and_errors(tmp_path):
    cfg, warnings = load_config(None, port=1)
    o = cfg.outlier
    assert (o.enabled, o.consecutive_failures, o.failure_rate_percent, o.min_requests,
            o.interval_secs, o.base_ejection_secs, o.max_ejection_secs,
            o.max_ejection_percent, o.consecutive_successes) == (
        True, 5, 50, 20, 10, 30, 300, 50, 10)
    path = tmp_path / "c.yaml"
    path.write_text("outlier:\n  enabled: false\n  base-ejection-secs: 2\n"
                    "  max-ejection-percent: 100\n")
    cfg, warnings = load_config(str(path), port=1)
    assert (cfg.outlier.enabled, cfg.outlier.base_ejection_secs,
            cfg.outlier.max_ejection_percent) == (False, 2, 100)
    assert warnings == []
    for key, value, reason in (("max-ejection-percent", 150, "must be between 0 and 100"),
                               ("base-ejection-secs", 0, "must be > 0"),
                               ("min-requests", 0, "must be >= 1")):
        path.write_text(f"outlier:\n  {key}: {value}\n")
        with pytest.raises(ConfigError) as err:
            load_config(str(path), port=1)
        assert str(err.value).startswith(f"config error: {path}: outlier.{key}: {reason}")


# -- the router's wiring ----------------------------------------------------------------------
def info(role: Role, port: int) -> InstanceInfo:
    return InstanceInfo(role=role, host="127.0.0.1", scheme="http", port=str(port))


async def test_router_select_skips_ejected_counts_and_forgets():
    cfg = RouterConfig()
    cfg.scheduler.policy = "request_num"
    router = Router(cfg)
    try:
        a, b = (router.registry.add(info(Role.MIXED, p)) for p in (9001, 9002))
        view = router.request_view_now({"prompt": "hi"}, "/v1/completions", (Role.MIXED,))
        assert view is not None
        assert router.select(Role.MIXED, view).instance is a          # ties: earliest URL
        fail(router.outliers, a.identity, 5)
        assert router.select(Role.MIXED, view).instance is b
        # the only one left is ejected: used anyway, as if none were
        assert router.select(Role.MIXED, view, exclude={b.identity}).instance is a
        fail(router.outliers, b.identity, 5)   # 2 of 2 would exceed 50 %: stays in rotation
        assert router.outliers.ejected() == {a.identity}
        text = router.metrics.render().decode()
        assert sample(text, "kvrouter_outlier_ejections_total", url=a.url,
                      reason="consecutive_failures") == 1
        assert sample(text, "kvrouter_outlier_ejected_instances") == 1
        router.registry.remove(a, "test")
        assert router.outliers.ejected() == set()
        text = router.metrics.render().decode()
        assert "kvrouter_outlier_ejections_total{" not in text
        assert sample(text, "kvrouter_outlier_ejected_instances") == 0
    finally:
        await router.close()


async def test_router_caps_per_role_in_pd():
    cfg = RouterConfig()
    cfg.server.splitwise = True
    router = Router(cfg)
    try:
        p1, p2 = (router.registry.add(info(Role.PREFILL, p)) for p in (9001, 9002))
        d1, d2 = (router.registry.add(info(Role.DECODE, p)) for p in (9003, 9004))
        for inst in (p1, p2, d1, d2):
            fail(router.outliers, inst.identity, 5)
        assert router.outliers.ejected() == {p1.identity, d1.identity}  # one per role
    finally:
        await router.close()


# -- end to end -------------------------------------------------------------------------------
CHAT_MAX_TOKENS = 2


async def send(url: str, n: int, tag: str, concurrency: int = 4) -> list[int]:
    """``n`` chat requests (distinct prompts), ``concurrency`` at a time; their statuses."""
    statuses: list[int] = []
    todo = iter(range(n))

    async def worker(s: aiohttp.ClientSession) -> None:
        for i in todo:
            body = {"messages": [{"role": "user", "content": f"{tag} question {i}"}],
                    "max_tokens": CHAT_MAX_TOKENS}
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return statuses


async def knobs(inst, **changes) -> None:
    async with aiohttp.ClientSession() as s, s.post(inst.url + "/sim/knobs", json=changes) as r:
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("policy", ["request_num", "cache_aware"])
@bounded(60)
async def test_instance_answering_500_is_ejected_and_comes_back(router_factory, sims, policy):
    router = await router_factory({
        "scheduler": {"policy": policy},
        "outlier": {"base-ejection-secs": 1.5, "max-ejection-secs": 3}})
    insts = await sims(4)
    for inst in insts:
        assert await inst.register_once(router.url) == 200
    bad = insts[0]                       # the earliest URL: load ties go to it
    await knobs(bad, reply_status=500, reply_body="upstream exploded")

    warm = await send(router.url, 20, "warm-up")

    async def ejected() -> bool:
        text = await metrics_text(router)
        return (sample(text, "kvrouter_outlier_ejections_total", url=bad.url,
                       reason="consecutive_failures") >= 1
                and sample(text, "kvrouter_outlier_ejected_instances") == 1)

    await wait_for(ejected, timeout=5)
    before = [i.inference_count for i in insts]
    measured = await send(router.url, 100, "measured")
    got = [i.inference_count - b for i, b in zip(insts, before, strict=True)]
    assert got[0] < 0.05 * sum(got), got
    # its 500s before the ejection were retried on other instances, within the retry budget
    # (20 % of the requests: one of the five may reach the client)
    assert (warm + measured).count(200) >= 0.99 * len(warm + measured), warm
    assert "ejected for" in router.log()

    await knobs(bad, reply_status=None)

    async def back() -> bool:
        return sample(await metrics_text(router), "kvrouter_outlier_ejected_instances") == 0

    await wait_for(back, timeout=10)
    before = [i.inference_count for i in insts]
    statuses = await send(router.url, 40, "after")
    got = [i.inference_count - b for i, b in zip(insts, before, strict=True)]
    assert statuses == [200] * 40
    assert got[0] >= 4, got
    assert "back in rotation" in router.log()


@bounded(60)
async def test_instance_answering_4xx_is_not_ejected(router_factory, sims):
    """A 4xx is the client's fault: the instance that answers it stays in rotation."""
    router = await router_factory({"outlier": {"base-ejection-secs": 30}})
    insts = await sims(2)
    for inst in insts:
        assert await inst.register_once(router.url) == 200
    picky = insts[0]                     # the earliest URL: load ties go to it
    await knobs(picky, reply_status=400,
                reply_body={"error": {"message": "bad", "type": "invalid_request_error"}})
    before = picky.inference_count
    statuses = await send(router.url, 40, "picky", concurrency=2)
    assert statuses.count(400) >= 20
    assert picky.inference_count - before >= 20
    text = await metrics_text(router)
    assert sample(text, "kvrouter_outlier_ejected_instances") == 0
    assert "kvrouter_outlier_ejections_total{" not in text
