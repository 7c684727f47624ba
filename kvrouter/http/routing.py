"""Exact-path routing: path → method → (handler, endpoint label)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[..., Any]

NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405


class Routes:
    """Exact paths only (the router's surface has no path parameters). ``GET`` routes also
    answer ``HEAD``."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, tuple[Handler, str]]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = self._paths.setdefault(path, {})
        methods[method] = (handler, path)
        if method == "GET":
            methods.setdefault("HEAD", (handler, path))

    def resolve(self, method: str, path: str) -> tuple[Handler, str] | int:
        """``(handler, endpoint)``, or :data:`NOT_FOUND` / :data:`METHOD_NOT_ALLOWED`."""
        methods = self._paths.get(path)
        if methods is None:
            return NOT_FOUND
        found = methods.get(method)
        return METHOD_NOT_ALLOWED if found is None else found

    def allowed(self, path: str) -> list[str]:
        return sorted(self._paths.get(path, ()))
