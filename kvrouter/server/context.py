"""What the handlers are given instead of the application object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrouter.backends.adapters import Adapters
from kvrouter.errors import RouterError
from kvrouter.http.request import Request
from kvrouter.http.upstream import UpstreamPool
from kvrouter.router import Router
from kvrouter.server.forward import InstanceRefs
from kvrouter.server.queueing import Admission
from kvrouter.server.retry import RetryRatio

if TYPE_CHECKING:
    from kvrouter.tracing import Tracer

#: How an inference request ends: ``complete(req, endpoint, error)``, once, with the error to
#: answer (``None``: answered, or the client left). Counts it, logs it, frees the connection.
Complete = Callable[[Request, str, "RouterError | None"], None]


@dataclass(eq=False, slots=True)
class Context:
    """The router, the data plane's shared objects and the completion of inference requests."""

    router: Router
    pool: UpstreamPool
    refs: InstanceRefs          # per-registration constants of the data plane
    adapters: Adapters          # each engine's protocol where engines differ (PD)
    fast_views: bool            # no policy needs the prompt: views skip rendering it
    complete: Complete
    retries: RetryRatio         # the router-wide budget of status retries
    admission: Admission | None = None   # the admission queue, when it can ever hold a request
    tracer: Tracer | None = None         # OpenTelemetry spans, when tracing.enabled
