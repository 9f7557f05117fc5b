"""The benchmark table: each target judged from result JSON, and the README's copy replaced in place."""

from bench.report import render_table, update_readme


def test_table_marks_targets():
    results = {
        "ingest": {"mode": "full", "ratio_stream_vs_raw": 0.6, "lost_events": 0, "machine": {"cpu_model": "X"}},
        "scorer": {"mode": "full", "ratio_vs_pipeline": 1.2, "fraction_of_matmul_bound": 0.9,
                   "failed_requests_during_swaps": 0, "swaps": 6, "machine": {"cpu_model": "X", "gpu": None}},
    }
    table = render_table(results)
    lines = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| ingest") or line.startswith("| scorer")}
    assert lines["gateway streaming >= 50% of raw producer"].rstrip(" |").endswith("yes")
    assert "**no**" in lines["CPU >= 1.5x pipeline; GPU >= 10x"]
    assert "not run" in table  # train-reward and freshness rows
    assert "Machine: X." in table


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table -->\nold\n<!-- /bench-table -->\nrest\n")
    assert update_readme(readme, "| new |\n")
    assert readme.read_text() == "intro\n<!-- bench-table -->\n| new |\n<!-- /bench-table -->\nrest\n"
    other = tmp_path / "other.md"
    other.write_text("no markers")
    assert not update_readme(other, "x")


def test_a_terminated_benchmark_unwinds_so_it_stops_what_it_started(tmp_path, monkeypatch):
    """SIGTERM during a ``prefstream`` command (here a benchmark) raises KeyboardInterrupt in it, so its
    ``finally`` blocks stop the stack and the services it started (measured: a terminated
    criteria-loop bench left them running); the command exits 130 and writes no result."""
    import os
    import signal
    import types

    import bench.cli
    from prefstream.cli import main

    stopped = []

    def run(_args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return {"never": "reached"}
        finally:
            stopped.append(True)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(bench.cli.BENCHMARKS, "fake", "bench.fake")
    monkeypatch.setattr(bench.cli, "_load", lambda _name: types.SimpleNamespace(run=run, add_arguments=lambda p: None))
    out = tmp_path / "r.json"
    try:
        assert main(["bench", "fake", "--quick", "--verbose", "--out", str(out)]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == [True] and not out.exists()
