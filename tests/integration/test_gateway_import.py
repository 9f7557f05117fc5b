"""`prefstream import` through a real gateway: the shipped HH data becomes exactly 2000 records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from gateway.auth import create_key
from gateway.importer import import_file
from gateway.testing import GatewayHarness, wait_for_records
from services import topics
from services.data import shared_data_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gw(kafka_bootstrap: str, redis_url: str) -> Iterator[GatewayHarness]:
    with GatewayHarness(kafka_bootstrap, redis_url) as h:
        yield h


def test_hh_train_file_imports_cleanly_into_2000_records(gw, redis_client, kafka_bootstrap) -> None:
    project = f"hh-{uuid.uuid4().hex[:6]}"
    key, _ = create_key(redis_client, project, pepper="")
    path = shared_data_dir() / "hh_helpful_train_2k.jsonl"
    summary = import_file(path, gateway=gw.address, project=project, api_key=key, progress=False)
    assert summary.ok, summary.describe()
    assert (summary.lines, summary.examples, summary.events_ok, summary.duplicates) == (2000, 2000, 4000, 0)

    records = wait_for_records(kafka_bootstrap, gw.topic(topics.PREFERENCES), lambda v: v.get("project") == project,
                               count=2000, timeout_s=240, settle_s=2.0)
    assert len(records) == 2000
    assert len({r["record_id"] for r in records}) == 2000
    assert {r["source_kind"] for r in records} == {"FEEDBACK_KIND_IMPORT"}
    assert {r["split"] for r in records} == {"SPLIT_TRAIN"}
    assert all(len(r["ranked_responses"]) == 2 for r in records)
    first = json.loads(path.read_text().splitlines()[0])
    match = [r for r in records if r["ranked_responses"][0] == first["messages"][-1]["content"]]
    assert match and match[0]["ranked_responses"][1] == first["rejected_message"]["content"]

    # Importing again writes nothing new: every event is a duplicate, no new record appears.
    again = import_file(path, gateway=gw.address, project=project, api_key=key, progress=False)
    assert (again.events_ok, again.duplicates) == (0, 4000)
    records = wait_for_records(kafka_bootstrap, gw.topic(topics.PREFERENCES), lambda v: v.get("project") == project,
                               count=2000, timeout_s=30, settle_s=3.0)
    assert len(records) == 2000


def test_cli_reports_bad_lines_and_goes_on(gw, redis_client, kafka_bootstrap, tmp_path: Path) -> None:
    project = f"cli-{uuid.uuid4().hex[:6]}"
    key, _ = create_key(redis_client, project, pepper="")
    data = tmp_path / "ranked.jsonl"
    data.write_text("\n".join([
        json.dumps({"prompt": "Pick a colour", "ranked_outputs": ["blue", "green", "red"]}),
        "{broken",
        json.dumps({"prompt": "Pick a colour", "ranked_outputs": ["only one"]}),
        json.dumps({"prompt": [{"role": "user", "content": "Pick a number"}], "ranked_outputs": ["7", "3"], "split": "TEST"}),
    ]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFSTREAM_API_KEY": key}
    out = subprocess.run([sys.executable, "-m", "prefstream", "import", str(data), "--format", "ranked", "--project", project,
                          "--gateway", gw.address, "--no-progress"], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr  # bad lines make the exit status non-zero
    assert "line 2: line: not valid JSON" in out.stderr
    assert "line 3: ranked_outputs: must list at least 2 outputs" in out.stderr
    assert "4 line(s): 2 example(s) sent, 4 event(s) written" in out.stdout
    records = wait_for_records(kafka_bootstrap, gw.topic(topics.PREFERENCES), lambda v: v.get("project") == project,
                               count=2, timeout_s=60)
    assert sorted((tuple(r["ranked_responses"]), r["split"]) for r in records) == [
        (("7", "3"), "SPLIT_TEST"), (("blue", "green", "red"), "SPLIT_TRAIN")]
    assert {r["source_kind"] for r in records} == {"FEEDBACK_KIND_IMPORT"}
