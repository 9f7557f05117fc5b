"""``python -m trainer``: the continual trainer, configured by PREFSTREAM_TRAINER_* env, a file or flags.

Equivalent to ``prefstream trainer run``; this is what k8s/trainer.yaml and the demo start.
"""

from __future__ import annotations

import sys

from prefstream.cli import main

if __name__ == "__main__":
    sys.exit(main(["trainer", "run", *sys.argv[1:]]))
