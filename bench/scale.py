"""``prefstream bench scale``: the loop scaled out on one machine, every replica working together.

The demo's loop (real stack, real processes, HH-RLHF pairs as live feedback, the MiniLM reward model)
with 2 gateway processes (each with its feedback processor, one consumer group over the topics'
partitions; a pair's completion enters through one gateway and its feedback through the other), the
trainer on 2 Ray Train workers (DDP), and 3 scorer replicas under a steady best-of-N load spread
round-robin while the trainer publishes.  Reported:

* ``acked_events`` / ``lost_events``: every acknowledged event accounted for in Kafka and in training
  (the demo's ledger; lost must be 0);
* ``versions_published`` and ``convergence_p50_s`` / ``convergence_p99_s``: from a version's publish
  (its registry record) until *every* scorer replica reports serving it (or a newer one), polled every
  0.2 s on each replica's admin API (target p99 <= 10 s);
* ``failed_requests`` (must be 0) and ``per_replica_served``: answers per version per replica.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from demo.config import load_demo_config
from demo.run import run_demo

CONVERGENCE_P99_TARGET_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=None, help="preference pairs streamed (default 120 quick, 600 full)")
    parser.add_argument("--rate", type=float, default=2.0, help="pairs per second")
    parser.add_argument("--load-rate", type=float, default=3.0, help="best-of-N requests per second over all replicas")
    parser.add_argument("--gateways", type=int, default=2, help="gateway processes")
    parser.add_argument("--scorers", type=int, default=3, help="scorer replicas")
    parser.add_argument("--trainer-workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--checkpoint-every-s", type=float, default=15.0, help="trainer checkpoint/publish interval")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.topics import FEEDBACK, PREFERENCES

    events = args.events or (120 if args.quick else 600)
    with tempfile.TemporaryDirectory(prefix="prefstream-scale-") as tmp:
        cfg = load_demo_config(overrides={
            "run_dir": str(Path(tmp) / "run"),
            "events": events,
            "rate": args.rate,
            "load_rate": args.load_rate,
            "gateway_replicas": args.gateways,
            "scorer_replicas": args.scorers,
            "trainer_workers": args.trainer_workers,
            "checkpoint_every_s": args.checkpoint_every_s,
            "final_eval_records": 0,
        })
        s = run_demo(cfg, write_html=False)
    ledger = s["ledger"]
    lost = int(ledger["unaccounted"])  # acked, yet neither derived, trained, evaluated nor dead-lettered
    p99 = s.get("convergence_p99_s")
    return {
        "gateway_replicas": s["gateway_replicas"],
        "scorer_replicas": s["scorer_replicas"],
        "trainer_workers": args.trainer_workers,
        "trainer_world_sizes": s["trainer_world_sizes"],  # read back from the checkpoints' metadata
        "partitions": {"feedback": FEEDBACK.partitions, "preferences": PREFERENCES.partitions},
        "acked_events": s["events"],
        "lost_events": lost,
        "ledger": ledger,
        "ledger_complete": s["ledger_complete"],
        "records_trained": s["records_trained"],
        "versions_published": s["versions_published"],
        "versions_rejected": s["versions_rejected"],
        "convergence_p50_s": s.get("convergence_p50_s"),
        "convergence_p99_s": p99,
        "convergence_max_s": s.get("convergence_max_s"),
        "convergence_by_version": s.get("convergence_by_version"),
        "unconverged_versions": s.get("unconverged_versions"),
        "failed_requests": s["failed_requests"],
        "scorer_errors": s["scorer_errors"],
        "scorer_requests": s["scorer_requests"],
        "scorer_p50_ms": s.get("scorer_p50_ms"),
        "scorer_p99_ms": s.get("scorer_p99_ms"),
        "per_replica_served": s["per_replica_served"],
        "replica_first_served_s": s["replica_first_served"],
        "freshness_p50_s": s.get("freshness_p50_s"),
        "freshness_p99_s": s.get("freshness_p99_s"),
        "app_failed_calls": s["app_failed_calls"],
        "targets": {"lost_events": 0, "failed_requests": 0, "convergence_p99_s": CONVERGENCE_P99_TARGET_S},
        "target_met": bool(lost == 0 and s["ledger_complete"] and s["failed_requests"] == 0 and p99 is not None
                           and p99 <= CONVERGENCE_P99_TARGET_S and not s.get("unconverged_versions")),
        "settings": {"events": events, "rate": args.rate, "load_rate": args.load_rate,
                     "checkpoint_every_s": args.checkpoint_every_s, "checkpoint_store": "file (one machine)"},
    }
