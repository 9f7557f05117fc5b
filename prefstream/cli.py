"""The ``prefstream`` command: one entry point, one subcommand group per area.

Each area owns its subcommands in its own ``cli.py`` exposing ``register(subparsers)``; this module
only collects them, so adding a command never means editing another area's code.  It sits at the top
of the house: it may import every area (the demo and the benchmarks included), and no deployable
imports it (``python -m gateway|trainer|scorer`` build their own parsers, :mod:`services.entry`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.entry import new_parser, run_command, sigterm_unwinds

# Every area that contributes subcommands.  A module that is not present is skipped so a partial
# checkout still runs what it has.
AREAS: tuple[str, ...] = (
    "services.stack.cli",
    "gateway.cli",
    "trainer.cli",
    "scorer.cli",
    "services.criteria_cli",
    "services.tls",
    "bench.cli",
    "demo.cli",
    "loop.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("prefstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``prefstream`` command.  SIGTERM unwinds it like Ctrl-C, so the stacks and services a
    command started (the demo, the loop, a benchmark) are stopped by its ``finally`` blocks; a command
    that serves installs its own handler over this one."""
    sigterm_unwinds()
    return run_command(build_parser(), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
