"""A bounded, seeded fuzz of the router's input surface, over raw sockets on 127.0.0.1.

Two router processes: mixed with two simulated instances, PD with a prefill and a decode.
Each gets ``/register`` bodies, chat and completion bodies (wrong types, deep nesting, unicode,
control characters, huge numbers, missing fields, hostile ``request_id`` values) and mutated
raw request heads (request lines, header names and values with control bytes, conflicting
``Content-Length``/``Transfer-Encoding``, truncated heads). Every answer must be a well-formed
HTTP response whose status is below 500 or 502/503/504 (a 500 only from an instance), with no
header the client injected; after each batch the router answers ``/health``; every read has a
timeout; at the end the router's open file descriptors are back to their starting count and
its log shows no unhandled error. A failure names the seed and the case
(``KVROUTER_FUZZ_SEED`` replays another seed). The last test pins down the descriptor leak
this check found in the PD router (a leg cancelled as its answer arrived).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
import pytest
from harness import bounded, register_all, wait_for
from test_input_validation import Malformed, Reply, open_fds, read_reply

from kvrouter.http.upstream import Target as UpstreamTarget
from kvrouter.http.upstream import UpstreamPool

SEED = int(os.environ.get("KVROUTER_FUZZ_SEED", "20240611"))
BATCH = 40
CASES = {"register": 80, "inference": 160, "raw": 80}   # per router: 640 in all
MARK = "X-Fuzz-Injected"
FORBIDDEN = {MARK.lower(), "set-cookie"}
FD_SLACK = 2          # control-plane keep-alive connections may differ by one or two
SETTLE_SECS = 20      # > the upstream pool's 15 s idle close: what stays open then is leaked
PATIENCE_SECS = 0.5   # for an answer to a request that may be incomplete, before half-closing
CONFIG = {"server": {"connect-timeout-secs": 2, "first-byte-timeout-secs": 5,
                     "stream-idle-timeout-secs": 5}}
SIM = {"output_tokens": 4, "handoff_timeout": 3.0}
WARM_UP = b'{"prompt":"warm up","max_tokens":2}'

# --- building blocks -------------------------------------------------------------------------

INJECTIONS = [f"a\r\n{MARK}: 1", f"\r\n{MARK}: 1\r\n", "x\r\nSet-Cookie: fuzz=1", f"\n{MARK}: 1",
              f"\r{MARK}: 1", "a\x00b", "\x7f", "%0d%0a" + MARK, "\u2028" + MARK]
TEXTS = ["", "a", "default", "hello there", "\u65e5\u672c\u8a9e", "caf\u00e9", "\U0001f600",
         "\u202e\u200b", "<b>&amp;</b>", '"quoted"', "\\", "a" * 300, "x" * 5000, *INJECTIONS]
NUMBERS = ["0", "-1", "1", "4", "1.5", "-0", "1e400", "-1e400", "1e-400", "0.1",
           "1" + "0" * 30, "18446744073709551616", "-9223372036854775809", "1" + "0" * 400,
           "2" * 5000, "NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1", "0x10"]
ALPHABETS = [
    [chr(c) for c in range(0x20, 0x7F)],
    [chr(c) for c in range(0x00, 0x20)] + ["\x7f"],
    [chr(c) for c in range(0x80, 0x800)],
    ["\u65e5", "\u672c", "\U0001f600", "\ufeff", "\ufffe", "\u0000"],
]
KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream",
        "stream_options", "request_id", "session_id", "extra_body", "disaggregate_info",
        "completion_token_ids", "prompt_token_ids", "ignore_eos", "temperature", "user", "n"]


def text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(TEXTS)
    alphabet = rng.choice(ALPHABETS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))


def string(rng: random.Random) -> str:
    """A JSON string literal: escaped, or with raw non-ASCII, or with a lone surrogate."""
    r = rng.random()
    if r < 0.1:
        return '"\\ud800' + text(rng).replace('"', "") + '"'
    return json.dumps(text(rng), ensure_ascii=r < 0.5)


def value(rng: random.Random, depth: int = 0) -> str:
    """JSON text (mostly valid) of a random shape."""
    r = rng.random()
    if depth > 3 or r < 0.55:
        return rng.choice([string(rng), rng.choice(NUMBERS), str(rng.randrange(-5, 9)),
                           "true", "false", "null"])
    if r < 0.8:
        return "[" + ",".join(value(rng, depth + 1) for _ in range(rng.randrange(0, 5))) + "]"
    return "{" + ",".join(f"{string(rng)}:{value(rng, depth + 1)}"
                          for _ in range(rng.randrange(0, 5))) + "}"


def deep(rng: random.Random) -> str:
    depth = rng.choice([129, 300, 1000, 1025, 2000, 100_000])
    if rng.random() < 0.5:
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def obj(fields: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields) + "}"


def encode(doc: str, rng: random.Random) -> bytes:
    data = doc.encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.03:
        return data[: rng.randrange(0, len(data) + 1)]        # truncated JSON
    if r < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))   # garbage
    return data


def mutate(rng: random.Random, fields: list[tuple[str, str]],
           pools: dict[str, Callable[[], str]], times: int) -> None:
    for _ in range(times):
        r = rng.random()
        if r < 0.2 and fields:
            fields.pop(rng.randrange(len(fields)))                      # missing field
        elif r < 0.35:
            fields.append((rng.choice([*pools, text(rng)]), value(rng)))  # extra / duplicate
        elif r < 0.45:
            fields.append((rng.choice(list(pools)), deep(rng)))
        elif fields:
            i = rng.randrange(len(fields))
            key = fields[i][0]
            make = pools.get(key)
            fields[i] = (key, make() if make and rng.random() < 0.6 else value(rng))


def request_id(rng: random.Random, case: int) -> str:
    r = rng.random()
    if r < 0.35:
        return json.dumps(rng.choice(INJECTIONS), ensure_ascii=rng.random() < 0.5)
    if r < 0.55:
        return json.dumps(f"fuzz-{SEED}-{case}")   # valid and unique: no hand-off mix-ups
    if r < 0.7:
        return json.dumps("r" * rng.choice([256, 257, 10_000]))
    return value(rng)


def inference_body(rng: random.Random, chat: bool, case: int) -> bytes:
    if rng.random() < 0.08:
        return encode(rng.choice([deep(rng), value(rng), "", "null", "[]"]), rng)
    fields = [("model", '"default"'), ("max_tokens", str(rng.randrange(1, 5)))]
    fields.append(("messages", obj([("role", '"user"'), ("content", string(rng))]).join("[]"))
                  if chat else ("prompt", string(rng)))
    if rng.random() < 0.3:
        fields.append(("stream", "true"))
    if rng.random() < 0.4:
        fields.append(("request_id", request_id(rng, case)))
    pools: dict[str, Callable[[], str]] = {
        "messages": lambda: "[" + ",".join(
            obj([("role", string(rng)), ("content", value(rng))]) if rng.random() < 0.7
            else value(rng) for _ in range(rng.randrange(0, 4))) + "]",
        "prompt": lambda: rng.choice([string(rng), value(rng), "[1,2,3]", "[[1,2],[3]]"]),
        "max_tokens": lambda: rng.choice([*NUMBERS[:10], '"4"', "true", "null"]),
        "stream": lambda: rng.choice(["true", "false", '"true"', "1", "null"]),
        "request_id": lambda: request_id(rng, case),
        "extra_body": lambda: obj([("session_id", string(rng))]),
        "stream_options": lambda: obj([("include_usage", value(rng))]),
        "model": lambda: string(rng),
    }
    mutate(rng, fields, pools, rng.randrange(0, 4))
    return encode(obj(_bounded_generation(fields)), rng)


def _bounded_generation(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the instances' work small: a usable ``max_tokens`` above 8 becomes 4."""
    out = []
    for key, text_ in fields:
        if key in ("max_tokens", "max_completion_tokens"):
            try:
                if int(text_) > 8:
                    text_ = "4"
            except ValueError:
                pass
        out.append((key, text_))
    return out


