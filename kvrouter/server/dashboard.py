"""The operator's view: ``GET /dashboard`` (a static page shipped in the package), its data
``GET /dashboard/state``, and ``POST /v1/route/explain`` (README "Operator's view").

The page is three static files (``kvrouter/server/static``: no build step, no CDN, nothing
fetched from elsewhere, since clusters are often air-gapped) that poll the state every 2 s with
``fetch``. Polling rather than server-sent events: ``EventSource`` cannot send the
``Authorization`` header the admin token travels in, and one small JSON answer every 2 s costs
the router nothing worth a push channel. The page itself holds no data and is open to anyone
(a browser cannot send the token with a navigation); the state and explain routes are admin
routes (``auth.ROUTE_CLASS``): the page asks for the token and keeps it in ``sessionStorage``.

What the state shows comes from the router as it is; the dashboard adds nothing to the request
path but what it reads: the recent decisions (``Router.decisions``, recorded only while a
dashboard polls) and the per-second traffic (``accounting.TRAFFIC``). Both are per process: with
``--workers N`` the page shows the decisions and traffic of the worker that answers it (the
registry and the in-flight load are shared, so the instances are the same on every worker).

Explain runs the request through the same steps as a real one up to the policy (body, view,
candidates as ``Router.select`` sees them) and asks the policy's :meth:`~kvrouter.policies.base.
Policy.explain` instead of ``select``: nothing is recorded in the prefix index, no lease is
taken, no counter moves, nothing is sent to an instance.
"""

from __future__ import annotations

import time
from collections import deque
from functools import partial
from importlib import resources

import orjson

from kvrouter import __version__, errors
from kvrouter.admission import Priority
from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.instance import Role
from kvrouter.metrics import Family, StatsTotals
from kvrouter.registry import HEALTHY, Instance
from kvrouter.router import Router
from kvrouter.server import accounting, pd
from kvrouter.server.context import Context
from kvrouter.server.inference import parse_json_object

#: the files of the page: path → (file in ``kvrouter/server/static``, content type)
STATIC = {"/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
#: the page runs only its own script and style and talks only to this router
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                "style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}
STATE_HEADERS = {"Cache-Control": "no-store"}
HIT_WINDOW_SECS = 60.0        # the hit rates' recent window
SAMPLES_KEPT = 64             # counter samples, at least 1 s apart: > HIT_WINDOW_SECS of them
#: ``?endpoint=`` of explain → the inference route whose body it is
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "/v1/chat/completions": "/v1/chat/completions",
             "/v1/completions": "/v1/completions"}


class Dashboard:
    """The handlers of one router process: the page, its state, explain."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        #: (monotonic time, the [stats] counters' totals) at past state answers
        self._samples: deque[tuple[float, StatsTotals]] = deque(maxlen=SAMPLES_KEPT)

    # -- the page ------------------------------------------------------------------------------
    async def static(self, ctx: Context, req: Request) -> Response:
        """One of the page's files (read from the package once)."""
        name, content_type = STATIC[req.path]
        body = self._files.get(name)
        if body is None:
            try:
                body = (resources.files("kvrouter.server") / "static" / name).read_bytes()
            except OSError:
                raise errors.RouterError(404, f"{name} is not installed with this kvrouter",
                                         "invalid_request_error", "not_found") from None
            self._files[name] = body
        return Response(body, content_type=content_type, headers=PAGE_HEADERS)

    # -- GET /dashboard/state --------------------------------------------------------------------
    async def state(self, ctx: Context, req: Request) -> Response:
        """Everything the page shows, as JSON (the README's "Operator's view" lists it)."""
        router = ctx.router
        router.watch_decisions()
        perf, wall, mono = time.perf_counter(), time.time(), time.monotonic()
        m = router.metrics
        instances = router.registry.all()
        urls = {inst.url for inst in instances}
        prompt = _by_instance(m.backend_prompt_tokens, urls)
        cached = _by_instance(m.backend_cached_tokens, urls)
        ejected = router.outliers.ejected()
        admission = ctx.admission
        body = {
            "version": __version__, "mode": router.mode, "time": wall,
            "policies": {role.value: p.name for role, p in router.policies.items()},
            "routable": router.registry.count_routable(),
            "instances": [_instance(inst, mono, inst.identity in ejected,
                                    prompt.get(inst.url, 0.0), cached.get(inst.url, 0.0))
                          for inst in instances],
            "hit_rate": self._hit_rates(router, mono),
            "decisions": [{"time": wall - (perf - t), "role": role, "policy": policy,
                           "instance": url, "strategy": strategy, "hit_blocks": hit,
                           "lookup_blocks": looked}
                          for t, role, policy, url, strategy, hit, looked
                          in reversed(router.decisions)],
            "traffic": _traffic(perf, wall),
            "queue": None if admission is None else
            {p.name.lower(): admission.queue.depth(p) for p in Priority},
            "processes": router.shared.health_info(),
        }
        return Response(orjson.dumps(body), headers=STATE_HEADERS)

    def _hit_rates(self, router: Router, mono: float) -> dict[str, float | None]:
        """Predicted (the prefix index: hit / looked-up blocks) and measured (cached / prompt
        tokens the instances reported) hit rates, since start and over the last minute; the
        ``[stats]`` line's ``prefix_hit_rate`` and ``measured_hit_rate`` over other windows.
        ``None``: nothing to divide (no lookup, no usage seen)."""
        now = router.metrics.stats_totals()
        others = router.shared.peer_totals()
        if others is not None:
            now = now + others
        samples = self._samples
        if not samples or mono - samples[-1][0] >= 1.0:
            samples.append((mono, now))
        since, base = next(((t, tot) for t, tot in samples if mono - t <= HIT_WINDOW_SECS),
                           (mono, now))
        recent = now - base
        return {"predicted_total": _ratio(now.hit_blocks, now.lookup_blocks),
                "measured_total": _ratio(now.cached_tokens, now.prompt_tokens),
                "predicted_recent": _ratio(recent.hit_blocks, recent.lookup_blocks),
                "measured_recent": _ratio(recent.cached_tokens, recent.prompt_tokens),
                "recent_secs": round(mono - since, 1)}

    # -- POST /v1/route/explain ------------------------------------------------------------------
    async def explain(self, ctx: Context, req: Request) -> Response:
        """Which instance(s) the policies would pick now for this inference body, with every
        candidate's terms; records, leases and sends nothing."""
        body = parse_json_object(req.body)
        endpoint = explain_endpoint(req.query.get("endpoint"), body)
        router = ctx.router
        roles = pd.PD_ROLES if router.splitwise else (Role.MIXED,)
        view = await router.request_view(body, endpoint, roles)
        out: list[dict] = []
        prefer = require = None
        for role in roles:
            cands = router.candidates(role, view, prefer=prefer, require=require)
            policy = router.policies[role]
            rows = policy.explain(cands, view)
            pick = next((c for c, row in zip(cands, rows, strict=True) if row.get("chosen")),
                        None)
            out.append({"role": role.value, "policy": policy.name,
                        "pick": None if pick is None else pick.url,
                        "strategy": next((row["strategy"] for row in rows if row.get("chosen")),
                                         None),
                        "candidates": rows})
            if role is Role.PREFILL and pick is not None:     # the decode must pair with it
                adapter = pd._adapter_of(ctx, pick.info)
                prefer = partial(pd.pairs_well, adapter, pick.info)
                require = partial(pd.must_pair, adapter, pick.info)
        return Response(orjson.dumps({
            "object": "route.explain", "mode": router.mode, "endpoint": endpoint,
            "model": view.model, "token_estimate": view.token_estimate,
            "tokenized": view.tokens is not None, "prompt_blocks": len(view.hashes),
            "decisions": out}))


