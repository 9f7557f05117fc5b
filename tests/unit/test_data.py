"""services.data: the shipped HH-RLHF files parse completely, and bad lines are reported by number."""

import json

import pytest

from services.data import TEST_FILE, TRAIN_FILE, LineError, iter_openpipe_jsonl, load_openpipe_jsonl, shared_data_dir
from services.errors import InvalidArgument


def test_shipped_files_parse():
    train = load_openpipe_jsonl(shared_data_dir() / TRAIN_FILE)
    test = load_openpipe_jsonl(shared_data_dir() / TEST_FILE)
    assert len(train) == 2000 and len(test) == 500
    assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}
    assert all(r.k == 2 and r.prompt and r.prompt[-1].role == "user" for r in train)
    assert len({r.record_id for r in train + test}) == 2500


def test_bad_lines_reported_with_numbers(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected_message": {"role": "assistant", "content": "b"}, "split": "TEST"}
    lines = [
        json.dumps(good),
        "{oops",
        json.dumps({**good, "rejected_message": None}),
        json.dumps({**good, "split": "DEV"}),
        json.dumps({**good, "messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}),
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    items = list(iter_openpipe_jsonl(f))
    errors = [i for i in items if isinstance(i, LineError)]
    assert [e.line for e in errors] == [2, 3, 4, 5]
    assert errors[1].field == "rejected_message" and errors[2].field == "split"
    assert errors[3].field == "messages[1].role"
    with pytest.raises(InvalidArgument, match=":2:line"):
        load_openpipe_jsonl(f)
    assert len(load_openpipe_jsonl(f, strict=False)) == 1
