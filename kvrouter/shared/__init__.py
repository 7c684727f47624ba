"""The seam through which routers share routing state.

A :class:`~kvrouter.router.Router` holds one :class:`SharedState` (``Router.shared``) and
calls it; the default shares nothing (one process, every method a no-op). Implementations:

* :class:`kvrouter.workers.sync.WorkerSync`: the worker processes of one router
  (``kvrouter --workers N``), over socket pairs;
* :class:`kvrouter.shared.redis.RedisState`: router replicas on many hosts, through Redis.

What is shared, and through which hook (each shaped so that either transport can carry it,
see :mod:`kvrouter.workers.events`):

* **registry** (registrations, pause flags, health state, removals): the router subscribes
  :meth:`~SharedState.instance_added` / :meth:`~SharedState.instance_changed` /
  :meth:`~SharedState.instance_removed` to its registry; an implementation publishes versioned
  records (last writer wins, removals leave tombstones) and applies the others' with the
  registry's own methods (``add``, ``update``, ``remove``, ``changed``);
* **prefix records**: the index made by :meth:`~SharedState.make_index` calls
  :meth:`~SharedState.recorded` after each local record; the others' are applied with
  ``PrefixIndex.record`` (without publishing them again);
* **session affinity**: every local observation reaches :meth:`~SharedState.observed`; the
  others' are applied with ``SessionAffinity.remember`` (``Router.sessions``);
* **in-flight load**: each router publishes its own part of each instance's counters
  (``Load.share()``) as one snapshot per sender; :class:`~kvrouter.shared.loads.LoadShares`
  sums the others' snapshots into ``Load.set_remote`` (the counters the policies read);
* **counters**: :meth:`~SharedState.peer_totals` for the leader's ``[stats]`` line,
  :meth:`~SharedState.render_metrics` for ``/metrics``;
* **admin answers**: :meth:`~SharedState.registered` (``POST /register`` answers once every
  router applied it) and :meth:`~SharedState.health_info` (extra ``GET /health`` fields).

Hooks without ``async`` are called on the event loop, on the request path for some
(``recorded``, ``observed``): they only queue work, never block or await.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.prefix.index import PrefixIndex

if TYPE_CHECKING:
    from kvrouter.instance import Role
    from kvrouter.metrics import RouterMetrics, StatsTotals
    from kvrouter.registry import Instance
    from kvrouter.router import Router

__all__ = ["SharedState"]


class SharedState:
    """Routing state shared with other routers; this base shares nothing (one process)."""

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def leader(self) -> bool:
        """Whether this router runs the health rounds, timed removals, metrics scrapes and
        the ``[stats]`` line (one of the routers sharing state does)."""
        return True

    def probes(self, inst: Instance) -> bool:
        """Whether this router's health rounds probe ``inst`` and may remove it (routers that
        share health results split the work; one router owns everything)."""
        return True

    def make_index(self, max_entries: int, ttl_secs: float) -> PrefixIndex:
        """The router's prefix index. One that shares prefix records is made with
        ``on_record=self.recorded``."""
        return PrefixIndex(max_entries, ttl_secs)

    def attach(self, router: Router) -> None:
        """Called once at the end of ``Router.__init__``: the state to publish and to apply
        the others' changes into (registry, index, ``sessions``, metrics)."""

    def start(self) -> None:
        """Start sharing (inside the running event loop, before the router serves)."""

    def close(self) -> None:
        """Stop sharing (at shutdown)."""

    # -- local changes -----------------------------------------------------------------------------
    def instance_added(self, inst: Instance) -> None:
        """A registration was stored locally (registry ``on_added``)."""

    def instance_changed(self, inst: Instance, what: str) -> None:
        """``what`` = ``"info"``: a registration was updated (heartbeat, pause);
        ``"health"``: a health observation was counted (registry ``on_changed``)."""

    def instance_removed(self, inst: Instance, reason: str) -> None:
        """An instance was removed locally (registry ``on_removed``)."""

    def recorded(self, hashes: Sequence[int], identity: str) -> None:
        """The prefix index recorded ``hashes`` (a block-hash chain) for ``identity``."""

    def observed(self, role: Role, session_id: str, identity: str) -> None:
        """The ``role`` policy routed session ``session_id`` to ``identity``."""

    # -- reads -------------------------------------------------------------------------------------
    def peer_totals(self) -> StatsTotals | None:
        """The other routers' ``[stats]`` counter totals, summed (``None``: no other)."""
        return None

    # -- admin endpoints ---------------------------------------------------------------------------
    async def registered(self) -> None:
        """After a successful ``POST /register``: return once every other router applies
        it (bounded wait), so the ``200`` means every router routes to the instance."""

    async def render_metrics(self, metrics: RouterMetrics) -> bytes:
        """The ``GET /metrics`` body: ``metrics``' exposition, with the other routers'
        counters and histograms added when shared."""
        return metrics.render()

    def health_info(self) -> dict[str, object]:
        """Extra top-level fields of the ``GET /health`` answer (none by default)."""
        return {}
