"""bench stop-hazard: where a reply could end, and the hazard per length bin, worked by hand; and a
quick run on the embedded policy."""

from __future__ import annotations

import argparse

import pytest

from bench.stop_hazard import end_points, hazard_table


def test_end_points_are_the_tokens_that_complete_a_sentence_or_a_line() -> None:
    reply = "Tea is hot. Cats purr!\nDogs bark"
    # Decoded prefixes token by token, as a tokenizer would give them (a space rides on the next word).
    texts = ["Tea", "Tea is", "Tea is hot", "Tea is hot.", "Tea is hot. Cats", "Tea is hot. Cats purr",
             "Tea is hot. Cats purr!", "Tea is hot. Cats purr!\n", "Tea is hot. Cats purr!\nDogs",
             "Tea is hot. Cats purr!\nDogs bark"]
    # After "hot." (3 words) and after "purr!" (5 words); the newline token adds no new end, and the
    # whole reply is no proper prefix.
    assert end_points(reply, texts) == [(3, 3), (6, 5)]
    assert end_points("One sentence only.", ["One", "One sentence", "One sentence only."]) == []


def test_hazard_table_averages_each_model_per_ten_word_bin() -> None:
    rows = [{"words": 3, "p": {"base": 0.1, "v1": 0.3}}, {"words": 8, "p": {"base": 0.3, "v1": 0.5}},
            {"words": 45, "p": {"base": 0.2, "v1": 0.6}}, {"words": 130, "p": {"base": 0.4, "v1": 0.9}}]
    table = hazard_table(rows, ["base", "v1"])
    assert table == [
        {"words": "0-9", "end_points": 2, "base": pytest.approx(0.2), "v1": pytest.approx(0.4)},
        {"words": "40-49", "end_points": 1, "base": 0.2, "v1": 0.6},
        {"words": "80+", "end_points": 1, "base": 0.4, "v1": 0.9},
    ]


def test_a_quick_run_reads_the_base_policy_at_every_end_point() -> None:
    from bench.report import render_table
    from bench.stop_hazard import run

    out = run(argparse.Namespace(quick=True, versions=[], samples=None, eval_count=None, seed=0))
    assert out["models"] == ["base"] and out["end_points"] == sum(r["end_points"] for r in out["hazard_by_words"])
    assert all(0.0 <= r["base"] <= 1.0 for r in out["hazard_by_words"])
    assert "stop-hazard" in render_table({"stop-hazard": {**out, "mode": "quick", "machine": {"cpu_model": "X"}}})
