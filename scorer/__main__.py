"""``python -m scorer [serve] [flags]``: the same as ``prefstream scorer serve``."""

from __future__ import annotations

import sys

from prefstream.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] != ["serve"]:
        argv = ["serve", *argv]
    sys.exit(main(["scorer", *argv]))
