"""Virtual-time discrete-event simulation of a routed cluster.

One process, one event heap, no wall clock: a load generator replays a workload's arrivals;
each arrival is routed by the *real* kvrouter policy objects (``make_policy``, the same code
the server runs) over fake :class:`~kvrouter.registry.Instance` objects, then added to that
instance's engine core (:mod:`kvrouter.sim.core`), which is stepped in virtual time.

Router-side accounting follows the server (``kvrouter.server.inference`` / ``.pd``): a mixed
leg's lease releases its tokens at the first token and its request at the end; in PD the
prefill lease is released at the prefill's first token and the decode lease at the end. The
prefix index is swept every ``eviction-interval-secs``; policies that need remote metrics get
snapshots (from the cores' gauges) every ``metrics-scrape-interval-secs``, stored in
``inst.snapshot`` with ``load.on_snapshot`` exactly as the scraper does.

PD: the prefill core runs the prompt (``phase="prefill"``) and emits one token; at that token
the decode request is added to the decode core with ``transfer_time = setup + missing tokens ×
KV bytes per token / link bandwidth`` (missing = prompt tokens not already cached on the
decode core); the prefill core keeps the blocks until the transfer is over
(``release_prefill``). The client's TTFT is the decode core's first token.

Admission (``admission=True``; off by default): the router-side queue of
:mod:`kvrouter.admission`, the same class the server runs, in front of the mixed (PD: prefill)
instances. An arriving request is offered to the queue; it waits while no candidate has
headroom (``Headroom`` over each instance's router ``Load`` and its latest fresh snapshot, as
the server) and is routed when the queue admits it: the policy runs then. The queue is
pumped after every event that frees capacity (a first token, an end, a scrape) and expired
every 0.1 s while requests wait; requests it rejects end with ``rejected`` set and never
reach an instance. A request's TTFT counts from its arrival, queue time included.

``policy="oracle"`` selects :class:`OraclePolicy`, a cluster-side policy with the same
``select`` signature that sees every core's true prefix cache and queued prefill work and picks
the lowest estimated TTFT (a bound on what routing can achieve, not a deployable policy).

Usage::

    res = run_cluster(make_workload("b2b", rate=20, n=500, seed=1), policy="cache_aware",
                      instances=4, preset="llama3-8b-h100", seed=1)
    summarize(res.results)   # or res.summary()

The package: :mod:`.des` (event loop, routing, ``run_cluster``), :mod:`.nodes` (per-core and
per-request state, ground-truth cache access, gauge names), :mod:`.oracle` (``OraclePolicy``),
:mod:`.results` (``RequestResult``, ``CoreStats``, ``ClusterResult``) and :mod:`.summary`
(``summarize``, ``percentile``). Everything public is importable from here.
"""

from __future__ import annotations

from kvrouter.sim.cluster.des import run_cluster
from kvrouter.sim.cluster.nodes import CoreFactory, cached_prefix_tokens
from kvrouter.sim.cluster.oracle import OraclePolicy
from kvrouter.sim.cluster.results import ClusterResult, CoreStats, RequestResult
from kvrouter.sim.cluster.summary import percentile, summarize

__all__ = [
    "ClusterResult",
    "CoreFactory",
    "CoreStats",
    "OraclePolicy",
    "RequestResult",
    "cached_prefix_tokens",
    "percentile",
    "run_cluster",
    "summarize",
]
