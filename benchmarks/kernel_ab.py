"""Interleaved A/B of the fused CPU merge kernel against another git revision of it, in one process.

Run: ``python benchmarks/kernel_ab.py --rev 1e90c9b`` (any revision whose ``numba_cpu.py`` has the same launcher
interface). ``src/ringattn/backends/numba_cpu.py`` at ``--rev`` is loaded as a second module of the
``ringattn.backends`` package (from a temporary directory, so its numba disk cache lives there too), and every case
of ``ringattn bench`` (default shapes, ``out=``) runs the forward merge through the working tree's kernel and the
old one, in a shuffled order each repeat, beside a copy of the same bytes. Outputs are compared bitwise. Printed:
medians, ``new/old`` time and each one's share of the copy floor.

Why a script of its own: on a shared 2-core VM the memory bandwidth of separate runs moved by 1.7x within minutes, so
only interleaved samples compare two kernels. Keep the process to these two kernels: runs that also compiled a third
variant in the same process measured even identical kernels 1.1x apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ringattn
from ringattn.backends import numba_cpu
from ringattn.bench.merge import DTYPES, MERGE, OPS, bytes_moved, cases, make_inputs

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "src/ringattn/backends/numba_cpu.py"


def load_revision(rev: str, where: Path):
    """``numba_cpu.py`` at git revision ``rev`` as the module ``ringattn.backends._ab_<rev>``."""
    source = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, capture_output=True, text=True, check=True)
    name = "_ab_" + "".join(c if c.isalnum() else "_" for c in rev)
    path = where / f"{name}.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"ringattn.backends.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, bool]]:
    """Run the A/B; returns ``(case, new seconds, old seconds, bitwise equal)`` per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="git revision of the old kernel")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layouts", default="SBH,TND")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, no meaningful times")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    merge_new = numba_cpu.merge_rows
    with tempfile.TemporaryDirectory() as where:
        old = load_revision(args.rev, Path(where))
        kernels = {"new": merge_new, "old": old.merge_rows}
        dtypes = tuple(DTYPES[name] for name in args.dtypes.split(","))
        rows = []
        for case in cases(args.layouts.split(","), dtypes, ops=tuple(args.ops.split(",")), quick=args.quick):
            inputs = make_inputs(case, torch.device("cpu"))

            def forward(inputs=inputs, case=case):
                if case.op == MERGE:
                    o_a, l_a, o_b, l_b = inputs.tensors
                    return ringattn.merge_states([o_a, o_b], [l_a, l_b], layout="TND", lse_layout="NT",
                                                 backend="cpu", out=inputs.out[0], out_lse=inputs.out[1])  # fmt: skip
                return ringattn.ring_attention_update(*inputs.tensors, inputs.seq_qlen, case.layout,
                                                      ascend_limits=case.ascend_limits, backend="cpu",
                                                      out=inputs.out)  # fmt: skip

            half = bytes_moved(case) // 2
            src, dst = torch.ones(half, dtype=torch.uint8), torch.zeros(half, dtype=torch.uint8)
            results = {}
            for name, kernel in kernels.items():  # compiles (or loads) each kernel before any timing
                numba_cpu.merge_rows = kernel
                forward()
                results[name] = [t.clone() for t in forward()]
            same = all(torch.equal(a, b) for a, b in zip(results["new"], results["old"], strict=True))
            samples: dict[str, list[float]] = {"new": [], "old": [], "copy": []}
            for _ in range(args.repeats):
                for name in random.sample(list(samples), len(samples)):
                    if name != "copy":
                        numba_cpu.merge_rows = kernels[name]
                    start = time.perf_counter()
                    dst.copy_(src) if name == "copy" else forward()
                    samples[name].append(time.perf_counter() - start)
            numba_cpu.merge_rows = merge_new
            med = {name: statistics.median(times) for name, times in samples.items()}
            label = f"{case.op} {case.layout} {str(case.dtype).removeprefix('torch.')} {tuple(case.shape)}"
            print(f"{label}: new {med['new'] * 1e3:.2f} ms ({med['copy'] / med['new']:.0%} floor), "
                  f"old {med['old'] * 1e3:.2f} ms ({med['copy'] / med['old']:.0%} floor), "
                  f"new/old {med['new'] / med['old']:.3f}, bitwise equal: {same}", flush=True)  # fmt: skip
            rows.append((label, med["new"], med["old"], same))
    return rows


if __name__ == "__main__":
    main()
