"""The short version of ``prefstream bench chaos``: a kill -9 of the feedback processor and a kill -9 of
Redis, each under retrying ingest clients, a continual trainer and a best-of-N load.  Every acknowledged
event is in the topic, derived, and trained exactly once (Redis losing the processor's newest markers
puts records on the preference topic twice; the trainer skips what it trained already), no request
fails, and each part comes back."""

from __future__ import annotations

import argparse

import pytest

from bench.chaos import run

pytestmark = pytest.mark.integration


def test_killed_parts_restart_where_they_left_off_and_every_event_is_trained_once() -> None:
    result = run(argparse.Namespace(quick=True, scenario=["processor-kill", "redis-restart"], kills=1, writers=2,
                                    batch=10, swap_every_s=2.0, swaps=None))
    for s in result["scenarios"]:
        assert s["acked"] > 0 and s["unacked_at_end"] == 0, s
        assert (s["lost"], s["derived_missing"], s["failed_requests"]) == (0, 0, 0), s
        assert (s["trained_missing"], s["trained_unknown"], s["duplicates_trained"]) == (0, 0, 0), s
        assert s["bestofn"]["requests"] > 0 and s["bestofn"]["failed_requests"] == 0, s
        assert s["recovery_s"] is not None, s
    assert result["target_met"], result
