"""Criteria evaluation: each rule with its edge cases, model-backed criteria through injected callables,
the weighted combination, and pair/ranking building with ties skipped."""

from __future__ import annotations

import math
from typing import Sequence

import pytest

from services.criteria import JudgeSpec, RewardSpec, parse_criterion
from services.criteria_eval import (
    ERROR,
    SUCCESS,
    combine,
    contains_any,
    contains_none,
    count_words,
    criteria_results,
    evaluate,
    json_valid,
    max_chars,
    max_words,
    min_words,
    preferences_from_scores,
    rank,
    regex_must_match,
    regex_must_not_match,
    usable,
)
from services.kinds import FeedbackKind
from services.schemas import ChatMessage, PreferenceRecord

PROMPT = (ChatMessage("user", "Say something."),)


# -- rules ------------------------------------------------------------------------------------------


def test_word_counts_split_on_unicode_whitespace() -> None:
    assert count_words("") == 0
    assert count_words("   \n\t ") == 0
    assert count_words("naïve café déjà-vu") == 3
    assert count_words("one\u00a0two\u3000three") == 3  # no-break space and ideographic space separate words
    assert count_words("日本語のテキスト") == 1  # no spaces: one word (documented)
    assert max_words("a b c", 3) == 1 and max_words("a b c d", 3) == 0
    assert max_words("", 0) == 1 and min_words("", 1) == 0 and min_words("a  b", 2) == 1


def test_max_chars_counts_code_points() -> None:
    assert max_chars("héllo", 5) == 1  # 6 bytes in UTF-8, 5 characters
    assert max_chars("🙂🙂", 2) == 1 and max_chars("🙂🙂🙂", 2) == 0
    assert max_chars("", 0) == 1


def test_regex_rules_search_anywhere_and_honour_flags() -> None:
    assert regex_must_match("the answer is 42", r"\d+") == 1
    assert regex_must_match("ANSWER", "answer") == 0
    assert regex_must_match("ANSWER", "answer", "i") == 1
    assert regex_must_match("first\nsecond", "^second$") == 0
    assert regex_must_match("first\nsecond", "^second$", "m") == 1
    assert regex_must_match("a\nb", "a.b") == 0 and regex_must_match("a\nb", "a.b", "s") == 1
    assert regex_must_not_match("As an AI, I cannot", r"\bas an ai\b", "i") == 0
    assert regex_must_not_match("", "x") == 1 and regex_must_match("", "^$") == 1


def test_contains_rules_with_and_without_case() -> None:
    assert contains_any("Yes, indeed", ["yes", "no"]) == 0
    assert contains_any("Yes, indeed", ["yes", "no"], "i") == 1
    assert contains_any("STRASSE", ["straße"], "i") == 1  # case-folded, not just lower-cased
    assert contains_none("I'm sorry", ["sorry"]) == 0 and contains_none("fine", ["sorry"]) == 1
    assert contains_any("", ["x"]) == 0 and contains_none("", ["x"]) == 1


def test_json_valid() -> None:
    assert json_valid('{"a": [1, 2]}') == 1 and json_valid("  42 \n") == 1 and json_valid('"s"') == 1
    assert json_valid("") == 0 and json_valid("{'a': 1}") == 0 and json_valid('{"a": 1} trailing') == 0
    assert json_valid("```json\n{}\n```") == 0  # a fenced block is not JSON


# -- evaluate ----------------------------------------------------------------------------------------


