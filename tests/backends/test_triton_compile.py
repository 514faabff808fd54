"""The Triton kernels compile for sm_90a (H100) with Triton's real compiler and ptxas, without a GPU.

CI runs the kernels under ``TRITON_INTERPRET=1``, which accepts Python the compiler rejects; this runs
``triton_sm90_compile.py`` in a fresh process without the interpreter (see its docstring).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")
pytest.importorskip("triton.backends.nvidia", reason="triton was built without its NVIDIA backend")

SCRIPT = pathlib.Path(__file__).with_name("triton_sm90_compile.py")
SRC = pathlib.Path(__file__).parents[2] / "src"


@pytest.mark.triton
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for kernel in ("_merge_rows_kernel", "_merge_rows_backward_kernel", "_per_batch_row_map_kernel"):
        assert any(line.startswith(f"{kernel}: ") and "sm_90a cubin" in line for line in lines), (kernel, lines)
    assert len(lines) >= 12, lines
