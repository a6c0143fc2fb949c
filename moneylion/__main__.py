"""``python -m moneylion`` is the ``moneylion`` command."""

import sys

from moneylion.cli import main

sys.exit(main())
