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
