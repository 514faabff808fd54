"""The ``ringattn`` command: ``ringattn demo``, ``ringattn bench`` and ``ringattn compile`` (also ``python -m
ringattn``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ringattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the MindSpore example, a realistic merge and ring attention, each checked (PASS/FAIL)",
        description="Run the MindSpore example, a realistic merge and ring attention; each result is checked "
        "against a float64 reference and a stated tolerance. Exit status 1 when a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--world-size", type=int, default=2, help="ring attention processes on this machine")
    demo.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="ring attention sequence length, a multiple of 2 x world size (default: 4096 rounded to one)",
    )
    demo.add_argument("--no-ring", action="store_true", help="only the merge part")
    sub.add_parser("bench", help="benchmarks; `ringattn bench --help` for options", add_help=False)
    sub.add_parser("compile", help="compile the fused CPU kernels ahead of time; --where, --clear", add_help=False)
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
