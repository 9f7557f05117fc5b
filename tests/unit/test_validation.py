"""Every validation rule of gateway.validation: the field it names and the limit it states."""

from __future__ import annotations

import math

import pytest

from gateway.events import Choice, Completion, Edit, Feedback, OutputScore, Ranking, Regeneration, Scores, Thumbs, completion_id_for
from gateway.validation import (
    Limits,
    check_feedback_against,
    check_feedback_indices,
    completion_from_proto,
    feedback_from_proto,
    parse_json,
)
from prefstream.events.v1 import events_pb2 as ev
from services.errors import InvalidArgument

LIMITS = Limits(max_prompt_messages=4, max_message_chars=50, max_candidates=4, max_output_chars=40,
                max_metadata_entries=2, max_metadata_chars=10, max_id_chars=20)
USER = ev.ChatMessage(role=ev.ROLE_USER, content="hello")


def completion(**kw) -> ev.Completion:
    base = dict(event_id="e1", project="proj", prompt=[USER], candidates=["a", "b"])
    base.update(kw)
    return ev.Completion(**base)


def feedback(**kw) -> ev.Feedback:
    base = dict(event_id="f1", project="proj", completion_id="cmp_x", choice=ev.Choice(chosen_index=0))
    base.update(kw)
    return ev.Feedback(**base)


def inline(n: int = 3) -> ev.InlineCompletion:
    return ev.InlineCompletion(prompt=[USER], outputs=[f"out{i}" for i in range(n)])


def test_valid_completion_becomes_domain_event() -> None:
    c = completion_from_proto(completion(model="m", model_version="v1", metadata={"k": "v"}, split=ev.SPLIT_TEST), LIMITS)
    assert c == Completion(event_id="e1", project="proj", prompt=c.prompt, candidates=("a", "b"),
                           completion_id=completion_id_for("proj", "e1"), model="m", model_version="v1",
                           metadata={"k": "v"}, split="test")
    assert c.prompt[0].role == "user"


def test_completion_id_is_assigned_and_event_id_can_be_given_by_the_caller_of_validation() -> None:
    c = completion_from_proto(completion(event_id=""), LIMITS, assigned_event_id="gw-1")
    assert c.event_id == "gw-1" and c.completion_id == completion_id_for("proj", "gw-1")
    same = completion_from_proto(completion(completion_id=completion_id_for("proj", "e1")), LIMITS)
    assert same.completion_id == completion_id_for("proj", "e1")


BAD_COMPLETIONS = [
    (dict(project=""), "completion.project", "is required"),
    (dict(project="has space"), "completion.project", "not a project name"),
    (dict(project="p" * 21), "completion.project", "the limit is 20"),
    (dict(event_id="e" * 21), "completion.event_id", "the limit is 20"),
    (dict(event_id="with space"), "completion.event_id", "printable ASCII"),
    (dict(completion_id="cmp_mine"), "completion.completion_id", "assigned by the gateway"),
    (dict(prompt=[]), "completion.prompt", "at least one message"),
    (dict(prompt=[USER] * 5), "completion.prompt", "has 5 messages; the limit is 4"),
    (dict(prompt=[USER, ev.ChatMessage(role=ev.ROLE_UNSPECIFIED, content="x")]), "completion.prompt[1].role", "unknown role 0"),
    (dict(prompt=[ev.ChatMessage(role=9, content="x")]), "completion.prompt[0].role", "unknown role 9"),
    (dict(prompt=[ev.ChatMessage(role=ev.ROLE_USER, content="  ")]), "completion.prompt[0].content", "empty"),
    (dict(prompt=[ev.ChatMessage(role=ev.ROLE_USER, content="x" * 51)]), "completion.prompt[0].content", "51 characters; the limit is 50"),
    (dict(candidates=[]), "completion.candidates", "at least one candidate"),
    (dict(candidates=["a"] * 5), "completion.candidates", "5 candidate outputs; the limit is 4"),
    (dict(candidates=["a", ""]), "completion.candidates[1]", "empty"),
    (dict(candidates=["a", "x" * 41]), "completion.candidates[1]", "the limit is 40"),
    (dict(model="m m"), "completion.model", "printable ASCII"),
    (dict(metadata={"a": "1", "b": "2", "c": "3"}), "completion.metadata", "3 entries; the limit is 2"),
    (dict(metadata={"k": "v" * 11}), "completion.metadata['k']", "the limit is 10"),
    (dict(metadata={"": "v"}), "completion.metadata", "empty key"),
    (dict(split=7), "completion.split", "unknown split 7"),
]


