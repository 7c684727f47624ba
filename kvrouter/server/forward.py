"""Client → instance forwarding: header filtering, the upstream request bytes, and
per-instance constants (pool target, URL, router header lines) cached per registration."""

from __future__ import annotations

from kvrouter.admission import PRIORITY_HEADER
from kvrouter.backends.engines import ENGINES, StreamUsage
from kvrouter.http.headers import HOP_BY_HOP, end_to_end
from kvrouter.http.request import Request
from kvrouter.http.response import header_block
from kvrouter.http.upstream import Target
from kvrouter.registry import Instance

# hop-by-hop, recomputed or router-owned headers; ``Expect`` too: the router already answered
# it, and an instance's ``100 Continue`` must not reach the relay; the router's own priority
DROP = HOP_BY_HOP | {b"content-length", b"host", b"expect", PRIORITY_HEADER}
DROP_IDENTITY = DROP | {b"accept-encoding"}
IDENTITY = b"Accept-Encoding: identity\r\n"
CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
NO_STREAM_USAGE = StreamUsage()


def forward_block(req: Request, *, identity: bool = False) -> bytes:
    """The client's end-to-end header lines to pass on (:func:`end_to_end` minus
    :data:`DROP`); with ``identity`` (PD mode) ``Accept-Encoding: identity`` replaces the
    client's, because the router inspects the bodies."""
    lines: list[bytes] = []
    for _, name, value in end_to_end(req.headers, DROP_IDENTITY if identity else DROP):
        lines += (name, b": ", value, b"\r\n")
    if identity:
        lines.append(IDENTITY)
    return b"".join(lines)


def strip_credentials(req: Request) -> None:
    """Remove the client's credentials from ``req`` once the router has consumed them
    (``auth.forward-client-key``), so that neither :func:`forward_block` nor any other
    step passes them on. Runs in ``App.handle``, before anything looked a header up."""
    req.headers = [h for h in req.headers if h[0].lower() not in CREDENTIALS]


def upstream_request(req: Request, target: Target, headers: bytes, body: bytes) -> bytes:
    """The complete request for an instance: same method and target (path and query)."""
    return b"".join((req.method.encode("latin-1"), b" ", req.target, b" HTTP/1.1\r\n",
                     target.host_line, headers, b"Content-Length: %d\r\n\r\n" % len(body), body))


class InstanceRef:
    """What the data plane needs of one registration, computed once."""

    __slots__ = ("identity", "info", "inst", "mixed_tag", "stream_usage", "target", "url",
                 "usage_children")

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        info = self.info = inst.info
        self.url = info.url
        self.identity = info.identity
        self.target = Target(info.host, int(info.port), tls=info.scheme == "https")
        self.mixed_tag = header_block({"X-Router-Mixed-URL": self.url})
        engine = ENGINES.get(info.engine) if info.engine is not None else None
        # an engine still to be recognised is asked nothing
        self.stream_usage = engine.usage if engine is not None else NO_STREAM_USAGE
        self.usage_children: tuple | None = None  # backend prompt/cached token counters


class InstanceRefs:
    """Cache of :class:`InstanceRef` keyed by the registration object (a heartbeat that
    changes the registration replaces it)."""

    def __init__(self) -> None:
        self._refs: dict[int, InstanceRef] = {}

    def get(self, inst: Instance) -> InstanceRef:
        info = inst.info
        ref = self._refs.get(id(info))
        if ref is None or ref.info is not info:
            if len(self._refs) > 4096:
                self._refs.clear()
            ref = self._refs[id(info)] = InstanceRef(inst)
        return ref

    def pop(self, inst: Instance) -> InstanceRef:
        """Forget a removed instance's constants (its metric children were deleted)."""
        ref = self.get(inst)
        del self._refs[id(inst.info)]
        return ref
