"""bench criteria-frontier: which gate readings count as the first criterion's, the cut and its bins
worked by hand, and the run over result files down to the README table's row."""

from __future__ import annotations

import argparse
import json

from bench.criteria_frontier import first_phase_checkpoints, frontier, length_fit


def _m(rate: float, ref: float, drop: float, prompts: int = 24, words: float = 40.0, **extra) -> dict:
    return {"violation_rate": rate, "reference_violation_rate": ref, "reward_drop": drop, "guard_prompts": prompts,
            "mean_words": words, "reference_mean_words": 50.0, "kl_to_ref": 0.01, "state": "rejected", **extra}


RESULT = {"mode": "full", "criteria": ["concise@v1", "impersonal@v1"], "gate_metrics": {
    "v000001": _m(0.5, 0.5, -0.01),                           # no cut
    "v000002": _m(0.1, 0.5, 0.08, prompts=48),                # cut 0.8, the judge fell
    "v000003": _m(0.0, 0.5, 0.01, prompts=9),                 # cut 1.0 inside the bar, on 9 prompts
    "v000004": _m(0.2, 0.5, 0.0, **{"criteria_prompts[impersonal@v1]": 24.0}),  # the second phase: left out
    "v000005": {"violation_rate": 0.2, "reference_violation_rate": 0.5},        # no reward reading: left out
    "v000006": _m(0.0, 0.0, 0.0),                             # the reference kept every rule: no cut to measure
}}


def test_only_first_criterion_checkpoints_with_a_reward_reading_count() -> None:
    points = first_phase_checkpoints(RESULT, "run-a")
    assert [p["version"] for p in points] == ["v000001", "v000002", "v000003"]
    assert [round(p["cut"], 6) for p in points] == [0.0, 0.8, 1.0]
    assert points[1]["run"] == "run-a" and points[1]["guard_prompts"] == 48


def test_frontier_bins_by_cut_and_lists_the_target_cuts_inside_the_bar() -> None:
    out = frontier(first_phase_checkpoints(RESULT), target_cut=0.77, reward_bar=0.02, min_guard_prompts=24)
    assert [(b["cut_from"], b["cut_to"], b["checkpoints"]) for b in out["bins"]] == [(0.0, 0.3, 1), (0.77, None, 2)]
    top = out["bins"][-1]
    assert top["median_reward_drop"] == (0.08 + 0.01) / 2 and top["within_reward_bar"] == 0.5
    assert top["checkpoints_on_min_guard_prompts"] == 1
    assert [p["version"] for p in out["target_cut_within_reward_bar"]] == ["v000003"]
    assert out["target_cut_within_reward_bar_on_min_guard_prompts"] == 0  # read on 9 prompts only


def test_run_reads_full_results_only_and_renders_its_table_row(tmp_path) -> None:
    from bench.criteria_frontier import run
    from bench.report import render_table

    full, quick = tmp_path / "criteria-loop-a.json", tmp_path / "criteria-loop-b.json"
    full.write_text(json.dumps(RESULT))
    quick.write_text(json.dumps({**RESULT, "mode": "quick"}))
    out = run(argparse.Namespace(results=[full, quick], target_cut=0.77, reward_bar=0.02, min_guard_prompts=24))
    assert out["runs"] == 1 and out["checkpoints"] == 3
    row = render_table({"criteria-frontier": {**out, "mode": "full", "machine": {"cpu_model": "X"}}})
    assert "a guard-set cut >= 0.77: 2, median reward drop 0.045" in row
    assert "1 within 0.02 (0 read on >= 24 prompts)" in row


def test_length_fit_is_the_line_of_the_drop_on_the_words_and_where_it_meets_the_bar() -> None:
    # drop = 0.004 a word shorter, exactly, whatever the cut: r = -1, nothing left for the cut to explain
    points = [{"words_change": w, "reward_drop": -0.004 * w, "cut": c}
              for w, c in ((-20.0, 0.9), (-10.0, 0.1), (0.0, 0.5), (5.0, -0.2))]
    fit = length_fit(points, reward_bar=0.02)
    assert round(fit["slope_per_word"], 9) == -0.004 and abs(fit["intercept"]) < 1e-12
    assert round(fit["correlation"], 9) == -1.0
    assert round(fit["words_shorter_at_reward_bar"], 6) == 5.0  # 0.02 / 0.004
    assert length_fit(points[:2], 0.02) is None  # too few to fit
    assert first_phase_checkpoints(RESULT)[1]["words_change"] == -10.0
