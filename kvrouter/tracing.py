"""OpenTelemetry tracing of inference requests (``tracing.*``, README "Tracing"): optional.

With ``tracing.enabled: true`` (and ``pip install 'kvrouter[otel]'``) the application builds one
:class:`Tracer` and puts it on the ``Context``. Each inference request then gets one SERVER span,
from its receipt to its last byte, that continues the client's W3C ``traceparent`` if it sent
one; the ``traceparent`` (and ``tracestate``) sent to the instances names this span, so their
own spans hang below it. Each routing decision (``Leg.choose``; a retry makes another) sets the
span's ``kvrouter.<role>.*`` attributes and adds a ``route`` event; the end sets the status.
Spans leave in batches from a background thread (OTLP over HTTP/protobuf), never on the event
loop.

Off (the default), ``Context.tracer`` is ``None``: this module's OpenTelemetry imports never
run, and a request pays a few ``is None`` checks (its start, each decision, its end).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from kvrouter import __version__
from kvrouter.config import TracingConfig, redact_url

if TYPE_CHECKING:
    from kvrouter.errors import RouterError
    from kvrouter.http.request import Request
    from kvrouter.policies.base import RequestView, Selection
    from kvrouter.server.accounting import Outcome
    from kvrouter.server.leg import Leg

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
#: what the router sends on (W3C Trace Context, version 00)
TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: list members of visible ASCII, at most W3C's 512 characters propagated
TRACESTATE_RE = re.compile(r"[\x20-\x7e]{1,512}")
MAX_INCOMING = 1024     # longer incoming trace headers are ignored (a new trace starts)
EXPORT_TIMEOUT_SECS = 5.0   # one export to the collector (the exit waits for at most one)
FLUSH_MILLIS = 2000         # at exit, for the spans still in the batch

#: the modules ``pip install 'kvrouter[otel]'`` brings
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")


def traces_endpoint(endpoint: str) -> str | None:
    """The OTLP/HTTP traces URL: ``/v1/traces`` appended to a URL without a path; ``None``
    (``""``) leaves it to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``http://localhost:4318/v1/traces``)."""
    if not endpoint:
        return None
    url = endpoint if "://" in endpoint else "http://" + endpoint
    scheme, _, rest = url.partition("://")
    if "/" not in rest.rstrip("/"):
        return f"{scheme}://{rest.rstrip('/')}/v1/traces"
    return url


class Tracer:
    """The router's OpenTelemetry tracer (its own provider: the global one is left alone)."""

    def __init__(self, cfg: TracingConfig, exporter: Any = None) -> None:
        """``exporter``: a ``SpanExporter`` to use instead of OTLP, exported span by span
        (tests use the SDK's in-memory one)."""
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            shutdown_on_exit=False,     # close(): worker processes leave with os._exit
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
            resource=Resource.create({"service.name": cfg.service_name,
                                      "service.version": __version__}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = traces_endpoint(cfg.endpoint)
            self.provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_SECS)))
            self.target = redact_url(url) if url else "the OTEL_EXPORTER_OTLP_* endpoint"
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
            self.target = type(exporter).__name__
        self._tracer = self.provider.get_tracer("kvrouter", __version__)
        self._views: dict[int, Trace] = {}      # id(RequestView) → its request's trace

    def close(self) -> None:
        """Export the spans still waiting (bounded), then stop the exporter thread."""
        self.provider.force_flush(FLUSH_MILLIS)
        self.provider.shutdown()

    def start(self, req: Request, endpoint: str, mode: str) -> Trace:
        """The span of an inference request; ``req``'s trace headers are replaced by the ones
        that name it (what the instances receive)."""
        carrier: dict[str, str] = {}
        for name, value in req.headers:
            key = name.lower()
            if key in (TRACEPARENT, TRACESTATE):
                text = key.decode("latin-1")
                if text in carrier or len(value) > MAX_INCOMING:
                    carrier = {}     # repeated or oversized: not a trace to continue
                    break
                carrier[text] = value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        started = time.time_ns() - int((time.perf_counter() - req.received) * 1e9)
        span = self._tracer.start_span(
            f"{req.method} {endpoint}", context=parent, kind=self._server, start_time=started,
            attributes={"http.request.method": req.method, "http.route": endpoint,
                        "url.path": req.path, "client.address": req.conn.peer,
                        "network.protocol.version": req.version, "kvrouter.mode": mode})
        out: dict[str, str] = {}
        self._propagator.inject(out, context=self._trace.set_span_in_context(span))
        headers = [h for h in req.headers if h[0].lower() not in (TRACEPARENT, TRACESTATE)]
        parent_id = out.get("traceparent", "")
        if TRACEPARENT_RE.fullmatch(parent_id):
            headers.append((b"traceparent", parent_id.encode("ascii")))
            state = out.get("tracestate", "")
            if state and TRACESTATE_RE.fullmatch(state):
                headers.append((b"tracestate", state.encode("ascii")))
        req.headers = headers
        return Trace(self, span)

    def chose(self, leg: Leg, sel: Selection) -> None:
        """A routing decision of a leg (``Leg.choose``): the span's ``kvrouter.<role>.*``
        attributes (the last decision's) and a ``route`` event per decision."""
        trace = self._views.get(id(leg.view))
        if trace is None:
            return
        role = leg.role.value
        trace.choices[role] = trace.choices.get(role, 0) + 1
        attrs = {f"kvrouter.{role}.url": sel.instance.url,
                 f"kvrouter.{role}.policy": leg.ctx.router.policies[leg.role].name,
                 f"kvrouter.{role}.strategy": sel.strategy,
                 f"kvrouter.{role}.matched_blocks": sel.hit_blocks,
                 f"kvrouter.{role}.prompt_blocks": sel.lookup_blocks}
        trace.span.set_attributes(attrs)
        trace.span.add_event("route", attrs)


class Trace:
    """The span of one inference request (:meth:`Tracer.start`), until :meth:`end`."""

    __slots__ = ("choices", "span", "tracer", "view")

    def __init__(self, tracer: Tracer, span: Any) -> None:
        self.tracer = tracer
        self.span = span
        self.view: int | None = None
        self.choices: dict[str, int] = {}      # role → decisions made (retries + 1)

    def bind(self, view: RequestView) -> None:
        """The request's scheduling view is known: its legs' decisions belong to this span."""
        self.view = id(view)
        self.tracer._views[self.view] = self

    def end(self, error: RouterError | None, status: int, outcome: Outcome) -> None:
        """The request ended: ``error`` to be answered, else the answer's ``status``."""
        if self.view is not None:
            self.tracer._views.pop(self.view, None)
        span = self.span
        code = error.status if error is not None else status
        span.set_attribute("kvrouter.retries", max(self.choices.values(), default=1) - 1)
        if code:
            span.set_attribute("http.response.status_code", code)
        if outcome.client_gone:
            span.set_attribute("kvrouter.client_gone", True)
        if error is not None and code >= 500:
            span.set_attribute("error.type", error.code or str(code))
            span.set_status(self.tracer._trace.Status(self.tracer._error.status_code,
                                                      error.message[:256]))
        elif code >= 500 or outcome.failure is not None or outcome.interrupted:
            span.set_attribute("error.type", "stream_interrupted" if code < 500 else str(code))
            span.set_status(self.tracer._error)
        span.end()
