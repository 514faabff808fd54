"""CUDA backend: the row merge of Note [row merge] and its backward as Triton kernels.

One kernel source serves every layout (SBH; TND with per-batch or token-major statistics), every output
dtype (float16, bfloat16, float32; float64 runs on the ``torch`` backend, see below) and every part count
``K`` of :func:`merge_rows`, in both the stats form and the LSE form. It reads every tensor through its
strides (no ``.contiguous()`` copies), indexes with 64-bit offsets, takes every size as a runtime
argument (only block sizes, ``K`` and the form are compile-time), and never synchronises with the host,
so it can be captured in a CUDA graph. With ``TRITON_INTERPRET=1`` set before Triton is imported it runs
on CPU tensors (that is how the tests run without a GPU).

The kernels and their design notes (Note [triton row tiles], Note [triton flat merge], Note [triton row merge
backward]) are in ``triton_kernels.py``; this module holds the interface of ``backends/__init__.py`` and the
launchers. The forward runs the row-tile kernel unless the environment variable ``RINGATTN_TRITON_MERGE=flat``
(read at every launch, see :func:`merge_kernel`) picks the flat kernel, which computes the same bits but has not
yet been measured on a GPU.

float64 is not compiled here (float64 ``exp`` is slow on most NVIDIA parts and the exactness checks it
serves do not need speed): :func:`unsupported_reason` says so, ``auto`` then picks ``torch``, and
:func:`merge_rows` and :func:`merge_rows_backward` hand float64 to the ``torch`` backend. So do merges of
more than ``MAX_PARTS`` parts, which would need more kernel parameters than a launch carries comfortably.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._contract import UpdateProblem
from ..errors import BackendError, expected
from . import heads_outer, torch_eager

try:
    import triton

    from .triton_kernels import (
        _merge_flat_kernel,
        _merge_rows_backward_kernel,
        _merge_rows_kernel,
        _per_batch_row_map_kernel,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    _IMPORT_ERROR: str | None = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = None

NAME = "triton"
MAX_PARTS = 8
# Parts may differ in dtype: each is loaded as its own type and widened (ring attention merges a bfloat16 block
# output into a float32 accumulator without widening it first).
MIXED_PART_DTYPES = True
_MAX_BLOCK_D = 256
_MAX_BLOCK_ROWS = 32
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Which forward merge kernel runs (Note [triton flat merge] in triton_kernels.py): read at every launch, so a
# benchmark or a user can switch without editing code. 'tile' (Note [triton row tiles]) until the flat kernel has
# been measured on a GPU.
MERGE_KERNEL_ENV = "RINGATTN_TRITON_MERGE"
MERGE_KERNELS = ("tile", "flat")
_DEFAULT_MERGE_KERNEL = "tile"
_FLAT_MAX_ROWS = 128  # rows per flat program when D is tiny (the statistics tile is rows x lanes)


# Triton decides at @triton.jit time (module import) whether kernels are interpreted on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> str | None:
    """Why this backend cannot run in this process (Triton missing), or None."""
    return _IMPORT_ERROR


def device_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run tensors on ``device``, or None."""
    if device.type != "cuda" and not (device.type == "cpu" and _INTERPRETED):
        return f"needs a CUDA device (or CPU tensors with TRITON_INTERPRET=1), got device {device}"
    return None


def unsupported_reason(problem: UpdateProblem) -> str | None:
    """Why the fused kernel cannot run ``problem`` (device, dtype), or None."""
    reason = device_reason(problem.device)
    if reason is not None:
        return reason
    if problem.dtype not in _KERNEL_DTYPES:
        return f"compiles float16, bfloat16 and float32 only (float64 runs on the 'torch' backend), got {problem.dtype}"
    return None


