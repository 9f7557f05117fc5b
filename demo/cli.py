"""``prefstream demo``: the whole loop on the embedded defaults (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import json

from services.config import add_config_flags, overrides_from_args
from services.entry import quiet_third_party


def register(subparsers: argparse._SubParsersAction) -> None:
    from demo.config import DemoConfig

    p = subparsers.add_parser("demo", help="stream feedback, train continually, hot-swap, report (the main job)")
    p.add_argument("--config", default=None, help="YAML/JSON file with demo settings")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.add_argument("--verbose", action="store_true",
                   help="also print third-party INFO logs (kafka-python, Ray...) on the console")
    add_config_flags(p, DemoConfig)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from demo.config import DemoConfig, load_demo_config

    if not args.verbose:
        quiet_third_party()
    from demo.run import print_summary, run_demo

    cfg = load_demo_config(args.config, overrides=overrides_from_args(args, DemoConfig))
    summary = run_demo(cfg)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["failed_requests"] == 0 and summary["ledger_complete"] else 1
