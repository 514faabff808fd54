"""Compile every Triton kernel variant the launchers pick for sm_90a (H100), without a GPU; run as a script.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts Python that Triton's compiler rejects
(a starred expression in a tuple, say, which reached a GPU run once); this compiles the real launch paths to
cubin with ptxas instead. A stand-in driver reports an sm_90 target and every launch becomes a warm-up
(compile, no launch), so the arguments can be CPU tensors. Prints one line per compiled kernel, and one
``cvt-bf16`` line per kernel that converts float32 to bfloat16, counting its PTX conversions by rounding modifier
(``cvt.rn.bf16x2.f32``: round to nearest even; ``.rz``: truncation, what the interpreter does). Run by
``test_triton_compile.py`` in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

assert os.environ.get("TRITON_INTERPRET") != "1", "compiles for sm_90a: run without TRITON_INTERPRET=1"


class _Sm90Driver:
    """Just enough of a driver for ``JITFunction.run(warmup=True)``."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled: list[str] = []
conversions: list[str] = []
resources: list[str] = []
label = ""  # the variant being compiled, named in the resource lines
_run = JITFunction.run
# float32 -> bfloat16 in PTX: cvt.<rounding>[.<modifiers>].bf16[x2].f32
_CVT_BF16 = re.compile(r"\bcvt((?:\.\w+)*?)\.bf16(?:x2)?\.f32\b")
# 128-bit global accesses: ld.global[.nc...].v4.b32 / st.global.v4.b32 (16 bytes per thread and instruction)
_LD_V4 = re.compile(r"\bld\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)\b")
_ST_V4 = re.compile(r"\bst\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)\b")
_CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> str:
    """``REG=.. STACK=.. LOCAL=..`` of the cubin's kernel, from ``cuobjdump --dump-resource-usage`` (ptxas' register
    count; STACK and LOCAL are nonzero when registers spill). Empty when Triton ships no cuobjdump."""
    if not _CUOBJDUMP.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return " ".join(f"{key}={found[key]}" for key in ("REG", "STACK", "LOCAL") if key in found)


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    cubin = kernel.asm.get("cubin", b"")
    assert cubin, f"{self.fn.__name__}: no cubin"
    compiled.append(f"{self.fn.__name__}: {len(cubin)} bytes of sm_90a cubin")
    ptx = kernel.asm["ptx"]
    modes = collections.Counter(m.group(1).lstrip(".") or "default" for m in _CVT_BF16.finditer(ptx))
    if modes:
        counts = " ".join(f"{mode}={n}" for mode, n in sorted(modes.items()))
        conversions.append(f"cvt-bf16 {self.fn.__name__}: {counts}")
    usage = _resource_usage(cubin)
    vectors = f"ld.v4={len(_LD_V4.findall(ptx))} st.v4={len(_ST_V4.findall(ptx))} bar.sync={ptx.count('bar.sync')}"
    resources.append(f"resources {self.fn.__name__} [{label}]: {usage} {vectors}")
    return kernel


driver.set_active(_Sm90Driver())
JITFunction.run = _compile_only

from ringattn._contract import _row_map  # noqa: E402
from ringattn.backends import triton_cuda  # noqa: E402


def parts(k: int, shape: tuple[int, ...], dtype: torch.dtype, lse: bool):
    o = [torch.randn(*shape, dtype=dtype) for _ in range(k)]
    m = [torch.randn(*shape[:-1], 8) for _ in range(k)]
    return o, m, (None if lse else [torch.rand(*shape[:-1], 8) for _ in range(k)])


def forward_and_backward(k, shape, dtype, lse, row_map=None, backward=True):
    global label
    label = f"K={k} {tuple(shape)} {str(dtype).removeprefix('torch.')} {'lse' if lse else 'stats'}"
    label += " row-map" if row_map is not None else ""
    o, m, l = parts(k, shape, dtype, lse)
    out = (torch.empty_like(o[0]), torch.empty_like(m[0]), None if lse else torch.empty_like(m[0]))
    triton_cuda.merge_rows(o, m, l, *out, row_map=row_map)
    if backward:
        grads = (torch.randn_like(o[0]), torch.randn_like(m[0]), None if lse else torch.randn_like(m[0]))
        grad_parts = (
            [torch.empty_like(t) for t in o],
            [torch.empty_like(t) for t in m],
            l and [torch.empty_like(t) for t in l],
        )
        triton_cuda.merge_rows_backward(*grads, o, m, l, *grad_parts, row_map=row_map)


