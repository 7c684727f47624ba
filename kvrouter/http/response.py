"""Complete responses, status lines and header blocks."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` (cached per status)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())
        _STATUS_LINES[status] = line
    return line


_date_second = 0
_date_header = b""


def date_header() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n``, formatted at most once per second."""
    global _date_second, _date_header
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_header = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_header


def header_block(headers: dict[str, str] | list[tuple[bytes, bytes]] | None) -> bytes:
    """``Name: value\\r\\n`` lines of ``headers`` (a ``str`` dict or raw byte pairs)."""
    if not headers:
        return b""
    if isinstance(headers, dict):
        return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
    return b"".join(k + b": " + v + b"\r\n" for k, v in headers)


JSON = b"application/json"


class Response:
    """A complete response: status, content type, extra header lines and body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: bytes | str = JSON,
                 headers: dict[str, str] | list[tuple[bytes, bytes]] | bytes | None = None
                 ) -> None:
        self.status = status
        self.body = body
        self.content_type = (content_type.encode("latin-1") if isinstance(content_type, str)
                             else content_type)
        self.headers = headers if isinstance(headers, bytes) else header_block(headers)

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"
