"""``prefstream loop criteria``: best-of-N with criteria -> criteria feedback -> continual DPO -> hot swap."""

from __future__ import annotations

import argparse
import json

from services.config import add_config_flags, overrides_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from loop.config import LoopConfig

    p = subparsers.add_parser("loop", help="product loops on the real stack")
    sub = p.add_subparsers(dest="loop", metavar="LOOP", required=True)
    c = sub.add_parser("criteria", help="teach the served policy criteria through best-of-N and continual DPO; "
                                        "measure its violation rate after every version; HTML report")
    c.add_argument("--config", default=None, help="YAML/JSON file with loop settings")
    c.add_argument("--criterion", action="append", default=None, metavar="NAME|FILE",
                   help="a criterion to teach (stored name, name@version, or a YAML/JSON definition file); "
                        "repeat for phases taught one after another (the same as --criteria a,b)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    add_config_flags(c, LoopConfig)
    c.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from loop.config import LoopConfig, load_loop_config
    from loop.run import print_summary, run_criteria_loop

    overrides = overrides_from_args(args, LoopConfig)
    if args.criterion:
        overrides["criteria"] = list(args.criterion)
    cfg = load_loop_config(args.config, overrides=overrides)
    summary = run_criteria_loop(cfg)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["failed_requests"] == 0 else 1
