"""``python -m trainer [run] [flags]``: the continual trainer, the same as ``prefstream trainer run [flags]``.

Configured by PREFSTREAM_TRAINER_* env, a file or flags; this is what k8s/trainer.yaml and the demo
start.  It builds only the trainer's own parser (:mod:`trainer.cli`), so the benchmarks and the demo
are never imported.
"""

import sys

from services.entry import run_area
from trainer.cli import register

sys.exit(run_area("python -m trainer", register, ("trainer", "run"), sys.argv[1:]))
