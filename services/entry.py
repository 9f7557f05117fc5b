"""Run one command of a command-line parser: logging, the handler, and the exit codes every entry uses.

The ``prefstream`` command collects every area's ``register(subparsers)``; ``python -m gateway``,
``python -m trainer`` and ``python -m scorer`` each build a parser from their own area's ``cli.py``
only (:func:`run_area`), so starting a deployable never imports another area's command modules (the
benchmarks', the demo's).  Both paths end in :func:`run_command`, so they log and fail alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from services.config import ConfigError

Register = Callable[[argparse._SubParsersAction], None]


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_unwinds() -> None:
    """Make SIGTERM unwind like Ctrl-C, so a command's ``finally`` blocks stop what it started."""
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)


def new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """A top-level parser with the ``--log-level`` every entry point takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default=os.environ.get("PREFSTREAM_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default PREFSTREAM_LOG_LEVEL or INFO)")
    return parser


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse ``argv``, configure logging and run the chosen subcommand's ``handler``; the exit code.

    No subcommand prints the help (2); a ConfigError prints its message, which names the setting to
    change (2); Ctrl-C, and SIGTERM once :func:`sigterm_unwinds` was called (``prefstream`` does), exit with 130.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except ConfigError as e:
        print(f"{parser.prog}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_area(prog: str, register: Register, command: Sequence[str], argv: Sequence[str]) -> int:
    """``python -m <area> [flags]``: run ``command`` (e.g. ``("scorer", "serve")``) of one area's parser.

    ``argv`` holds the command's flags; a leading repetition of the command's last word is accepted,
    so ``python -m scorer serve --port 0`` and ``python -m scorer --port 0`` are the same.  The log
    level comes from ``PREFSTREAM_LOG_LEVEL``.
    """
    parser = new_parser(prog)
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    argv = list(argv)
    if argv[:1] == [command[-1]]:
        argv = argv[1:]
    return run_command(parser, [*command, *argv])


#: Libraries whose INFO lines (a line per Kafka connection, per HTTP request...) drown a console.
THIRD_PARTY_LOGGERS = ("kafka", "urllib3", "filelock", "ray", "botocore", "asyncio", "httpx")


def quiet_third_party(level: int = logging.WARNING) -> None:
    """Console commands show prefstream's own progress; third-party loggers only warn (``--verbose``
    keeps them).  The services' own log files are untouched: they run in their own processes."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
