"""The demo report renders every figure and the summary from a recorded timeline."""

import json

from demo.report import Timeline, write_report


def test_report_files(tmp_path):
    tl = Timeline(
        accuracy=[(1.0, 0, 0.5, "base"), (20.0, 300, 0.58, "v000001")],
        freshness=[(20.0, 12.5, "v000001"), (21.0, 13.0, "v000001")],
        latency=[(1.0, 40.0, "base", True), (20.5, 45.0, "v000001", True), (21.0, 0.0, "", False)],
        swaps=[(20.5, "v000001")],
    )
    path = write_report(tmp_path, tl, {"freshness_p50_s": 12.75, "events": 600})
    html = path.read_text()
    assert "freshness_p50_s" in html and "12.75" in html
    for png in ("accuracy.png", "freshness.png", "latency.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert png in html
    assert json.loads((tmp_path / "timeline.json").read_text())["swaps"] == [[20.5, "v000001"]]


def test_a_hundred_versions_get_a_few_spread_labels():
    from demo.report import spaced

    xs = [i * 30 for i in range(137)]  # the demo's 137 versions over 4000 events
    labels = spaced(xs, 6)
    assert labels[0] == 0 and labels[-1] == 136 and len(labels) == 6
    gaps = [xs[b] - xs[a] for a, b in zip(labels, labels[1:])]
    assert min(gaps) >= 0.8 * (xs[-1] / 5)  # evenly spread, none crowding its neighbour
    assert spaced([5, 7], 6) == [0, 1] and spaced([], 6) == [] and spaced([1, 2, 3], 0) == []


def test_heldout_points_are_spread_over_the_events_and_end_with_the_final_version(tmp_path):
    from demo.run import heldout_versions

    served = [(1.0, 0, 0.5, "base")] + [(float(i), 40 * i, 0.5, f"v{i:06d}") for i in range(1, 101)]
    assert heldout_versions(served[1:], "v000100", 2) == [(1320, "v000033"), (2680, "v000067"), (4000, "v000100")]
    assert heldout_versions(served[1:], "v000100", 0) == [(4000, "v000100")]
    assert heldout_versions(served[1:], "v000050", 1) == [(1000, "v000025"), (2000, "v000050")]  # later ones ignored
    assert heldout_versions(served[1:2], "v000001", 3) == [(40, "v000001")]
    assert heldout_versions(served[1:10], "v000099", 2) == []  # the final version was never seen served: none


def test_report_plots_heldout_points(tmp_path):
    tl = Timeline(accuracy=[(float(i), 30 * i, 0.5 + i / 1000, f"v{i:06d}") for i in range(1, 138)],
                  heldout=[(1000, 0.55, "v000033"), (4000, 0.62, "v000137")])
    write_report(tmp_path, tl, {})
    assert json.loads((tmp_path / "timeline.json").read_text())["heldout"][1] == [4000, 0.62, "v000137"]
