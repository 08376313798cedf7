"""``python -m memckpt``: the ``memckpt`` command."""

import sys

from memckpt.tools.cli import main

sys.exit(main())
