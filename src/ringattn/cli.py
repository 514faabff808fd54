"""The ``ringattn`` command: ``ringattn demo``, ``ringattn bench`` and ``ringattn compile`` (also ``python -m
ringattn``)."""

from __future__ import annotations

import argparse
import sys


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's line with ``(default X)``, except where that would be wrong or said twice: a flag
    (``store_true`` / ``store_false``: the flag's help says what giving it does), a ``None`` default (the help says in
    words what happens without the option), or help text that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if flag or not action.option_strings or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``ringattn`` parser: ``demo`` with its options, ``bench`` and ``compile`` (whose options their own parsers
    own)."""
    parser = argparse.ArgumentParser(prog="ringattn", description=__doc__.replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the MindSpore example, a realistic merge and ring attention, each checked (PASS/FAIL)",
        description="Run the MindSpore example, a realistic merge and ring attention; each result is checked "
        "against a float64 reference and a stated tolerance. Exit status 1 when a check fails.",
        formatter_class=DefaultsFormatter,
    )
    demo.add_argument("--world-size", type=int, default=2, help="ring attention processes on this machine")
    demo.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="ring attention sequence length, a multiple of 2 x world size (default 4096 rounded to one)",
    )
    demo.add_argument("--no-ring", action="store_true", help="only the merge part")
    sub.add_parser("bench", help="benchmarks; `ringattn bench --help` for options", add_help=False)
    sub.add_parser("compile", help="compile the fused CPU kernels ahead of time; --where, --clear", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ringattn`` with ``argv`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["compile"]:
        from .backends._compile_cli import main as compile_main

        return compile_main(argv[1:])
    args = parser.parse_args(argv)
    from .demo import main as demo_main

    return demo_main(world_size=args.world_size, ring=not args.no_ring, seq_len=args.seq_len)


if __name__ == "__main__":
    sys.exit(main())
