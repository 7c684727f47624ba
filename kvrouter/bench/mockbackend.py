"""A near-zero-cost mock inference backend for the router-overhead benchmark (uvloop + httptools).

One process listens on several ports (one "instance" each) and answers ``GET /health`` (200),
``GET /v1/models``, ``GET /metrics`` (FastDeploy gauges at 0), the probes the peer routers send
(SGLang's ``/server_info``, ``/model_info``, ``/get_load``, ``/health_generate``; vLLM's
``/v1/{chat/}completions/render`` and ``/tokenize``) and ``POST /v1/chat/completions`` /
``/v1/completions``:

* non-stream → a small chat completion JSON with ``usage`` and a ``Content-Length``;
* ``"stream": true`` → ``text/event-stream``, chunked, ``max_tokens`` events (default
  ``--chunks``) plus ``data: [DONE]``, one HTTP chunk and one ``write()`` per event. Events are
  paced by one shared ticker per delay (``mock_delay_ms`` in the body, else ``--delay-ms``),
  like an engine emitting one token per running sequence per step; the first event is written
  at once, the last one together with ``[DONE]``.

usage: python -m kvrouter.bench.mockbackend --ports 18101,18102 [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

import httptools
import orjson

NONSTREAM = orjson.dumps({
    "id": "chatcmpl-mock", "object": "chat.completion", "created": 1700000000, "model": "mock",
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Hello! This is a mock reply."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16,
              "prompt_tokens_details": {"cached_tokens": 0}}})
MODELS = orjson.dumps({"object": "list", "data": [{"id": "mock", "object": "model",
                                                    "created": 1700000000, "owned_by": "mock"}]})
METRICS = (b"fastdeploy:num_requests_running 0.0\nfastdeploy:num_requests_waiting 0.0\n"
           b"available_gpu_block_num 1000.0\n")
EVENT = b"data: " + orjson.dumps({
    "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000,
    "model": "mock", "choices": [{"index": 0, "delta": {"content": " tok"},
                                  "finish_reason": None}]}) + b"\n\n"
EVENT_CHUNK = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
DONE_CHUNK = b"%x\r\n%b\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def _reply(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


R_NONSTREAM = _reply(b"200 OK", b"application/json", NONSTREAM)
R_HEALTH = _reply(b"200 OK", b"application/json", b"{}")
R_MODELS = _reply(b"200 OK", b"application/json", MODELS)
R_METRICS = _reply(b"200 OK", b"text/plain; version=0.0.4", METRICS)
R_404 = _reply(b"404 Not Found", b"application/json", b'{"error":"not found"}')
R_SERVER_INFO = _reply(b"200 OK", b"application/json", orjson.dumps({
    "model_path": "mock", "served_model_name": "mock", "tokenizer_path": None, "dp_size": 1,
    "tp_size": 1, "disaggregation_mode": "null", "disaggregation_bootstrap_port": None,
    "max_model_len": 32768, "version": "mock"}))
R_MODEL_INFO = _reply(b"200 OK", b"application/json", orjson.dumps({
    "model_path": "mock", "tokenizer_path": None, "is_generation": True, "model_type": "mock",
    "architectures": ["MockForCausalLM"]}))
R_LOAD = _reply(b"200 OK", b"application/json",
                b'[{"dp_rank":0,"num_reqs":0,"num_waiting_reqs":0,"num_tokens":0}]')
R_RENDER = _reply(b"200 OK", b"application/json",
                  b'{"token_ids":[1,2,3,4,5,6,7,8],"count":8,"max_model_len":32768}')
R_TOKENIZE = _reply(b"200 OK", b"application/json",
                    b'{"tokens":[1,2,3,4,5,6,7,8],"count":8,"max_model_len":32768}')
GET_ROUTES = {b"/health": R_HEALTH, b"/health_generate": R_HEALTH, b"/v1/models": R_MODELS,
              b"/metrics": R_METRICS, b"/server_info": R_SERVER_INFO,
              b"/get_server_info": R_SERVER_INFO, b"/model_info": R_MODEL_INFO,
              b"/get_model_info": R_MODEL_INFO, b"/get_load": R_LOAD}
POST_ROUTES = {b"/v1/completions/render": R_RENDER, b"/v1/chat/completions/render": R_RENDER,
               b"/tokenize": R_TOKENIZE}
DEFAULT_DELAY = 0.02
DEFAULT_CHUNKS = 50


class Ticker:
    """Writes one event to every active stream per tick."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active: list[list] = []
        self.wake = asyncio.Event()
        asyncio.get_running_loop().create_task(self.run())

    def add(self, proto: Mock, n: int) -> None:
        self.active.append([proto, n])
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while True:
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                nxt = loop.time()
            nxt += self.delay
            d = nxt - loop.time()
            if d < -0.5:          # hopelessly behind: resync instead of bursting
                nxt, d = loop.time(), 0
            await asyncio.sleep(max(d, 0))
            still = []
            for st in self.active:
                proto = st[0]
                if proto.closed:
                    continue
                st[1] -= 1
                if st[1] <= 0:
                    proto.transport.write(EVENT_CHUNK + DONE_CHUNK)
                    proto.done()
                else:
                    proto.transport.write(EVENT_CHUNK)
                    still.append(st)
            self.active = still


