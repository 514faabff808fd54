"""Compile the fused CPU kernels the default test run uses into numba's disk cache, one (dtype, K) at a time.

Note [test-time compiles]
-------------------------
numba compiles the fused CPU merge once per (dtype, K) and direction: 20-35 s per forward and ~10 s per backward on
a 2-core machine, most of a cold test run. ``conftest.py`` runs this script in a background process at the start
of a session that selects kernel tests, and runs those tests last, so that the compiles use the second core while
the tests that need no fused kernel run on the first. After each pair it writes ``<done_dir>/<dtype>-<K>.done``;
the session's first launch of a kernel of a planned pair waits for that file (numba then loads the kernel from the
disk cache in well under a second) instead of compiling the same kernel a second time. Each pair is claimed first
(``<dtype>-<K>.claim``, created exclusively): a launch that needs a pair nobody has claimed yet claims and compiles
it in the test process, and this script skips it, so neither waits for the other's queue. Pairs outside ``PLAN``
(the `slow` run's) compile in the test process as usual. ``RINGATTN_TEST_PRECOMPILE=0`` turns this off.

    python tests/precompile_kernels.py DONE_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

# The (dtype, K) pairs the default run launches, the most used first (float32 K = 2 is also every CPU ring's merge).
PLAN = [(torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 3)]

# The flat buffers' NumPy element type per tensor dtype (Note [cpu merge kernel] in numba_cpu.py).
_KEYS = {np.dtype(np.float32): "float32", np.dtype(np.uint16): "bfloat16", np.dtype(np.int16): "float16"}


def key(dtype: torch.dtype, k: int) -> str:
    return f"{str(dtype).removeprefix('torch.')}-{k}"


def launch_key(kernel_name: str, args: tuple) -> str | None:
    """The ``key`` of a launch of the forward or backward kernel (``numba_cpu._launch``'s arguments), or None."""
    buffers = args[0] if kernel_name == "_merge_rows_kernel" else args[3]  # the parts' flat buffers
    name = _KEYS.get(buffers[0].dtype)
    return None if name is None else f"{name}-{len(buffers)}"


def compile_pair(dtype: torch.dtype, k: int) -> None:
    """One forward and one backward launch of the fused kernels for ``(dtype, K)``: their first call compiles them."""
    from ringattn.backends import numba_cpu
    from ringattn.backends.numba_cpu_backward import merge_rows_backward

    shape, stats = (2, 1, 2, 8), (2, 1, 2, 8)
    parts_o = [torch.ones(shape, dtype=dtype) for _ in range(k)]
    parts_m = [torch.zeros(stats) for _ in range(k)]
    parts_l = [torch.ones(stats) for _ in range(k)]
    out = (torch.empty(shape, dtype=dtype), torch.empty(stats), torch.empty(stats))
    numba_cpu.merge_rows(parts_o, parts_m, parts_l, *out)
    grads = [[torch.empty_like(t) for t in ts] for ts in (parts_o, parts_m, parts_l)]
    merge_rows_backward(torch.ones(shape, dtype=dtype), torch.ones(stats), torch.ones(stats), parts_o, parts_m, parts_l,
                        *grads)  # fmt: skip


def claim(done_dir: Path, name: str) -> bool:
    """Claim pair ``name`` for compiling (True), unless the test process or this script already has (False)."""
    try:
        os.close(os.open(done_dir / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(done_dir: Path) -> None:
    for dtype, k in PLAN:
        if claim(done_dir, key(dtype, k)):
            compile_pair(dtype, k)
            (done_dir / f"{key(dtype, k)}.done").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
