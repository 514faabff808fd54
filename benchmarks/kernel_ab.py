"""Interleaved A/B of a fused CPU merge kernel against another git revision of it, in one process.

Run: ``python benchmarks/kernel_ab.py --rev 1e90c9b`` (the forward) or ``--pass backward`` (the backward kernel), for
any revision whose kernel module has the same launcher interface. The module (``numba_cpu.py``, or
``numba_cpu_backward.py`` for the backward) at ``--rev`` is loaded as a second module of the ``ringattn.backends``
package (from a temporary directory, so its numba disk cache lives there too), and every case of ``ringattn bench``
(default shapes; the forward into ``out=``, the backward as ``ringattn bench --pass backward`` times it) runs through
the working tree's kernel and the old one, in a shuffled order each repeat, beside a copy of the same bytes. Results
are compared bitwise. Printed: medians, ``new/old`` time and each one's share of the copy floor.

Why a script of its own: on a shared 2-core VM the memory bandwidth of separate runs moved by 1.7x within minutes, so
only interleaved samples compare two kernels. Keep the process to these two kernels: runs that also compiled a third
variant in the same process measured even identical kernels 1.1x apart.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ringattn.backends import numba_cpu, numba_cpu_backward
from ringattn.bench.merge import BACKWARD, DTYPES, FORWARD, OPS, PASSES, bytes_moved, cases, make_inputs, providers

ROOT = Path(__file__).resolve().parents[1]
# Per pass: the kernel module (path in the repository) and the function the cpu backend calls on it at each call.
KERNELS = {
    FORWARD: ("src/ringattn/backends/numba_cpu.py", numba_cpu, "merge_rows"),
    BACKWARD: ("src/ringattn/backends/numba_cpu_backward.py", numba_cpu_backward, "merge_rows_backward"),
}


def load_revision(rev: str, path: str, where: Path):
    """The module at ``path`` in git revision ``rev`` as the module ``ringattn.backends._ab_<name>_<rev>``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
    name = f"_ab_{Path(path).stem}_" + "".join(c if c.isalnum() else "_" for c in rev)
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
    parser.add_argument(
        "--pass", dest="direction", choices=PASSES, default=FORWARD, help="which kernel (default forward)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path, module, attribute = KERNELS[args.direction]
    current = getattr(module, attribute)
    with tempfile.TemporaryDirectory() as where:
        kernels = {"new": current, "old": getattr(load_revision(args.rev, path, Path(where)), attribute)}
        dtypes = tuple(DTYPES[name] for name in args.dtypes.split(","))
        ops = tuple(args.ops.split(","))
        rows = []
        for case in cases(args.layouts.split(","), dtypes, ops=ops, quick=args.quick, passes=(args.direction,)):
            inputs = make_inputs(case, torch.device("cpu"))
            name = "ringattn[cpu] out=" if args.direction == FORWARD else "ringattn[cpu]"
            call = functools.partial(providers(("cpu",), ("ringattn",), case.op, case.direction)[name], inputs)
            half = bytes_moved(case) // 2
            src, dst = torch.ones(half, dtype=torch.uint8), torch.zeros(half, dtype=torch.uint8)
            results = {}
            for label, kernel in kernels.items():  # compiles (or loads) each kernel before any timing
                setattr(module, attribute, kernel)
                call()
                results[label] = [t.clone() for t in call()]
            same = all(torch.equal(a, b) for a, b in zip(results["new"], results["old"], strict=True))
            samples: dict[str, list[float]] = {"new": [], "old": [], "copy": []}
            for _ in range(args.repeats):
                for label in random.sample(list(samples), len(samples)):
                    if label != "copy":
                        setattr(module, attribute, kernels[label])
                    start = time.perf_counter()
                    dst.copy_(src) if label == "copy" else call()
                    samples[label].append(time.perf_counter() - start)
            setattr(module, attribute, current)
            med = {label: statistics.median(times) for label, times in samples.items()}
            label = f"{case.name}"
            print(f"{label}: new {med['new'] * 1e3:.2f} ms ({med['copy'] / med['new']:.0%} floor), "
                  f"old {med['old'] * 1e3:.2f} ms ({med['copy'] / med['old']:.0%} floor), "
                  f"new/old {med['new'] / med['old']:.3f}, bitwise equal: {same}", flush=True)  # fmt: skip
            rows.append((label, med["new"], med["old"], same))
    return rows


if __name__ == "__main__":
    main()
