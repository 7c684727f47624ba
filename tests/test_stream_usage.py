"""Measured hit rate for every engine's streams, without changing what the client receives
(kvrouter/backends/usage.py): a real router process in front of ``kvrouter sim --engine …``
instances, and the relay in-process in front of scripted raw-socket instances."""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest
import yaml
from harness import (
    Fleet,
    RouterProcess,
    bounded,
    metrics_text,
    register_all,
    sample,
    shape,
    wait_for,
)
from test_http_server import FakeInstance, chunk, on_loop
from test_request_path import (
    SSE_EVENTS,
    URL,
    ask,
    fakes,
    mixed_app,
    sse_script,
    until,
)
from test_request_path import sample as app_sample

from kvrouter.backends.usage import (
    ASK,
    UsageTaker,
    decode_like,
    prefill_usage,
    timings_of,
    with_usage,
)
from kvrouter.sim import SimInstance
from kvrouter.sim.tokens import render_chat, tokenize

MESSAGES = [{"role": "user", "content": "a shared prefix that fills a few cache blocks " * 40}]
PROMPT = "a completion prompt long enough to fill a few prefix cache blocks " * 40
def request(kind: str, **extra: object) -> tuple[str, dict]:
    if kind == "chat":
        body: dict = {"messages": MESSAGES}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": PROMPT}
        path = "/v1/completions"
    return path, body | {"stream": True, "max_tokens": 4, "ignore_eos": True} | extra


def prompt_tokens(kind: str) -> int:
    return len(tokenize(render_chat(MESSAGES) if kind == "chat" else PROMPT))


