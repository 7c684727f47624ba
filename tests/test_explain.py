"""``POST /v1/route/explain`` (README "Operator's view"): which instance(s) the policies would
pick now for an inference body, with every candidate's score terms; nothing recorded, leased or
sent. Real router processes and simulated instances on 127.0.0.1."""

from __future__ import annotations

import asyncio

import aiohttp

from harness import bounded, metrics_text, post_json, register_all, sample

TOKEN = "admin-token-for-the-explain-test"


def chat(context: str, question: str = "q") -> dict:
    """A long prompt: ~20 blocks of 64 characters (the index keys on code points here)."""
    return {"messages": [{"role": "user", "content": f"{context} " * 150 + question}],
            "max_tokens": 4}


async def explain(router, body: dict, query: str = "", headers: dict | None = None):
    return await post_json(router.url + "/v1/route/explain" + query, body, headers=headers)


@bounded(60)
async def test_cache_aware_pick_and_terms_and_nothing_recorded(router_factory, sims):
    router = await router_factory({"scheduler": {"policy": "cache_aware"}})
    a, b = await sims(2)
    await register_all(router, a, b)
    body = chat("alpha")
    status, first, _ = await explain(router, body)
    assert status == 200
    assert first["object"] == "route.explain" and first["endpoint"] == "/v1/chat/completions"
    (d,) = first["decisions"]
    assert (d["role"], d["policy"], d["strategy"]) == ("mixed", "cache_aware",
                                                       "cache_aware_scoring")
    rows = {r["url"]: r for r in d["candidates"]}
    assert set(rows) == {a.url, b.url}
    blocks = first["prompt_blocks"]
    assert blocks > 10
    for r in rows.values():
        assert (r["matched_blocks"], r["prompt_blocks"], r["in_flight_requests"]) == (0, blocks, 0)
        assert r["score"] == 1.0              # all miss, no load
    assert [r["url"] for r in d["candidates"] if r["chosen"]] == [d["pick"]]

    # asking again changes nothing: same answer (a recorded prefix or selection would move it)
    status, again, _ = await explain(router, body)
    assert status == 200 and again == first
    text = await metrics_text(router)
    assert sample(text, "kvrouter_prefix_index_blocks") == 0
    assert "kvrouter_selections_total{" not in text
    assert sample(text, "kvrouter_instance_in_flight_requests") == 0
    assert a.inference_requests == [] and b.inference_requests == []

    # the real request goes where explain said; then explain sees the prefix it left
    status, _, headers = await post_json(router.url + "/v1/chat/completions", body)
    assert status == 200 and headers["X-Router-Mixed-URL"] == d["pick"]
    status, after, _ = await explain(router, chat("alpha", "another question"))
    (d2,) = after["decisions"]
    rows = {r["url"]: r for r in d2["candidates"]}
    other = b.url if d["pick"] == a.url else a.url
    assert d2["pick"] == d["pick"]
    assert rows[d["pick"]]["matched_blocks"] > 10 and rows[other]["matched_blocks"] == 0
    assert rows[d["pick"]]["score"] < rows[other]["score"]


@bounded(60)
async def test_kv_cost_terms_match_the_real_decision(router_factory, sims):
    router = await router_factory({"scheduler": {"policy": "kv_cost", "kv-cost-exploration": 0,
                                                 "metrics-scrape-interval-secs": 60,
                                                 "metrics-scrape-timeout-secs": 1}})
    a, b = await sims(2)
    await register_all(router, a, b)
    # warm one instance with context "beta", then ask about a new question on it
    status, _, headers = await post_json(router.url + "/v1/chat/completions", chat("beta"))
    assert status == 200
    holder = headers["X-Router-Mixed-URL"]
    other = b.url if holder == a.url else a.url
    body = chat("beta", "second question")
    status, ex, _ = await explain(router, body, "?endpoint=chat")
    assert status == 200
    (d,) = ex["decisions"]
    assert (d["policy"], d["pick"], d["strategy"]) == ("kv_cost", holder, "cost_estimate")
    rows = {r["url"]: r for r in d["candidates"]}
    assert rows[holder]["matched_blocks"] > 10 and rows[other]["matched_blocks"] == 0
    assert rows[holder]["uncached_tokens"] < rows[other]["uncached_tokens"]
    assert 0 < rows[holder]["cost_seconds"] < rows[other]["cost_seconds"]
    for r in rows.values():
        assert (r["queued_prefill_tokens"], r["decoding"]) == (0, 0)
        assert "near_best" not in r              # exploration is off
    status, _, headers = await post_json(router.url + "/v1/chat/completions", body)
    assert status == 200 and headers["X-Router-Mixed-URL"] == d["pick"]