@pytest.mark.parametrize("fields,field,text", BAD_COMPLETIONS, ids=[b[1] + ":" + b[2][:20] for b in BAD_COMPLETIONS])
def test_malformed_completions_name_field_and_limit(fields: dict, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        completion_from_proto(completion(**fields), LIMITS)
    assert err.value.field == field
    assert text in err.value.message


def test_valid_feedback_of_every_kind() -> None:
    kinds = {
        "choice": feedback(choice=ev.Choice(chosen_index=1)),
        "regeneration": feedback(regeneration=ev.Regeneration(rejected_indices=[0, 2], accepted_index=1)),
        "edit": feedback(edit=ev.Edit(draft_index=0, edited_text="better")),
        "ranking": feedback(ranking=ev.Ranking(ranked_indices=[2, 0, 1])),
        "scores": feedback(scores=ev.Scores(scores=[ev.OutputScore(index=0, score=1.0), ev.OutputScore(index=1, score=0.0)])),
        "thumbs": feedback(thumbs=ev.Thumbs(index=1, up=True)),
    }
    for kind, msg in kinds.items():
        fb = feedback_from_proto(msg, LIMITS)
        assert fb.kind == kind and fb.completion_id == "cmp_x" and fb.inline is None and fb.split == ""
    fb = feedback_from_proto(kinds["scores"], LIMITS)
    assert fb.action == Scores((OutputScore(0, score=1.0), OutputScore(1, score=0.0)))


def test_inline_feedback_is_checked_against_its_outputs() -> None:
    fb = feedback_from_proto(feedback(completion_id="", inline=inline(3), ranking=ev.Ranking(ranked_indices=[2, 1])), LIMITS)
    assert fb.inline is not None and fb.inline.outputs == ("out0", "out1", "out2")
    with pytest.raises(InvalidArgument) as err:
        feedback_from_proto(feedback(inline=inline(2), thumbs=ev.Thumbs(index=2)), LIMITS)
    assert err.value.field == "feedback.thumbs.index"
    assert "out of range: the completion has 2 output(s)" in err.value.message


def _attr_scores(*items: dict) -> ev.Scores:
    return ev.Scores(scores=[ev.OutputScore(**i) for i in items])


def F(kind: tuple[str, object] | None = ("choice", ev.Choice(chosen_index=0)), *, target: object = "cmp_x", **scalars: object) -> ev.Feedback:
    """A Feedback message: ``kind`` is (oneof name, message) or None; ``target`` a completion id, an
    InlineCompletion, or None for no target."""
    msg = ev.Feedback(**{"event_id": "f1", "project": "proj", **scalars})
    if isinstance(target, str):
        msg.completion_id = target
    elif target is not None:
        msg.inline.CopyFrom(target)
    if kind is not None:
        getattr(msg, kind[0]).CopyFrom(kind[1])
    return msg


BAD_FEEDBACK = [
    (F(project=""), "feedback.project", "is required"),
    (F(event_id="x" * 21), "feedback.event_id", "the limit is 20"),
    (F(target=None), "feedback.target", "completion_id or carry it inline"),
    (F(kind=None), "feedback.kind", "set one of choice"),
    (F(user_id="u u"), "feedback.user_id", "printable ASCII"),
    (F(split=5), "feedback.split", "unknown split 5"),
    (F(target=ev.InlineCompletion(prompt=[], outputs=["a"])), "feedback.inline.prompt", "at least one message"),
    (F(target=ev.InlineCompletion(prompt=[USER], outputs=["a", " "])), "feedback.inline.outputs[1]", "empty"),
    (F(target=inline(1)), "feedback.choice", "a choice needs at least 2"),
    (F(("choice", ev.Choice(chosen_index=2)), target=inline(2)), "feedback.choice.chosen_index", "index 2 is out of range"),
    (F(("regeneration", ev.Regeneration(accepted_index=1))), "feedback.regeneration.rejected_indices", "at least one rejected"),
    (F(("regeneration", ev.Regeneration(rejected_indices=[0, 0], accepted_index=1))),
     "feedback.regeneration.rejected_indices[1]", "appears twice"),
    (F(("regeneration", ev.Regeneration(rejected_indices=[1], accepted_index=1))),
     "feedback.regeneration.accepted_index", "also listed as rejected"),
    (F(("edit", ev.Edit(draft_index=0, edited_text=""))), "feedback.edit.edited_text", "empty"),
    (F(("edit", ev.Edit(draft_index=0, edited_text="x" * 41))), "feedback.edit.edited_text", "the limit is 40"),
    (F(("edit", ev.Edit(draft_index=0, edited_text="out0")), target=inline(2)), "feedback.edit.edited_text", "identical to the draft"),
    (F(("ranking", ev.Ranking(ranked_indices=[1]))), "feedback.ranking.ranked_indices", "K >= 2"),
    (F(("ranking", ev.Ranking(ranked_indices=[0, 1, 2, 3, 4]))), "feedback.ranking.ranked_indices", "the limit is 4"),
    (F(("ranking", ev.Ranking(ranked_indices=[0, 2, 0]))), "feedback.ranking.ranked_indices[2]", "index 0 appears twice"),
    (F(("ranking", ev.Ranking(ranked_indices=[0, 3])), target=inline(3)), "feedback.ranking.ranked_indices[1]", "index 3 is out of range"),
    (F(("scores", _attr_scores({"index": 0, "score": 1.0}))), "feedback.scores.scores", "at least 2 outputs"),
    (F(("scores", _attr_scores({"index": 0, "score": 1.0}, {"index": 0, "score": 2.0}))),
     "feedback.scores.scores[].index[1]", "appears twice"),
    (F(("scores", _attr_scores({"index": 0, "score": 1.0}, {"index": 1, "score": math.nan}))),
     "feedback.scores.scores[1].score", "finite"),
    (F(("scores", _attr_scores({"index": 0, "score": math.inf}, {"index": 1, "score": 1.0}))),
     "feedback.scores.scores[0].score", "finite"),
    (F(("scores", _attr_scores({"index": 0, "attributes": {"humor": 1.0}}, {"index": 1, "score": 1.0}))),
     "feedback.scores.scores[0].attributes['humor']", "unknown attribute 'humor'"),
    (F(("scores", _attr_scores({"index": 0, "attributes": {"helpfulness": math.nan}}, {"index": 1, "attributes": {"helpfulness": 1.0}}))),
     "feedback.scores.scores[0].attributes['helpfulness']", "finite"),
    (F(("scores", _attr_scores({"index": 0}, {"index": 1, "score": 1.0}))), "feedback.scores.scores[0]", "neither a score nor attributes"),
    (F(("scores", _attr_scores({"index": 0, "score": 1.0}, {"index": 1, "attributes": {"helpfulness": 1.0}}))),
     "feedback.scores.scores[1].score", "score every output the same way"),
    (F(("scores", _attr_scores({"index": 0, "attributes": {"verbosity": 1.0}}, {"index": 1, "attributes": {"verbosity": 2.0}}))),
     "feedback.scores.scores[0].attributes", "none of the ranking attributes"),
    (F(("scores", _attr_scores({"index": 0, "score": 1.0}, {"index": 5, "score": 2.0})), target=inline(2)),
     "feedback.scores.scores[1].index", "index 5 is out of range"),
    (F(("thumbs", ev.Thumbs(index=4)), target=inline(3)), "feedback.thumbs.index", "index 4 is out of range"),
]


@pytest.mark.parametrize("msg,field,text", BAD_FEEDBACK, ids=[b[1] + ":" + b[2][:20] for b in BAD_FEEDBACK])
def test_malformed_feedback_names_field_and_limit(msg: ev.Feedback, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        feedback_from_proto(msg, LIMITS)
    assert err.value.field == field
    assert text in err.value.message


def test_checks_against_a_logged_completion() -> None:
    fb = Feedback(event_id="f", project="p", action=Regeneration((0, 3), 1), completion_id="c")
    with pytest.raises(InvalidArgument) as err:
        check_feedback_indices(fb, 3)
    assert err.value.field == "feedback.regeneration.rejected_indices[1]"
    check_feedback_indices(fb, 4)
    edit = Feedback(event_id="f", project="p", action=Edit(1, "b"), completion_id="c")
    with pytest.raises(InvalidArgument) as err:
        check_feedback_against(edit, ["a", "b"])
    assert err.value.field == "feedback.edit.edited_text"
    check_feedback_against(edit, ["a", "c"])
    for action in (Choice(0), Ranking((0, 1)), Thumbs(1, False), Scores((OutputScore(0, 1.0), OutputScore(1, 2.0)))):
        check_feedback_indices(Feedback(event_id="f", project="p", action=action, completion_id="c"), 2)


def test_parse_json_names_the_offending_path() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_json(b'{"prompt": [{"role": "usr"}]}', ev.Completion, root="completion")
    assert err.value.field == "completion.prompt[0].role"
    assert "Invalid enum value usr" in err.value.message
    # enums as people type them: the lowercase short name beside the proto name
    said = parse_json(b'{"prompt": [{"role": "user", "content": "q"}, {"role": " Assistant", "content": "a"}], '
                      b'"split": "test", "candidates": ["x"]}', ev.Completion, root="completion")
    assert [m.role for m in said.prompt] == [ev.ROLE_USER, ev.ROLE_ASSISTANT] and said.split == ev.SPLIT_TEST
    with pytest.raises(InvalidArgument, match="prompt.0..role"):
        parse_json(b'{"prompt": [{"role": "unspecified_user"}]}', ev.Completion, root="completion")
    with pytest.raises(InvalidArgument) as err:
        parse_json(b'{"promt": []}', ev.Completion, root="completion")
    assert err.value.field == "completion" and "promt" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        parse_json(b"not json", ev.Completion, root="completion")
    assert err.value.field == "completion" and "not valid JSON" in err.value.message
    msg = parse_json(b'{"project": "p", "prompt": [{"role": "ROLE_USER", "content": "hi"}]}', ev.Completion, root="completion")
    assert msg.project == "p" and msg.prompt[0].role == ev.ROLE_USER