def register_body(rng: random.Random, roles: list[str], dead_port: int) -> bytes:
    if rng.random() < 0.08:
        return encode(rng.choice([deep(rng), value(rng), "", "[]"]), rng)
    port = rng.choice([str(dead_port), json.dumps(str(dead_port))])
    fields = [("role", json.dumps(rng.choice(roles))), ("host_ip", '"127.0.0.1"'), ("port", port)]
    ports = [str(dead_port), "0", "-1", "65536", "99999", '"abc"', "80.0", "true", "null", '""',
             json.dumps(f"{dead_port}\r\n{MARK}: 1"), "1" + "0" * 400, '"\u0661\u0662"']
    pools: dict[str, Callable[[], str]] = {
        "role": lambda: rng.choice(['"mixed"', '"PREFILL"', '"decode"', "0", "1", "2", "3", "99",
                                    '""', "null", json.dumps("mi\r\nxed"), string(rng)]),
        "host_ip": lambda: json.dumps(rng.choice([
            "127.0.0.1", "localhost", "[::1]", "http://127.0.0.1", "https://127.0.0.1/",
            f"fe80::1%\r\n{MARK}: 1", f"127.0.0.1\r\n{MARK}: 1", "\u017f.example", "[127.0.0.1]",
            "fe80::1%eth0", "a" * 300, "", " ", "::ffff:127.0.0.1", text(rng)])),
        "port": lambda: rng.choice(ports),
        "metrics_port": lambda: rng.choice(ports),
        "connector_port": lambda: rng.choice(ports),
        "engine_worker_queue_port": lambda: rng.choice(ports),
        "rdma_ports": lambda: "[" + ",".join(rng.choice(ports) for _ in range(3)) + "]",
        "device_ids": lambda: rng.choice(['["0","1"]', "[0,1]", '"0,1"', "[1.5]", value(rng)]),
        "transfer_protocol": lambda: rng.choice(['["ipc","rdma"]', '["IPC"]', "[1]", value(rng)]),
        "tp_size": lambda: rng.choice(["1", "0", "-1", '"2"', "1.5", "1" + "0" * 400]),
        "is_paused": lambda: rng.choice(["true", "false", '"true"', "1"]),
        "version": lambda: string(rng),
        "connected_decodes": lambda: value(rng),
        "engine": lambda: rng.choice(['"vllm"', '"sglang"', '"FASTDEPLOY"', string(rng)]),
        "models": lambda: rng.choice(['["default"]', "[]", value(rng)]),
    }
    mutate(rng, fields, pools, rng.randrange(1, 4))
    return encode(obj(fields), rng)


