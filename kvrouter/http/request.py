"""The parsed HTTP request handed to handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

if TYPE_CHECKING:
    from kvrouter.http.server import HttpConnection


class Request:
    """One request: method, path, query, raw headers, body and its connection.

    ``headers`` is the list of ``(name, value)`` byte pairs as received (case and order kept);
    :meth:`header` looks one up case-insensitively through an index built on first use.
    ``target`` is the raw request-target (path and query, undecoded), forwarded as is.
    """

    __slots__ = (
        "_index",
        "_query",
        "body",
        "conn",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query_string",
        "received",
        "target",
        "tenant",
        "too_large",
        "version",
    )

    def __init__(self, conn: HttpConnection, method: str, target: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        raw_path, _, query = target.partition(b"?")
        if raw_path[:1] != b"/" and b"://" in raw_path:  # absolute-form: keep only the path
            raw_path = b"/" + raw_path.split(b"://", 1)[1].partition(b"/")[2]
            self.target = raw_path + (b"?" + query if query else b"")
        path = raw_path.decode("utf-8", "replace")
        self.path = unquote(path) if "%" in path else path
        self.query_string = query.decode("utf-8", "replace")
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.too_large = False
        self.tenant = ""        # the client's name once authenticated (its API key's name)
        self.received = 0.0
        self._index: dict[bytes, bytes] | None = None
        self._query: dict[str, str] | None = None

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or ``default``."""
        index = self._index
        if index is None:
            index = {}
            for k, v in self.headers:
                index.setdefault(k.lower(), v)
            self._index = index
        return index.get(name, default)

    def header_str(self, name: bytes, default: str | None = None) -> str | None:
        value = self.header(name)
        return default if value is None else value.decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (the first value of each name)."""
        if self._query is None:
            q: dict[str, str] = {}
            for k, v in parse_qsl(self.query_string, keep_blank_values=True):
                q.setdefault(k, v)
            self._query = q
        return self._query

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} HTTP/{self.version}>"