TICKERS: dict[float, Ticker] = {}


class Mock(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.busy = False
        self.pending: list[tuple[bytes, bytes, bytes]] = []
        self.url = b""
        self.body: list[bytes] = []
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.pending.append((self.parser.get_method(), self.url.split(b"?")[0],
                             b"".join(self.body)))
        if not self.busy:
            self.process()

    def done(self) -> None:
        self.busy = False
        self.process()

    def process(self) -> None:
        while self.pending and not self.busy and not self.closed:
            method, path, body = self.pending.pop(0)
            if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
                try:
                    req = orjson.loads(body) if body else {}
                except orjson.JSONDecodeError:
                    req = {}
                if req.get("stream") is True:
                    n = int(req.get("max_tokens") or DEFAULT_CHUNKS)
                    delay = req.get("mock_delay_ms")
                    delay = DEFAULT_DELAY if delay is None else float(delay) / 1000.0
                    self.transport.write(STREAM_HEAD + EVENT_CHUNK)
                    if n <= 1:
                        self.transport.write(DONE_CHUNK)
                        continue
                    self.busy = True
                    tk = TICKERS.get(delay)
                    if tk is None:
                        tk = TICKERS[delay] = Ticker(delay)
                    tk.add(self, n - 1)
                else:
                    self.transport.write(R_NONSTREAM)
            else:
                routes = POST_ROUTES if method == b"POST" else GET_ROUTES
                self.transport.write(routes.get(path, R_404))


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for p in ports:
        await loop.create_server(Mock, "127.0.0.1", p, backlog=4096, reuse_port=True)
    print("mock backend listening on", ports, flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    global DEFAULT_DELAY, DEFAULT_CHUNKS
    ap = argparse.ArgumentParser(prog="python -m kvrouter.bench.mockbackend",
                                 description="Fast mock inference backend (loopback only).")
    ap.add_argument("--ports", default="18101,18102", help="comma list of ports (127.0.0.1)")
    ap.add_argument("--delay-ms", type=float, default=20.0,
                    help="interval between stream events when the body has no mock_delay_ms")
    ap.add_argument("--chunks", type=int, default=50,
                    help="stream events when the body has no max_tokens")
    a = ap.parse_args(argv)
    DEFAULT_DELAY = a.delay_ms / 1000.0
    DEFAULT_CHUNKS = max(1, a.chunks)
    ports = [int(x) for x in a.ports.split(",") if x]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(ports))
    else:
        uvloop.run(serve(ports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
