"""``python -m scorer [serve] [flags]``: the scorer, the same as ``prefstream scorer serve [flags]``.

It builds only the scorer's own parser (:mod:`scorer.cli`), so the benchmarks and the demo are never
imported.
"""

import sys

from scorer.cli import register
from services.entry import run_area

sys.exit(run_area("python -m scorer", register, ("scorer", "serve"), sys.argv[1:]))
