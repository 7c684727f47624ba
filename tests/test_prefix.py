"""Prefix machinery: rendering, tokenizers, block hashes, the prefix index
(docs/fastdeploy.md#cache-aware-routing)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import subprocess
import sys
from collections import OrderedDict

import aiohttp
import numpy as np
import pytest
import xxhash
from aiohttp import web

from kvrouter.config import SchedulerConfig
from kvrouter.prefix.hashing import H0, HashList, block_hashes, text_block_hashes
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.render import extract_session_id, render_prompt
from kvrouter.prefix.tokenizer import (
    CodePointTokenizer,
    LocalTokenizer,
    RemoteTokenizer,
    TokenizerError,
    code_points,
    make_tokenizer,
    normalize_tokenizer_url,
)
from kvrouter.prefix.view import build_request_view

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# --------------------------------------------------------------------------- rendering
def test_render_chat_roles_and_newlines():
    body = {"messages": [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " hi\n"}]}
    assert render_prompt(body, CHAT) == "system:Be brief. \nuser: hi\n\n"


def test_render_chat_role_is_part_of_key():
    a = render_prompt({"messages": [{"role": "user", "content": "X"}]}, CHAT)
    b = render_prompt({"messages": [{"role": "system", "content": "X"}]}, CHAT)
    assert a != b and a == "user:X\n" and b == "system:X\n"


def test_render_chat_tools_canonical_json():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": "é"}}}]
    body = {"tools": tools, "messages": [{"role": "user", "content": "q"}]}
    expected_tools = json.dumps(tools, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert render_prompt(body, CHAT) == f"tools:{expected_tools}\nuser:q\n"
    # key order in the body does not matter
    tools2 = [{"function": {"parameters": {"a": "é", "b": 1}, "name": "f"}, "type": "function"}]
    assert render_prompt({"tools": tools2, "messages": body["messages"]}, CHAT) == render_prompt(body, CHAT)


def test_render_chat_parts_and_attachments():
    url = "https://example.com/cat.png"
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look "},
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": " here"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            }
        ]
    }
    img = hashlib.sha256(url.encode()).hexdigest()[:16]
    aud = hashlib.sha256(b"AAAA").hexdigest()[:16]
    assert render_prompt(body, CHAT) == f"user:look <image_url:{img}> here<input_audio:{aud}>\n"
    # a different image gives a different key
    body2 = json.loads(json.dumps(body))
    body2["messages"][0]["content"][1]["image_url"]["url"] = url + "?v=2"
    assert render_prompt(body2, CHAT) != render_prompt(body, CHAT)


def test_render_chat_tool_calls_and_null_content():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    }
    canon = json.dumps(calls, sort_keys=True, separators=(",", ":"))
    assert render_prompt(body, CHAT) == f"user:q\nassistant:{canon}\ntool:42\n"


def test_render_chat_missing_messages():
    assert render_prompt({}, CHAT) == ""
    assert render_prompt({"messages": "nope"}, CHAT) == ""


def test_render_completions():
    assert render_prompt({"prompt": "  abc "}, COMPLETIONS) == "  abc "
    assert render_prompt({"prompt": ["first", "second"]}, COMPLETIONS) == "first"
    assert render_prompt({"prompt": [1, 2, 3]}, COMPLETIONS) == [1, 2, 3]
    assert render_prompt({"prompt": [[4, 5], [6]]}, COMPLETIONS) == [4, 5]
    assert render_prompt({"prompt": []}, COMPLETIONS) == ""
    assert render_prompt({}, COMPLETIONS) == ""
    assert render_prompt({"prompt": "x", "prompt_token_ids": [7, 8]}, COMPLETIONS) == [7, 8]
    assert render_prompt({"prompt_token_ids": [[9, 10]]}, COMPLETIONS) == [9, 10]
    # booleans are not token ids
    assert render_prompt({"prompt": "x", "prompt_token_ids": [True]}, COMPLETIONS) == "x"
    assert render_prompt({"messages": [], "prompt_token_ids": [1]}, CHAT) == [1]


def test_extract_session_id():
    assert extract_session_id({"session_id": "s1"}) == "s1"
    assert extract_session_id({"session_id": "", "extra_body": {"session_id": "s2"}}) == "s2"
    assert extract_session_id({"session_id": 5, "extra_body": {"session_id": "s3"}}) == "s3"
    assert extract_session_id({"extra_body": {"session_id": ""}}) is None
    assert extract_session_id({"extra_body": "x"}) is None
    assert extract_session_id({}) is None


# --------------------------------------------------------------------------- hashing
def _reference_hashes(tokens, block_size):
    """Direct transcription of the block hash (docs/fastdeploy.md#cache-aware-routing):
    h_i = H64(le64(h_{i-1}) ‖ le64(tokens of block i)), with H64 = XXH3-64 byte-swapped (its
    big-endian digest read little-endian)."""
    h = H0
    out = []
    for b in range(len(tokens) // block_size):
        msg = struct.pack("<Q", h) + b"".join(
            struct.pack("<Q", t % 2**64) for t in tokens[b * block_size : (b + 1) * block_size]
        )
        h = struct.unpack(">Q", struct.pack("<Q", xxhash.xxh3_64_intdigest(msg)))[0]
        out.append(h)
    return out


def test_h0_is_fixed():
    assert H0 == int.from_bytes(b"kvrouter", "little")


@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_block_hashes_match_reference(block_size):
    rng = random.Random(7)
    tokens = [rng.randrange(0, 200_000) for _ in range(1000)]
    assert block_hashes(tokens, block_size) == _reference_hashes(tokens, block_size)


def test_block_hashes_full_blocks_only_and_chained():
    assert block_hashes([1, 2, 3], 4) == []
    assert block_hashes([], 4) == []
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    # a different first block changes every later hash (chained prefix identity)
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]
    # negative / huge ids are reduced modulo 2**64
    assert block_hashes([-1, 2**64 + 5], 2) == _reference_hashes([-1, 2**64 + 5], 2)
    with pytest.raises(ValueError):
        block_hashes([1], 0)


def printed_by_another_process(code: str, hash_seed: str) -> str:
    """What ``code`` prints in a new interpreter with its own ``PYTHONHASHSEED``."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": hash_seed},
    ).stdout.strip()


