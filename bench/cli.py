"""``prefstream bench NAME [--quick] [--json] [--out FILE]``: every benchmark behind one command.

Each benchmark is a module exposing ``add_arguments(parser)`` and ``run(args) -> dict``; this module
adds the common flags, the machine description, writes ``bench/results/<name>.json`` and, for
``bench all``, a markdown table comparing each result with its target (see :mod:`bench.report`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from bench.machine import describe

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: name -> module implementing it.
BENCHMARKS: dict[str, str] = {
    "ingest": "bench.ingest",
    "scorer": "bench.scorer",
    "train-reward": "bench.train_reward",
    "train-dpo": "bench.train_dpo",
    "freshness": "bench.freshness",
    "loop-quality": "bench.loop_quality",
    "criteria-loop": "bench.criteria_loop",
    "criteria-ceiling": "bench.criteria_ceiling",
    "criteria-frontier": "bench.criteria_frontier",
    "stop-hazard": "bench.stop_hazard",
    "chaos": "bench.chaos",
    "scale": "bench.scale",
}


def _load(name: str):
    return importlib.import_module(BENCHMARKS[name])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run (minutes) for smoke checks and CI")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", type=Path, default=None, help="where to write the result (default bench/results/<name>.json)")
    p.add_argument("--verbose", action="store_true", help="also print third-party INFO logs (kafka-python, Ray...)")


def run_one(name: str, args: argparse.Namespace) -> dict:
    from services.entry import quiet_third_party

    if not getattr(args, "verbose", False):
        quiet_third_party()
    module = _load(name)
    started = time.time()
    result = module.run(args)
    result.setdefault("benchmark", name)
    result["mode"] = "quick" if args.quick else "full"
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"] = result.get("machine") or describe()
    out = args.out if getattr(args, "out", None) and name != "all" else RESULTS_DIR / f"{name}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", out)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    return result


def _handler(name: str):
    def handle(args: argparse.Namespace) -> int:
        run_one(name, args)
        return 0

    return handle


def _run_all(args: argparse.Namespace) -> int:
    from bench.report import write_table

    results = {}
    failed = []
    for name in BENCHMARKS:
        sub = argparse.Namespace(**vars(args))
        parser = argparse.ArgumentParser()
        _load(name).add_arguments(parser)
        for action in parser._actions:  # fill each benchmark's own defaults
            if action.dest != "help" and not hasattr(sub, action.dest):
                setattr(sub, action.dest, action.default)
        sub.out = None
        try:
            results[name] = run_one(name, sub)
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            log.exception("benchmark %s failed", name)
            failed.append(name)
    table = write_table(results, RESULTS_DIR / f"summary{'-quick' if args.quick else ''}.md")
    if not args.quick:
        from bench.report import update_readme

        update_readme(RESULTS_DIR.parent.parent / "README.md", table)
    print(table)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _table(args: argparse.Namespace) -> int:
    from bench.report import load_results, update_readme, write_table

    results = load_results(RESULTS_DIR, tuple(BENCHMARKS), quick=args.quick)
    table = write_table(results, RESULTS_DIR / f"summary{'-quick' if args.quick else ''}.md")
    if args.readme and not args.quick:
        update_readme(RESULTS_DIR.parent.parent / "README.md", table)
    print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="run benchmarks; results go to bench/results/")
    sub = bench.add_subparsers(dest="bench_name", metavar="NAME")
    for name in BENCHMARKS:
        p = sub.add_parser(name, help=f"the {name} benchmark")
        _common(p)
        try:
            _load(name).add_arguments(p)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("bench."):
                raise
            p.set_defaults(handler=lambda a, n=name: print(f"benchmark {n} is not available in this build") or 2)
            continue
        p.set_defaults(handler=_handler(name))
    p = sub.add_parser("all", help="every benchmark, then a markdown table vs targets")
    _common(p)
    p.set_defaults(handler=_run_all)
    p = sub.add_parser("table", help="the markdown table from the committed results (and the README's copy)")
    p.add_argument("--quick", action="store_true", help="use the -quick results")
    p.add_argument("--no-readme", dest="readme", action="store_false", help="do not update README.md")
    p.set_defaults(handler=_table)
