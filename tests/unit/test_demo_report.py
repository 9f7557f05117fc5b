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
