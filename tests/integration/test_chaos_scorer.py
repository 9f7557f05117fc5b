"""The scorer's chaos scenarios in quick mode (bench/chaos_scorer.py): a replica killed under best-of-N
load costs no failed request and comes back; bad checkpoints are refused and recorded while the good
version keeps answering, and a restart with a bad newest version serves the newest good one."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos_scorer import corrupt_checkpoint, scorer_kill

pytestmark = pytest.mark.integration


def test_a_killed_replica_costs_no_failed_request_and_answers_again(tmp_path: Path) -> None:
    s = scorer_kill(tmp_path, kills=1, quick=True)
    assert s["failed_requests"] == 0 and s["unanswered_at_stop"] == 0, s
    assert s["recovery_s"] is not None, s
    assert s["answers_during_outage"][0] > 0, s  # the survivor took the load
    assert s["versions"] == {"v1": s["requests"]} and s["ok"], s


def test_bad_checkpoints_are_refused_and_a_restart_serves_the_newest_good_version(tmp_path: Path) -> None:
    s = corrupt_checkpoint(tmp_path, quick=True)
    assert s["failed_requests"] == 0, s
    assert [r["version"] for r in s["refused"]] == ["v2", "v3", "v4"] and s["refused_as_expected"], s
    assert s["served_during"] == ["v1"], s
    assert s["restart_serving"] == "v1" and s["recovery_s"] is not None, s
    assert s["good_served_after_s"] is not None and s["ok"], s