def test_rule_criterion_all_and_mean_with_per_rule_results() -> None:
    rules = [{"max_words": 3}, {"contains_any": ["ok"], "flags": "i"}]
    c_all = parse_criterion({"name": "c", "version": "v2", "rules": rules})
    c_mean = parse_criterion({"name": "c", "rules": rules, "mode": "mean"})
    replies = ["OK then", "that is not fine at all", "ok but far too long here", ""]
    r_all = evaluate(c_all, PROMPT, replies)
    assert [r.score for r in r_all] == [1.0, 0.0, 0.0, 0.0]
    assert [r.passed for r in r_all] == [True, False, False, False]
    assert [r.score for r in evaluate(c_mean, PROMPT, replies)] == [1.0, 0.0, 0.5, 0.5]
    second = r_all[2]
    assert (second.status, second.ref) == (SUCCESS, "c@v2")
    assert [(p.rule, p.score, p.explanation) for p in second.rules] == [
        ("max_words 3", 0.0, "6 words (limit 3)"), ("contains_any ['ok'] (ignoring case)", 1.0, "contains 'ok'")]
    assert second.explanation == "1/2 rules pass; failed: max_words 3 (6 words (limit 3))"
    assert second.to_dict() == {"status": "success", "score": 0.0, "explanation": second.explanation,
                                "version": "v2", "passed": False,
                                "rules": [{"rule": "max_words 3", "score": 0.0, "explanation": "6 words (limit 3)"},
                                          {"rule": "contains_any ['ok'] (ignoring case)", "score": 1.0,
                                           "explanation": "contains 'ok'"}]}


def _reward(spec: RewardSpec, prompt: Sequence[ChatMessage], replies: Sequence[str]) -> list[float]:
    assert prompt == PROMPT
    return [float(len(r)) - 3.0 for r in replies]


def test_reward_criterion_threshold_and_logistic() -> None:
    replies = ["ab", "abc", "abcdef"]
    thr = parse_criterion({"name": "r", "reward": {"model": "rm", "threshold": 0}})
    res = evaluate(thr, PROMPT, replies, reward_fn=_reward)
    assert [(r.score, r.passed, r.raw_score) for r in res] == [(0.0, False, -1.0), (1.0, True, 0.0), (1.0, True, 3.0)]
    assert res[0].explanation == "rm reward -1 < 0"
    graded = parse_criterion({"name": "r", "reward": {"model": "rm", "attribute": "safety"}})
    res = evaluate(graded, PROMPT, replies, reward_fn=_reward)
    assert [r.score for r in res] == pytest.approx([1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-3))])
    assert res[0].passed is None and res[0].explanation == "rm.safety reward -1"


def test_judge_criterion_scores_p_yes_clipped() -> None:
    c = parse_criterion({"name": "j", "judge": {"model": "smol", "question": "Is it polite?"}})

    def judge(spec: JudgeSpec, prompt: Sequence[ChatMessage], replies: Sequence[str]) -> list[float]:
        assert spec.question == "Is it polite?"
        return [0.25, 1.0000001]

    assert [r.score for r in evaluate(c, PROMPT, ["a", "b"], judge_fn=judge)] == [0.25, 1.0]


def test_a_failing_model_gives_error_results_not_an_exception() -> None:
    c = parse_criterion({"name": "r", "reward": "rm"})

    def down(*_: object) -> list[float]:
        raise ConnectionError("scorer unreachable")

    res = evaluate(c, PROMPT, ["a", "b"], reward_fn=down)
    assert [(r.status, r.score) for r in res] == [(ERROR, 0.0), (ERROR, 0.0)]
    assert "scorer unreachable" in res[0].explanation and not usable(res)
    assert not usable(evaluate(c, PROMPT, ["a"]))  # no callable given
    assert not usable(evaluate(c, PROMPT, ["a", "b"], reward_fn=lambda *_: [1.0]))  # wrong length
    assert not usable(evaluate(c, PROMPT, ["a"], reward_fn=lambda *_: [float("nan")]))
    assert usable(evaluate(c, PROMPT, ["a"], reward_fn=lambda *_: [1.0]))


def test_criteria_results_is_openpipe_shaped_per_reply() -> None:
    c = parse_criterion({"name": "short", "version": "v1", "rules": [{"max_chars": 3}]})
    results = {"short": evaluate(c, PROMPT, ["abc", "abcd"])}
    out = criteria_results(results, 1)
    assert set(out) == {"short"}
    assert {k: out["short"][k] for k in ("status", "score", "passed")} == {"status": "success", "score": 0.0,
                                                                            "passed": False}


# -- combine and rank --------------------------------------------------------------------------------