@bounded(60)
async def test_generic_terms_show_the_load_in_flight(router_factory, sims):
    """A policy without its own explain (request_num) lists every candidate's counters."""
    router = await router_factory()
    a, b = await sims(2)
    await register_all(router, a, b)
    a.knobs.header_delay = 3.0                   # holds the first request (request_num → a)
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(router.url + "/v1/completions",
                                            json={"prompt": "hold", "max_tokens": 2}))
        async with asyncio.timeout(5):
            while not a.inference_requests:
                await asyncio.sleep(0.02)
        status, ex, _ = await explain(router, {"prompt": "x" * 100, "max_tokens": 2})
        held.cancel()
    assert status == 200 and ex["endpoint"] == "/v1/completions"   # from the body's shape
    (d,) = ex["decisions"]
    assert d["policy"] == "request_num"
    rows = {r["url"]: r for r in d["candidates"]}
    assert rows[a.url]["in_flight_requests"] == 1 and rows[a.url]["in_flight_tokens"] > 0
    assert rows[b.url]["in_flight_requests"] == 0 and rows[b.url]["in_flight_tokens"] == 0
    assert len(a.inference_requests) == 1 and b.inference_requests == []


@bounded(60)
async def test_pd_gives_the_prefill_and_the_decode_pick(router_factory, sims):
    router = await router_factory({"scheduler": {"prefill-policy": "cache_aware",
                                                 "decode-policy": "kv_cost",
                                                 "kv-cost-exploration": 0}}, "--splitwise")
    prefills = await sims(2, role="prefill")
    decodes = await sims(2, role="decode")
    await register_all(router, *prefills, *decodes)
    body = chat("gamma")
    status, ex, _ = await explain(router, body)
    assert status == 200 and ex["mode"] == "splitwise"
    p, d = ex["decisions"]
    assert (p["role"], p["policy"], d["role"], d["policy"]) == ("prefill", "cache_aware",
                                                                "decode", "kv_cost")
    assert {r["url"] for r in p["candidates"]} == {i.url for i in prefills}
    assert {r["url"] for r in d["candidates"]} == {i.url for i in decodes}
    assert all(r["uncached_tokens"] == 0 for r in d["candidates"])   # no prefill on a decode
    assert all(i.inference_requests == [] for i in (*prefills, *decodes))
    status, _, headers = await post_json(router.url + "/v1/chat/completions", body)
    assert status == 200
    assert (headers["X-Router-Prefill-URL"], headers["X-Router-Decode-URL"]) == (p["pick"],
                                                                                 d["pick"])


@bounded(60)
async def test_bad_input_is_4xx_and_no_instance_is_503(router_factory, sims):
    router = await router_factory()
    status, body, _ = await explain(router, chat("delta"))
    assert status == 503 and body["error"]["code"] == "no_available_instance"
    (a,) = await sims(1)
    await register_all(router, a)
    status, body, _ = await post_json(router.url + "/v1/route/explain", data=b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = await post_json(router.url + "/v1/route/explain", data=b"[1]")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = await explain(router, chat("delta"), "?endpoint=embeddings")
    assert status == 400 and body["error"]["code"] == "invalid_value"
    assert "endpoint" in body["error"]["message"]
    async with aiohttp.ClientSession() as s:
        async with s.get(router.url + "/v1/route/explain") as r:
            assert r.status == 405
    assert a.inference_requests == []


@bounded(60)
async def test_explain_is_an_admin_route(router_factory, sims):
    router = await router_factory({"auth": {"admin-token": TOKEN, "api-keys": ["client-key"],
                                            "register-allow-cidrs": ["127.0.0.0/8"]}})
    (a,) = await sims(1)
    await register_all(router, a)
    status, body, _ = await explain(router, chat("eps"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = await explain(router, chat("eps"),
                                    headers={"Authorization": "Bearer client-key"})
    assert status == 403 and body["error"]["code"] == "permission_denied"
    status, body, _ = await explain(router, chat("eps"),
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["decisions"][0]["candidates"][0]["url"] == a.url
