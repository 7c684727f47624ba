"""The control-plane side of the engine seam (``kvrouter.backends.engines``): each engine's
``/metrics`` names mapped onto the snapshot, its tokenize and abort endpoints, its usage fields;
and the scraper and remote tokenizer reading them from the table."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from kvrouter.backends.engines import (
    DEFAULT_ENGINE,
    ENGINES,
    FASTDEPLOY,
    parse_metrics,
)
from kvrouter.backends.snapshot import MetricsSnapshot
from kvrouter.config import SchedulerConfig
from kvrouter.control.scraper import MetricsScraper
from kvrouter.instance import InstanceInfo, Role
from kvrouter.metrics import RouterMetrics
from kvrouter.prefix.tokenizer import (
    RemoteTokenizer,
    TokenizerError,
    make_tokenizer,
    normalize_tokenizer_url,
    tokenize_api,
)
from kvrouter.registry import Registry

FASTDEPLOY_PAGE = """\
# HELP fastdeploy:num_requests_running Number of requests currently running
# TYPE fastdeploy:num_requests_running gauge
fastdeploy:num_requests_running 3.0
fastdeploy:num_requests_waiting 1.0
fastdeploy:available_gpu_block_num 1234.0
fastdeploy:max_batch_size 64.0
fastdeploy:gpu_cache_usage_perc 0.25
fastdeploy:request_prompt_tokens_bucket{le="128.0"} 7.0
"""

VLLM_PAGE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 896.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny"} 3.0
"""

