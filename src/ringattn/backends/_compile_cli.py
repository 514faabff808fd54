"""``ringattn compile``: compile the fused CPU kernels ahead of time, show or clear their cache.

numba compiles one kernel per dtype, number of parts K and direction (10-30 s each on a 2-core machine; the
statistics and LSE forms share a kernel: the form is a run-time flag). ``backend="auto"`` runs the portable torch
backend until a kernel is in the disk cache (Note [cold start] in ``_warm.py``); compiling ahead of time makes every
program start with the fused kernels. The cache is per user (Note [kernel cache] in ``_kernel_cache.py``).

    ringattn compile                                  # float32 and bfloat16, K = 2, forward and backward
    ringattn compile --dtype fp16 --parts 2,3,4 --direction forward
    ringattn compile --background ...                 # the same in a detached low-priority process; returns at once
    ringattn compile --where                          # print the cache directory
    ringattn compile --clear                          # delete it (every compiled kernel)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch

__all__ = ["build_parser", "compile_kernel", "main"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
DIRECTIONS = ("forward", "backward")
FORMS = ("stats", "lse")


def _csv(parse, what: str):
    def convert(text: str) -> list:
        try:
            values = [parse(part.strip()) for part in text.split(",") if part.strip()]
        except (KeyError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from exc
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return convert


def _parts(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _choice(options):
    def parse(text: str) -> str:
        if text not in options:
            raise KeyError(text)
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringattn compile",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dtype",
        type=_csv(DTYPES.__getitem__, f"comma-separated dtypes from {', '.join(DTYPES)}"),
        default=[torch.float32, torch.bfloat16],
        help="attention dtypes (default float32,bfloat16)",
    )
    parser.add_argument(
        "--parts",
        type=_csv(_parts, "comma-separated part counts K >= 1"),
        default=[2],
        help="numbers of parts K merged at once (default 2: ring_attention_update and two-part merge_states)",
    )
    parser.add_argument(
        "--direction",
        type=_csv(_choice(DIRECTIONS), "comma-separated directions from forward, backward"),
        default=list(DIRECTIONS),
        help="forward and/or backward (default both)",
    )
    parser.add_argument(
        "--form",
        type=_csv(_choice(FORMS), "comma-separated forms from stats, lse"),
        default=list(FORMS),
        help="statistics form (max and sum, ring_attention_update) and/or LSE form (merge_states, ring attention); "
        "they share a kernel, so naming one compiles both (default both)",
    )
    parser.add_argument(
        "--background", action="store_true", help="run in a detached low-priority process and return at once"
    )
    parser.add_argument("--where", action="store_true", help="print the kernel cache directory and exit")
    parser.add_argument("--clear", action="store_true", help="delete the kernel cache directory and exit")
    return parser


def compile_kernel(dtype: torch.dtype, parts: int, direction: str, form: str) -> None:
    """Compile (or load from the disk cache) the fused CPU kernel for one ``dtype``, ``parts``, ``direction`` and
    ``form``, by running it once on tiny tensors on this thread."""
    from . import numba_cpu

    stat = torch.float64 if dtype == torch.float64 else torch.float32
    lanes = 8 if form == "stats" else 1
    shape, stats = (2, 1, 2, 8), (2, 1, 2, lanes)
    parts_o = [torch.ones(shape, dtype=dtype) for _ in range(parts)]
    parts_m = [torch.zeros(stats, dtype=stat) for _ in range(parts)]
    parts_l = [torch.ones(stats, dtype=stat) for _ in range(parts)] if form == "stats" else None
    if direction == "forward":
        out_l = torch.empty(stats, dtype=stat) if form == "stats" else None
        numba_cpu.merge_rows(parts_o, parts_m, parts_l, torch.empty(shape, dtype=dtype), torch.empty(stats, dtype=stat),
                             out_l)  # fmt: skip
        return
    from .numba_cpu_backward import merge_rows_backward

    grads = [[torch.empty_like(t) for t in ts] for ts in (parts_o, parts_m, parts_l or [])]
    merge_rows_backward(torch.ones(shape, dtype=dtype), torch.ones(stats, dtype=stat),
                        torch.ones(stats, dtype=stat) if form == "stats" else None, parts_o, parts_m, parts_l,
                        grads[0], grads[1], grads[2] if form == "stats" else None)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import _kernel_cache

    if args.where:
        print(_kernel_cache.effective_dir())
        return 0
    if args.clear:
        own = _kernel_cache.cache_dir()
        if own is None:
            print(
                f"ringattn compile: the kernels are cached in NUMBA_CACHE_DIR={os.environ['NUMBA_CACHE_DIR']}, "
                f"shared with other packages: not cleared (set {_kernel_cache.CACHE_ENV} to give ringattn its own)",
                file=sys.stderr,
            )
            return 1
        shutil.rmtree(own, ignore_errors=True)
        print(f"cleared {own}")
        return 0
    if importlib_missing("numba"):
        print("ringattn compile: the fused CPU kernels need numba (pip install numba)", file=sys.stderr)
        return 1
    if args.background:
        rest = [a for a in (argv if argv is not None else sys.argv[2:]) if a != "--background"]
        worker = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.nice(10); from ringattn.backends._compile_cli import main; "
             "sys.exit(main(sys.argv[1:]))", *rest],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        print(f"compiling in the background (process {worker.pid}); cache: {_kernel_cache.effective_dir()}")
        return 0
    forms = ["stats"] if "stats" in args.form else ["lse"]  # one kernel serves both forms
    print(f"cache: {_kernel_cache.effective_dir()}")
    for dtype in dict.fromkeys(args.dtype):
        for parts in dict.fromkeys(args.parts):
            if parts == 1:
                print(f"{str(dtype).removeprefix('torch.')} K=1: no kernel (a merge of one part runs as a copy)")
                continue
            for direction in args.direction:
                start = time.perf_counter()
                for form in forms:
                    compile_kernel(dtype, parts, direction, form)
                took = time.perf_counter() - start
                print(f"{str(dtype).removeprefix('torch.')} K={parts} {direction}: ready ({took:.1f} s)", flush=True)
    return 0


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None
