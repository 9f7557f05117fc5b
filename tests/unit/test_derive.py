"""The feedback -> preference rules of gateway.derive, rule by rule, with expected records spelled out."""

from __future__ import annotations

import pytest

from gateway.derive import (
    IMPORT_METADATA_KEY,
    Target,
    ThumbVote,
    derive,
    derive_thumbs,
    ranking_score,
    target_of,
    thumb_vote,
)
from gateway.events import (
    Choice,
    Completion,
    Edit,
    Feedback,
    InlineCompletion,
    OutputScore,
    Ranking,
    Regeneration,
    Scores,
    Thumbs,
)
from services.schemas import ChatMessage, make_record_id

PROMPT = (ChatMessage("user", "Name a prime."),)
OUTS = ("two", "four", "nine", "seven")
TARGET = Target(completion_id="cmp_1", prompt=PROMPT, outputs=OUTS, split="train", event_id="c-ev")


def fb(action, **kw) -> Feedback:
    base = dict(event_id="f-ev", project="p", action=action, completion_id="cmp_1", acked_at=100.0)
    base.update(kw)
    return Feedback(**base)


def ranked(records) -> list[tuple[str, ...]]:
    return [r.ranked_responses for r in records]


def test_choice_prefers_chosen_over_each_other_output() -> None:
    recs = derive(fb(Choice(2)), TARGET, now=5.0)
    assert ranked(recs) == [("nine", "two"), ("nine", "four"), ("nine", "seven")]
    r = recs[0]
    assert r.source_kind == "choice"
    assert r.source_event_ids == ("f-ev", "c-ev")
    assert r.completion_id == "cmp_1"
    assert r.project == "p" and r.prompt == PROMPT
    assert r.split == "train"
    assert r.source_acked_at == 100.0 and r.created_at == 5.0
    assert r.record_id == make_record_id(("f-ev", "c-ev"), ("nine", "two"))
    assert len({x.record_id for x in recs}) == 3


def test_choice_skips_outputs_identical_to_the_chosen_one_and_repeated_losers() -> None:
    target = Target("cmp_1", PROMPT, ("a", "b", "a", "b"))
    assert ranked(derive(fb(Choice(0)), target, now=0)) == [("a", "b")]


def test_choice_among_identical_outputs_states_nothing() -> None:
    assert derive(fb(Choice(0)), Target("cmp_1", PROMPT, ("same", "same")), now=0) == []


def test_regeneration_prefers_accepted_over_each_rejected_only() -> None:
    recs = derive(fb(Regeneration(rejected_indices=(0, 1), accepted_index=3)), TARGET, now=0)
    assert ranked(recs) == [("seven", "two"), ("seven", "four")]
    assert all(r.source_kind == "regeneration" for r in recs)


def test_edit_prefers_edited_text_over_draft() -> None:
    recs = derive(fb(Edit(draft_index=1, edited_text="four is not prime; two is")), TARGET, now=0)
    assert ranked(recs) == [("four is not prime; two is", "four")]
    assert recs[0].source_kind == "edit"


def test_edit_identical_to_draft_states_nothing() -> None:
    assert derive(fb(Edit(draft_index=1, edited_text="four")), TARGET, now=0) == []


def test_ranking_is_one_k_way_record_kept_whole() -> None:
    recs = derive(fb(Ranking((3, 0, 2, 1))), TARGET, now=0)
    assert ranked(recs) == [("seven", "two", "nine", "four")]
    assert recs[0].k == 4 and recs[0].source_kind == "ranking"


def test_ranking_drops_later_duplicates_of_a_text() -> None:
    target = Target("cmp_1", PROMPT, ("x", "y", "x"))
    assert ranked(derive(fb(Ranking((2, 1, 0))), target, now=0)) == [("x", "y")]
    assert derive(fb(Ranking((0, 2))), target, now=0) == []


def test_scalar_scores_rank_by_score_largest_margin_first_ties_dropped() -> None:
    scores = Scores((OutputScore(0, score=3.0), OutputScore(1, score=1.0), OutputScore(2, score=3.0), OutputScore(3, score=2.5)))
    recs = derive(fb(scores), TARGET, now=0, max_pairs=16)
    # 0 and 2 tie (3.0): no pair between them.
    assert [(r.ranked_responses, r.margin) for r in recs] == [
        (("two", "four"), 2.0),
        (("nine", "four"), 2.0),
        (("seven", "four"), 1.5),
        (("two", "seven"), 0.5),
        (("nine", "seven"), 0.5),
    ]
    assert all(r.source_kind == "scores" and r.response_attributes == () for r in recs)


def test_scores_respect_the_per_prompt_cap() -> None:
    scores = Scores(tuple(OutputScore(i, score=float(i)) for i in range(4)))
    recs = derive(fb(scores), TARGET, now=0, max_pairs=2)
    assert [(r.ranked_responses, r.margin) for r in recs] == [(("seven", "two"), 3.0), (("nine", "two"), 2.0)]


def test_all_tied_scores_state_nothing() -> None:
    scores = Scores((OutputScore(0, score=1.0), OutputScore(1, score=1.0)))
    assert derive(fb(scores), TARGET, now=0) == []


def test_multi_attribute_scores_rank_by_weights_and_carry_attributes() -> None:
    a = {"helpfulness": 4.0, "correctness": 1.0}
    b = {"helpfulness": 2.0, "correctness": 4.0}
    scores = Scores((OutputScore(0, attributes=a), OutputScore(1, attributes=b)))
    recs = derive(fb(scores), TARGET, now=0, weights={"helpfulness": 1.0})
    assert [(r.ranked_responses, r.margin) for r in recs] == [(("two", "four"), 2.0)]
    assert recs[0].response_attributes == (a, b)
    # Other weights, other order: correctness dominates.
    recs = derive(fb(scores), TARGET, now=0, weights={"helpfulness": 0.5, "correctness": 1.0})
    assert ranked(recs) == [("four", "two")]
    assert recs[0].margin == pytest.approx(2.0)


