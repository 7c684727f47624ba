"""kvrouter's HTTP/1.1 data plane: an asyncio ``Protocol`` server and an upstream connection pool,
both parsing with httptools (llhttp), built for relaying bytes with as little work per request
and per chunk as possible.

* :mod:`.request`  – the parsed request (method, path, query, raw headers, body);
* :mod:`.response` – small complete responses, status lines, header blocks;
* :mod:`.server`   – the server connection protocol (keep-alive, pipelining, chunked bodies,
  ``Expect: 100-continue``, HTTP/1.0, body limit, flow control) and ``start_server``;
* :mod:`.routing`  – exact path → method → handler table (404/405 decided by the caller);
* :mod:`.sockets`  – listening sockets (``SO_REUSEPORT`` for worker processes), ``TCP_NODELAY``;
* :mod:`.upstream` – pooled keep-alive connections to instances, classified failures, first-byte
  and idle timeouts, pull (``read_chunk``) and push (``relay``) body delivery.
"""

from kvrouter.http.request import Request
from kvrouter.http.response import Response
from kvrouter.http.routing import Routes
from kvrouter.http.server import HttpConnection, start_server
from kvrouter.http.upstream import (
                                    BodyFailed,
                                    ConnectFailed,
                                    FirstByteTimeout,
                                    Target,
                                    TransportError,
                                    Upstream,
                                    UpstreamPool,
)

__all__ = [
    "BodyFailed", "ConnectFailed", "FirstByteTimeout", "HttpConnection", "Request", "Response",
    "Routes", "Target", "TransportError", "Upstream", "UpstreamPool", "start_server",
]
