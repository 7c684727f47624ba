"""OpenTelemetry tracing (``tracing.*``, kvrouter/tracing.py): one span per inference request
with the routing decision as attributes, W3C ``traceparent`` continued from the client and sent
on to the instances, sampling, and nothing of OpenTelemetry loaded when it is off.

In-process cases run the application over real sockets in front of scripted fake instances
(test_request_path's helpers) with the SDK's in-memory exporter; one case runs a real router
process that exports over OTLP/HTTP to a fake collector on 127.0.0.1. Skipped when the
``otel`` extra is not installed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

import orjson
from aiohttp import web
from harness import Fleet, bounded, post_json
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from test_http_server import on_loop
from test_request_path import URL, ask, fakes, mixed_app, reply

from kvrouter.config import ConfigError, TracingConfig, load_config
from kvrouter.tracing import Tracer, traces_endpoint

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01".encode()


def traced(app, **cfg) -> InMemorySpanExporter:
    """Turn tracing on for an in-process app, spans kept in memory."""
    exporter = InMemorySpanExporter()
    app.ctx.tracer = Tracer(TracingConfig(enabled=True, **cfg), exporter=exporter)
    return exporter


def header_values(head: bytes, name: bytes) -> list[str]:
    """The values of header ``name`` in a raw request head the fake instance received."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            out.append(v.strip().decode())
    return out


async def finished(exporter: InMemorySpanExporter, n: int = 1) -> list:
    async with asyncio.timeout(3):
        while len(exporter.get_finished_spans()) < n:
            await asyncio.sleep(0.005)
    return list(exporter.get_finished_spans())


@on_loop
async def test_span_continues_the_client_trace_and_names_itself_to_the_instance():
    script = _json()
    async with fakes(script) as (fake,), mixed_app(fake) as (app, port, _):
        exporter = traced(app)
        status, _, _ = await ask(port, extra=b"traceparent: " + TRACEPARENT + b"\r\n"
                                             b"tracestate: vendor=abc\r\n")
        assert status == 200
        (span,) = await finished(exporter)
        ctx = span.get_span_context()
        assert f"{ctx.trace_id:032x}" == TRACE                   # the client's trace
        assert f"{span.parent.span_id:016x}" == PARENT and span.parent.is_remote
        assert span.name == "POST /v1/chat/completions" and span.kind is SpanKind.SERVER
        attrs = dict(span.attributes)
        assert attrs["kvrouter.mixed.url"] == URL % fake.port
        assert attrs["kvrouter.mixed.policy"] == "request_num"
        assert attrs["kvrouter.mixed.strategy"] == "policy"
        assert attrs["kvrouter.mixed.matched_blocks"] == 0
        assert attrs["kvrouter.retries"] == 0
        assert attrs["http.response.status_code"] == 200
        assert span.status.status_code is StatusCode.UNSET
        # the instance got one traceparent naming the router's span, and the tracestate
        head = fake.requests[-1][0]
        assert header_values(head, b"traceparent") == [
            f"00-{TRACE}-{ctx.span_id:016x}-01"]
        assert header_values(head, b"tracestate") == ["vendor=abc"]
    assert script.calls == 1


@on_loop
async def test_a_retry_is_a_second_route_event_and_the_last_choice_wins():
    calls = []

    async def first_fails(inst, head, raw):
        calls.append(inst.owner.port)
        reply(inst, 503 if len(calls) == 1 else 200, b'{"choices":[]}')

    async with fakes(first_fails, first_fails) as (a, b), \
            mixed_app(a, b, status_retries=1) as (app, port, _):
        exporter = traced(app)
        status, _, _ = await ask(port)
        assert status == 200
        (span,) = await finished(exporter)
        attrs = dict(span.attributes)
        events = [dict(e.attributes) for e in span.events if e.name == "route"]
        assert [e["kvrouter.mixed.url"] for e in events] == [URL % p for p in calls]
        assert len(set(calls)) == 2
        assert attrs["kvrouter.mixed.url"] == URL % calls[-1]
        assert attrs["kvrouter.retries"] == 1 and attrs["http.response.status_code"] == 200
        # a new trace: the instance's traceparent names the router's span
        ctx = span.get_span_context()
        assert span.parent is None
        (sent,) = header_values((b if calls[-1] == b.port else a).requests[-1][0],
                                b"traceparent")
        assert sent[:-3] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}"
        assert int(sent[-2:], 16) & 1        # sampled (0x02, a random trace id, may be set)


@on_loop
async def test_no_instance_is_an_error_span():
    async with mixed_app() as (app, port, _):
        exporter = traced(app)
        status, _, _ = await ask(port)
        assert status == 503
        (span,) = await finished(exporter)
        assert span.status.status_code is StatusCode.ERROR
        attrs = dict(span.attributes)
        assert attrs["http.response.status_code"] == 503
        assert attrs["error.type"] == "no_available_instance"
        assert not any(k.startswith("kvrouter.mixed.") for k in attrs)


