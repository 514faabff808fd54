"""``python -m ringattn.bench``: the same as ``ringattn bench``."""

import sys

from . import main

sys.exit(main())
