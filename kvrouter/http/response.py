"""Complete responses, status lines and header blocks."""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import quote_from_bytes

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


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")    # a field name (RFC 9110)
_PRINTABLE = bytes(range(0x20, 0x7F))
_KEPT = bytes(c for c in _PRINTABLE if c != ord("%")).decode()   # unencoded when encoding


def header_value(value: bytes) -> bytes:
    """``value`` as it may go on a header line: unchanged if it is printable ASCII, else
    percent-encoded (``%`` and every byte outside 0x20..0x7E: CR, LF, NUL, other controls,
    non-ASCII). Encoding rather than refusing keeps an answer that reflects a value (an error
    reply, say) from failing; a value a client chose is refused before it gets here (the PD
    ``request_id``, docs/fastdeploy.md#request-ids)."""
    if not value.translate(None, _PRINTABLE):
        return value
    return quote_from_bytes(value, safe=_KEPT).encode("ascii")


def header_block(headers: dict[str, str] | list[tuple[bytes, bytes]] | None) -> bytes:
    """``Name: value\\r\\n`` lines of ``headers`` (a ``str`` dict, text as UTF-8, or raw
    byte pairs): the one writer of header lines from values, so none can split the response.
    Values go through :func:`header_value`; a name that is not a token is a ``ValueError``
    (names are the router's own)."""
    if not headers:
        return b""
    pairs = ([(k.encode("utf-8", "backslashreplace"), v.encode("utf-8", "backslashreplace"))
              for k, v in headers.items()] if isinstance(headers, dict) else headers)
    lines = []
    for name, value in pairs:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name[:64]!r}")
        lines.append(name + b": " + header_value(value) + b"\r\n")
    return b"".join(lines)


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
