"""``python -m prefstream`` is the same as the ``prefstream`` command."""

import sys

from prefstream.cli import main

sys.exit(main())
