"""``python -m gateway [flags]`` runs the gateway: the same as ``prefstream gateway serve [flags]``.

It builds only the gateway's own parser, so starting a gateway does not import the other areas'
command modules (the trainer's torch, the demo's matplotlib).
"""

import argparse
import logging
import os
import sys

from gateway.cli import register
from services.config import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("--log-level", default=os.environ.get("PREFSTREAM_LOG_LEVEL", "INFO"))
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gateway", "serve", *argv])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"python -m gateway: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


sys.exit(main(sys.argv[1:]))