def test_ranking_score_prefers_scalar_over_attributes() -> None:
    s = OutputScore(0, score=1.5, attributes={"helpfulness": 9.0})
    assert ranking_score(s, {"helpfulness": 1.0}) == 1.5
    assert ranking_score(OutputScore(0, attributes={"verbosity": 2.0}), {"helpfulness": 1.0, "verbosity": -0.5}) == -1.0


def test_split_comes_from_feedback_then_completion_then_train() -> None:
    test_target = Target("cmp_1", PROMPT, OUTS, split="test")
    assert derive(fb(Choice(0)), test_target, now=0)[0].split == "test"
    assert derive(fb(Choice(0), split="train"), test_target, now=0)[0].split == "train"
    assert derive(fb(Choice(0), split="test"), TARGET, now=0)[0].split == "test"


def test_imported_feedback_is_source_kind_import() -> None:
    recs = derive(fb(Choice(0), metadata={IMPORT_METADATA_KEY: "openpipe"}), TARGET, now=0)
    assert {r.source_kind for r in recs} == {"import"}


def test_record_ids_are_deterministic_across_replays() -> None:
    a = derive(fb(Ranking((0, 1))), TARGET, now=1.0)
    b = derive(fb(Ranking((0, 1))), TARGET, now=2.0)
    assert [r.record_id for r in a] == [r.record_id for r in b]
    c = derive(fb(Ranking((0, 1)), event_id="other"), TARGET, now=1.0)
    assert a[0].record_id != c[0].record_id


def test_target_of_inline_and_logged_completions() -> None:
    inline = fb(Choice(0), completion_id="", inline=InlineCompletion(PROMPT, ("a", "b")))
    t = target_of(inline, None)
    assert t.outputs == ("a", "b") and t.completion_id == "" and t.event_id == ""
    assert derive(inline, t, now=0)[0].source_event_ids == ("f-ev",)
    comp = Completion(event_id="c-ev", project="p", prompt=PROMPT, candidates=OUTS, completion_id="cmp_1", split="test")
    t = target_of(fb(Choice(0)), comp)
    assert t == Target("cmp_1", PROMPT, OUTS, split="test", event_id="c-ev")
    with pytest.raises(ValueError):
        target_of(fb(Choice(0), completion_id="cmp_other"), comp)


def test_thumbs_need_derive_thumbs() -> None:
    with pytest.raises(ValueError):
        derive(fb(Thumbs(0, True)), TARGET, now=0)


# --- thumbs ---------------------------------------------------------------------------------


def vote(event_id: str, response: str, up: bool, acked: float = 0.0, split: str = "train") -> ThumbVote:
    return ThumbVote(event_id=event_id, response=response, up=up, completion_id="cmp_" + event_id,
                     completion_event_id="c-" + event_id, split=split, acked_at=acked)


def test_thumb_vote_from_feedback() -> None:
    v = thumb_vote(fb(Thumbs(index=3, up=False)), TARGET)
    assert (v.event_id, v.response, v.up, v.completion_id, v.completion_event_id, v.acked_at) == (
        "f-ev", "seven", False, "cmp_1", "c-ev", 100.0)


def test_thumbs_pair_up_over_down_when_both_exist() -> None:
    assert derive_thumbs(vote("a", "good", True), [], project="p", prompt=PROMPT, now=0) == []
    recs = derive_thumbs(vote("b", "bad", False, acked=7.0), [vote("a", "good", True)], project="p", prompt=PROMPT, now=9.0)
    assert ranked(recs) == [("good", "bad")]
    r = recs[0]
    assert r.source_kind == "thumbs"
    assert r.source_event_ids == ("a", "b", "c-a", "c-b")
    assert r.completion_id == "cmp_a"  # the preferred response's completion
    assert r.source_acked_at == 7.0  # the vote that made the pair derivable


def test_thumbs_same_direction_or_same_text_do_not_pair() -> None:
    others = [vote("a", "x", True), vote("b", "y", True), vote("c", "z", False)]
    assert ranked(derive_thumbs(vote("d", "w", True), others, project="p", prompt=PROMPT, now=0)) == [("w", "z")]
    # The same text voted down by someone else: no self-pair.
    assert derive_thumbs(vote("e", "x", False), [vote("a", "x", True)], project="p", prompt=PROMPT, now=0) == []
    # A replayed vote does not pair with itself.
    assert derive_thumbs(vote("a", "x", True), [vote("a", "x", True)], project="p", prompt=PROMPT, now=0) == []


def test_new_down_vote_pairs_with_each_earlier_up_oldest_first_capped() -> None:
    ups = [vote(f"u{i}", f"good{i}", True, acked=float(10 - i)) for i in range(5)]
    recs = derive_thumbs(vote("d", "bad", False), ups, project="p", prompt=PROMPT, now=0, max_pairs=3)
    assert ranked(recs) == [("good4", "bad"), ("good3", "bad"), ("good2", "bad")]


def test_thumbs_pair_is_test_when_either_vote_is() -> None:
    recs = derive_thumbs(vote("b", "bad", False, split="test"), [vote("a", "good", True)], project="p", prompt=PROMPT, now=0)
    assert recs[0].split == "test"


def test_thumb_vote_round_trips_through_dict() -> None:
    v = vote("a", "x", True, acked=3.5, split="test")
    assert ThumbVote.from_dict(v.to_dict()) == v
