"""Fused CPU backward of the row merge: Note [row merge backward] (``_backward.py``) as one numba kernel.

Like the forward (Note [cpu merge kernel] in ``numba_cpu.py``, whose flat buffers and element conversions this
module reuses), the backward is memory-bound: per row it reads ``g`` and the K parts once and writes K gradients
once, so the kernel's job is to touch each of those bytes once and keep everything else in registers.

Note [cpu merge backward kernel]
--------------------------------
Arithmetic is float32 (float64 for float64 parts). Work is split over threads in tiles of whole tokens (1024 to
32768 rows, about ``_TILES_PER_THREAD`` per thread; the launcher passes the count). A tile runs in three phases,
each walking memory in its own order, as the forward's two do (Note [cpu merge kernel]):

1. statistics, in their memory order (head-major for SBH and per-batch TND): read the K statistics of every lane
   and recompute, lane by lane, ``M``, ``a_k``, ``exp(m_k - M)``, ``L``, ``w_k``, the tie shares ``t_k`` and the
   empty flags (cheaper than reading the forward's merged statistics, which are not inputs), kept per row and
   lane in a tile-local array; a row whose lanes are bitwise equal computes lane 0 only (Note [equal lanes once]);
2. outputs, in attention order: per part k, ``d_k = <g, o_k>`` of each lane and ``do_k = w_k g`` rounded once. In
   the stats form, unit strides and no empty lane, the row goes 8 elements at a time, one vector for the 8 lanes
   (Note [eight lanes at once]); otherwise one loop per lane over the elements ``d % lanes == c`` (a sub-row of
   stride ``lanes``; the whole row in the LSE form, which has one lane: ``_scale_and_dot``). An empty part's
   ``o_k`` is not read and its ``do_k`` is 0. ``w_k`` does not depend on any dot, so the write needs no second
   pass; ``g`` is re-read K times, but from L1;
3. statistics again, in their memory order: per lane, the incoming statistic gradients of the output lanes
   holding that lane, and the 2K (stats form) or K (LSE form) statistic gradients; 0 for an empty part.

Visiting the statistics in attention order instead (one row of every head per token) touches ~10 statistics
streams times N heads at once, more than the prefetcher follows; visiting the attention rows head-major jumps by a
token's stride. The split measured 1.15-1.5x faster on SBH rows (2 threads, A/B in one process), the stats form
gaining most. The per-row arithmetic and its order are unchanged, so results are bitwise those of a single pass.

The dot is the only reduction; ``_scale_and_dot`` alone is compiled with ``reassoc`` (and ``contract``) so that
LLVM vectorises it with partial sums, as a BLAS dot does. It stays a separate (non-inlined) function: inlined into
the phase loop, the same source compiled to a scalar loop. No other fast-math flag is set anywhere: ``nnan`` /
``ninf`` would break the empty-row (``-inf``) and NaN semantics.

K is the length of a tuple of flat buffers, so one kernel source compiles once per (dtype, statistics dtype, K).
The statistics' lanes must get the gradients of their own elements, whether or not they are equal: phases 2 and 3
are per lane even where phase 1 computed one lane for all. Phase 3 reads each lane's incoming gradient directly
when the incoming statistics have as many lanes as the merge (a call of ``_lane_gradient`` per lane, as before,
cost the stats form 1.2-1.4x). Loops over K index the tuples of
buffers with the loop variable (numba then reloads the data pointers, Note [cpu merge kernel]); the element loop
itself is ``_scale_and_dot``, which takes one buffer each. Gradient outputs never alias inputs (Note [row merge
backward]), so no ordering of reads and writes matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from . import heads_outer, torch_eager
from .numba_cpu import (
    _at,
    _bits,
    _columns,
    _compute,
    _flat,
    _launch,
    _narrow,
    _part_max,
    _part_offsets,
    _scratch,
    _stats_at,
    _strides,
    _threads,
    _widen,
)
from .numba_stream import or_lane_diffs, scale_and_dot_blocks8

# Rows per tile: about _TILES_PER_THREAD tiles per thread (the launcher passes the count), within these bounds.
# Phases 1 and 3 walk one run of tokens per head and statistics tensor, so long tiles keep the prefetcher
# streaming (as in the forward, Note [cpu merge kernel]); the per-row scratch of a tile (~(4K + 2) compute values
# per row) should stay in L2/L3 between the phases.
_TILES_PER_THREAD = 2
_TILE_ROWS_MIN = 1024
_TILE_ROWS_MAX = 32768
_NO_ROW_MAP = np.empty(0, dtype=np.int64)


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def _scale_and_dot(g_buf, g_base, g_step, o_buf, o_base, o_step, out_buf, out_base, out_step, weight, dim):
    """Write ``weight * g`` (rounded once to ``out_buf``'s dtype) over one row and return ``<g, o>``.

    Compiled on its own with ``reassoc`` (and ``contract``) so that LLVM vectorises the dot with partial sums, as a
    BLAS dot does; every other operation here is a single rounding, which the flags cannot change. (Inlined into
    its caller, the loop was left scalar.)
    """
    dot = _compute(0.0, out_buf)
    for d in range(np.uint64(dim)):
        g = _widen(g_buf[g_base + d * g_step])
        dot += g * _widen(o_buf[o_base + d * o_step])
        out_buf[out_base + d * out_step] = _narrow(g * weight, out_buf)
    return dot


# Note [equal lanes once]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Phase 1 merges each lane's statistics on its own: per part an ``exp`` (a libm call) and a division, 8 times per row
# in the stats form. Ascend writes one value to all 8 lanes, so a row whose lanes are bitwise equal in every part
# computes lane 0 and copies its row of the scratch to lanes 1-7 (bit-equal inputs give bit-equal lane results, NaN
# payloads included). The test is the forward's vector one (``or_lane_diffs``, Note [lane check vector]), per row,
# for lanes of unit stride; strided lanes are merged one by one. (The forward's scalar per-row test, ``_diff8_all``,
# added 4.5 s to each backward kernel's compile.) Phases 2 and 3 stay per lane: the lanes' gradients differ (each
# lane gets the gradient of its own elements).


# Note [eight lanes at once]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# The stats form's row of D elements gives element d to lane d % 8. Walked per lane (``_scale_and_dot`` over a
# sub-row of stride 8, 8 calls per part and row), nothing vectorises: the backward ran at ~9 GB/s in float32 and
# ~4.6 GB/s in bfloat16 (6-12% of the copy floor of a 2-core VM, slower than autograd through the eager formula in
# float32). Walked 8 elements at a time, lane c is always the c-th element of a block: 8 accumulators and 8 weights,
# one per lane, are the lanes of one vector. For float32 and bfloat16 parts the blocks go through
# ``scale_and_dot_blocks8`` (Note [eight-lane row backward] in ``numba_stream.py``: the row loop in vector
# instructions; the same arithmetic as the per-lane walk without reassociation, each lane's dot summed in element
# order) and the last D % 8 elements one by one. Other dtypes, other strides, and rows with an empty part in some
# lane keep the per-lane walk. (The 8 lanes written out as numba code, 8 accumulators, stayed mostly scalar.)


@numba.njit(cache=True)
def _rows8_vector(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w, lane_acc):
    """One row of part ``k`` in the stats form (unit strides, float32 or bfloat16, no empty lane): ``out = w_c g``
    rounded once and ``dots[first_row + c, k] = <g, o>`` over the elements of lane ``c = d % 8``, with ``w_c =
    rows[first_row + c, k]``; ``lane_w``, ``lane_acc``: 8-element float32 scratch (Note [eight lanes at once])."""
    for c in range(8):
        lane_w[c] = rows[first_row + c, k]
    blocks = np.uint64(dim) // np.uint64(8)
    scale_and_dot_blocks8(g_buf, g_base, o_buf, o_base, out_buf, out_base, lane_w, lane_acc, blocks)
    for d in range(blocks * np.uint64(8), np.uint64(dim)):  # the tail: lanes 0 .. D % 8 - 1
        c = d - blocks * np.uint64(8)
        x = _widen(g_buf[g_base + d])
        lane_acc[c] += x * _widen(o_buf[o_base + d])
        out_buf[out_base + d] = _narrow(x * lane_w[c], out_buf)
    for c in range(8):
        dots[first_row + c, k] = lane_acc[c]


def _eight_lanes(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w,
                 lane_acc):  # pragma: no cover - numba stub  # fmt: skip
    """``_rows8_vector`` where the parts' dtype has the vector intrinsic (float32, bfloat16), returning True; False
    (nothing done: the caller walks the lanes) for other dtypes."""


@overload(_eight_lanes, inline="always")
def _eight_lanes_impl(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w,
                      lane_acc):  # fmt: skip
    if g_buf.dtype not in (types.float32, types.uint16) or rows.dtype != types.float32:

        def declined(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w, lane_acc):
            return False

        return declined

    def eight_lanes(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w, lane_acc):
        _rows8_vector(g_buf, g_base, o_buf, o_base, out_buf, out_base, rows, first_row, k, dots, dim, lane_w, lane_acc)
        return True

    return eight_lanes


@numba.njit(cache=True)
def _zero_row(buf, base, step, count):
    """``buf[base + d * step] = 0`` for ``d < count``: the gradient of an empty part's output."""
    for d in range(np.uint64(count)):
        buf[base + d * step] = 0.0


@numba.njit(cache=True)
def _lane_gradient(buf, cols, k, at, lanes_in, lane, lanes, like):
    """Lane ``lane`` of the gradient of a merged statistic: the sum of the output lanes ``c`` with
    ``c % lanes == lane`` of statistics row ``at`` of ``buf`` (output lane c holds merged lane c % lanes)."""
    base, step = _at(cols, k, at[0], at[1], at[2]), np.uint64(cols[3][k])
    total = _compute(0.0, like)
    for c in range(lane, lanes_in, lanes):
        total += _compute(buf[base + np.uint64(c) * step], like)
    return total


@numba.njit(cache=True)
def _dots_phase(
    grad_o, g_strides, o_bufs, o_strides, do_bufs, do_strides, token_p, token_q, num_n, dim, lanes, rows, dots
):
    """Phase 2 of a tile, rows in attention order: ``do_k = w_k g`` and ``dots[row * lanes + c, k] = <g, o_k>``
    over the elements ``d`` of lane ``c`` (``d % lanes == c``), an empty part's ``o_k`` not read.

    ``rows[row * lanes + c]`` holds the lane's weights ``w_k`` (columns ``:K``) and empty flags (columns
    ``4K:5K``) from phase 1. A lane's elements are a sub-row of stride ``lanes``: ``_scale_and_dot`` walks it
    (with one lane, the LSE form, that is the whole row, as before lanes were told apart).
    """
    parts = len(o_bufs)
    g_cols = _columns(g_strides, (grad_o,))
    g_step = np.uint64(g_cols[3][0])
    zero = _compute(0.0, rows)
    lane_w, lane_acc = _scratch(8, rows), _scratch(8, rows)  # _eight_lanes' scratch
    for i in range(token_p.size):
        p, q = token_p[i], token_q[i]
        for n in range(num_n):
            row = i * num_n + n
            g_base = np.uint64(p * g_strides[0, 0] + q * g_strides[0, 1] + n * g_strides[0, 2])
            for k in range(parts):
                o_base = np.uint64(p * o_strides[k, 0] + q * o_strides[k, 1] + n * o_strides[k, 2])
                do_base = np.uint64(p * do_strides[k, 0] + q * do_strides[k, 1] + n * do_strides[k, 2])
                o_step, do_step = np.uint64(o_strides[k, 3]), np.uint64(do_strides[k, 3])
                if lanes == 8 and dim >= 8 and g_step == 1 and o_step == 1 and do_step == 1:
                    empty = False
                    for c in range(8):
                        empty |= rows[row * lanes + c, 4 * parts + k] != zero
                    if not empty and _eight_lanes(grad_o, g_base, o_bufs[k], o_base, do_bufs[k], do_base, rows,
                                                  row * lanes, k, dots, dim, lane_w, lane_acc):  # fmt: skip
                        continue  # Note [eight lanes at once]
                for c in range(min(lanes, dim)):
                    rr = row * lanes + c
                    count = (dim - c + lanes - 1) // lanes
                    first = np.uint64(c)
                    if rows[rr, 4 * parts + k] != zero:  # empty part: not read, gradient 0
                        _zero_row(do_bufs[k], do_base + first * do_step, do_step * np.uint64(lanes), count)
                        dots[rr, k] = zero
                        continue
                    dots[rr, k] = _scale_and_dot(
                        grad_o, g_base + first * g_step, g_step * np.uint64(lanes),
                        o_bufs[k], o_base + first * o_step, o_step * np.uint64(lanes),
                        do_bufs[k], do_base + first * do_step, do_step * np.uint64(lanes),
                        rows[rr, k], count,
                    )  # fmt: skip
                for c in range(dim, lanes):  # lanes no element reads (D < lanes)
                    dots[row * lanes + c, k] = zero


@numba.njit(parallel=True, cache=True)
def _merge_rows_backward_kernel(
    grad_o,  # flat buffer of grad_o (P, Q, N, D)
    grad_ms,  # (grad_m, grad_l) flat buffers (P, Q, N, lanes_in); grad_l is grad_m again in LSE form (unread)
    grad_strides,  # int64 (3, 4): strides of grad_m, grad_l, grad_o
    o_bufs,  # K flat buffers of parts_o (P, Q, N, D)
    o_strides,  # int64 (K, 4)
    m_bufs,  # K flat buffers of parts_m (P, Q, N, lanes); (T, 1, N, lanes) with a row map
    m_strides,  # int64 (K, 4)
    l_bufs,  # K flat buffers of parts_l, or m_bufs again in LSE form (unread)
    l_strides,  # int64 (K, 4)
    do_bufs,  # K flat buffers of grad_parts_o (P, Q, N, D)
    do_strides,  # int64 (K, 4)
    dm_bufs,  # K flat buffers of grad_parts_m, shaped like parts_m
    dm_strides,  # int64 (K, 4)
    dl_bufs,  # K flat buffers of grad_parts_l, or dm_bufs again in LSE form (unwritten)
    dl_strides,  # int64 (K, 4)
    shape,  # int64 (P, Q, N, D, lanes_in, lanes, lanes_out): lanes of the incoming gradients, lanes merged (1 in the
    # LSE form: lane 0), lanes of the statistic gradients (those past `lanes` get 0)
    row_base,  # int64 (P,): per-batch row map (Note [canonical rows]), or empty for none
    row_step,  # int64 (P,)
    heads_outer,  # bool: the statistics' head stride exceeds their token stride (visit order of phases 1 and 3)
    lse_form,  # bool: parts_m are LSEs (natural log after * lse_scale); no parts_l, grad_l, grad_parts_l
    lse_scale,  # float
    tiles,  # int: number of tiles to aim for (a few per thread)
):
    num_p, num_q, num_n, dim = shape[0], shape[1], shape[2], shape[3]
    lanes_in, lanes, lanes_out = shape[4], shape[5], shape[6]
    parts = len(o_bufs)
    tokens = num_p * num_q
    tile_rows = min(_TILE_ROWS_MAX, max(_TILE_ROWS_MIN, tokens * num_n // max(tiles, 1)))
    per_tile = max(1, tile_rows // max(num_n, 1))
    for tile in numba.prange((tokens + per_tile - 1) // per_tile):
        first = tile * per_tile
        count = min(tokens - first, per_tile)
        like = do_bufs[0]  # decides the compute type: float64 iff the parts are float64
        scale = _compute(lse_scale, like)
        zero, one, neg_inf = _compute(0.0, like), _compute(1.0, like), _compute(-np.inf, like)
        token_p, token_q = np.empty(count, np.int64), np.empty(count, np.int64)  # divisions once per token
        for i in range(count):
            token_p[i], token_q[i] = (first + i) // num_q, (first + i) % num_q
        # Per row and lane of the tile (attention order): w_k, a_k, exp(m_k - M), t_k, empty_k (K each), L, 1 / L.
        rows = _scratch((count * num_n * lanes, 5 * parts + 2), like)
        dots = _scratch((count * num_n * lanes, parts), like)  # d_k per lane
        maxima = _scratch(parts, like)
        m_cols, l_cols = _columns(m_strides, m_bufs), _columns(l_strides, l_bufs)
        dm_cols, dl_cols = _columns(dm_strides, dm_bufs), _columns(dl_strides, dl_bufs)
        grad_cols = _columns(grad_strides, grad_ms)
        outer, inner = (num_n, count) if heads_outer else (count, num_n)
        m_bits, l_bits = _bits(m_bufs), _bits(l_bufs)
        diff_m, diff_l = np.zeros(8, m_bits[0].dtype), np.zeros(8, l_bits[0].dtype)  # or_lane_diffs' accumulators
        unit_lanes = True
        for k in range(parts):
            unit_lanes &= m_cols[3][k] == 1 and l_cols[3][k] == 1
        # Phase 1, statistics in their memory order: M, a_k, L and w_k per lane (lanes merge one by one). A row whose
        # 8 lanes are bitwise equal in every part (the contract) computes lane 0 and copies it (Note [equal lanes
        # once]).
        for a in range(outer):
            for b in range(inner):
                i, n = (b, a) if heads_outer else (a, b)
                at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, False)
                same = False
                if lanes == 8 and unit_lanes:  # Note [equal lanes once]
                    # The forward's per-row test, written out: as a shared inlined helper (array arguments, reference
                    # counted per call) the float32 backward measured 1.26x slower in an interleaved A/B.
                    diff_m[:] = 0
                    diff_l[:] = 0
                    or_lane_diffs(diff_m, m_bits, _part_offsets(m_cols, m_bufs, at[0], at[1], at[2]))
                    if not lse_form:
                        or_lane_diffs(diff_l, l_bits, _part_offsets(l_cols, l_bufs, at[0], at[1], at[2]))
                    same = not (diff_m.any() or diff_l.any())
                for c in range(lanes):
                    r = (i * num_n + n) * lanes + c
                    if same and c > 0:
                        for col in range(5 * parts + 2):
                            rows[r, col] = rows[r - c, col]
                        continue
                    new_max = neg_inf
                    for k in range(parts):
                        raw = m_bufs[k][_at(m_cols, k, at[0], at[1], at[2]) + np.uint64(c * m_cols[3][k])]
                        m = _part_max(raw, lse_form, scale, like)
                        maxima[k] = m
                        empty = m == neg_inf
                        if not lse_form:
                            l_at = _at(l_cols, k, at[0], at[1], at[2]) + np.uint64(c * l_cols[3][k])
                            s = _compute(l_bufs[k][l_at], like)
                            empty = empty and s == zero
                            rows[r, parts + k] = s
                        rows[r, 4 * parts + k] = one if empty else zero
                        if m > new_max or m != m:  # NaN propagates
                            new_max = m
                    all_empty = new_max == neg_inf
                    shift = zero if all_empty else new_max  # all parts empty: exp(-inf - 0) = 0, never NaN
                    new_sum = zero
                    for k in range(parts):
                        decay = np.exp(maxima[k] - shift)
                        scaled = decay
                        if not lse_form:
                            scaled *= rows[r, parts + k]
                        rows[r, parts + k], rows[r, 2 * parts + k] = scaled, decay
                        new_sum = scaled if k == 0 else new_sum + scaled
                    inv_sum = zero if all_empty else one / new_sum
                    ties = zero  # the max is shared equally by tied non-empty parts (torch.maximum's rule)
                    for k in range(parts):
                        ties += one if (maxima[k] == new_max and rows[r, 4 * parts + k] == zero) else zero
                    ties = max(ties, one)
                    for k in range(parts):
                        rows[r, k] = rows[r, parts + k] * inv_sum
                        tied = maxima[k] == new_max and rows[r, 4 * parts + k] == zero
                        rows[r, 3 * parts + k] = (one if tied else zero) / ties
                    rows[r, 5 * parts], rows[r, 5 * parts + 1] = new_sum, inv_sum
        # Phase 2, attention order: do_k = w_k g and d_k = <g, o_k> per lane.
        _dots_phase(
            grad_o, grad_strides[2:], o_bufs, o_strides, do_bufs, do_strides, token_p, token_q, num_n, dim, lanes,
            rows, dots,
        )  # fmt: skip
        # Phase 3, statistics in their memory order: lane c of each part's statistics gets lane c's gradient; an
        # empty part's is 0.
        for a in range(outer):
            for b in range(inner):
                i, n = (b, a) if heads_outer else (a, b)
                at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, False)
                g_m_base, g_m_step = _at(grad_cols, 0, at[0], at[1], at[2]), np.uint64(grad_cols[3][0])
                g_l_base, g_l_step = _at(grad_cols, 1, at[0], at[1], at[2]), np.uint64(grad_cols[3][1])
                for c in range(lanes):
                    r = (i * num_n + n) * lanes + c
                    mean_dot = zero  # <g, o> over the lane's elements, recomputed from the parts
                    for k in range(parts):
                        mean_dot = rows[r, k] * dots[r, k] if k == 0 else mean_dot + rows[r, k] * dots[r, k]
                    if lanes_in == lanes:  # one incoming lane per merged lane: read it here (no call per lane)
                        g_m = _compute(grad_ms[0][g_m_base + np.uint64(c) * g_m_step], like)
                        g_l = zero if lse_form else _compute(grad_ms[1][g_l_base + np.uint64(c) * g_l_step], like)
                    else:
                        g_m = _lane_gradient(grad_ms[0], grad_cols, 0, at, lanes_in, c, lanes, like)
                        g_l = (
                            zero if lse_form else _lane_gradient(grad_ms[1], grad_cols, 1, at, lanes_in, c, lanes, like)
                        )
                    new_sum, inv_sum = rows[r, 5 * parts], rows[r, 5 * parts + 1]
                    max_grad = g_m - new_sum * g_l
                    for k in range(parts):
                        empty = rows[r, 4 * parts + k] != zero
                        dm_at = _at(dm_cols, k, at[0], at[1], at[2]) + np.uint64(c * dm_cols[3][k])
                        if lse_form:
                            dx = rows[r, k] * (scale * (dots[r, k] - mean_dot) + g_m)
                            dm_bufs[k][dm_at] = zero if empty else dx
                            for lane in range(1, lanes_out):  # the LSE form reads lane 0 only
                                dm_bufs[k][dm_at + np.uint64(lane * dm_cols[3][k])] = zero
                            continue
                        dl = ((dots[r, k] - mean_dot) * inv_sum + g_l) * rows[r, 2 * parts + k]
                        dm = rows[r, k] * (dots[r, k] - mean_dot) + rows[r, parts + k] * g_l
                        dm = dm + rows[r, 3 * parts + k] * max_grad
                        dl_bufs[k][_at(dl_cols, k, at[0], at[1], at[2]) + np.uint64(c * dl_cols[3][k])] = (
                            zero if empty else dl
                        )
                        dm_bufs[k][dm_at] = zero if empty else dm


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
    """Note [row merge backward] in ``_backward.py``, fused: one read of ``g`` and of each part, one write each.

    Parameters
    ----------
    grad_o : CPU tensor ``(P, Q, N, D)``, the parts' dtype, any strides: the gradient of the merged output.
    grad_m, grad_l : CPU tensors ``(P, Q, N, lanes_in)`` (``(T, 1, N, lanes_in)`` with ``row_map``), the
        statistics' dtype, any strides: gradients of the merged max and sum (stats form), or of the merged LSE
        in the caller's base with ``grad_l`` None (LSE form). Each is summed over its lanes.
    parts_o, parts_m, parts_l, row_map, lse_scale : exactly the forward's inputs (Note [row merge]): K >= 1
        parts ``(P, Q, N, D)`` float16 / bfloat16 / float32 / float64, any strides (zero strides included);
        statistics float32 (float64 allowed with float64 parts), lane by lane; ``parts_l`` None for the LSE
        form, whose natural log is ``lse * lse_scale`` (``ln 2`` for base 2) and where ``+inf`` reads as empty.
    grad_parts_o : K CPU tensors shaped like ``parts_o``, their dtype: receive ``w_k g``, rounded once.
    grad_parts_m, grad_parts_l : K CPU tensors shaped like ``parts_m`` (``grad_parts_l`` None in LSE form), the
        statistics' dtype: receive each lane's gradient (from the output elements ``d % lanes == lane`` and
        the lanes of the merged statistics holding that lane); 0 for a part empty in that lane.

    Outputs must not overlap inputs or each other. Arithmetic is float32 (float64 for float64 parts). Empty parts
    get zero gradients; rows empty in every part give finite gradients (``dm_k = g_m / K``); NaN inputs give NaN.
    Threads follow ``torch.get_num_threads()``, whose value is left unchanged.
    """
    if len(parts_o) == 1:  # nothing to merge (Note [one part] in numba_cpu.py)
        torch_eager.merge_rows_backward(
            grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, grad_parts_o, grad_parts_m, grad_parts_l,
            row_map=row_map, lse_scale=lse_scale,
        )  # fmt: skip
        return
    lse_form = parts_l is None
    row_base, row_step = (_NO_ROW_MAP, _NO_ROW_MAP) if row_map is None else (t.numpy() for t in row_map)
    (num_p, num_q, num_n, dim), lanes_in, lanes_out = grad_o.shape, grad_m.shape[-1], parts_m[0].shape[-1]
    lanes = 1 if lse_form else lanes_out  # the LSE form: one LSE per row, lane 0
    if num_p * num_q * num_n == 0:
        return
    l_list = parts_m if lse_form else parts_l
    grad_l_or_m = grad_m if grad_l is None else grad_l
    dl_list = grad_parts_m if grad_parts_l is None else grad_parts_l

    def flats(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
        return tuple(_flat(t) for t in tensors)

    nbytes = grad_o.numel() * grad_o.element_size() * (2 * len(parts_o) + 1)
    _launch(
        _merge_rows_backward_kernel,
        nbytes,
        _flat(grad_o),
        flats((grad_m, grad_l_or_m)),
        _strides((grad_m, grad_l_or_m, grad_o)),
        flats(parts_o),
        _strides(parts_o),
        flats(parts_m),
        _strides(parts_m),
        flats(l_list),
        _strides(l_list),
        flats(grad_parts_o),
        _strides(grad_parts_o),
        flats(grad_parts_m),
        _strides(grad_parts_m),
        flats(dl_list),
        _strides(dl_list),
        np.array((num_p, num_q, num_n, dim, lanes_in, lanes, lanes_out), dtype=np.int64),
        np.ascontiguousarray(row_base, dtype=np.int64),
        np.ascontiguousarray(row_step, dtype=np.int64),
        heads_outer(parts_m, row_map),
        lse_form,
        float(lse_scale),
        _threads(nbytes) * _TILES_PER_THREAD,
    )