SGLANG_PAGE = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 5.0
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 0.0
sglang:token_usage{model_name="m",tp_rank="0"} 0.125
sglang:cache_hit_rate{model_name="m",tp_rank="0"} 0.8
"""

LLAMA_CPP_PAGE = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6000
llamacpp:prompt_tokens_cached_total 4500
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""


def test_table_is_keyed_by_name_and_fastdeploy_is_the_default():
    assert DEFAULT_ENGINE == "fastdeploy" and ENGINES[DEFAULT_ENGINE] is FASTDEPLOY
    assert set(ENGINES) == {"fastdeploy", "vllm", "sglang", "llamacpp", "llama-cpp-python",
                            "openai"}
    assert all(name == e.name for name, e in ENGINES.items())


def test_fastdeploy_mapping():
    assert parse_metrics(FASTDEPLOY_PAGE, 12.5, FASTDEPLOY) == MetricsSnapshot(
        running=3.0, waiting=1.0, taken_at=12.5, available_gpu_block_num=1234.0,
        max_batch_size=64.0, gpu_cache_usage_perc=0.25)
    # the default engine is FastDeploy; older releases' bare block count is read too
    s = parse_metrics("fastdeploy:num_requests_running 0\nfastdeploy:num_requests_waiting 0\n"
                      "available_gpu_block_num 5\n", 0.0)
    assert s is not None and s.available_gpu_block_num == 5.0


@pytest.mark.parametrize("engine, page, want", [
    ("vllm", VLLM_PAGE, (3.0, 4.0, None, None, 0.5)),
    ("sglang", SGLANG_PAGE, (5.0, 0.0, None, None, 0.125)),
    ("llamacpp", LLAMA_CPP_PAGE, (4.0, 2.0, None, None, None)),
])
def test_other_engines_mappings(engine, page, want):
    s = parse_metrics(page, 1.0, ENGINES[engine])
    assert s is not None
    assert (s.running, s.waiting, s.available_gpu_block_num, s.max_batch_size,
            s.gpu_cache_usage_perc) == want
    assert s.taken_at == 1.0
    # an engine's names are its own: FastDeploy's mapping finds nothing on this page
    assert parse_metrics(page, 1.0, FASTDEPLOY) is None
    assert parse_metrics(FASTDEPLOY_PAGE, 1.0, ENGINES[engine]) is None


def test_vllm_old_kv_usage_name_and_engines_without_metrics():
    page = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n" \
           "vllm:gpu_cache_usage_perc 0.75\n"
    s = parse_metrics(page, 0.0, ENGINES["vllm"])
    assert s is not None and s.gpu_cache_usage_perc == 0.75
    for name in ("openai", "llama-cpp-python"):
        assert ENGINES[name].metrics is None
        assert parse_metrics(FASTDEPLOY_PAGE, 0.0, ENGINES[name]) is None


class _FakeTransport:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.urls: list[str] = []

    async def get(self, url: str, timeout: float, *_args, **_kw) -> tuple[int, bytes]:
        self.urls.append(url)
        return 200, self.body


async def test_scraper_reads_the_engines_names():
    reg = Registry(stale_after=30.0)
    inst = reg.add(InstanceInfo(role=Role.MIXED, host="127.0.0.1", scheme="http", port="9"))
    transport = _FakeTransport(FASTDEPLOY_PAGE.encode())
    scraper = MetricsScraper(reg, transport, 1.0, 1.0, RouterMetrics())
    assert scraper.engine_for(inst) is FASTDEPLOY
    await scraper.scrape(inst)
    assert inst.snapshot is not None and inst.snapshot.running == 3.0
    assert transport.urls == ["http://127.0.0.1:9/metrics"]

    # an instance of an engine without /metrics is never scraped
    scraper.engine_for = lambda _inst: ENGINES["openai"]
    inst.snapshot = None
    await scraper.scrape(inst)
    assert inst.snapshot is None and len(transport.urls) == 1


# ------------------------------------------------------------------------------- tokenizers
def test_fastdeploy_tokenize_shape():
    api = FASTDEPLOY.tokenize
    assert api is not None and api.path == "/tokenize"
    assert orjson.loads(api.request_body("a b")) == {"text": "a b", "prompt": "a b",
                                                      "message": "a b"}
    assert api.tokens({"input_ids": [1, 2, 3]}) == [1, 2, 3]
    for bad in ({"input_ids": []}, {"input_ids": ["a"]}, {"input_ids": [1, True]},
                {"tokens": [1]}, [1, 2], None):
        assert api.tokens(bad) is None


@pytest.mark.parametrize("engine, path, body, answer", [
    ("vllm", "/tokenize", {"prompt": "hi"}, {"tokens": [7, 8], "count": 2, "max_model_len": 9}),
    ("sglang", "/tokenize", {"prompt": "hi"}, {"tokens": [7, 8], "count": 2}),
    ("llamacpp", "/tokenize", {"content": "hi"}, {"tokens": [7, 8]}),
    ("llama-cpp-python", "/extras/tokenize", {"input": "hi"}, {"tokens": [7, 8]}),
])
def test_other_tokenize_shapes(engine, path, body, answer):
    api = ENGINES[engine].tokenize
    assert api is not None and api.path == path
    assert orjson.loads(api.request_body("hi")) == body
    assert api.tokens(answer) == [7, 8]


def test_tokenizer_url_default_path_follows_the_engine():
    assert normalize_tokenizer_url("h:1") == "http://h:1/tokenize"
    assert normalize_tokenizer_url("h:1/", "/extras/tokenize") == "http://h:1/extras/tokenize"
    assert normalize_tokenizer_url("h:1/own", "/extras/tokenize") == "http://h:1/own"
    with pytest.raises(TokenizerError):
        tokenize_api("openai")
    with pytest.raises(TokenizerError):
        make_tokenizer(SchedulerConfig(tokenizer_url="h:1"), engine="openai")


async def test_remote_tokenizer_speaks_the_engines_protocol():
    received: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"tokens": [5, 6, 7]})

    app = web.Application()
    app.router.add_post("/tokenize", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            cfg = SchedulerConfig(tokenizer_url=f"127.0.0.1:{port}", tokenizer_timeout_secs=2)
            tok = make_tokenizer(cfg, lambda: session, engine="llamacpp")
            assert isinstance(tok, RemoteTokenizer)
            assert await tok.tokens_for("hello") == ([5, 6, 7], True)
            assert received == [{"content": "hello"}]
            # the default (FastDeploy) protocol wants input_ids: this answer is a failure
            fd = RemoteTokenizer(f"127.0.0.1:{port}", 2, lambda: session)
            assert await fd.tokens_for("ab") == ([97, 98], False)
            assert received[-1] == {"text": "ab", "prompt": "ab", "message": "ab"}
            assert fd.failures == 1
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------ abort and usage
def test_abort_endpoints():
    fd = FASTDEPLOY.abort
    assert fd is not None and fd.path == "/v1/abort_requests"
    assert fd.bodies(["a", "b"]) == [{"req_ids": ["a", "b"]}]
    assert fd.bodies([], abort_all=True) == [{"abort_all": True}]
    vllm = ENGINES["vllm"].abort
    assert vllm is not None and vllm.path == "/inference/v1/abort_requests"
    assert vllm.bodies(["a"]) == [{"request_ids": ["a"]}]
    assert vllm.bodies([], abort_all=True) == []      # vLLM cannot abort everything
    sgl = ENGINES["sglang"].abort
    assert sgl is not None and sgl.path == "/abort_request"
    assert sgl.bodies(["a", "b"]) == [{"rid": "a"}, {"rid": "b"}]
    assert sgl.bodies([], abort_all=True) == [{"abort_all": True}]
    for name in ("llamacpp", "llama-cpp-python", "openai"):
        assert ENGINES[name].abort is None


def test_stream_usage_per_engine():
    """Who is asked for stream usage (the engines that add only the usage event for it), who
    says it in ``timings``, and who is left alone."""
    asked = {n for n, e in ENGINES.items() if e.usage.ask}
    assert asked == {"fastdeploy", "vllm", "sglang"}
    assert {n for n, e in ENGINES.items() if e.usage.timings} == {"llamacpp"}