def explain_endpoint(asked: str | None, body: dict) -> str:
    """The inference route an explained body is for: ``?endpoint=chat|completions`` (or the
    route's path); without it, ``/v1/completions`` for a body with a ``prompt`` and no
    ``messages``, else ``/v1/chat/completions``."""
    if asked is None:
        return ("/v1/completions" if "prompt" in body and "messages" not in body
                else "/v1/chat/completions")
    endpoint = ENDPOINTS.get(asked)
    if endpoint is None:
        raise errors.invalid_value("endpoint must be chat or completions")
    return endpoint


def _instance(inst: Instance, now: float, ejected: bool, prompt: float,
              cached: float) -> dict:
    load = inst.load
    snap = inst.snapshot
    return {
        "url": inst.url, "role": inst.role.value, "engine": inst.info.engine,
        "state": "paused" if inst.paused and inst.state == HEALTHY else inst.state,
        "routable": inst.routable, "static": inst.static, "ejected": ejected,
        "in_flight_requests": load.requests, "in_flight_tokens": load.tokens,
        "queued_prefill_tokens": load.prefill_tokens, "decoding": load.decoding,
        "snapshot": None if snap is None else {
            "running": snap.running, "waiting": snap.waiting,
            "kv_usage": snap.gpu_cache_usage_perc, "free_blocks": snap.available_gpu_block_num,
            "age_secs": round(now - snap.taken_at, 1),
            "fresh": inst.fresh_snapshot(now) is not None},
        "prompt_tokens": prompt, "cached_tokens": cached,
        "measured_hit_rate": _ratio(cached, prompt),
    }


def _by_instance(family: Family, urls: set[str]) -> dict[str, float]:
    """A per-instance counter's totals by instance URL (found among the label values, so
    whatever the label is called)."""
    out: dict[str, float] = {}
    for metric in family.collect():
        for s in metric.samples:
            url = next((v for v in s.labels.values() if v in urls), None)
            if url is not None and s.name.endswith("_total"):
                out[url] = out.get(url, 0.0) + s.value
    return out


def _traffic(perf: float, wall: float) -> dict[str, object]:
    """The per-second traffic of the last minutes as columns, oldest first; ``end``: the
    wall-clock time of the last (current) second. Seconds in the TTFT and duration columns,
    ``None`` for a second without such a request."""
    a = accounting
    rows = a.TRAFFIC.last(perf)
    return {
        "end": round(wall - (perf - rows[-1][a.SEC]), 3), "step_secs": 1,
        "requests": [b[a.REQUESTS] for b in rows],
        "errors": [b[a.ERRORS] for b in rows],
        "ttft_mean": [_secs(b[a.TTFT_SUM] / b[a.TTFT_N]) if b[a.TTFT_N] else None
                      for b in rows],
        "ttft_max": [_secs(b[a.TTFT_MAX]) if b[a.TTFT_N] else None for b in rows],
        "duration_mean": [_secs(b[a.DURATION_SUM] / b[a.REQUESTS]) if b[a.REQUESTS] else None
                          for b in rows],
        "prompt_tokens": [b[a.PROMPT_TOKENS] for b in rows],
    }


def _secs(x: float) -> float:
    return round(x, 6)


def _ratio(part: float, whole: float) -> float | None:
    """``part / whole`` within 0..1 (a removed instance's series vanish from the totals, so a
    difference over a window can be off); ``None`` for nothing to divide."""
    return min(1.0, max(0.0, part / whole)) if whole > 0 else None