def test_combine_is_the_weighted_mean() -> None:
    scores = combine({"a": [1.0, 0.0, 1.0], "b": [0.0, 1.0, 1.0]}, {"a": 3.0, "b": 1.0})
    assert scores == pytest.approx([0.75, 0.25, 1.0])
    c = parse_criterion({"name": "a", "rules": [{"max_words": 1}]})
    assert combine({"a": evaluate(c, PROMPT, ["x", "x y"])}, {}) == [1.0, 0.0]
    with pytest.raises(ValueError, match="expected 3"):
        combine({"a": [1.0, 0.0, 1.0], "b": [0.0]}, {})
    with pytest.raises(ValueError, match="> 0"):
        combine({"a": [1.0]}, {"a": 0.0})


def test_rank_uses_the_tie_breaker_then_reply_order() -> None:
    assert rank([0.5, 1.0, 0.5, 0.5], [0.1, 0.0, 0.3, 0.1]) == [1, 2, 0, 3]
    assert rank([0.1 + 0.2, 0.3]) == [0, 1]  # equal within TIE_EPS: reply order


# -- preference building -----------------------------------------------------------------------------


def _pref(replies: list[str], scores: list[float], tb: list[float] | None = None,
          **kw: object) -> PreferenceRecord | None:
    out = preferences_from_scores(PROMPT, replies, scores, tb, criteria=("concise@v1",), completion_id="cmpl-1",
                                  source_event_ids=("evt-1",), now=100.0, **kw)  # type: ignore[arg-type]
    assert len(out) <= 1  # pair and ranking state at most one record
    return out[0] if out else None


def test_pair_is_best_over_worst_tagged_with_the_criterion() -> None:
    rec = _pref(["mid", "best", "worst"], [0.5, 1.0, 0.0])
    assert rec is not None
    assert rec.ranked_responses == ("best", "worst") and rec.margin == 1.0
    assert rec.source_kind is FeedbackKind.CRITERIA
    assert rec.source_event_ids == ("evt-1", "criterion:concise@v1")
    assert (rec.completion_id, rec.project, rec.split, rec.created_at) == ("cmpl-1", "default", "train", 100.0)
    # survives the wire unchanged
    assert PreferenceRecord.from_kafka(rec.to_kafka()) == rec


def test_ties_never_form_a_pair() -> None:
    assert _pref(["a", "b", "c"], [0.5, 0.5, 0.5]) is None
    assert _pref(["a", "b"], [0.5, 0.5], [0.2, 0.2]) is None
    rec = _pref(["a", "b"], [0.5, 0.5], [0.2, 0.7])  # the tie-breaker decides
    assert rec is not None and rec.ranked_responses == ("b", "a") and rec.margin == 0.0
    assert _pref(["a"], [1.0]) is None and _pref([], []) is None


def test_identical_texts_collapse() -> None:
    assert _pref(["same", "same"], [1.0, 0.0]) is None  # first occurrence's score stands for the text
    rec = _pref(["x", "y", "x"], [0.2, 0.9, 0.0])
    assert rec is not None and rec.ranked_responses == ("y", "x") and rec.margin == pytest.approx(0.7)


def test_ranking_keeps_one_reply_per_tied_group() -> None:
    rec = _pref(["a", "b", "c", "d", "e"], [0.5, 1.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0], mode="ranking",
                attributes=[{"concise": s} for s in (0.5, 1.0, 0.5, 0.0, 0.5)])
    assert rec is not None
    assert rec.ranked_responses == ("b", "e", "a", "d")  # c ties a on both scores: dropped
    assert rec.response_attributes == ({"concise": 1.0}, {"concise": 0.5}, {"concise": 0.5}, {"concise": 0.0})
    assert _pref(["a", "b"], [0.3, 0.3], mode="ranking") is None


def test_record_ids_are_deterministic_and_depend_on_the_criterion_version() -> None:
    a = _pref(["x", "y"], [1.0, 0.0])
    b = _pref(["x", "y"], [0.9, 0.1])  # same order, different scores: the same preference
    [other] = preferences_from_scores(PROMPT, ["x", "y"], [1.0, 0.0], criteria=("concise@v2",),
                                      source_event_ids=("evt-1",), completion_id="cmpl-1")
    assert a is not None and b is not None and other is not None
    assert a.record_id == b.record_id != other.record_id
    assert a.record_id.startswith("pr_")


def test_bad_lengths_and_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        _pref(["a", "b"], [1.0, 0.0], mode="best")
    with pytest.raises(ValueError, match="2 replies"):
        _pref(["a", "b"], [1.0])