async def stream(url: str, path: str, body: dict) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(
            url + path, data=orjson.dumps(body),
            headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        return await r.read()


async def router_for(fleet: Fleet, inst: SimInstance) -> RouterProcess:
    path = fleet.tmp_path / f"register{len(fleet.routers)}.yaml"
    path.write_text(yaml.safe_dump({"instances": [inst.register_entry()]}))
    return await fleet.router({"manager": {"register-path": str(path)}})


async def counted(router: RouterProcess, url: str) -> tuple[float, float]:
    text = await metrics_text(router)
    return (sample(text, "kvrouter_backend_prompt_tokens_total", url=url),
            sample(text, "kvrouter_backend_cached_tokens_total", url=url))


@pytest.mark.parametrize("engine", ["fastdeploy", "vllm", "sglang", "llamacpp"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
@bounded(60)
async def test_streams_are_measured_and_relayed_unchanged(fleet: Fleet, engine: str,
                                                          kind: str) -> None:
    """A stream whose client did not ask for usage: the client gets the bytes the engine sends
    such a request (same events, no usage), and the router counts the prompt and cached tokens
    the engine reported; the repeated prompt is a cache hit."""
    inst = await fleet.sim(engine=engine, time_scale=0.01)
    router = await router_for(fleet, inst)
    path, body = request(kind)
    direct = await stream(inst.url, path, body)
    before = await counted(router, inst.url)
    assert before == (0, 0)
    relayed = [await stream(router.url, path, body) for _ in range(2)]
    for raw in relayed:
        assert shape(raw) == shape(direct)
        assert b'"usage"' not in raw or (engine == "llamacpp" and kind == "completion")
    sent = [r.json() for r in inst.requests_to(path)][1:]
    asks = engine != "llamacpp"   # llama.cpp says it in `timings`: asking would move them
    assert [s.get("stream_options") for s in sent] == (
        [{"include_usage": True}] * 2 if asks else [None, None])
    n = prompt_tokens(kind)
    prompt, cached = await wait_for(lambda: _settled(router, inst.url, 2 * n))
    assert prompt == 2 * n
    assert n // 2 < cached < 2 * n           # the second request hit the first one's cache


async def _settled(router: RouterProcess, url: str, want: float) -> tuple[float, float] | None:
    got = await counted(router, url)
    return got if got[0] >= want else None


@pytest.mark.parametrize("engine", ["fastdeploy", "vllm"])
@bounded(60)
async def test_a_client_that_asks_for_usage_gets_it_as_before(fleet: Fleet,
                                                             engine: str) -> None:
    inst = await fleet.sim(engine=engine, time_scale=0.01)
    router = await router_for(fleet, inst)
    path, body = request("chat", stream_options={"include_usage": True})
    raw = await stream(router.url, path, body)
    assert raw.count(b'"usage"') == 1 and raw.count(b'"choices":[]') == 1
    assert shape(raw) == shape(await stream(inst.url, path, body))
    (sent,) = inst.requests_to(path)[:1]
    assert sent.body == orjson.dumps(body)         # passed on as the client wrote it
    n = prompt_tokens("chat")
    assert (await wait_for(lambda: _settled(router, inst.url, n)))[0] == n


@bounded(60)
async def test_continuous_usage_is_not_turned_on(fleet: Fleet) -> None:
    """vLLM reports per-event usage with ``continuous_usage_stats`` only when ``include_usage``
    is set: asking for usage would add it to every event, so the router does not ask."""
    inst = await fleet.sim(engine="vllm", time_scale=0.01)
    router = await router_for(fleet, inst)
    opts = {"continuous_usage_stats": True}
    path, body = request("chat", stream_options=opts)
    raw = await stream(router.url, path, body)
    assert b'"usage"' not in raw
    assert inst.requests_to(path)[0].json()["stream_options"] == opts


@bounded(60)
async def test_pd_prefill_is_asked_for_usage_and_counted(fleet: Fleet) -> None:
    """FastDeploy PD: the prefill's answer is drained by the router, so its body asks for
    usage; the decode's body (whose answer the client gets) is the client's request."""
    router = await fleet.router({}, "--splitwise")
    p = await fleet.sim(role="prefill", time_scale=0.01)
    d = await fleet.sim(role="decode", time_scale=0.01)
    await register_all(router, p, d)
    path, body = request("chat")
    raw = await stream(router.url, path, body)
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    (pr,), (dr,) = p.inference_requests, d.inference_requests
    assert pr.json()["stream_options"] == {"include_usage": True}
    assert "stream_options" not in dr.json()
    assert pr.body == dr.body[:-1] + ASK
    n = prompt_tokens("chat")
    assert (await wait_for(lambda: _settled(router, p.url, n)))[0] == n


# -- the relay, in-process, in front of scripted instances --------------------------------------
USAGE_EVENT = SSE_EVENTS[2]


@on_loop
async def test_usage_event_split_over_reads_is_taken_out_and_counted():
    """The usage event arrives in pieces, in one read with the events around it, and
    with ``\\n\\n`` split: the client gets every other byte, whole events at a time."""
    pieces = [SSE_EVENTS[0][:7], SSE_EVENTS[0][7:] + SSE_EVENTS[1][:5], SSE_EVENTS[1][5:-1],
              b"\n" + USAGE_EVENT[:20], USAGE_EVENT[20:-1], b"\n", b"data: [DONE]\n\n"]
    together = [SSE_EVENTS[0] + SSE_EVENTS[1] + USAGE_EVENT + SSE_EVENTS[3]]
    for script in (pieces, together):
        async with fakes(sse_script(*script)) as (fake,), mixed_app(fake) as (app, port, _):
            status, _, body = await ask(port, orjson.dumps({"stream": True}))
            assert status == 200
            assert body == SSE_EVENTS[0] + SSE_EVENTS[1] + SSE_EVENTS[3]
            url = URL % fake.port
            await until(lambda a=app, u=url: app_sample(
                a, "kvrouter_backend_prompt_tokens_total", url=u) == 11)
            assert app_sample(app, "kvrouter_backend_cached_tokens_total", url=url) == 4


@on_loop
async def test_an_engine_that_sends_usage_unasked_keeps_its_usage_event():
    """vLLM with ``--enable-force-include-usage`` puts usage on every event and sends the
    usage event whether asked or not: the client gets it as without the router."""
    first = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":11}}\n\n'
    pieces = [first, b"data: {", b'"choices":[]}\n\n', USAGE_EVENT, SSE_EVENTS[3]]
    async with fakes(sse_script(*pieces)) as (fake,), mixed_app(fake) as (app, port, _):
        status, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert status == 200 and body == b"".join(pieces)
        await until(lambda: app_sample(app, "kvrouter_backend_cached_tokens_total",
                                       url=URL % fake.port) == 4)


@on_loop
async def test_a_stream_without_event_boundaries_is_passed_on_past_the_hold_limit():
    big = b"data: " + b"x" * (1 << 20) + b"\n"     # one "event" past 1 MiB, never ended
    async with fakes(sse_script(big[:1000], big[1000:], b"\n", SSE_EVENTS[3])) as (fake,), \
            mixed_app(fake) as (_app, port, _):
        status, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert status == 200 and body == big + b"\n" + SSE_EVENTS[3]


@on_loop
async def test_error_answers_to_an_asked_stream_are_relayed_as_they_are():
    error = b'{"error":{"message":"bad","usage":{"prompt_tokens":3},"choices":[]}}'

    async def script(inst: FakeInstance, head: bytes, raw: bytes) -> None:
        inst.transport.write(b"HTTP/1.1 400 Bad\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunk(error + b"\n\n")
                             + b"0\r\n\r\n")

    async with fakes(script) as (fake,), mixed_app(fake) as (_app, port, _):
        status, _, body = await ask(port, orjson.dumps({"stream": True}))
        assert status == 400 and body == error + b"\n\n"


# -- the functions --------------------------------------------------------------------------------
def test_with_usage_asks_only_streams_that_leave_usage_off():
    raw = b'{"stream":true,"messages":[]} \n'
    assert with_usage(raw, orjson.loads(raw)) == b'{"stream":true,"messages":[]' + ASK
    assert orjson.loads(with_usage(raw, orjson.loads(raw)) or b"")["stream_options"] == {
        "include_usage": True}
    for body, want in [
        ({"stream": False}, None),
        ({"messages": []}, None),
        ({"stream": True, "stream_options": {"include_usage": True}}, None),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, None),
        ({"stream": True, "stream_options": "bad"}, None),
        ({"stream": True, "n": 2}, None),
        ({"stream": True, "n": 1}, {"include_usage": True}),
        ({"stream": True, "stream_options": None}, {"include_usage": True}),
        ({"stream": True, "stream_options": {"include_usage": False, "x": 1}},
         {"include_usage": True, "x": 1}),
    ]:
        got = with_usage(orjson.dumps(body), body)
        assert (got if got is None else orjson.loads(got)["stream_options"]) == want, body


def test_prefill_usage_is_undone_for_the_decode():
    body = {"stream": True, "request_id": "r"}
    raw = orjson.dumps(body)
    asked = prefill_usage(raw, body)
    assert orjson.loads(asked)["stream_options"] == {"include_usage": True}
    assert decode_like(asked, body) == raw
    # a client that wrote the same suffix itself keeps it on both legs
    own = {"stream": True, "stream_options": {"include_usage": True}}
    raw = orjson.dumps(own)
    assert prefill_usage(raw, own) == raw and decode_like(raw, own) == raw


def taken(*pieces: bytes) -> tuple[bytes, UsageTaker]:
    """What the relay passes on of ``pieces`` (unchanged once the taker is passing)."""
    taker = UsageTaker()
    out = b""
    for p in pieces:
        out += p if taker.passing else taker.feed(p)
    return out + taker.flush(), taker


def test_usage_taker_removes_only_usage_only_events():
    assert taken(*SSE_EVENTS)[0] == SSE_EVENTS[0] + SSE_EVENTS[1] + SSE_EVENTS[3]
    assert taken(*SSE_EVENTS)[1].usage == (11, 4)
    spaced = b'data: {"choices": [ ], "usage": {"prompt_tokens": 5}}\n\n'
    out, taker = taken(spaced)
    assert out == b"" and taker.usage == (5, None) and not taker.passing
    # usage on an event with choices: the engine sends usage unasked, nothing is taken out
    unasked = b'data: {"choices":[{"text":""}],"usage":{"prompt_tokens":7}}\n\n'
    out, taker = taken(unasked, spaced[:9], spaced[9:])
    assert out == unasked + spaced and taker.passing


def test_usage_taker_moves_fields_back_to_the_finishing_event():
    """vLLM, asked for usage, sends its system_fingerprint on the usage event instead of the
    last one: the client gets it where vLLM sends it unasked, the usage event held or not."""
    fp = b',"system_fingerprint":"vllm-0.32.0"'
    finish = b'data: {"id":"c","choices":[{"index":0,"finish_reason":"length"}]}\n\n'
    usage = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,'
             b'"prompt_tokens_details":{"cached_tokens":0}}' + fp + b'}\n\n')
    unasked = finish[:-3] + fp + b"}\n\n"
    for pieces in ([SSE_EVENTS[0], finish, usage, SSE_EVENTS[3]],
                   [SSE_EVENTS[0] + finish + usage + SSE_EVENTS[3]],
                   [SSE_EVENTS[0], finish[:20], finish[20:] + usage[:30], usage[30:],
                    SSE_EVENTS[3]]):
        out, taker = taken(*pieces)
        assert out == SSE_EVENTS[0] + unasked + SSE_EVENTS[3], pieces
        assert taker.usage == (9, 0)
    # a finishing event is held only until the next event arrives
    taker = UsageTaker()
    assert taker.feed(SSE_EVENTS[0] + finish) == SSE_EVENTS[0]
    assert taker.feed(SSE_EVENTS[3]) == finish + SSE_EVENTS[3]


def test_timings_of_reads_llamacpp_timings():
    raw = (b'data: {"choices":[],"timings":{"cache_n":30,"prompt_n":1,'
           b'"prompt_ms":6.9}}\n\n')
    assert timings_of(raw) == (31, 30)
    assert timings_of(b'{"timings":{"prompt_n":3}}') == (None, None)
