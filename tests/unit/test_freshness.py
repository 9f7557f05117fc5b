"""Freshness is computed from checkpoint contents and served versions, worked by hand."""

from demo.freshness import VersionContents, compute, first_served_times, percentile, summarize


def test_first_served_times():
    assert first_served_times([(5.0, "v2"), (3.0, "v1"), (4.0, "v2"), (1.0, "")]) == {"v1": 3.0, "v2": 4.0}


def test_compute_by_hand():
    versions = [
        VersionContents("v1", 1, ("a", "b")),
        VersionContents("v2", 2, ("c",), published=False),  # rejected: never served
        VersionContents("v3", 3, ("d",)),
    ]
    acks = {"a": 10.0, "b": 11.0, "c": 12.0, "d": 13.0, "e": 14.0}
    served = {"v1": 20.0, "v3": 30.0}
    samples, unserved = compute(acks, versions, served)
    by_key = {s.key: s for s in samples}
    assert by_key["a"].seconds == 10.0 and by_key["a"].version == "v1"
    assert by_key["b"].seconds == 9.0
    # c was first in the rejected v2; v3 (cumulative) is the first served version containing it
    assert by_key["c"].version == "v3" and by_key["c"].seconds == 18.0
    assert by_key["d"].seconds == 17.0
    assert unserved == ["e"]


def test_later_version_served_earlier_counts():
    # v1 published but a scorer saw v2 first (it skipped v1): a key in v1 is served at v2's time
    versions = [VersionContents("v1", 1, ("a",)), VersionContents("v2", 2, ("b",))]
    samples, unserved = compute({"a": 0.0}, versions, {"v2": 5.0})
    assert [(s.version, s.seconds) for s in samples] == [("v2", 5.0)] and not unserved


def test_percentiles():
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4, 5], 99) == 4.96
    s = summarize([])
    assert s["freshness_p50_s"] is None and s["freshness_samples"] == 0


def test_convergence_waits_for_the_slowest_replica_and_counts_skipped_versions() -> None:
    from demo.freshness import convergence, summarize_convergence

    published = {"v000001": 100.0, "v000002": 110.0, "v000003": 120.0}
    first_seen = {
        0: {"base": 50.0, "v000001": 101.0, "v000002": 111.0, "v000003": 121.5},
        1: {"base": 50.0, "v000001": 103.0, "v000003": 122.0},  # swapped straight past v000002
        2: {"base": 50.0, "v000001": 102.0, "v000002": 114.0},  # never reached v000003
    }
    by_version, never = convergence(published, first_seen)
    # v000001: the slowest replica (1) served it 3 s after publish; v000002: replica 1 only served a newer
    # version at 122 (12 s), replica 2 at 114; v000003: replica 2 never served it.
    assert by_version == {"v000001": 3.0, "v000002": 12.0}
    assert never == ["v000003"]
    summary = summarize_convergence(published, first_seen)
    assert summary["convergence_max_s"] == 12.0 and summary["unconverged_versions"] == ["v000003"]
    assert summary["convergence_p50_s"] == 7.5
    assert convergence({}, first_seen) == ({}, [])
    assert convergence(published, {}) == ({}, ["v000001", "v000002", "v000003"])
