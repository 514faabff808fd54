"""``ringattn bench``: benchmarks of ringattn's ops, one module per op.

``ringattn bench [merge] ...`` times ``ring_attention_update`` (:mod:`ringattn.bench.merge`, its command
line in :mod:`ringattn.bench.merge_cli`); ``ringattn bench ring ...`` times ring attention
(:mod:`ringattn.bench.ring`). Nothing runs at import; a subcommand's module is imported when it runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Subcommand -> the module whose ``main(argv) -> int`` runs it.
_SUBCOMMANDS = {"merge": "merge_cli", "ring": "ring"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ringattn bench``; ``argv`` excludes the program and ``bench`` words. Returns the exit status.

    The first word picks the benchmark (``merge``, the default, or ``ring``); the rest goes to its module's
    ``main(argv) -> int``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in _SUBCOMMANDS else "merge"
    module_name = f"{__name__}.{_SUBCOMMANDS[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"ringattn bench {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(module.main(argv))