@on_loop
async def test_unsampled_requests_export_nothing_but_still_propagate():
    async with fakes(_json()) as (fake,), mixed_app(fake) as (app, port, _):
        exporter = traced(app, sample_ratio=0.0)
        for _ in range(3):
            assert (await ask(port))[0] == 200
        # a client that sampled its trace is followed (parent-based sampling)
        assert (await ask(port, extra=b"traceparent: " + TRACEPARENT + b"\r\n"))[0] == 200
        (span,) = await finished(exporter)
        assert f"{span.get_span_context().trace_id:032x}" == TRACE
        sampled = [int(header_values(head, b"traceparent")[0][-2:], 16) & 1
                   for head, _ in fake.requests]
        assert sampled == [0, 0, 0, 1]


@on_loop
async def test_invalid_or_repeated_traceparent_starts_a_new_trace():
    async with fakes(_json()) as (fake,), mixed_app(fake) as (app, port, _):
        exporter = traced(app)
        bad = (b"traceparent: 00-zz-1-01\r\n",
               b"traceparent: " + TRACEPARENT + b"\r\ntraceparent: " + TRACEPARENT + b"\r\n")
        for extra in bad:
            assert (await ask(port, extra=extra))[0] == 200
        spans = await finished(exporter, 2)
        assert all(s.parent is None for s in spans)
        assert all(f"{s.get_span_context().trace_id:032x}" != TRACE for s in spans)
        for head, _ in fake.requests:
            (value,) = header_values(head, b"traceparent")
            assert value.startswith("00-") and TRACE not in value


@on_loop
async def test_tracing_off_passes_the_client_headers_unchanged():
    async with fakes(_json()) as (fake,), mixed_app(fake) as (app, port, _):
        assert app.ctx.tracer is None
        assert (await ask(port, extra=b"traceparent: " + TRACEPARENT + b"\r\n"))[0] == 200
        assert header_values(fake.requests[-1][0], b"traceparent") == [TRACEPARENT.decode()]


def test_off_imports_no_opentelemetry():
    code = ("import asyncio, sys\n"
            "from kvrouter.config import RouterConfig\n"
            "from kvrouter.http.upstream import UpstreamPool\n"
            "from kvrouter.router import Router\n"
            "from kvrouter.server.app import App\n"
            "async def main():\n"
            "    assert App(Router(RouterConfig()), UpstreamPool(1, 1, 1)).ctx.tracer is None\n"
            "asyncio.run(main())\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_config_keys(tmp_path: Path):
    def load(text: str):
        path = tmp_path / "config.yaml"
        path.write_text(text)
        return load_config(str(path), port=0)[0].tracing

    cfg = load("tracing:\n  enabled: true\n  endpoint: collector:4318\n"
               "  service-name: router-a\n  sample-ratio: 0.25\n")
    assert (cfg.enabled, cfg.endpoint, cfg.service_name, cfg.sample_ratio) == \
        (True, "collector:4318", "router-a", 0.25)
    assert load("log:\n  level: info\n") == TracingConfig()
    for text, key in (("tracing:\n  sample-ratio: 2\n", "tracing.sample-ratio"),
                      ("tracing:\n  service-name: 'a b'\n", "tracing.service-name"),
                      ("tracing:\n  endpoint: 'ftp://x'\n", "tracing.endpoint"),
                      ("tracing:\n  enabled: maybe\n", "tracing.enabled")):
        with pytest.raises(ConfigError) as err:
            load(text)
        assert str(err.value).startswith(f"config error: {tmp_path / 'config.yaml'}: {key}: ")
    assert traces_endpoint("collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("https://c:4318/") == "https://c:4318/v1/traces"
    assert traces_endpoint("http://c/otlp/v1/traces") == "http://c/otlp/v1/traces"
    assert traces_endpoint("") is None


@bounded(40)
async def test_router_process_exports_spans_over_otlp_http(fleet: Fleet) -> None:
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        received.append(msg)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    collector = await fleet.fake(app)
    sim = await fleet.sim()
    r = await fleet.router({"tracing": {"enabled": True, "endpoint": collector,
                                        "service-name": "kvrouter-test"},
                            "scheduler": {"policy": "cache_aware"}})
    status, _, _ = await post_json(r.url + "/register", {
        "host_ip": "127.0.0.1", "port": sim.port, "role": "mixed"})
    assert status == 200
    chat = {"model": "default", "max_tokens": 4,
            "messages": [{"role": "user", "content": "trace me " * 40}]}
    status, _, _ = await post_json(r.url + "/v1/chat/completions", chat)
    assert status == 200
    assert await r.stop() == 0       # the exit flushes the batch of spans
    spans = [(res, s) for msg in received for res in msg.resource_spans
             for scope in res.scope_spans for s in scope.spans]
    assert len(spans) == 1, received
    resource, span = spans[0]
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "kvrouter-test"
    attrs = {a.key: a.value for a in span.attributes}
    assert span.name == "POST /v1/chat/completions"
    assert attrs["kvrouter.mixed.url"].string_value == sim.url
    assert attrs["kvrouter.mixed.policy"].string_value == "cache_aware"
    assert attrs["kvrouter.mixed.prompt_blocks"].int_value > 0
    assert attrs["http.response.status_code"].int_value == 200
    assert "tracing 100% of new requests to " + collector + "/v1/traces" in r.log()


class _json:
    """A fake instance script answering a JSON completion; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, inst, head, raw):
        self.calls += 1
        reply(inst, 200, orjson.dumps({"choices": []}))
