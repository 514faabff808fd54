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
KERNELS = ("_merge_rows_kernel", "_merge_rows_backward_kernel", "_merge_flat_kernel")


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
    assert sum("sm_90a cubin" in line for line in lines) >= 26, lines


@pytest.mark.triton
def test_bfloat16_stores_round_to_nearest_even(compiled_lines):
    conversions = [line for line in compiled_lines if line.startswith("cvt-bf16 ")]
    for kernel in KERNELS:  # every kernel was compiled for bfloat16 outputs, so each converts
        assert any(line.startswith(f"cvt-bf16 {kernel}: ") for line in conversions), (kernel, compiled_lines)
    for line in conversions:
        modes = dict(item.split("=") for item in line.split(": ", 1)[1].split())
        assert set(modes) == {"rn"}, f"float32 -> bfloat16 not rounded to nearest even: {line}"


def resource_lines(lines: list[str]) -> list[tuple[str, str, dict[str, int]]]:
    """``(kernel, variant, {"REG": .., "STACK": .., "LOCAL": .., "ld.v4": .., "st.v4": ..})`` per compiled variant."""
    found = []
    for line in lines:
        if line.startswith("resources "):
            head, counts = line.removeprefix("resources ").split("]: ", 1)
            kernel, variant = head.split(" [", 1)
            found.append((kernel, variant, {k: int(v) for k, v in (item.split("=") for item in counts.split())}))
    return found


@pytest.mark.triton
def test_no_register_spills(compiled_lines):
    """ptxas keeps every variant in registers (cuobjdump's STACK and LOCAL are 0): a spill would turn the merge's
    loads into local-memory traffic. The register counts are printed with ``-s`` (Note [triton flat merge] cites
    them)."""
    usage = resource_lines(compiled_lines)
    assert len(usage) >= 26, compiled_lines
    if not any("REG" in counts for _, _, counts in usage):
        pytest.skip("triton ships no cuobjdump to read the register counts from")
    for kernel, variant, counts in usage:
        print(f"{kernel} [{variant}]: {counts}")
        assert counts["STACK"] == 0 and counts["LOCAL"] == 0, (kernel, variant, counts)
        assert 0 < counts["REG"] <= 255, (kernel, variant, counts)


@pytest.mark.triton
def test_flat_kernel_moves_16_byte_packs(compiled_lines):
    """The flat kernel's unit-stride variants load each part and store the output with 128-bit accesses
    (``ld.global.v4`` / ``st.global.v4``: one 16-byte pack per thread), D = 72 included (the launcher's alignment
    promise, not Triton's divisibility-by-16 specialisation); D = 5 falls back to scalar accesses. Every variant
    keeps its ``bar.sync`` between the statistics reads and writes (Note [triton flat merge])."""
    flat = {variant: counts for kernel, variant, counts in resource_lines(compiled_lines) if kernel == KERNELS[2]}
    assert len(flat) >= 10, compiled_lines
    for variant, counts in flat.items():
        assert counts["bar.sync"] >= 1, (variant, "the barrier before the statistics writes (in-place merges)")
        parts = int(variant.split()[0].removeprefix("K="))
        if ", 5)" in variant:
            assert counts["ld.v4"] == 0 and counts["st.v4"] == 0, (variant, counts)
        else:
            assert counts["ld.v4"] >= parts and counts["st.v4"] >= 1, (variant, counts)