def test_block_hashes_stable_across_processes():
    out = printed_by_another_process("from kvrouter.prefix.hashing import block_hashes;"
                                     "print(block_hashes(list(range(100)), 8))", "123")
    assert out == str(block_hashes(list(range(100)), 8))


# --------------------------------------------------------------------------- index
def test_index_match_leading_blocks():
    idx = PrefixIndex(1000, 0)
    idx.record([1, 2, 3, 4], "a:1", 1.0)
    idx.record([1, 2], "b:1", 1.0)
    assert idx.match([1, 2, 3, 4], ["a:1", "b:1", "c:1"]) == {"a:1": 4, "b:1": 2, "c:1": 0}
    # chained hashes: after a divergence every later hash differs too
    assert idx.match([1, 2, 9, 10], ["a:1"]) == {"a:1": 2}
    assert idx.match([9, 2, 3], ["a:1"]) == {"a:1": 0}
    assert idx.match([], ["a:1"]) == {"a:1": 0}
    assert idx.match([1, 2, 3, 4, 5, 6, 7], ["a:1"]) == {"a:1": 4}
    assert idx.size == 6


def test_index_lookup_does_not_refresh():
    idx = PrefixIndex(1000, 10)
    idx.record([1, 2], "a:1", 0.0)
    for t in range(5):
        idx.match([1, 2], ["a:1"])
    assert idx.sweep(10.5) == 2
    assert idx.match([1, 2], ["a:1"]) == {"a:1": 0}


def test_index_ttl_sweep():
    idx = PrefixIndex(1000, 60)
    idx.record([1, 2, 3], "a:1", 0.0)
    idx.record([1, 2], "b:1", 30.0)
    idx.record([1], "a:1", 50.0)          # refreshes a's first block only
    assert idx.sweep(60.0) == 0           # exactly TTL old is kept
    assert idx.sweep(70.0) == 2           # a's blocks 2, 3 (recorded at 0)
    assert idx.match([1, 2, 3], ["a:1", "b:1"]) == {"a:1": 1, "b:1": 2}
    assert idx.sweep(95.0) == 2
    assert idx.sweep(111.0) == 1
    assert idx.size == 0
    assert idx.evictions["ttl"] == 5


def test_index_ttl_zero_never_expires():
    idx = PrefixIndex(1000, 0)
    idx.record([1, 2], "a:1", 0.0)
    assert idx.sweep(1e12) == 0
    assert idx.size == 2


