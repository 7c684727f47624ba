"""Outlier detection: instances whose answers keep failing are left out of routing for a while.

Why: an instance that answers every request at once with a 500 looks like the least loaded one
to the load-aware policies (``request_num``, ``cache_aware``, …), since it never holds a
request, so it draws nearly all the traffic; its ``/health`` may well pass. Envoy's outlier
detection is the model. The request path reports every answer with
``router.outliers.observe(identity, failed)``: ``failed`` is a 5xx answer or a transport
failure; a 4xx or a client that went away is not a failure (it says nothing about the
instance). Rules (``outlier.*`` keys, :class:`~kvrouter.config.OutlierConfig`):

- **eject** after ``consecutive-failures`` failures in a row, or when at least
  ``failure-rate-percent`` of the last ``interval-secs`` of answers failed, counted once
  ``min-requests`` answers were seen in that interval;
- an ejection lasts ``base-ejection-secs`` × the number of times the instance was ejected, at
  most ``max-ejection-secs``;
- at most ``max-ejection-percent`` of the routable instances of a role are ejected at once; the
  one that would go over stays in rotation (logged at most once per ``interval-secs``);
- when the time is up the instance is back, **on probation**: real traffic probes it, and its
  first failure ejects it again at once, for the next longer time. ``consecutive-successes``
  successes in a row end the probation and reset the multiplier, so a later incident starts
  again from ``base-ejection-secs``.

Answers that arrive while an instance is ejected (requests sent before the ejection) are not
counted. The state lives in memory per router process (with ``--workers N`` each worker
detects on its own share of the traffic). Everything here is synchronous and does no I/O; the
clock is injected (monotonic by default) so the rules can be tested in fake time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Protocol, TypeVar

from kvrouter.config import OutlierConfig
from kvrouter.metrics import RouterMetrics
from kvrouter.registry import Instance, Registry

log = logging.getLogger("kvrouter.outlier")

#: the failure-rate window is kept as this many time buckets (bounded memory at any rate)
BUCKETS = 10

CONSECUTIVE = "consecutive_failures"
RATE = "failure_rate"
PROBATION = "probation_failure"

#: ``peers(identity)``: identities of the routable instances of the same role (itself included
#: if routable), or ``None`` if the instance is not known (removed: its answers are ignored)
Peers = Callable[[str], Collection[str] | None]


class _HasIdentity(Protocol):
    @property
    def identity(self) -> str: ...


_I = TypeVar("_I", bound=_HasIdentity)


class _State:
    """What the detector knows about one instance."""

    __slots__ = ("capped_logged", "consecutive", "epochs", "failures", "probation", "streak",
                 "times_ejected", "totals", "until")

    def __init__(self) -> None:
        self.consecutive = 0            # failures in a row
        self.streak = 0                 # successes in a row while on probation
        self.times_ejected = 0          # the ejection-time multiplier
        self.until: float | None = None  # ejected until (clock time), None = in rotation
        self.probation = False
        self.capped_logged = -math.inf
        self.epochs = [-1] * BUCKETS    # bucket i holds the answers of time slot epochs[i]
        self.totals = [0] * BUCKETS
        self.failures = [0] * BUCKETS

    def clear_window(self) -> None:
        self.consecutive = 0
        self.epochs = [-1] * BUCKETS
        self.totals = [0] * BUCKETS
        self.failures = [0] * BUCKETS


class OutlierDetector:
    """Counts each instance's answers and decides which instances are ejected (module doc)."""

    def __init__(self, cfg: OutlierConfig, peers: Peers | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``peers``: the instances an ejection is capped against (default: no cap and every
        identity is known)."""
        self.cfg = cfg
        self._enabled = cfg.enabled
        self._peers = peers
        self._clock = clock
        self._slot = cfg.interval_secs / BUCKETS
        self._states: dict[str, _State] = {}
        #: identity → ejected until; empty (the rule) means routing need not filter at all
        self.ejections: dict[str, float] = {}
        self._all_ejected_logged = -math.inf
        #: called with ``(identity, reason)`` at each ejection
        self.listeners: list[Callable[[str, str], None]] = []

    # -- the request path ---------------------------------------------------------------------
    def observe(self, inst_identity: str, failed: bool, now: float | None = None) -> None:
        """Count one answer of an instance (``failed``: a 5xx or a transport failure)."""
        if not self._enabled:
            return
        st = self._states.get(inst_identity)
        if st is None:
            if self._peers is not None and self._peers(inst_identity) is None:
                return                  # removed: keep no state that no removal forgets
            st = self._states[inst_identity] = _State()
        t = self._clock() if now is None else now
        if st.until is not None:
            if t < st.until:
                return
            self._return(inst_identity, st)
        epoch = int(t // self._slot)
        i = epoch % BUCKETS
        if st.epochs[i] != epoch:
            st.epochs[i], st.totals[i], st.failures[i] = epoch, 0, 0
        st.totals[i] += 1
        if not failed:
            st.consecutive = 0
            if st.probation:
                st.streak += 1
                if st.streak >= self.cfg.consecutive_successes:
                    st.probation, st.times_ejected = False, 0
            return
        st.failures[i] += 1
        st.consecutive += 1
        st.streak = 0
        cfg = self.cfg
        if st.probation:
            self._eject(inst_identity, st, PROBATION, t)
        elif 0 < cfg.consecutive_failures <= st.consecutive:
            self._eject(inst_identity, st, CONSECUTIVE, t)
        elif cfg.failure_rate_percent > 0:
            total = failures = 0
            for j in range(BUCKETS):
                if st.epochs[j] > epoch - BUCKETS:
                    total += st.totals[j]
                    failures += st.failures[j]
            if total >= cfg.min_requests and failures * 100 >= cfg.failure_rate_percent * total:
                self._eject(inst_identity, st, RATE, t)

    def is_ejected(self, identity: str, now: float | None = None) -> bool:
        """Whether ``identity`` is out of rotation now (an ejection that ended is closed)."""
        until = self.ejections.get(identity)
        if until is None:
            return False
        if (self._clock() if now is None else now) < until:
            return True
        self._return(identity, self._states[identity])
        return False

    def ejected(self, now: float | None = None) -> set[str]:
        """The identities out of rotation now (ejections that ended are closed)."""
        if not self.ejections:
            return set()
        t = self._clock() if now is None else now
        for identity in [i for i, until in self.ejections.items() if until <= t]:
            self._return(identity, self._states[identity])
        return set(self.ejections)

    def filter(self, cands: list[_I], role: str, now: float | None = None) -> list[_I]:
        """``cands`` without the ejected instances; all of them if that would leave none, as
        if none were ejected (logged at most once per ``interval-secs``)."""
        if not self.ejections:
            return cands
        t = self._clock() if now is None else now
        ejected = self.ejected(t)
        kept = [c for c in cands if c.identity not in ejected]
        if kept or not cands:
            return kept
        if t - self._all_ejected_logged >= self.cfg.interval_secs:
            self._all_ejected_logged = t
            log.warning("every routable %s instance is ejected (outlier detection); "
                        "routing to them anyway", role)
        return cands

    def forget(self, identity: str) -> None:
        """Drop everything known about ``identity`` (removed from the registry)."""
        self._states.pop(identity, None)
        self.ejections.pop(identity, None)

    # -- transitions ---------------------------------------------------------------------------
    def _eject(self, identity: str, st: _State, reason: str, t: float) -> None:
        cfg = self.cfg
        peers = self._peers(identity) if self._peers is not None else None
        if peers is not None:
            routable = len(peers) + (identity not in peers)
            others = sum(1 for i, until in self.ejections.items()
                         if until > t and i != identity and i in peers)
            if (others + 1) * 100 > cfg.max_ejection_percent * routable:
                st.clear_window()
                if t - st.capped_logged >= cfg.interval_secs:
                    st.capped_logged = t
                    log.warning("Instance %s not ejected (%s): %d of %d routable instances of "
                                "its role are ejected, max-ejection-percent is %g", identity,
                                reason, others, routable, cfg.max_ejection_percent)
                return
        st.times_ejected += 1
        secs = min(cfg.base_ejection_secs * st.times_ejected, cfg.max_ejection_secs)
        st.until = self.ejections[identity] = t + secs
        st.probation = False
        st.streak = 0
        st.clear_window()
        log.warning("Instance %s ejected for %gs (%s; ejection #%d)", identity, secs, reason,
                    st.times_ejected)
        for cb in self.listeners:
            cb(identity, reason)

    def _return(self, identity: str, st: _State) -> None:
        st.until = None
        self.ejections.pop(identity, None)
        st.probation = True
        st.streak = 0
        log.info("Instance %s back in rotation after its ejection, on probation "
                 "(%d successes in a row end it)", identity, self.cfg.consecutive_successes)


def for_router(cfg: OutlierConfig, registry: Registry, metrics: RouterMetrics) -> OutlierDetector:
    """The router's detector: ejections capped per role over the registry's routable instances,
    counted in ``kvrouter_outlier_ejections_total``, ejected instances gauged in
    ``kvrouter_outlier_ejected_instances``, removed instances forgotten."""

    def peers(identity: str) -> Collection[str] | None:
        inst = registry.get(identity)
        if inst is None:
            return None
        return {c.identity for c in registry.candidates(inst.role)}

    def counted(identity: str, reason: str) -> None:
        inst = registry.get(identity)
        metrics.outlier_ejections.labels(inst.url if inst else identity, reason).inc()

    def removed(inst: Instance, reason: str) -> None:
        detector.forget(inst.identity)

    detector = OutlierDetector(cfg, peers)
    detector.listeners.append(counted)
    registry.on_removed.append(removed)
    metrics.attach_outliers(lambda: len(detector.ejected()))
    return detector
