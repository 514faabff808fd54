"""``ringattn bench``: benchmarks of ringattn's ops, one module per op (STYLE.md section F).

``ringattn bench [merge] ...`` times ``ring_attention_update`` (:mod:`ringattn.bench.merge`);
``ringattn bench ring ...`` times ring attention (:mod:`ringattn.bench.ring`). Nothing runs at import;
the op modules are imported when their subcommand runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

_SUBCOMMANDS = ("merge", "ring")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ringattn bench``; ``argv`` excludes the program and ``bench`` words. Returns the exit status.

    The first word picks the benchmark (``merge``, the default, or ``ring``); the rest goes to its
    ``main(argv) -> int``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in _SUBCOMMANDS else "merge"
    try:
        module = importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        print(f"ringattn bench {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(module.main(argv))
