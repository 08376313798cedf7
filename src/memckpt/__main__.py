"""``python -m memckpt``: the ``memckpt`` command."""

import sys

from memckpt import _warnings  # noqa: F401  (first: warning filters before torch is imported)
from memckpt.tools.cli import main

sys.exit(main())
