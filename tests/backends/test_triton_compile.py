"""The Triton kernels compile for sm_90a (H100) with Triton's real compiler and ptxas, without a GPU.

CI runs the kernels under ``TRITON_INTERPRET=1``, which accepts Python the compiler rejects; this runs
``triton_sm90_compile.py`` in a fresh process without the interpreter (see its docstring), once for the module.

bfloat16 rounding: the interpreter converts float32 to bfloat16 by truncation, compiled code rounds to nearest
even, so the interpreter tests cannot see a rounding bug in the kernels' bfloat16 stores. The PTX of every
compiled variant is therefore checked here: each float32 -> bfloat16 conversion must be ``cvt.rn`` (round to
nearest even), none ``cvt.rz`` (truncation) or another mode. (Checked to fail: ``.to(..., fp_downcast_rounding=
"rtz")`` planted in ``_merge_chunk``'s store gives ``cvt.rz.bf16x2.f32`` and this test reports it.)
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
KERNELS = ("_merge_rows_kernel", "_merge_rows_backward_kernel")


@pytest.fixture(scope="module")
def compiled_lines() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.splitlines()


@pytest.mark.triton
def test_every_kernel_variant_compiles_for_sm90(compiled_lines):
    lines = compiled_lines
    for kernel in (*KERNELS, "_per_batch_row_map_kernel"):
        assert any(line.startswith(f"{kernel}: ") and "sm_90a cubin" in line for line in lines), (kernel, lines)
    assert sum("sm_90a cubin" in line for line in lines) >= 12, lines


@pytest.mark.triton
def test_bfloat16_stores_round_to_nearest_even(compiled_lines):
    conversions = [line for line in compiled_lines if line.startswith("cvt-bf16 ")]
    for kernel in KERNELS:  # both kernels were compiled for bfloat16 outputs, so both convert
        assert any(line.startswith(f"cvt-bf16 {kernel}: ") for line in conversions), (kernel, compiled_lines)
    for line in conversions:
        modes = dict(item.split("=") for item in line.split(": ", 1)[1].split())
        assert set(modes) == {"rn"}, f"float32 -> bfloat16 not rounded to nearest even: {line}"
