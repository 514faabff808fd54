"""Sweep the Triton merge's tile (rows per program, warps) on the bench's default cases; needs a CUDA GPU.

    PYTHONPATH=src python3 benchmarks/triton_tune.py [--rows 4,8,16,32,64] [--warps 2,4,8] [--repeats 20]

Every configuration runs ``ring_attention_update(..., out=...)`` through the public function with the launcher's
tile overridden, is checked bitwise against the default tile (tiling changes no arithmetic), and is timed
from CUDA graph replays next to the copy floor, interleaved, in one process (Note [bench timing]). Prints one
line per case and configuration: microseconds per call and % of the copy floor.
"""

from __future__ import annotations

import argparse
import functools

import torch

from ringattn import ring_attention_update
from ringattn.backends import triton_cuda
from ringattn.bench._timing import copy_floor, measure, median
from ringattn.bench.merge import bytes_moved, cases, make_inputs


def _call(inputs):
    c = inputs.case
    return ring_attention_update(
        *inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits, backend="triton", out=inputs.out
    )


def _with_tile(rows: int | None, warps: int | None):
    """``_call`` with the launcher's tile overridden (None: the default)."""
    launch = triton_cuda._launch_merge_rows

    def call(inputs):
        if rows is None:
            return _call(inputs)
        triton_cuda._launch_merge_rows = functools.partial(launch, block_rows=rows, num_warps=warps)
        try:
            return _call(inputs)
        finally:
            triton_cuda._launch_merge_rows = launch

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--rows", type=ints, default=[4, 8, 16, 32, 64])
    parser.add_argument("--warps", type=ints, default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    for case in cases(["SBH", "TND"], (torch.float32, torch.bfloat16)):
        inputs = make_inputs(case, device)
        want = [t.clone() for t in _with_tile(None, None)(inputs)]
        configs = {"default": _with_tile(None, None)}
        configs.update({f"rows={r} warps={w}": _with_tile(r, w) for r in args.rows for w in args.warps})
        for name, fn in configs.items():
            for t in inputs.out:
                t.fill_(float("nan"))
            got = fn(inputs)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), f"{case.name} {name}: not bitwise"
        timed = {name: functools.partial(fn, inputs) for name, fn in configs.items()}
        timed["copy"] = copy_floor(bytes_moved(case), device)
        eager: list[tuple[str, str]] = []
        samples = measure(timed, device=device, warmup=2, repeats=args.repeats, eager_timed=eager)
        assert not eager, eager
        floor = median(samples["copy"])
        print(f"{case.name}  (copy {floor * 1e6:.1f} us)")
        for name, secs in sorted(samples.items(), key=lambda kv: median(kv[1])):
            print(f"  {name:<20} {median(secs) * 1e6:8.1f} us  {100 * floor / median(secs):5.1f}% floor")
        del inputs, timed


if __name__ == "__main__":
    main()
