"""``python -m spamkern``: the main job (see :mod:`spamkern.cli`)."""

import sys

from spamkern.cli import main

sys.exit(main())
