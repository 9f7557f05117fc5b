"""The chaos bench's ledger: what was acknowledged against what the topics hold."""

from __future__ import annotations

from bench.chaos import ledger


def test_the_ledger_counts_losses_duplicates_and_derivations_of_acked_events_only() -> None:
    acked = ["a", "b", "c", "d"]
    in_topic = ["a", "b", "b", "c", "x"]  # b written twice (a retried write that had landed); d lost; x never acked
    derived = ["a", "b", "c", "c", "x"]  # c derived twice
    assert ledger(acked, in_topic, derived) == {
        "acked": 4, "found": 3, "lost": 1, "duplicates_in_topic": 1,
        "derived": 3, "derived_missing": 1, "duplicates_derived": 1,
    }
    assert ledger([], in_topic, derived)["acked"] == 0


def test_the_summary_totals_scenarios_and_holds_every_target() -> None:
    import argparse
    from pathlib import Path

    from bench.chaos import summarize

    ingest = {"name": "redis-restart", "acked": 10, "lost": 0, "derived_missing": 0, "duplicates_derived": 3,
              "duplicates_trained": 0, "trained_missing": 0, "failed_requests": 0, "recovery_s": 0.1}
    swaps = {"name": "hot-swaps", "swaps": 100, "swap_p99_increase": 0.04, "failed_requests": 0}
    malformed = {"name": "malformed", "malformed_cases": 120, "malformed_internal_errors": 0, "unhealthy_after": 0,
                 "failed_requests": 0}
    skipped = {"name": "disk-full", "skipped": "cannot mount"}
    args = argparse.Namespace(writers=3, batch=20, swap_every_s=2.0)
    out = summarize([ingest, swaps, malformed, skipped], root=Path("/tmp"), args=args, kills=3)
    assert out["scenarios_run"] == ["redis-restart", "hot-swaps", "malformed"]
    assert out["scenarios_skipped"] == {"disk-full": "cannot mount"}
    assert (out["acked_lost_total"], out["duplicates_trained_total"], out["duplicates_derived_total"]) == (0, 0, 3)
    assert (out["swaps"], out["malformed_cases"], out["malformed_internal_errors"]) == (100, 120, 0)
    assert out["target_met"] and out["swap_target_met"]  # records derived twice are not trained twice: met
    bad = summarize([{**ingest, "duplicates_trained": 1}, swaps], root=Path("/tmp"), args=args, kills=3)
    assert not bad["target_met"] and bad["duplicates_trained_total"] == 1
    slow = summarize([{**swaps, "swap_p99_increase": 0.2}], root=Path("/tmp"), args=args, kills=3)
    assert slow["target_met"] and not slow["swap_target_met"]
