"""Hop-by-hop header filtering, one rule for both directions (RFC 9110 §7.6.1).

A proxy passes on only end-to-end headers: it drops the hop-by-hop ones, every header the
``Connection`` header names, and the headers it recomputes itself (the caller's ``drop``).
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})

Header = tuple[bytes, bytes]


def end_to_end(headers: Iterable[Header], drop: frozenset[bytes] = HOP_BY_HOP
               ) -> list[tuple[bytes, bytes, bytes]]:
    """``(lower-case name, name, value)`` of each header to pass on: all but ``drop`` (which
    must contain :data:`HOP_BY_HOP`) and the headers the ``Connection`` header names.

    Runs twice per proxied request (forwarding, relay): the ``Connection`` values are only
    joined in the loop, and a second pass over the kept headers is made only when they name
    a field not dropped anyway (``Connection: keep-alive`` names none)."""
    kept: list[tuple[bytes, bytes, bytes]] = []
    connection: bytes | None = None
    for name, value in headers:
        n = name.lower()
        if n not in drop:
            kept.append((n, name, value))
        elif n == b"connection":
            connection = value if connection is None else connection + b"," + value
    if connection is not None:
        named = {t.strip().lower() for t in connection.split(b",")}
        named -= drop
        named.discard(b"")
        if named:
            kept = [h for h in kept if h[0] not in named]
    return kept
