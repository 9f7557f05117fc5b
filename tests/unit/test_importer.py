"""Dataset parsing of the importer: each format, its errors, and the events an example becomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.derive import IMPORT_METADATA_KEY
from gateway.events import completion_id_for
from gateway.importer import (
    Example,
    detect_format,
    example_events,
    parse_hh,
    parse_hh_transcript,
    parse_openpipe_example,
    parse_ranked,
    parse_trl,
    read_items,
)
from gateway.validation import Limits, completion_from_proto, feedback_from_proto
from prefstream.events.v1 import events_pb2 as ev
from services.data import shared_data_dir
from services.errors import InvalidArgument
from services.schemas import ChatMessage

U = ChatMessage("user", "Hi?")


def test_openpipe_pair_with_split() -> None:
    obj = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "good"}],
           "rejected_message": {"role": "assistant", "content": "bad"}, "split": "TEST"}
    ex = parse_openpipe_example(obj)
    assert ex == Example(prompt=(ChatMessage("system", "S"), U), outputs=("good", "bad"), split="test")


def test_ranked_example() -> None:
    ex = parse_ranked({"prompt": "Hi?", "ranked_outputs": ["a", "b", "c"]})
    assert ex == Example(prompt=(U,), outputs=("a", "b", "c"), ranked=True)
    with pytest.raises(InvalidArgument, match="at least 2"):
        parse_ranked({"prompt": "Hi?", "ranked_outputs": ["a"]})
    with pytest.raises(InvalidArgument) as err:
        parse_ranked({"prompt": "Hi?", "ranked_outputs": ["a", ""]})
    assert err.value.field == "ranked_outputs[1]"
    with pytest.raises(InvalidArgument, match="same output twice"):
        parse_ranked({"prompt": "Hi?", "ranked_outputs": ["a", "a"]})


def test_trl_standard_conversational_and_implicit_prompt() -> None:
    assert parse_trl({"prompt": "Hi?", "chosen": "good", "rejected": "bad"}).outputs == ("good", "bad")
    conv = {"prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}
    assert parse_trl(conv) == Example(prompt=(U,), outputs=("good", "bad"))
    implicit = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "bad"}]}
    assert parse_trl(implicit) == Example(prompt=(U,), outputs=("good", "bad"))
    with pytest.raises(InvalidArgument) as err:
        parse_trl({"chosen": "good", "rejected": "bad"})
    assert err.value.field == "prompt"
    with pytest.raises(InvalidArgument, match="identical"):
        parse_trl({"prompt": "Hi?", "chosen": "same", "rejected": "same"})


def test_hh_transcripts() -> None:
    msgs = parse_hh_transcript("\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Weather?\n\nAssistant: Sunny.", "chosen")
    assert [(m.role, m.content) for m in msgs] == [("user", "Hi?"), ("assistant", "Hello."), ("user", "Weather?"), ("assistant", "Sunny.")]
    ex = parse_hh({"chosen": "\n\nHuman: Hi?\n\nAssistant: good", "rejected": "\n\nHuman: Hi?\n\nAssistant: bad"})
    assert ex == Example(prompt=(U,), outputs=("good", "bad"))
    with pytest.raises(InvalidArgument, match="share every turn"):
        parse_hh({"chosen": "\n\nHuman: Hi?\n\nAssistant: good", "rejected": "\n\nHuman: Yo?\n\nAssistant: bad"})
    with pytest.raises(InvalidArgument, match="start with"):
        parse_hh_transcript("Hello there", "chosen")


def test_detect_format() -> None:
    assert detect_format({"messages": [], "rejected_message": {}}) == "openpipe"
    assert detect_format({"prompt": "x", "ranked_outputs": []}) == "ranked"
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "..."}) == "hh"
    assert detect_format({"prompt": "x", "chosen": "a", "rejected": "b"}) == "trl"
    with pytest.raises(InvalidArgument):
        detect_format({"text": "x"})


def test_example_events_are_valid_and_deterministic() -> None:
    ex = Example(prompt=(U,), outputs=("good", "bad"), split="test")
    c, f = example_events(ex, project="proj", fmt="openpipe")
    c2, f2 = example_events(ex, project="proj", fmt="openpipe")
    assert c == c2 and f == f2
    assert f.completion_id == completion_id_for("proj", c.event_id)
    assert f.WhichOneof("kind") == "choice" and f.choice.chosen_index == 0
    assert c.split == ev.SPLIT_TEST and f.metadata[IMPORT_METADATA_KEY] == "openpipe"
    completion_from_proto(c, Limits())
    feedback_from_proto(f, Limits())
    other, _ = example_events(Example(prompt=(U,), outputs=("good", "worse")), project="proj", fmt="openpipe")
    assert other.event_id != c.event_id
    rc, rf = example_events(Example(prompt=(U,), outputs=("a", "b", "c"), ranked=True), project="proj", fmt="ranked")
    assert list(rf.ranking.ranked_indices) == [0, 1, 2] and list(rc.candidates) == ["a", "b", "c"]


def test_read_items_jsonl_with_bad_lines_and_json_arrays(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n{"b": 2}\n')
    items = list(read_items(p))
    assert [n for n, _ in items] == [1, 3, 4]
    assert isinstance(items[1][1], json.JSONDecodeError)
    q = tmp_path / "d.json"
    q.write_text(json.dumps([{"a": 1}, {"b": 2}]))
    assert list(read_items(q)) == [(1, {"a": 1}), (2, {"b": 2})]


def test_every_line_of_the_shipped_hh_data_parses() -> None:
    path = shared_data_dir() / "hh_helpful_train_2k.jsonl"
    examples = [parse_openpipe_example(obj) for _, obj in read_items(path)]
    assert len(examples) == 2000
    assert len({example_events(e, project="p", fmt="openpipe")[0].event_id for e in examples}) == 2000
