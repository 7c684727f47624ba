"""What a warm tiny request costs the router, counted, not timed.

Wall-clock CPU per request depends on the load of the (shared) machine; the work a request
does in Python does not. These tests run the router in-process over real sockets on 127.0.0.1
(the fakes of ``test_http_server``), warm it up, then count the calls a few more requests make
(``sys.setprofile``) to the per-request work that a router configured once should never repeat:
resolving metric labels, filtering ejected instances when none is, computing an instance's URL,
checking a logged path for control characters. And the caches that replace that work follow
the registry: a removed and re-registered instance is counted afresh under its URL.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

from harness import connect, read_response
from test_http_server import CHAT, FakeInstance, on_loop, post, router_app

from kvrouter.control.outlier import OutlierDetector
from kvrouter.instance import InstanceInfo
from kvrouter.logsetup import DATE_FORMAT, LOG_FORMAT
from kvrouter.metrics import Family

URL = "http://127.0.0.1:%d"
ANSWER = (b'{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,'
          b'"prompt_tokens_details":{"cached_tokens":0}}}')


async def answer(inst, head, body) -> None:
    inst.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))


class Calls:
    """Calls made while profiling, of the watched Python functions and C methods, by name."""

    def __init__(self, functions: dict[str, object], methods: tuple[str, ...]) -> None:
        self.codes = {f.__code__: name for name, f in functions.items()}  # type: ignore[attr-defined]
        self.methods = methods
        self.counts = dict.fromkeys([*functions, *methods], 0)

    def __call__(self, frame, event: str, arg) -> None:
        if event == "call":
            name = self.codes.get(frame.f_code)
            if name is not None:
                self.counts[name] += 1
        elif event == "c_call" and getattr(arg, "__name__", None) in self.methods:
            self.counts[arg.__name__] += 1


@contextlib.contextmanager
def profiled(calls: Calls) -> Iterator[Calls]:
    sys.setprofile(calls)
    try:
        yield calls
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def access_log() -> Iterator[io.StringIO]:
    """INFO on for ``kvrouter.access``, written in kvrouter's own format to a buffer."""
    logger = logging.getLogger("kvrouter.access")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


async def chat(port: int, n: int) -> None:
    async with connect(port) as (r, w):
        for _ in range(n):
            w.write(post("/v1/chat/completions", CHAT))
            status, _headers, _body = await read_response(r)
            assert status == 200


@on_loop
async def test_a_warm_request_repeats_no_per_configuration_work():
    """Metric children, the decision-time histogram of the role, the instance's URL label and
    a logged path's escaping are worked out once; no ejection, no filtering of candidates."""
    fakes = [await FakeInstance(answer).start() for _ in range(2)]
    with access_log() as log_text:
        async with router_app(*fakes) as (app, port, _http):
            await chat(port, 4)                   # warm: children, pools, the logged path
            app.access.flush()
            calls = Calls({"labels": Family.labels, "filter": OutlierDetector.filter,
                           "url": InstanceInfo.url.fget},        # type: ignore[attr-defined]
                          ("isprintable",))
            with profiled(calls):
                await chat(port, 10)
                app.access.flush()
    assert calls.counts == {"labels": 0, "filter": 0, "url": 0, "isprintable": 0}
    lines = [x for x in log_text.getvalue().splitlines() if "/v1/chat/completions" in x]
    assert len(lines) == 14 and all("[POST] /v1/chat/completions HTTP/1.1 200 " in x
                                    for x in lines)


@on_loop
async def test_a_removed_then_registered_instance_is_counted_afresh_under_its_url():
    """The cached selection and request series of an instance go with it: once removed (its
    series deleted) and registered again, its requests count from 1 under its URL."""
    fake = await FakeInstance(answer).start()
    async with router_app(fake) as (app, port, _http):
        router, url = app.router, URL % fake.port
        selections, requests = router.metrics.selections, router.metrics.inference_requests

        def counted() -> tuple[float, float]:
            chosen = [c.value for k, c in selections._metrics.items() if k[2] == url]
            done = [c.value for k, c in requests._metrics.items() if k[1] == url]
            return sum(chosen), sum(done)

        await chat(port, 3)
        assert counted() == (3, 3)
        inst = router.registry.get(f"127.0.0.1:{fake.port}")
        assert inst is not None
        info = inst.info
        router.registry.remove(inst, "test")
        assert counted() == (0, 3)     # the selection series went with the instance
        router.registry.add(info)
        await chat(port, 2)
        assert counted() == (2, 5)