def _block_sizes(head_dim: int, live_tiles: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_D)`` for head size ``D``, ``live_tiles`` D-tiles loaded per chunk (``K`` for the
    forward, ``K + 1`` for the backward, which also holds ``g``) and elements of ``element_size`` bytes: Note
    [triton row tiles]. Tiles are sized in bytes (4 KiB per part for ``K <= 2``): on an H100 float32 ran at
    79 % of the copy floor with bfloat16's 2048-element tile and 84 % with 1024 elements."""
    block_d = min(triton.next_power_of_2(max(head_dim, 1)), _MAX_BLOCK_D)
    tile = 2048 if live_tiles <= 2 and head_dim <= _MAX_BLOCK_D else 1024 if live_tiles <= 4 else 512
    tile = max(tile * 2 // max(element_size, 2), 64)
    return max(1, min(tile // block_d, _MAX_BLOCK_ROWS)), block_d


def merge_kernel(name: str | None = None) -> str:
    """The forward merge kernel to launch: ``name`` when given, else the environment variable
    ``RINGATTN_TRITON_MERGE`` (``tile`` when unset or empty), read at each call: ``'tile'`` (row tiles, Note
    [triton row tiles]) or ``'flat'`` (a flat grid of 16-byte packs, Note [triton flat merge]); both compute the
    same bits. Raises BackendError naming the variable (or ``kernel``) for any other value."""
    if name is None:
        value = os.environ.get(MERGE_KERNEL_ENV, "").strip().lower() or _DEFAULT_MERGE_KERNEL
        if value not in MERGE_KERNELS:
            got = os.environ[MERGE_KERNEL_ENV]
            raise BackendError(expected(MERGE_KERNEL_ENV, " or ".join(map(repr, MERGE_KERNELS)), repr(got)))
        return value
    if name not in MERGE_KERNELS:
        raise BackendError(expected("kernel", " or ".join(map(repr, MERGE_KERNELS)), repr(name)))
    return name


def _wide_columns(tensors: Sequence[torch.Tensor], head_dim: int) -> bool:
    """Whether a column offset ``d * stride(3)`` of one of ``tensors`` can pass 2**31 (a transposed view of a large
    tensor, say): the tile kernels then compute column offsets in int64 instead of int32, which would wrap around."""
    return any(abs(t.stride(3)) * max(head_dim - 1, 0) >= 2**31 for t in tensors)


def _row_map_args(row_map: tuple[torch.Tensor, torch.Tensor] | None, Q: int) -> tuple:
    """``(row_base, row_step)`` kernel arguments: the tensors, or ``(None, None)`` without a row map."""
    if row_map is None:
        return None, None
    row_base, row_step = row_map
    assert Q == 1 and row_base.is_contiguous() and row_step.is_contiguous(), "row_map as per_batch_row_map gives"
    return row_base, row_step


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s CUDA device, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def per_batch_row_map(
    seq_offsets: torch.Tensor, total_tokens: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_contract.per_batch_row_map`` in one kernel launch (the torch version takes nine), without a host sync.

    ``seq_offsets``: a valid int64 ``(B + 1,)`` sequence on the device (``_contract`` validates it first).
    """
    offsets = seq_offsets.contiguous()  # int64, as validate_update guarantees
    row_base = torch.empty(total_tokens, dtype=torch.int64, device=offsets.device)
    row_step = torch.empty_like(row_base)
    num_batches = offsets.numel() - 1
    if total_tokens == 0:
        return row_base, row_step
    block = 256
    with _device_guard(offsets):
        _per_batch_row_map_kernel[(triton.cdiv(total_tokens, block),)](
            offsets, num_batches, total_tokens, num_heads, num_batches.bit_length(), row_base, row_step, BLOCK=block
        )
    return row_base, row_step


def _forward_args(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    row_map: tuple[torch.Tensor, torch.Tensor] | None,
    lse_scale: float,
) -> tuple[tuple, dict]:
    """The arguments both forward kernels (:func:`_merge_rows_kernel`, :func:`_merge_flat_kernel`) start with, and
    the compile-time constants they share: what a merge is, apart from how a kernel tiles it."""
    P, Q, N, D = out_o.shape
    is_lse = parts_l is None
    assert is_lse == (out_l is None), "the LSE form has neither parts_l nor out_l"
    assert is_lse or out_l.shape == out_m.shape, "out_l is shaped like out_m"
    row_base, row_step = _row_map_args(row_map, Q)
    lanes = out_m.shape[-1]
    args = (
        tuple(parts_o),
        tuple(o.stride() for o in parts_o),
        tuple(parts_m),
        tuple(m.stride() for m in parts_m),
        None if is_lse else tuple(parts_l),
        None if is_lse else tuple(s.stride() for s in parts_l),
        out_o,
        out_o.stride(),
        out_m,
        out_m.stride(),
        out_l,
        None if is_lse else out_l.stride(),
        row_base,
        row_step,
        P * Q * N,
        Q,
        N,
        D,
        lanes,
        float(lse_scale),
    )
    constants = dict(
        K=len(parts_o),
        IS_LSE=is_lse,
        HAS_ROW_MAP=row_map is not None,
        BLOCK_LANES=triton.next_power_of_2(lanes),
        LANES_IN=1 if is_lse else parts_m[0].shape[-1],  # the LSE form reads lane 0 (one LSE per row)
    )
    return args, constants


def _launch_merge_rows(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    row_map: tuple[torch.Tensor, torch.Tensor] | None,
    lse_scale: float,
    block_rows: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    *,
    kernel: str | None = None,
    flat_block: int | None = None,
    flat_lane_check: bool = True,
    flat_int64_index: bool = False,
    wide_cols: bool | None = None,
) -> None:
    """Launch the forward merge on already valid views: :func:`_merge_rows_kernel`, or :func:`_merge_flat_kernel`
    when ``kernel`` (default: :func:`merge_kernel`'s environment variable) is ``'flat'``. ``block_*`` override the
    tile, ``flat_block`` the flat kernel's elements per program, ``flat_lane_check`` its equal-lanes shortcut,
    ``flat_int64_index`` its 64-bit indices, ``num_warps`` either's warps, ``wide_cols`` the tile kernel's 64-bit
    column offsets (default: where :func:`_wide_columns` finds them needed) (tests, ``benchmarks/triton_tune.py``)."""
    P, Q, N, D = out_o.shape
    num_rows = P * Q * N
    if merge_kernel(kernel) == "flat":
        _launch_merge_flat(
            parts_o,
            parts_m,
            parts_l,
            out_o,
            out_m,
            out_l,
            row_map,
            lse_scale,
            flat_block,
            num_warps,
            flat_lane_check,
            flat_int64_index,
        )
        return
    if num_rows == 0:
        return
    default_rows, default_d = _block_sizes(D, len(parts_o), out_o.element_size())
    args, constants = _forward_args(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map, lse_scale)
    block_rows, block_d = block_rows or default_rows, max(block_d or default_d, constants["LANES_IN"])
    with _device_guard(out_o):
        _merge_rows_kernel[(triton.cdiv(num_rows, block_rows),)](
            *args,
            **constants,
            HEADS_OUTER=heads_outer(parts_m, row_map),
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            ONE_CHUNK=D <= block_d,
            WIDE_COLS=_wide_columns((*parts_o, out_o), D) if wide_cols is None else wide_cols,
            num_warps=num_warps or 4,
            # The contract rounds two products, then adds: no fused multiply-add.
            enable_fp_fusion=False,
        )


def _flat_vector(tensors: Sequence[torch.Tensor], head_dim: int, element_size: int) -> int:
    """Elements per pack of the flat kernel: 16 bytes of ``element_size``-byte elements, halved until every
    attention tensor has unit column stride and ``D`` and its other strides (of dimensions longer than 1) are
    multiples of it. The kernel promises the compiler that much contiguity and alignment (``tl.multiple_of``), so
    this check is what makes the promise true; 1 (scalar accesses) always is."""
    vec = max(16 // element_size, 1)
    while vec > 1:
        fits = (
            head_dim % vec == 0
            and all(t.stride(3) == 1 or t.shape[3] == 1 for t in tensors)
            and all(s % vec == 0 for t in tensors for s, n in zip(t.stride()[:3], t.shape[:3], strict=True) if n > 1)
        )
        if fits:
            break
        vec //= 2
    return vec


class FlatPlan(NamedTuple):
    """How :func:`_launch_merge_flat` launches a merge (``benchmarks/triton_tune.py`` prints it)."""

    vec: int  # elements per pack
    block: int  # elements per chunk
    rows_per_program: int
    programs: int
    num_warps: int
    lane_check: bool  # the equal-lanes shortcut compiled in
    int32_index: bool  # 32-bit row numbers and offsets


def _flat_plan(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    block: int | None = None,
    num_warps: int | None = None,
    lane_check: bool = True,
    int64_index: bool = False,
    stats: Sequence[torch.Tensor] = (),
) -> FlatPlan:
    """The flat kernel's launch for these views and overrides (Note [triton flat merge]); ``stats``: the output
    statistics, whose offsets must fit the index type too."""
    P, Q, N, D = out_o.shape
    vec = _flat_vector([*parts_o, out_o], D, out_o.element_size())
    block = block or max(2048 // out_o.element_size(), vec)
    assert block >= vec and block & (block - 1) == 0, "flat_block: a power of 2 of at least one pack"
    rows_per_program = max(1, min(block // max(D, 1), _FLAT_MAX_ROWS))
    lanes_in = 1 if parts_l is None else parts_m[0].shape[-1]
    programs = -(-P * Q * N // rows_per_program)
    tensors = [*parts_o, *parts_m, *(parts_l or ()), out_o, *stats]
    int32_index = (
        not int64_index
        and max(programs * rows_per_program, max(D, 1) * block) < 2**31
        and all(_max_offset(t) < 2**31 for t in tensors)
    )
    return FlatPlan(
        vec=vec,
        block=block,
        rows_per_program=rows_per_program,
        programs=programs,
        num_warps=num_warps or max(1, min(8, block // vec // 32)),
        lane_check=lane_check and parts_l is not None and min(vec, lanes_in) > 1,
        int32_index=int32_index,
    )


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes for ``t`` (strides are non-negative in torch)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)


def _launch_merge_flat(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    row_map: tuple[torch.Tensor, torch.Tensor] | None,
    lse_scale: float,
    block: int | None = None,
    num_warps: int | None = None,
    lane_check: bool = True,
    int64_index: bool = False,
) -> None:
    """Launch :func:`_merge_flat_kernel` (Note [triton flat merge]) on already valid views: ``block`` elements per
    chunk (a power of 2; default 2 KiB of the output's elements), ``num_warps`` (default one warp per 32 packs, at
    most 8), ``lane_check``: in the stats form, test each chunk's lanes for equality and then form the weights once
    per pack (the same bits either way); ``int64_index`` forces 64-bit indices where 32 would do (tests). Indices
    are 32-bit when every row number and element offset fits. Any strides: a column stride other than 1, or strides
    and ``D`` that are not multiples of the 16-byte pack, only make the packs narrower (``_flat_vector``); outputs
    may be exactly the inputs' views."""
    P, Q, N, D = out_o.shape
    num_rows = P * Q * N
    if num_rows == 0:
        return
    outs = [out_m] if out_l is None else [out_m, out_l]
    plan = _flat_plan(parts_o, parts_m, parts_l, out_o, block, num_warps, lane_check, int64_index, outs)
    args, constants = _forward_args(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map, lse_scale)
    with _device_guard(out_o):
        _merge_flat_kernel[(plan.programs,)](
            *args,
            plan.rows_per_program,
            **constants,
            # The attention tensors' memory order, so a program's run is contiguous memory.
            HEADS_OUTER=abs(out_o.stride(2)) > abs(out_o.stride(0)),
            BLOCK=plan.block,
            VEC=plan.vec,
            ROWS=triton.next_power_of_2(plan.rows_per_program),
            ONE_CHUNK=0 < D <= plan.block,  # D = 0: no chunk (the loop runs 0 times), the statistics are still merged
            LANE_CHECK=plan.lane_check,
            INT32_INDEX=plan.int32_index,
            num_warps=plan.num_warps,
            enable_fp_fusion=False,  # the tile kernel's arithmetic exactly: no fused multiply-add
        )


def _launch_merge_rows_backward(
    grad_o: torch.Tensor,
    grad_m: torch.Tensor,
    grad_l: torch.Tensor | None,
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    grad_parts_o: Sequence[torch.Tensor],
    grad_parts_m: Sequence[torch.Tensor],
    grad_parts_l: Sequence[torch.Tensor] | None,
    row_map: tuple[torch.Tensor, torch.Tensor] | None,
    lse_scale: float,
    block_rows: int | None = None,
    block_d: int | None = None,
    wide_cols: bool | None = None,
) -> None:
    """Launch :func:`_merge_rows_backward_kernel` on already valid views; ``block_*`` override the tile and
    ``wide_cols`` the choice of 64-bit column offsets (tests)."""
    P, Q, N, D = grad_o.shape
    num_rows = P * Q * N
    if num_rows == 0:
        return
    k = len(parts_o)
    default_rows, default_d = _block_sizes(D, k + 1, grad_o.element_size())
    lanes_in = 1 if parts_l is None else parts_m[0].shape[-1]  # the LSE form reads lane 0 (one LSE per row)
    lanes = grad_parts_m[0].shape[-1]
    block_rows, block_d = block_rows or default_rows, max(block_d or default_d, lanes_in)
    is_lse = parts_l is None
    assert is_lse == (grad_l is None) == (grad_parts_l is None), "the LSE form has no parts_l, grad_l, grad_parts_l"
    assert is_lse or grad_l.shape == grad_m.shape, "grad_l is shaped like grad_m"
    grad_lanes = grad_m.shape[-1]
    row_base, row_step = _row_map_args(row_map, Q)
    with _device_guard(grad_o):
        _merge_rows_backward_kernel[(triton.cdiv(num_rows, block_rows),)](
            grad_o,
            grad_o.stride(),
            grad_m,
            grad_m.stride(),
            grad_l,
            None if is_lse else grad_l.stride(),
            tuple(parts_o),
            tuple(o.stride() for o in parts_o),
            tuple(parts_m),
            tuple(m.stride() for m in parts_m),
            None if is_lse else tuple(parts_l),
            None if is_lse else tuple(s.stride() for s in parts_l),
            tuple(grad_parts_o),
            tuple(t.stride() for t in grad_parts_o),
            tuple(grad_parts_m),
            tuple(t.stride() for t in grad_parts_m),
            None if is_lse else tuple(grad_parts_l),
            None if is_lse else tuple(t.stride() for t in grad_parts_l),
            row_base,
            row_step,
            num_rows,
            Q,
            N,
            D,
            grad_lanes,
            lanes,
            float(lse_scale),
            K=k,
            IS_LSE=is_lse,
            HAS_ROW_MAP=row_map is not None,
            HEADS_OUTER=heads_outer(parts_m, row_map),
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            BLOCK_K=triton.next_power_of_2(k),
            BLOCK_GRAD_LANES=triton.next_power_of_2(grad_lanes),
            BLOCK_LANES=triton.next_power_of_2(lanes),
            LANES_IN=lanes_in,
            WIDE_COLS=_wide_columns((grad_o, *parts_o, *grad_parts_o), D) if wide_cols is None else wide_cols,
            num_warps=4,
            enable_fp_fusion=False,  # the same products and sums as the torch backend, no contraction
        )


def _lanes_fused(parts_m: Sequence[torch.Tensor], lanes_out: int, is_lse: bool) -> bool:
    """Whether the kernels take these lane counts: the LSE form (lane 0 read) or the stats form's lanes a power of
    two (Ascend's 8) matched by the merged statistic's lanes. Anything else runs on the ``torch`` backend."""
    lanes = parts_m[0].shape[-1]
    return is_lse or (lanes == lanes_out and lanes & (lanes - 1) == 0 and lanes <= _MAX_BLOCK_D)


def merge_rows(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Merge ``K`` partial results row by row into ``out_*``: Note [row merge] in ``backends/__init__.py``.

    Parameters
    ----------
    parts_o : K tensors ``(P, Q, N, D)``, one dtype of float16, bfloat16, float32 (float64: see below)
        Partial outputs, each normalised over its own keys; any strides.
    parts_m : K tensors ``(P, Q, N, lanes)``, float32, any strides; merged lane by lane (output element ``d``
        uses lane ``d % lanes``; an empty part's output is not read: Note [row merge])
        Stats form: row maximum of the scaled scores. LSE form (``parts_l`` None): log-sum-exp that is in
        natural log after multiplying by ``lse_scale`` (``ln 2`` for base-2 producers); ``+inf`` reads as
        ``-inf`` (an empty row of old FlashAttention).
    parts_l : K tensors like ``parts_m``, or None
        ``sum(exp(s - max))`` per row (stats form), or None for the LSE form.
    out_o : ``(P, Q, N, D)``, the dtype of ``parts_o``
    out_m : ``(P, Q, N, lanes_out)``, float32
        Stats form: merged max; LSE form: merged LSE in the caller's base (divided by ``lse_scale``).
        Written to every lane.
    out_l : like ``out_m`` (stats form: merged sum), or None (LSE form)
    row_map : ``(row_base, row_step)``, contiguous int64 ``(T,)`` each, on the outputs' device, or None
        Per-batch TND statistics (Note [canonical rows]): every stats view is then the raw
        ``(T, 1, N, lanes)`` tensor.

    A row whose parts are all empty (max ``-inf``) merges to ``o = 0``, max ``-inf``, sum 0 (LSE ``-inf``),
    never NaN; NaN inputs propagate. Outputs may be exactly the same views as inputs; partial overlaps
    are undefined (callers validate with ``_contract.check_outputs``). Arguments are not validated.
    float64 or more than ``MAX_PARTS`` parts run on the ``torch`` backend. Asynchronous on CUDA: no host
    synchronisation, capturable in a CUDA graph. The kernel is the row-tile one, or the flat one (the same bits)
    when the environment variable ``RINGATTN_TRITON_MERGE`` is ``flat`` (:func:`merge_kernel`; another value raises
    BackendError).
    """
    if (
        out_o.dtype not in _KERNEL_DTYPES
        or len(parts_o) > MAX_PARTS
        or not _lanes_fused(parts_m, out_m.shape[-1], parts_l is None)
    ):
        torch_eager.merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map=row_map, lse_scale=lse_scale)
        return
    _launch_merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map, lse_scale)


def merge_rows_backward(
    grad_o: torch.Tensor,
    grad_m: torch.Tensor,
    grad_l: torch.Tensor | None,
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    grad_parts_o: Sequence[torch.Tensor],
    grad_parts_m: Sequence[torch.Tensor],
    grad_parts_l: Sequence[torch.Tensor] | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Gradients of :func:`merge_rows` with respect to its K parts: Note [row merge backward] in ``_backward.py``.

    Parameters
    ----------
    grad_o : ``(P, Q, N, D)``, the dtype of ``parts_o``, any strides
        Gradient of ``out_o``.
    grad_m : ``(P, Q, N, lanes_out)``, float32, any strides
        Gradient of ``out_m`` (stats form: of the merged max; LSE form: of the merged LSE in the caller's base),
        summed over its lanes (the forward writes one value to every lane).
    grad_l : like ``grad_m`` (stats form: gradient of the merged sum), or None (LSE form)
    parts_o, parts_m, parts_l, row_map, lse_scale
        Exactly the forward's inputs (:func:`merge_rows`), every lane read. The merged ``M``,
        ``L`` and weights are recomputed from them, so the forward's outputs are not needed.
    grad_parts_o : K tensors ``(P, Q, N, D)``, the parts' dtype, any strides
        Written: ``w_k * grad_o``, computed in float32 and rounded once.
    grad_parts_m, grad_parts_l : K tensors ``(P, Q, N, lanes)`` each, float32, any strides (``grad_parts_l`` None
        in the LSE form)
        Written: each lane's gradient of ``m_k`` (LSE form: of the caller-base LSE) and of ``l_k``; 0 for a part
        empty in that lane (the gradient of an empty part's output is 0 too), and 0
        in the other lanes. With ``row_map`` they are raw per-batch ``(T, 1, N, lanes)`` views, as in the forward.

    Ties of the maximum share its gradient equally; empty parts (max ``-inf``, LSE ``+-inf``) get zero gradients;
    a row whose parts are all empty gets ``grad_parts_o = 0``, ``grad_parts_l = 0`` and ``grad_parts_m = g_m / K``,
    never NaN; NaN inputs propagate. Gradient outputs must not overlap any input. Arguments are not validated.
    float64 or more than ``MAX_PARTS`` parts run on the ``torch`` backend. Asynchronous on CUDA: no host
    synchronisation, capturable in a CUDA graph.
    """
    fused = _lanes_fused(parts_m, grad_m.shape[-1], parts_l is None)
    if parts_o[0].dtype not in _KERNEL_DTYPES or len(parts_o) > MAX_PARTS or not fused:
        torch_eager.merge_rows_backward(
            grad_o,
            grad_m,
            grad_l,
            parts_o,
            parts_m,
            parts_l,
            grad_parts_o,
            grad_parts_m,
            grad_parts_l,
            row_map=row_map,
            lse_scale=lse_scale,
        )
        return
    _launch_merge_rows_backward(
        grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, grad_parts_o, grad_parts_m, grad_parts_l, row_map, lse_scale
    )