def flat(k, shape, dtype, lse, row_map=None, block=None, lane_check=True):
    """The flat forward kernel (Note [triton flat merge]) through the public path: selected by its environment
    variable, or with an explicit ``block`` or ``lane_check`` through the launcher's overrides."""
    global label
    if block is not None or not lane_check:
        label = f"K={k} {tuple(shape)} {str(dtype).removeprefix('torch.')} {'lse' if lse else 'stats'} block={block}"
        label += "" if lane_check else " no-lane-check"
        o, m, l = parts(k, shape, dtype, lse)
        out = (torch.empty_like(o[0]), torch.empty_like(m[0]), None if lse else torch.empty_like(m[0]))
        triton_cuda._launch_merge_rows(
            o, m, l, *out, row_map, 1.0, kernel="flat", flat_block=block, flat_lane_check=lane_check
        )
        return
    os.environ[triton_cuda.MERGE_KERNEL_ENV] = "flat"
    try:
        forward_and_backward(k, shape, dtype, lse, row_map=row_map, backward=False)
    finally:
        del os.environ[triton_cuda.MERGE_KERNEL_ENV]


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    forward_and_backward(2, (16, 2, 4, 128), dtype, lse=False)  # SBH-like rows, one chunk
offsets = torch.tensor([0, 5, 5, 12])
triton_cuda.per_batch_row_map(offsets, 12, 4)  # compiled, not run: its outputs stay unwritten
forward_and_backward(2, (12, 1, 4, 64), torch.bfloat16, lse=False, row_map=_row_map(offsets, 12, 4))
forward_and_backward(3, (16, 1, 4, 320), torch.float16, lse=True)  # LSE form, K = 3, D loops over chunks
forward_and_backward(8, (16, 1, 2, 40), torch.float32, lse=True, backward=False)
forward_and_backward(3, (16, 1, 4, 320), torch.bfloat16, lse=True)  # bfloat16 in the LSE form too
# The flat forward kernel: every dtype in both forms (16-byte packs), the per-batch map, K = 3 and 8, D = 72 (packs
# by the launcher's check, not by Triton's divisibility-by-16 specialisation), D = 5 (one element per pack), and a
# row longer than a program's block (the chunk loop).
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    flat(2, (16, 2, 4, 128), dtype, lse=False)
    flat(2, (16, 1, 32, 128), dtype, lse=True)
flat(2, (12, 1, 4, 64), torch.bfloat16, lse=False, row_map=_row_map(offsets, 12, 4))
flat(3, (16, 1, 4, 320), torch.float16, lse=True)
flat(8, (16, 1, 2, 40), torch.float32, lse=True)
flat(2, (16, 1, 4, 72), torch.bfloat16, lse=False)
flat(2, (16, 1, 4, 5), torch.float32, lse=False)
flat(2, (16, 1, 4, 320), torch.bfloat16, lse=False, block=256)
for dtype in (torch.float32, torch.bfloat16):  # every pack's own lane weights, without the equal-lanes shortcut
    flat(2, (16, 2, 4, 128), dtype, lse=False, lane_check=False)
# The tile kernels with 64-bit column offsets (chosen for huge column strides; forced here), one chunk and a loop.
for head_dim in (128, 320):
    label = f"K=2 (16, 1, 4, {head_dim}) bfloat16 stats wide-columns"
    o, m, l = parts(2, (16, 1, 4, head_dim), torch.bfloat16, False)
    out = (torch.empty_like(o[0]), torch.empty_like(m[0]), torch.empty_like(m[0]))
    triton_cuda._launch_merge_rows(o, m, l, *out, None, 1.0, kernel="tile", wide_cols=True)
    grads = (torch.randn_like(o[0]), torch.randn_like(m[0]), torch.randn_like(m[0]))
    grad_parts = ([torch.empty_like(t) for t in o], [torch.empty_like(t) for t in m], [torch.empty_like(t) for t in l])
    triton_cuda._launch_merge_rows_backward(*grads, o, m, l, *grad_parts, None, 1.0, wide_cols=True)
print("\n".join(compiled + conversions + resources))
sys.exit(0 if compiled else 1)
