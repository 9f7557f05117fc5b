"""bench criteria-ceiling's statistics, worked by hand."""

from __future__ import annotations

import pytest

from bench.criteria_ceiling import ceiling_stats


def test_ceiling_stats_by_hand() -> None:
    rows = [
        # Reference scored 0.5. Candidates: 12 words (pass, 0.2), 45 words (pass, 0.6), 90 words (fail, 0.9).
        {"reference": 0.5, "scores": [0.2, 0.6, 0.9], "words": [12, 45, 90], "passed": [True, True, False]},
        # Reference 0.4. Candidates: 60 words (fail, 0.4: a tie), 70 words (fail, 0.3).
        {"reference": 0.4, "scores": [0.4, 0.3], "words": [60, 70], "passed": [False, False]},
    ]
    s = ceiling_stats(rows)
    assert [(b["words"], b["candidates"], b["win_rate_vs_reference"], b["passing_share"]) for b in s["by_words"]] == [
        ("10-19", 1, 0.0, 1.0), ("40-49", 1, 1.0, 1.0), ("60-69", 1, 0.5, 0.0), ("70-79", 1, 0.0, 0.0),
        ("80+", 1, 1.0, 0.0)]
    # Prompt 1: length and score rise together, r = 27.1 / sqrt(3066 * 0.24667) = 0.9854; prompt 2: r = -1.
    r1 = 27.1 / (3066 * (0.3667**2 + 0.0333**2 + 0.3333**2)) ** 0.5
    assert s["words_score_correlation_within_prompt"] == pytest.approx((r1 - 1.0) / 2, abs=1e-3)
    # Pairs of different length and score: (12,45) longer wins, (12,90) wins, (45,90) wins, (60,70) loses.
    assert s["longer_preferred_share"] == pytest.approx(3 / 4)
    p = s["policies"]
    assert p["random_candidate"] == {"prompts": 2, "win_rate_vs_reference": 0.25, "violation_rate": 0.5,
                                     "mean_words": 36.0}
    # Criteria first: the 45-word pass (wins), then the best failing 60 words (ties).
    assert p["criteria_best_of_n"] == {"prompts": 2, "win_rate_vs_reference": 0.75, "violation_rate": 0.5,
                                       "mean_words": 52.5}
    assert p["judge_best_of_n"]["win_rate_vs_reference"] == 0.75 and p["judge_best_of_n"]["mean_words"] == 75.0
    # Only prompt 1 has a passing candidate.
    assert p["judge_best_passing"] == {"prompts": 1, "win_rate_vs_reference": 1.0, "violation_rate": 0.0,
                                       "mean_words": 45.0}


def test_ceiling_stats_choose_among_the_first_k_candidates_too() -> None:
    rows = [{"reference": 0.5, "scores": [0.2, 0.6, 0.9], "words": [12, 45, 90], "passed": [True, True, False]}]
    s = ceiling_stats(rows, first_k=(1, 2, 3))
    assert set(s["policies_first_k"]) == {"1", "2"}  # 3 is every candidate: that is "policies"
    assert s["policies_first_k"]["1"]["judge_best_of_n"] == {"prompts": 1, "win_rate_vs_reference": 0.0,
                                                            "violation_rate": 0.0, "mean_words": 12.0}
    assert s["policies_first_k"]["2"]["judge_best_of_n"]["mean_words"] == 45.0
    assert s["policies"]["judge_best_of_n"]["mean_words"] == 90.0


def test_ceiling_stats_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="candidate"):
        ceiling_stats([{"reference": 0.1, "scores": [0.2], "words": [3, 4], "passed": [True]}])
    with pytest.raises(ValueError):
        ceiling_stats([])
