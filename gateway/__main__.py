"""``python -m gateway [serve] [flags]`` runs the gateway: the same as ``prefstream gateway serve [flags]``.

It builds only the gateway's own parser (:mod:`gateway.cli`), so starting a gateway does not import
the other areas' command modules (the trainer's torch, the demo, the benchmarks).
"""

import sys

from gateway.cli import register
from services.entry import run_area

sys.exit(run_area("python -m gateway", register, ("gateway", "serve"), sys.argv[1:]))
