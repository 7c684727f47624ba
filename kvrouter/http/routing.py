"""Exact-path routing: path → method → :class:`Route`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405


@dataclass(frozen=True, slots=True)
class Route:
    """A handler and the endpoint label it is counted under. ``takes_over``: the handler
    owns the request from here on and completes it itself (the inference routes); otherwise
    it is a coroutine function returning the response."""

    handler: Callable[..., Any]
    endpoint: str
    takes_over: bool = False


class Routes:
    """Exact paths only (the router's surface has no path parameters). ``GET`` routes also
    answer ``HEAD``."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Route]] = {}

    def add(self, method: str, path: str, handler: Callable[..., Any], *,
            takes_over: bool = False) -> None:
        methods = self._paths.setdefault(path, {})
        route = Route(handler, path, takes_over)
        methods[method] = route
        if method == "GET":
            methods.setdefault("HEAD", route)

    def resolve(self, method: str, path: str) -> Route | int:
        """The route, or :data:`NOT_FOUND` / :data:`METHOD_NOT_ALLOWED`."""
        methods = self._paths.get(path)
        if methods is None:
            return NOT_FOUND
        found = methods.get(method)
        return METHOD_NOT_ALLOWED if found is None else found

    def allowed(self, path: str) -> list[str]:
        return sorted(self._paths.get(path, ()))
