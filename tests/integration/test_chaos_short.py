"""The short version of ``prefstream bench chaos``: one kill -9 of the feedback processor under retrying
clients; every acknowledged event is in the topic and derived exactly once, and the restarted processor
(a static group member) derives again."""

from __future__ import annotations

import argparse

import pytest

from bench.chaos import run

pytestmark = pytest.mark.integration


def test_a_killed_processor_restarts_where_it_left_off_and_derives_each_event_once() -> None:
    result = run(argparse.Namespace(quick=True, scenario=["processor-kill"], kills=1, writers=2, batch=10))
    (s,) = result["scenarios"]
    assert s["acked"] > 0 and s["unacked_at_end"] == 0, s
    assert (s["lost"], s["derived_missing"], s["duplicates_derived"], s["failed_requests"]) == (0, 0, 0, 0), s
    assert s["recovery_s"] is not None, s