def test_index_capacity_lru_deepest_first():
    idx = PrefixIndex(5, 0)
    idx.record([1, 2, 3], "a:1", 1.0)     # order: 3, 2, 1
    idx.record([1, 7, 8], "b:1", 2.0)     # 6 entries → evict a's deepest (3)
    assert idx.size == 5
    assert idx.evictions["capacity"] == 1
    assert idx.match([1, 2, 3], ["a:1"]) == {"a:1": 2}
    idx.record([1], "a:1", 3.0)           # refresh the shared root; a:2 is now the oldest
    idx.record([9], "c:1", 4.0)
    assert idx.match([1, 2, 3], ["a:1"]) == {"a:1": 1}
    assert idx.match([1, 7, 8], ["b:1"]) == {"b:1": 3}
    # one call larger than the cap keeps its shallowest blocks
    idx2 = PrefixIndex(3, 0)
    idx2.record(list(range(100, 110)), "a:1", 1.0)
    assert idx2.size == 3
    assert idx2.match(list(range(100, 110)), ["a:1"]) == {"a:1": 3}


def test_index_cap_never_exceeded_and_match_is_prefix_exact():
    rng = random.Random(3)
    idx = PrefixIndex(1000, 0)
    shared = [rng.getrandbits(64) for _ in range(20)]
    chains = []
    for i in range(3000):
        chain = shared[: rng.randrange(0, 21)] + [rng.getrandbits(64) for _ in range(rng.randrange(1, 30))]
        chains.append(chain)
        idx.record(chain, f"i{i % 4}:1", float(i))
        assert idx.size <= 1000
    # binary-search match equals a linear scan of the entries
    for chain in chains[-200:]:
        for ident in ("i0:1", "i1:1", "i2:1", "i3:1"):
            linear = 0
            for h in chain:
                if idx.holds(h, ident):
                    linear += 1
                else:
                    break
            assert idx.match(chain, [ident])[ident] == linear
    assert idx.evictions["capacity"] > 0


def test_index_remove_instance():
    idx = PrefixIndex(100, 0)
    idx.record([1, 2, 3], "a:1", 1.0)
    idx.record([1, 2], "b:1", 1.0)
    assert idx.instance_blocks("a:1") == 3
    assert idx.remove_instance("a:1") == 3
    assert idx.remove_instance("zz:1") == 0
    assert idx.match([1, 2, 3], ["a:1", "b:1"]) == {"a:1": 0, "b:1": 2}
    assert idx.size == 2
    assert idx.evictions == {"ttl": 0, "capacity": 0, "instance_removed": 3}


# --------------------------------------------------------------------------- tokenizers
def test_code_points():
    s = "aé😀\n"
    assert code_points(s) == [ord(c) for c in s]
    assert code_points("") == []


async def test_code_point_tokenizer():
    tok = CodePointTokenizer()
    assert not tok.real
    assert await tok.tokens_for("ab😀") == ([97, 98, 0x1F600], False)
    assert await tok.tokens_for([5, 6]) == ([5, 6], True)


def _write_word_tokenizer(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "[CLS]": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 3)])
    tok.save(str(path))


async def test_local_tokenizer(tmp_path):
    p = tmp_path / "tokenizer.json"
    _write_word_tokenizer(p)
    tok = make_tokenizer(SchedulerConfig(tokenizer_path=str(p), tokenizer_url="http://ignored"))
    assert isinstance(tok, LocalTokenizer) and tok.real
    # no special tokens ([CLS]) added
    assert await tok.tokens_for("hello world zzz") == ([1, 2, 0], True)
    with pytest.raises(TokenizerError):
        LocalTokenizer(str(tmp_path / "missing.json"))


def test_normalize_tokenizer_url():
    assert normalize_tokenizer_url("10.0.0.1:8000") == "http://10.0.0.1:8000/tokenize"
    assert normalize_tokenizer_url("http://h:1/") == "http://h:1/tokenize"
    assert normalize_tokenizer_url("https://h:1/api/tok") == "https://h:1/api/tok"
    assert normalize_tokenizer_url("h:1/x?y=1") == "http://h:1/x?y=1"


class FakeTokenizerServer:
    def __init__(self):
        self.received: list[dict] = []
        self.mode = "ok"

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        if self.mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "empty":
            return web.json_response({"input_ids": []})
        if self.mode == "strings":
            return web.json_response({"input_ids": ["a"]})
        if self.mode == "notjson":
            return web.Response(text="hi")
        return web.json_response({"input_ids": [11, 12, 13]})


