"""``python -m ringattn``: the ``ringattn`` command (``demo``, ``bench``)."""

import sys

from .cli import main

sys.exit(main())
