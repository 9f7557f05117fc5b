"""bench loop-quality's paired statistics, worked by hand."""

from __future__ import annotations

import math

import pytest

from bench.loop_quality import paired_stats


def test_paired_stats_average_seeds_per_pair_then_take_the_pairs_as_units() -> None:
    # pair differences averaged over 2 seeds: 0, 0.5, 0.5, 0 -> mean 0.25, sample var 1/12, se sqrt(1/48)
    diff, se = paired_stats(["1100", "1010"], ["1000", "1000"])
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(1 / 48))


def test_paired_stats_of_identical_arms_is_zero() -> None:
    assert paired_stats(["0110"], ["0110"]) == (0.0, 0.0)


@pytest.mark.parametrize("live, offline", [([], []), (["10"], ["10", "01"]), (["101"], ["10"]), (["1"], ["0"])])
def test_paired_stats_refuses_mismatched_outcomes(live, offline) -> None:
    with pytest.raises(ValueError):
        paired_stats(live, offline)
