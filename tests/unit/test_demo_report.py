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


def test_heldout_snapshots_copy_the_first_version_served_past_each_point(tmp_path):
    from demo.run import MODEL_NAME, HeldoutSnapshots
    from services.checkpoints import CheckpointStore

    store = CheckpointStore(str(tmp_path / "ckpt"))
    for i in range(1, 8):
        store.write(MODEL_NAME, f"v{i:06d}", lambda d, i=i: (d / "weights.bin").write_text(f"w{i}"), {"records": []})
    kept = HeldoutSnapshots(store, tmp_path / "kept", total_events=3000, points=2)  # points at 1000, 2000
    assert not kept.offer("base", 1500)
    assert not kept.offer("v000001", 400)
    assert kept.offer("v000003", 1100) and not kept.offer("v000004", 1900)
    assert kept.offer("v000006", 2600) and not kept.offer("v000007", 2900)
    assert [(x, v) for x, v, _ in kept.kept] == [(1100, "v000003"), (2600, "v000006")]
    assert (tmp_path / "kept" / "v000006" / "weights.bin").read_text() == "w6"
    late = HeldoutSnapshots(store, tmp_path / "late", total_events=3000, points=2)
    assert late.offer("v000007", 2500)  # one version past both points stands for both
    assert [v for _, v, _ in late.kept] == ["v000007"] and not late.offer("v000007", 2950)
    assert not HeldoutSnapshots(store, tmp_path / "none", 3000, 0).offer("v000007", 2900)


def test_report_plots_heldout_points(tmp_path):
    tl = Timeline(accuracy=[(float(i), 30 * i, 0.5 + i / 1000, f"v{i:06d}") for i in range(1, 138)],
                  heldout=[(1000, 0.55, "v000033"), (4000, 0.62, "v000137")])
    write_report(tmp_path, tl, {})
    assert json.loads((tmp_path / "timeline.json").read_text())["heldout"][1] == [4000, 0.62, "v000137"]