@dataclass
class Raw:
    data: bytes
    #: seconds to wait for an answer before half-closing (the router may be waiting for more
    #: bytes, and may then close without one); None: complete, an answer must come
    patience: float | None = None
    head_only: bool = False   # a HEAD request: no body in the answer


def raw_request(rng: random.Random, case: int) -> Raw:
    """A request head mutated at the byte level (the body is a small valid completion)."""
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    method, path, version = b"POST", rng.choice([b"/v1/completions", b"/v1/chat/completions",
                                                 b"/health", b"/register"]), b"HTTP/1.1"
    headers = [(b"Host", b"router"), (b"Content-Type", b"application/json"),
               (b"Content-Length", str(len(body)).encode())]
    patience: float | None = None
    for _ in range(rng.randrange(0, 4)):
        r = rng.randrange(12)
        if r == 0:
            method = rng.choice([b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                                 b"CONNECT", b"PO ST", b"P\x00ST", b"G\xc3\xa9T", b"", b"X" * 300])
        elif r == 1:
            path = rng.choice([b"*", b"", b"/v1/completions?x=1&y=%00", b"/%2e%2e/register",
                               b"/v1/completions#frag", b"http://evil/v1/completions",
                               b"/v1/\xff\xfe", b"/a b", b"/" + b"a" * 70_000,
                               b"/v1/completions\x00", b"/health\r\n" + MARK.encode() + b": 1"])
        elif r == 2:
            version = rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1.1x", b"",
                                  b"http/1.1", b"HTTP/1"])
        elif r == 3:
            name = rng.choice([b"X-A\x00", b"X A", b"X-A:", b"", b"\xff", b"X-\x7f", b"(x)",
                               b"Content-Length ", b" Host"])
            headers.append((name, b"1"))
        elif r == 4:
            junk = rng.choice([b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b"\xff\xfe", b"\xc3\xa9",
                               b"a\r\n" + MARK.encode() + b": 1", b"\t", b" " * 8])
            headers.append((rng.choice([b"X-Test", b"Authorization", b"User-Agent"]),
                            b"v" + junk + b"v"))
        elif r == 5:
            headers.append((b"Content-Length", rng.choice([b"0", b"5", b"99", b"-1", b"abc",
                                                           b"1 2", b"99999999999999999999999"])))
            patience = PATIENCE_SECS
        elif r == 6:
            headers.append((b"Transfer-Encoding", rng.choice([b"chunked", b"gzip, chunked",
                                                              b"chunked, gzip", b"identity",
                                                              b"chunk\x00ed"])))
            patience = PATIENCE_SECS
        elif r == 7:
            headers = [h for h in headers if h[0] != b"Content-Length"]
            headers.append((b"Transfer-Encoding", b"chunked"))
            body = rng.choice([b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                               b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                               b"%x;ext=\x00\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                               b"ffffffffffffffffff\r\n" + body])
            if not body.endswith(b"0\r\n\r\n") or body.startswith(b"zz"):
                patience = PATIENCE_SECS
        elif r == 8:
            headers.append((b"Expect", rng.choice([b"100-continue", b"200-ok"])))
        elif r == 9:
            headers.append((b"X-Folded", b"a\r\n b"))          # obsolete line folding
        elif r == 10:
            headers.append((b"Connection", rng.choice([b"close", b"keep-alive, Upgrade",
                                                       b"Content-Length"])))
            if rng.random() < 0.5:
                headers.append((b"Upgrade", b"websocket"))
        else:
            headers.append((b"X-Big", b"v" * rng.choice([100, 70_000])))
    head = method + b" " + path + b" " + version + b"\r\n" + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    data = head + body
    if rng.random() < 0.1:
        data = data[: rng.randrange(0, len(head))]            # truncated head
        patience = 0.0
    elif rng.random() < 0.05:
        data = data.replace(b"\r\n", b"\n")                    # bare LF line endings
        patience = PATIENCE_SECS
    return Raw(data, patience, head_only=method == b"HEAD")


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    router: object
    roles: list[str]


def check(reply: Reply) -> None:
    """The invariants every answer must hold."""
    injected = [k for k, _ in reply.headers if k in FORBIDDEN]
    assert not injected, f"injected header(s) {injected} in {reply}"
    if reply.status >= 500 and reply.status not in (502, 503, 504):
        from_instance = any(k.startswith("x-router-") for k, _ in reply.headers)
        assert reply.status == 500 and from_instance and b"internal_error" not in reply.body, \
            f"router answered {reply.status}: {reply.body[:300]!r}"


async def send(host: str, port: int, raw: Raw) -> Reply | None:
    """One case on its own connection: read the answer; a request the router may still be
    waiting on is half-closed first, and then may end without an answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw.data)
        await writer.drain()
        if raw.patience is None:
            return await read_reply(reader, head_only=raw.head_only)
        if raw.patience:
            try:
                return await read_reply(reader, head_only=raw.head_only, head_secs=raw.patience)
            except TimeoutError:
                pass    # no head yet (nothing consumed): half-close and read on
        writer.write_eof()
        try:
            return await read_reply(reader, head_only=raw.head_only)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            return None   # the client left first: a cut answer is no fault
    finally:
        writer.transport.abort()


def post(path: str, body: bytes) -> Raw:
    return Raw(b"POST %s HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body),
                                                                        body))


async def instance_count(router) -> int:
    """Instances the router knows (``GET /registered``, every list)."""
    async with aiohttp.ClientSession() as s, s.get(router.url + "/registered") as r:
        body = await r.json()
    return sum(len(body[k]) for k in ("prefill", "decode", "mixed", "unavailable"))


async def healthy(router) -> None:
    reply = await send(router.host, router.port, Raw(b"GET /health HTTP/1.1\r\nHost: r\r\n"
                                                     b"Connection: close\r\n\r\n"))
    assert reply is not None and reply.status == 200, f"/health: {reply}"


def cases(rng: random.Random, target: Target, dead_port: int) -> list[tuple[str, Raw]]:
    out: list[tuple[str, Raw]] = []
    for _ in range(CASES["register"]):
        out.append(("register", post("/register", register_body(rng, target.roles, dead_port))))
    for i in range(CASES["inference"]):
        chat = i % 2 == 0
        path = "/v1/chat/completions" if chat else "/v1/completions"
        out.append((path, post(path, inference_body(rng, chat, i))))
    for i in range(CASES["raw"]):
        out.append(("raw", raw_request(rng, i)))
    rng.shuffle(out)
    return out


async def run(target: Target, dead_port: int) -> None:
    router = target.router
    pid = router.proc.pid
    rng = random.Random(f"{SEED}-{target.name}")
    plan = cases(rng, target, dead_port)
    await healthy(router)
    # the starting count: with pooled instance connections and a metrics scrape round done
    warm = await send(router.host, router.port, post("/v1/completions", WARM_UP))
    assert warm is not None and warm.status == 200, warm
    await asyncio.sleep(2.5)
    before = open_fds(pid)
    known = await instance_count(router)
    for start in range(0, len(plan), BATCH):
        for n, (kind, raw) in enumerate(plan[start:start + BATCH], start):
            where = (f"seed {SEED}, {target.name} case #{n} ({kind}): {raw.data[:600]!r}"
                     f"{'...' if len(raw.data) > 600 else ''}")
            try:
                reply = await send(router.host, router.port, raw)
                if reply is not None:
                    check(reply)
            except (AssertionError, Malformed, TimeoutError, OSError) as e:
                pytest.fail(f"{where}\n-> {type(e).__name__}: {e}")
        try:
            await healthy(router)
        except (AssertionError, TimeoutError, OSError) as e:
            pytest.fail(f"seed {SEED}, {target.name}: router unhealthy after cases "
                        f"{start}..{start + BATCH - 1}: {e!r}")

    # a fuzzed registration that was valid added an instance, which the control plane keeps
    # probing and scraping over keep-alive connections: up to two descriptors each
    added = max(0, await instance_count(router) - known)

    async def settled() -> bool:
        return open_fds(pid) <= before + FD_SLACK + 2 * added

    try:   # at once, or once the connections pooled meanwhile were idle long enough
        await wait_for(settled, SETTLE_SECS, interval=0.5)
    except TimeoutError:
        pytest.fail(f"seed {SEED}, {target.name}: router fds {before} -> {open_fds(pid)} "
                    f"({added} instances registered by the fuzz)")
    log = router.log()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


@bounded(120)
async def test_fuzz_mixed_and_pd_routers(router_factory, sims):
    mixed = await router_factory(CONFIG)
    pd = await router_factory(CONFIG, "--splitwise")
    a, b = await sims(2, **SIM)
    (p,) = await sims(1, role="prefill", **SIM)
    (d,) = await sims(1, role="decode", **SIM)
    await register_all(mixed, a, b)
    await register_all(pd, p, d)
    # registrations name a bound port nothing listens on: every probe is refused at once, and
    # no fuzzed registration can point the routers at anything else on this machine
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        dead_port = dead.getsockname()[1]
        async with asyncio.TaskGroup() as both:    # the two routers at once
            both.create_task(run(Target("mixed", mixed, ["mixed"]), dead_port))
            both.create_task(run(Target("pd", pd, ["prefill", "decode"]), dead_port))
    finally:
        dead.close()


# --- what the PD descriptor check found --------------------------------------------------------
# A fuzzed body both PD legs reject makes the prefill and the decode answer 400 at the same
# moment: the prefill's answer cancels the decode leg just as the decode's answer arrives. The
# pool handed that connection to a coroutine that was already cancelled (or cancelled it before
# it resumed), so nobody closed it: one descriptor per such request, for as long as the
# instance kept the connection open.

ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
          b"Content-Length: 2\r\n\r\n{}")


async def cancel_as_answered(cancel_first: bool) -> None:
    """``UpstreamPool.open`` cancelled in the loop iteration its answer arrives in: before the
    answer is handed over (``cancel_first``) or after, before the coroutine resumed. The
    instance must see the connection closed."""
    loop = asyncio.get_running_loop()
    opening: list[asyncio.Task] = []
    closed = loop.create_future()

    class Instance(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(ANSWER)   # sent now: readable at the pool's next poll
            cancel = opening[0].cancel
            # a callback queued now runs in the next iteration before that poll's reads; one it
            # queues runs after them
            loop.call_soon(cancel if cancel_first else partial(loop.call_soon, cancel))

        def connection_lost(self, exc: Exception | None) -> None:
            if not closed.done():
                closed.set_result(None)

    server = await loop.create_server(Instance, "127.0.0.1", 0)
    pool = UpstreamPool(2, 5, 5)
    try:
        target = UpstreamTarget("127.0.0.1", server.sockets[0].getsockname()[1])
        opening.append(asyncio.ensure_future(pool.open(target, b"GET / HTTP/1.1\r\n\r\n")))
        with pytest.raises(asyncio.CancelledError):
            await opening[0]
        try:
            await asyncio.wait_for(closed, 3)
        except TimeoutError:
            pytest.fail(f"the cancelled exchange's connection is still open "
                        f"({len(pool._live)} live)")
    finally:
        pool.close()
        server.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-first", "answer-first"])
def test_open_cancelled_as_its_answer_arrives_closes_the_connection(loop: str,
                                                                    cancel_first: bool) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(asyncio.wait_for(cancel_as_answered(cancel_first), 30))
    else:
        asyncio.run(asyncio.wait_for(cancel_as_answered(cancel_first), 30))
