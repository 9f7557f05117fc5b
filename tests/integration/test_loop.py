"""The whole loop against the real stack: events in, trained, published, swapped in, served, accounted.

A short run of the demo's own code path, scaled out (the short version of ``bench scale``): a simulated
app logs completions and choices through two real gateway processes (a pair's completion through one,
its choice through the other; their processors share one consumer group), a real trainer process trains
and publishes gated versions, two real scorer replicas swap them in under best-of-N load spread over both.  Then: a new version was published and served (a response carries
it), no scorer request failed, and the event ledger accounts for every acked event (trained,
evaluated or dead-lettered with a reason).
"""

from __future__ import annotations

import pytest

from demo.config import load_demo_config
from demo.run import run_demo


@pytest.mark.slow
def test_short_loop_end_to_end(stack, tmp_path):
    cfg = load_demo_config(env={}, overrides={
        "run_dir": str(tmp_path / "run"),
        "stack_run_dir": str(stack.cfg.run_path),
        "events": 40,
        "rate": 8.0,
        "load_rate": 2.0,
        "checkpoint_every_s": 4.0,
        "checkpoint_every_records": 16,
        "eval_max_records": 16,
        "final_eval_records": 0,
        "drain_timeout_s": 120.0,
        "progress_every_s": 2.0,
        "gateway_replicas": 2,
        "scorer_replicas": 2,
    })
    summary = run_demo(cfg, write_html=False)

    assert summary["events"] == 80  # 40 completions + 40 choices, all acked
    assert summary["app_failed_calls"] == 0
    assert summary["records_trained"] == 40
    assert summary["versions_published"] >= 1
    # a scorer response carried a version trained on the new events
    assert any(v != "base" for v in summary["served_versions"])
    assert summary["final_version"] in summary["served_versions"]
    assert summary["failed_requests"] == 0, summary["scorer_errors"]
    # every acknowledged event is accounted for
    assert summary["ledger_complete"], summary["ledger"]
    assert summary["ledger"]["trained"] + summary["ledger"]["evaluated"] + summary["ledger"]["dead_lettered"] == 80
    assert summary["freshness_samples"] == 40 and summary["freshness_p50_s"] > 0
    # both replicas answered, and each published version reached both of them
    assert (summary["gateway_replicas"], summary["scorer_replicas"]) == (2, 2)
    assert set(summary["per_replica_served"]) == {"0", "1"}
    assert all(summary["final_version"] in summary["replica_first_served"][r] for r in ("0", "1"))
    assert summary["unconverged_versions"] == [] and summary["convergence_p99_s"] is not None
