"""Criteria combination for best-of-N, worked out by hand."""

from __future__ import annotations

import math

import pytest

from scorer.bestofn import Criterion, combine, empties_last, is_empty_reply, parse_criteria, rank, standardize
from services.errors import InvalidArgument


def test_standardize_is_population_z_score():
    # mean 2, population variance ((1)^2 + 0 + 1^2) / 3 = 2/3
    z = standardize([1.0, 2.0, 3.0])
    s = math.sqrt(2 / 3)
    assert z == pytest.approx([-1 / s, 0.0, 1 / s])


def test_standardize_constant_or_single_gives_zeros():
    assert standardize([4.0, 4.0, 4.0]) == [0.0, 0.0, 0.0]
    assert standardize([7.0]) == [0.0]
    assert standardize([]) == []


def test_combine_uses_standardized_not_raw_rewards():
    # Model "wide" ranges over 100s and prefers candidate 0; model "narrow" ranges over 0.1s and
    # prefers candidate 1.  With equal weights neither dominates because both are standardized:
    # wide z = [1.2247, 0, -1.2247]; narrow z = [-1.2247, 1.2247, 0] (values 0.1, 0.3, 0.2).
    rewards = {"wide": [300.0, 200.0, 100.0], "narrow": [0.1, 0.3, 0.2]}
    k = math.sqrt(1.5)
    combined = combine(rewards, [Criterion("wide", 1.0), Criterion("narrow", 1.0)])
    assert combined == pytest.approx([0.0, k, -k])
    assert rank(combined) == [1, 0, 2]


def test_combine_weights_scale_each_criterion():
    rewards = {"a": [0.0, 1.0], "b": [1.0, 0.0]}
    # a z = [-1, 1], b z = [1, -1]; 2*a + 1*b = [-1, 1]
    assert combine(rewards, [Criterion("a", 2.0), Criterion("b", 1.0)]) == pytest.approx([-1.0, 1.0])
    # negative weight: a criterion to minimise (e.g. verbosity)
    assert combine(rewards, [Criterion("a", -1.0)]) == pytest.approx([1.0, -1.0])


def test_combine_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="scored 1 candidates, expected 2"):
        combine({"a": [1.0, 2.0], "b": [1.0]}, [Criterion("a"), Criterion("b")])


def test_rank_is_best_first_and_stable_on_ties():
    assert rank([0.5, 2.0, 0.5, -1.0]) == [1, 0, 2, 3]


def test_empty_replies_rank_after_every_reply_with_text_each_group_in_order():
    texts = ["long answer", "", "ok", " \n\t", "fine"]
    assert [is_empty_reply(t) for t in texts] == [False, True, False, True, False]
    # An empty reply first (a word limit passes it) still goes after every reply with text.
    assert empties_last([3, 1, 2, 4, 0], texts) == [2, 4, 0, 3, 1]
    assert empties_last([0, 2], texts) == [0, 2]


@pytest.mark.parametrize(
    "header, expected",
    [
        ('["helpfulness", "safety"]', [Criterion("helpfulness"), Criterion("safety")]),
        ('[{"model": "helpfulness", "weight": 2}, {"name": "safety"}]', [Criterion("helpfulness", 2.0), Criterion("safety")]),
        ('{"helpfulness": 2, "safety": 0.5}', [Criterion("helpfulness", 2.0), Criterion("safety", 0.5)]),
        ("helpfulness:2, safety", [Criterion("helpfulness", 2.0), Criterion("safety")]),
        ("reward=0.5", [Criterion("reward", 0.5)]),
        ("reward", [Criterion("reward")]),
    ],
)
def test_parse_criteria_forms(header, expected):
    assert parse_criteria(header) == expected


@pytest.mark.parametrize(
    "header, field, fragment",
    [
        ("", "op-criteria", "is empty"),
        ("[oops", "op-criteria", "not valid JSON"),
        ('["a", "a"]', "op-criteria[1].model", "listed twice"),
        ("a:heavy", "op-criteria[0].weight", "must be a number"),
        ('[{"weight": 1}]', "op-criteria[0].model", "needs a string"),
        ('[{"model": "a", "wieght": 1}]', "op-criteria[0]", "unknown keys"),
        ('["bad name!"]', "op-criteria[0].model", "not a reward model name"),
        ("a:0,b:0", "op-criteria", "all weights are 0"),
        ('["a", 3]', "op-criteria[1]", "must be a model name"),
        ("a:nan", "op-criteria[0].weight", "finite"),
    ],
)
def test_parse_criteria_errors_name_the_field(header, field, fragment):
    with pytest.raises(InvalidArgument) as e:
        parse_criteria(header)
    assert e.value.field == field
    assert fragment in e.value.message
