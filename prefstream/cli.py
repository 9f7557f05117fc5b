"""The ``prefstream`` command: one entry point, one subcommand group per area.

Each area owns its subcommands in its own ``cli.py`` exposing ``register(subparsers)``; this module
only collects them, so adding a command never means editing another service's code.  Modules are
imported lazily by name so ``prefstream stack status`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# (module, description) of every area that contributes subcommands.  A module that is not present
# yet is skipped so a partial checkout still runs what it has.
AREAS: tuple[str, ...] = (
    "services.stack.cli",
    "gateway.cli",
    "trainer.cli",
    "scorer.cli",
    "bench.cli",
    "prefstream.demo_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefstream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("PREFSTREAM_LOG_LEVEL", "INFO"))
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from services.config import ConfigError

    try:
        rc = handler(args)
    except ConfigError as e:
        print(f"prefstream: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
