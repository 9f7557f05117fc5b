"""The paired difference the reward guard and the benchmarks' arm comparisons share."""

from __future__ import annotations

import math

import pytest

from services.stats import paired_difference


def test_paired_difference_is_the_mean_of_per_unit_differences_with_its_standard_error() -> None:
    mean, se = paired_difference([0.3, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.4])  # differences 0.1 0.2 0.1 0.0
    assert mean == pytest.approx(0.1)
    assert se == pytest.approx(math.sqrt(((0.0 ** 2) + 0.1 ** 2 + 0.0 ** 2 + 0.1 ** 2) / 3) / 2)


def test_paired_difference_removes_what_the_units_share() -> None:
    # a unit-wide offset (a hard prompt, a lucky seed) moves both sides alike: no spread in the differences
    assert paired_difference([1.0, 5.0, 9.0], [0.5, 4.5, 8.5]) == pytest.approx((0.5, 0.0))


def test_paired_difference_of_one_unit_has_no_error_estimate() -> None:
    mean, se = paired_difference([0.7], [0.5])
    assert mean == pytest.approx(0.2) and se is None


@pytest.mark.parametrize("a, b", [([], []), ([0.1, 0.2], [0.1])])
def test_paired_difference_refuses_unpaired_samples(a, b) -> None:
    with pytest.raises(ValueError, match="same units"):
        paired_difference(a, b)
