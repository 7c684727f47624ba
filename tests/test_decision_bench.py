"""The routing-decision benchmark (``kvrouter.bench.decision``) runs and reports sane rows."""

from __future__ import annotations

from kvrouter.bench import decision


def test_decision_run_small():
    rows = decision.run(instances=50, prompt_tokens=1024, iterations=50, cache_max_blocks=4000)
    assert [r["policy"] for r in rows] == list(decision.DEFAULT_POLICIES)
    for r in rows:
        assert r["instances"] == 50 and r["prompt_tokens"] == 1024
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert 0 < r["view_p50_us"] <= r["view_p99_us"]
        assert 0 < r["wall_p50_us"] <= r["wall_p99_us"]
        # the index was filled to its cap (eviction keeps a little slack under it)
        assert 3900 <= r["index_entries"] <= 4000
        assert 0 < r["index_distinct_blocks"] <= r["index_entries"]
        assert 0 < r["index_bytes_per_entry"] <= r["index_bytes_per_block"]
        assert r["index_bytes_per_entry"] < 200
    by = {r["policy"]: r for r in rows}
    # shared prefixes were found: 3/4 of every prompt is a group prefix held somewhere
    assert by["cache_aware"]["predicted_hit_rate"] > 0.5
    assert by["request_num"]["predicted_hit_rate"] == 0.0


def test_decision_main_prints_a_table(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert decision.main(["--instances", "8", "--prompt-tokens", "256", "--iterations", "20",
                          "--policies", "cache_aware", "--cache-max-blocks", "500",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cache_aware" in text and "p99" in text
    assert out.read_text().count("\n") == 1