@pytest.fixture
async def fake_tokenizer():
    fake = FakeTokenizerServer()
    app = web.Application()
    app.router.add_post("/tokenize", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    fake.port = port
    yield fake
    await runner.cleanup()


async def test_remote_tokenizer_success_and_failures(fake_tokenizer, caplog):
    async with aiohttp.ClientSession() as session:
        cfg = SchedulerConfig(tokenizer_url=f"127.0.0.1:{fake_tokenizer.port}", tokenizer_timeout_secs=2)
        tok = make_tokenizer(cfg, lambda: session)
        assert isinstance(tok, RemoteTokenizer)
        assert tok.url == f"http://127.0.0.1:{fake_tokenizer.port}/tokenize"
        assert await tok.tokens_for("user:hi\n") == ([11, 12, 13], True)
        assert fake_tokenizer.received[-1] == {"text": "user:hi\n", "prompt": "user:hi\n", "message": "user:hi\n"}

        caplog.set_level(logging.WARNING, logger="kvrouter.tokenizer")
        for mode in ("500", "empty", "strings", "notjson"):
            fake_tokenizer.mode = mode
            assert await tok.tokens_for("ab") == ([97, 98], False)
        warnings = [r for r in caplog.records if "remote tokenizer" in r.getMessage()]
        assert len(warnings) == 1          # rate-limited: once per 30 s
        assert "HTTP 500" in warnings[0].getMessage()
        assert tok.failures == 4
        # token-id prompts never call the tokenizer
        n = len(fake_tokenizer.received)
        assert await tok.tokens_for([1, 2]) == ([1, 2], True)
        assert len(fake_tokenizer.received) == n


async def test_remote_tokenizer_unreachable_and_own_session():
    # a port with nothing listening: connection refused → code points
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    tok = RemoteTokenizer(f"http://127.0.0.1:{port}", 0.5)
    try:
        assert await tok.tokens_for("xy") == ([120, 121], False)
    finally:
        await tok.close()


async def test_build_request_view_500_fallback(fake_tokenizer):
    fake_tokenizer.mode = "500"
    body = {"messages": [{"role": "user", "content": "abcdefghij"}], "session_id": "s"}
    async with aiohttp.ClientSession() as session:
        tok = RemoteTokenizer(f"127.0.0.1:{fake_tokenizer.port}/", 2, lambda: session)
        view = await build_request_view(body, CHAT, tok, 4, need_prefix=True)
    rendered = "user:abcdefghij\n"
    assert fake_tokenizer.received == [{"text": rendered, "prompt": rendered, "message": rendered}]
    assert view.prompt == rendered and view.tokens is None
    assert view.token_estimate == 2 * len(rendered)
    assert view.hashes == block_hashes([ord(c) for c in rendered], 4)
    assert view.session_id == "s"


async def test_build_request_view_variants():
    cp = CodePointTokenizer()
    v = await build_request_view({"prompt": "abcdefgh"}, COMPLETIONS, cp, 4, need_prefix=False)
    assert (v.tokens, v.token_estimate, v.hashes) == (None, 16, [])
    v = await build_request_view({"prompt": [1, 2, 3, 4, 5]}, COMPLETIONS, cp, 4, need_prefix=True)
    assert (v.tokens, v.token_estimate, v.hashes) == ([1, 2, 3, 4, 5], 5, block_hashes([1, 2, 3, 4], 4))
    v = await build_request_view({"prompt": "abc"}, COMPLETIONS, cp, 4, need_prefix=True)
    assert v.hashes == [] and v.token_estimate == 6


# --------------------------------------------------------------------------- fast paths
def test_text_block_hashes_equal_code_point_hashes():
    rng = random.Random(11)
    # ASCII, accents, CJK, emoji (non-BMP) and a lone surrogate (kept as a code point)
    alphabet = "ab \n" + "éß" + "漢字" + "😀🚀" + "\ud800"
    for length in (0, 3, 4, 63, 64, 65, 1000):
        text = "".join(rng.choice(alphabet) for _ in range(length))
        for bs in (1, 4, 64):
            assert text_block_hashes(text, bs) == block_hashes(code_points(text), bs)
    with pytest.raises(ValueError):
        text_block_hashes("abc", 0)


def test_hash_list_is_a_list_with_its_array():
    hs = block_hashes(list(range(40)), 8)
    assert isinstance(hs, list) and isinstance(hs, HashList) and len(hs) == 5
    assert hs == list(hs) and hs.array.dtype == np.uint64 and hs.array.tolist() == list(hs)
    assert type(hs[:2]) is list and hs[:2] == list(hs)[:2]
    assert block_hashes([1, 2, 3], 8) == [] and len(block_hashes([], 8).array) == 0
    # a numpy token array hashes like the list
    assert block_hashes(np.arange(40, dtype=np.int64), 8) == hs
    assert HashList([5, 6]).array.tolist() == [5, 6]


def test_text_hashes_stable_across_processes():
    out = printed_by_another_process("from kvrouter.prefix.hashing import text_block_hashes;"
                                     "print(text_block_hashes('système: 😀 ' * 40, 16))", "7")
    assert out == str(text_block_hashes("système: 😀 " * 40, 16))


async def test_build_request_view_code_points_skip_the_token_list():
    cp = CodePointTokenizer()
    text = "user:" + "héllo wörld 😀 " * 30 + "\n"
    v = await build_request_view({"messages": [{"role": "user", "content": text[5:-1]}]}, CHAT,
                                 cp, 16, need_prefix=True)
    assert v.tokens is None and v.token_estimate == 2 * len(text)
    assert v.hashes == block_hashes([ord(c) for c in text], 16)
    assert isinstance(v.hashes, HashList)


# --------------------------------------------------------------------------- index vs a model
class _ModelIndex:
    """The prefix index of docs/fastdeploy.md#cache-aware-routing, spelled out: an OrderedDict
    of (instance, hash) → time in record order (deepest first), with PrefixIndex's eviction
    batch (``max_entries // 256``)."""

    def __init__(self, cap, ttl):
        self.cap, self.ttl, self.slack = cap, ttl, min(cap // 256, 4096)
        self.d = OrderedDict()
        self.ev = {"ttl": 0, "capacity": 0, "instance_removed": 0}

    def record(self, hs, ident, now):
        if not hs or self.cap == 0:
            return
        hs = list(dict.fromkeys(hs))
        for h in reversed(hs):
            self.d.pop((ident, h), None)
            self.d[(ident, h)] = now
        over = len(self.d) - self.cap
        if over > 0:
            # older entries first (plus the batch), then, for a call longer than the cap,
            # its own deepest blocks
            k = min(len(self.d) - len(hs), over + self.slack)
            k += max(0, len(self.d) - k - self.cap)
            for _ in range(k):
                self.d.popitem(last=False)
            self.ev["capacity"] += k

    def match(self, hs, ids):
        out = {}
        for i in ids:
            c = 0
            while c < len(hs) and (i, hs[c]) in self.d:
                c += 1
            out[i] = c
        return out

    def sweep(self, now):
        if self.ttl <= 0:
            return 0
        removed = 0
        while self.d and self.d[next(iter(self.d))] < now - self.ttl:
            self.d.popitem(last=False)
            removed += 1
        self.ev["ttl"] += removed
        return removed

    def remove(self, ident):
        doomed = [k for k in self.d if k[0] == ident]
        for k in doomed:
            del self.d[k]
        self.ev["instance_removed"] += len(doomed)
        return len(doomed)


def _replay(seed, cap, ttl, n_inst, ops, depth):
    rng = random.Random(seed)
    idx, model = PrefixIndex(cap, ttl), _ModelIndex(cap, ttl)
    roots = [[rng.getrandbits(64) for _ in range(rng.randrange(1, depth))] for _ in range(8)]
    ids = [f"i{k}:1" for k in range(n_inst)]
    t = 0.0
    for op in range(ops):
        t += rng.random() * 2
        chain = rng.choice(roots)[: rng.randrange(0, depth)] + [
            rng.getrandbits(64) for _ in range(rng.randrange(0, depth))]
        r = rng.random()
        if r < 0.6:
            ident = rng.choice(ids)
            if rng.random() < 0.5:      # as the policies do: match, then record the same chain
                chain = HashList(chain)
                q = rng.sample(ids, rng.randrange(1, n_inst + 1))
                assert idx.match(chain, q) == model.match(chain, q), (seed, op)
            idx.record(chain, ident, t)
            model.record(chain, ident, t)
        elif r < 0.9:
            q = rng.sample(ids, rng.randrange(1, n_inst + 1))
            assert idx.match(chain, q) == model.match(chain, q), (seed, op)
        elif r < 0.97:
            assert idx.sweep(t) == model.sweep(t), (seed, op)
        else:
            ident = rng.choice(ids)
            assert idx.remove_instance(ident) == model.remove(ident), (seed, op)
        assert idx.size == len(model.d), (seed, op)
    assert idx.evictions == model.ev
    for root in roots:
        assert idx.match(root, ids) == model.match(root, ids)
    assert idx.distinct_blocks() == len({h for _, h in model.d})
    for ident in ids:
        assert idx.instance_blocks(ident) == sum(1 for k in model.d if k[0] == ident)


@pytest.mark.parametrize("seed", range(6))
def test_index_equals_the_ordered_dict_model(seed):
    # small caps: exact eviction; TTL on and off; growth, re-stamping and purges on the way
    for cap, ttl in ((5, 0), (50, 20), (255, 20)):
        _replay(seed, cap, ttl, n_inst=6, ops=1200, depth=12)


@pytest.mark.parametrize("seed", range(2))
def test_index_equals_the_model_with_many_instances_and_batched_eviction(seed):
    # 300 instances × long chains: first-block probe, then binary search; cap ≥ 256: batches
    _replay(seed, 3000, 50, n_inst=300, ops=800, depth=40)


def test_index_full_buckets_spill_and_are_found_again():
    rng = random.Random(5)
    idx = PrefixIndex(400, 0)
    model = _ModelIndex(400, 0)
    shift = int(idx._shift)
    inverse = pow(0x9E3779B97F4A7C15, -1, 1 << 64)
    chains = []
    for c in range(12):            # 12 chains whose keys all land in 3 home buckets
        ident = ("a:1", "b:1")[c % 2]
        salt = int(idx._salts[idx._number(ident)])
        home = 5 + c % 3
        chain = [((((home << shift) + rng.getrandbits(shift)) * inverse) & (2**64 - 1)) ^ salt
                 for _ in range(rng.randrange(5, 30))]
        chains.append(chain)
        idx.record(chain, ident, float(c))
        model.record(chain, ident, float(c))
        for ch in chains:
            assert idx.match(ch, ["a:1", "b:1"]) == model.match(ch, ["a:1", "b:1"])
    assert idx._spilled > 0
    assert idx.remove_instance("a:1") == model.remove("a:1")
    for ch in chains:
        assert idx.match(ch, ["a:1", "b:1"]) == model.match(ch, ["a:1", "b:1"])
    assert idx._spilled == int(idx._spill.sum())


def test_index_batched_capacity_eviction_keeps_order():
    idx = PrefixIndex(1024, 0)                     # batch of 1024 // 256 = 4 extra entries
    for i in range(64):
        idx.record([1000 * i + d for d in range(16)], "a:1", float(i))   # 1024 entries
    assert idx.size == 1024 and idx.evictions["capacity"] == 0
    idx.record([10**9, 10**9 + 1], "a:1", 99.0)   # 2 over → 2 + 4 oldest (deepest) go
    assert idx.size == 1020 and idx.evictions["capacity"] == 6
    assert idx.match([d for d in range(16)], ["a:1"]) == {"a:1": 10}    # chain 0 lost 6 deep
    assert idx.match([1000 + d for d in range(16)], ["a:1"]) == {"a:1": 16}


def test_index_memory_per_entry_at_most_64_bytes():
    import gc
    import tracemalloc

    rng = np.random.default_rng(1)
    stream = [rng.integers(0, 2**63, 128, dtype=np.int64).astype(np.uint64).tobytes()
              for _ in range(220)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        idx = PrefixIndex(20_000, 1800)
        for i, raw in enumerate(stream):
            idx.record(np.frombuffer(raw, dtype=np.uint64).tolist(), f"i{i % 7}:1", float(i))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert idx.size >= 19_900
    assert used / idx.size <= 64, used / idx.size


def test_block_hashes_memo_reuses_shared_leading_blocks():
    from kvrouter.prefix import hashing

    rng = random.Random(21)
    shared = [rng.randrange(0, 200_000) for _ in range(4 * 29)]        # 29 blocks of 4
    for trial in range(4):
        tokens = shared + [rng.randrange(0, 200_000) for _ in range(4 * rng.randrange(0, 12))]
        before = len(hashing._MEMO)
        assert block_hashes(tokens, 4) == _reference_hashes(tokens, 4)
        assert len(hashing._MEMO) >= min(before, hashing.MEMO_SIZE)
    # the checkpoints of the shared prefix are there: a longer prompt hits them
    hits = [k for k in hashing._MEMO if k[0] == 32 and k[1] == 24 * 32]
    assert hits
    # a different block size or a changed early token does not reuse them
    other = list(shared)
    other[5] += 1
    assert block_hashes(other, 4) == _reference_hashes(other, 4)
    assert block_hashes(shared, 2) == _reference_hashes(shared, 2)
    assert text_block_hashes("x" * 200, 8) == _reference_hashes([ord("x")] * 200, 8)
