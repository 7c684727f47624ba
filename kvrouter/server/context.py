"""What the handlers are given instead of the application object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvrouter.backends.base import EngineAdapter
from kvrouter.errors import RouterError
from kvrouter.http.request import Request
from kvrouter.http.upstream import UpstreamPool
from kvrouter.router import Router
from kvrouter.server.forward import InstanceRefs

#: How an inference request ends: ``complete(req, endpoint, error)``, once, with the error to
#: answer (``None``: answered, or the client left). Counts it, logs it, frees the connection.
Complete = Callable[[Request, str, "RouterError | None"], None]


@dataclass(eq=False, slots=True)
class Context:
    """The router, the data plane's shared objects and the completion of inference requests."""

    router: Router
    pool: UpstreamPool
    refs: InstanceRefs          # per-registration constants of the data plane
    adapter: EngineAdapter      # the engine's protocol where engines differ (PD)
    fast_views: bool            # no policy needs the prompt: views skip rendering it
    complete: Complete
