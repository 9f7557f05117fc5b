"""``python -m gateway [flags]`` runs the gateway: the same as ``prefstream gateway serve [flags]``."""

import sys

from prefstream.cli import main

sys.exit(main(["gateway", "serve", *sys.argv[1:]]))
