"""Fused CPU backward of the row merge: Note [row merge backward] (``_backward.py``) as one numba kernel.

Like the forward (Note [cpu merge kernel] in ``numba_cpu.py``, whose flat buffers and element conversions this
module reuses), the backward is memory-bound: per row it reads ``g`` and the K parts once and writes K gradients
once, so the kernel's job is to touch each of those bytes once and keep everything else in registers.

Note [cpu merge backward kernel]
--------------------------------
Arithmetic is float32 (float64 for float64 parts). Work is split over threads in tiles of whole tokens (1024 to
32768 rows, about ``_TILES_PER_THREAD`` per thread; the launcher passes the count). A tile runs in three phases,
each walking memory in its own order, as the forward's two do (Note [cpu merge kernel]):

1. statistics, in their memory order (head-major for SBH and per-batch TND): read the K lane-0 statistics and
   recompute ``M``, ``a_k``, ``exp(m_k - M)``, ``L``, ``w_k`` and the tie shares ``t_k`` (cheaper than reading the
   forward's merged statistics, which are not inputs), kept per row in a tile-local array;
2. outputs, in attention order: per part k, one loop over D that reads ``g`` and ``o_k``, accumulates
   ``d_k = <g, o_k>`` and writes ``do_k = w_k g`` rounded once (``_scale_and_dot``). ``w_k`` does not depend on
   any dot, so the write needs no second pass; ``g`` is re-read K times, but from L1;
3. statistics again, in their memory order: sum the incoming statistic gradients over their lanes and write the
   2K (stats form) or K (LSE form) statistic gradients to lane 0, zeros to the other lanes.

Visiting the statistics in attention order instead (one row of every head per token) touches ~10 statistics
streams times N heads at once, more than the prefetcher follows; visiting the attention rows head-major jumps by a
token's stride. The split measured 1.15-1.5x faster on SBH rows (2 threads, A/B in one process), the stats form
gaining most. The per-row arithmetic and its order are unchanged, so results are bitwise those of a single pass.

The dot is the only reduction; ``_scale_and_dot`` alone is compiled with ``reassoc`` (and ``contract``) so that
LLVM vectorises it with partial sums, as a BLAS dot does. It stays a separate (non-inlined) function: inlined into
the phase loop, the same source compiled to a scalar loop. No other fast-math flag is set anywhere: ``nnan`` /
``ninf`` would break the empty-row (``-inf``) and NaN semantics.

K is the length of a tuple of flat buffers, so one kernel source compiles once per (dtype, statistics dtype, K).
Code that touches every part's buffer is generated per K with ``@overload`` + ``exec`` (``_part_dots``,
``_write_lane0``; ``numba_cpu._lane0`` for the reads): each part is one statement indexing the tuple with a
literal. A ``for k in range(K)`` loop indexing a tuple of arrays makes numba spill the tuple and reload the data
pointers at every access (Note [cpu merge kernel]). Loops over K that touch only scalars or scratch arrays stay
loops. Gradient outputs never alias inputs (Note [row merge backward]), so no ordering of reads and writes matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba.extending import overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from . import heads_outer
from .numba_cpu import (
    _at,
    _columns,
    _compute,
    _flat,
    _lane0,
    _launch,
    _narrow,
    _part_max,
    _per_part_tuple,
    _scratch,
    _stats_at,
    _strides,
    _threads,
    _widen,
)

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


def _part_dots(
    g_buf, g_base, g_step, o_bufs, o_bases, o_steps, do_bufs, do_bases, do_steps, weights, dim
):  # pragma: no cover - numba stub
    """Write ``do_k = weights[k] * g`` (rounded once) over one row for every part k; return the K dots ``<g, o_k>``."""


@overload(_part_dots, inline="always")
def _part_dots_impl(g_buf, g_base, g_step, o_bufs, o_bases, o_steps, do_bufs, do_bases, do_steps, weights, dim):
    # Generated for this K (Note [cpu merge backward kernel]): one call per part, each indexing the tuples with a
    # literal, so that the buffers' data pointers are not spilled and reloaded; g is re-read from L1 by later parts.
    def call(k: int) -> str:
        return (
            f"_scale_and_dot(g_buf, g_base, g_step, o_bufs[{k}], o_bases[{k}], o_steps[{k}], "
            f"do_bufs[{k}], do_bases[{k}], do_steps[{k}], weights[{k}], dim)"
        )

    signature = "g_buf, g_base, g_step, o_bufs, o_bases, o_steps, do_bufs, do_bases, do_steps, weights, dim"
    return _per_part_tuple("part_dots", signature, call, len(o_bufs), _scale_and_dot=_scale_and_dot)


def _write_lane0(bufs, cols, at, values, lanes):  # pragma: no cover - numba stub
    """For every part k: ``values[k]`` to lane 0 of statistics row ``at`` of ``bufs[k]`` (offsets through ``cols``,
    see ``numba_cpu._columns``), 0 to its other lanes (the forward reads lane 0 only)."""


@overload(_write_lane0, inline="always")
def _write_lane0_impl(bufs, cols, at, values, lanes):
    # Generated for this K, for the reason given in _part_dots_impl.
    body = "".join(
        f"    base, step = _at(cols, {k}, at[0], at[1], at[2]), np.uint64(cols[3][{k}])\n"
        f"    bufs[{k}][base] = values[{k}]\n"
        f"    for lane in range(np.uint64(1), np.uint64(lanes)):\n"
        f"        bufs[{k}][base + lane * step] = 0.0\n"
        for k in range(len(bufs))
    )
    namespace = {"_at": _at, "np": np}
    exec(f"def write_lane0(bufs, cols, at, values, lanes):\n{body}", namespace)  # noqa: S102 - from K only
    return namespace["write_lane0"]


@numba.njit(inline="always", cache=True)
def _lane_sum(buf, cols, k, at, lanes, like):
    """Sum over the ``lanes`` entries of statistics row ``at`` of ``buf`` (offsets through ``cols``, row ``k``)."""
    base, step = _at(cols, k, at[0], at[1], at[2]), np.uint64(cols[3][k])
    total = _compute(0.0, like)
    for lane in range(lanes):
        total += _compute(buf[base + lane * step], like)
    return total


@numba.njit(cache=True)
def _dots_phase(grad_o, g_strides, o_bufs, o_strides, do_bufs, do_strides, token_p, token_q, num_n, dim, rows, dots):
    """Phase 2 of a tile, rows in attention order: ``do_k = w_k g`` and ``dots[row, k] = <g, o_k>``.

    ``rows[row, :K]`` holds the row's weights ``w_k`` (phase 1).
    """
    parts = len(o_bufs)
    o_cols, do_cols = _columns(o_strides, o_bufs), _columns(do_strides, do_bufs)
    g_cols = _columns(g_strides, (grad_o,))
    g_step = np.uint64(g_cols[3][0])
    scratch = np.empty(parts, np.uint64)
    for k in range(parts):
        scratch[k] = o_cols[3][k]
    o_steps = to_fixed_tuple(scratch, parts)
    for k in range(parts):
        scratch[k] = do_cols[3][k]
    do_steps = to_fixed_tuple(scratch, parts)
    w_scratch = np.empty(parts, rows.dtype)
    for i in range(token_p.size):
        p, q = token_p[i], token_q[i]
        for n in range(num_n):
            row = i * num_n + n
            for k in range(parts):
                scratch[k] = _at(o_cols, k, p, q, n)
            o_bases = to_fixed_tuple(scratch, parts)
            for k in range(parts):
                scratch[k] = _at(do_cols, k, p, q, n)
            do_bases = to_fixed_tuple(scratch, parts)
            for k in range(parts):
                w_scratch[k] = rows[row, k]
            weights = to_fixed_tuple(w_scratch, parts)
            got = _part_dots(
                grad_o, _at(g_cols, 0, p, q, n), g_step,
                o_bufs, o_bases, o_steps, do_bufs, do_bases, do_steps, weights, dim,
            )  # fmt: skip
            for k in range(parts):
                dots[row, k] = got[k]


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
    shape,  # int64 (P, Q, N, D, lanes_in, lanes_out)
    row_base,  # int64 (P,): per-batch row map (Note [canonical rows]), or empty for none
    row_step,  # int64 (P,)
    heads_outer,  # bool: the statistics' head stride exceeds their token stride (visit order of phases 1 and 3)
    lse_form,  # bool: parts_m are LSEs (natural log after * lse_scale); no parts_l, grad_l, grad_parts_l
    lse_scale,  # float
    tiles,  # int: number of tiles to aim for (a few per thread)
):
    num_p, num_q, num_n, dim = shape[0], shape[1], shape[2], shape[3]
    lanes_in, lanes_out = np.uint64(shape[4]), shape[5]
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
        # Per row of the tile (attention order): w_k, a_k, exp(m_k - M), t_k (K each), L, 1 / L.
        rows = _scratch((count * num_n, 4 * parts + 2), like)
        dots = _scratch((count * num_n, parts), like)  # d_k
        maxima, values = _scratch(parts, like), _scratch(parts, like)
        m_cols, l_cols = _columns(m_strides, m_bufs), _columns(l_strides, l_bufs)
        dm_cols, dl_cols = _columns(dm_strides, dm_bufs), _columns(dl_strides, dl_bufs)
        grad_cols = _columns(grad_strides, grad_ms)
        outer, inner = (num_n, count) if heads_outer else (count, num_n)
        # Phase 1, statistics in their memory order: M, a_k, L and w_k, recomputed from lane 0 of the parts.
        for a in range(outer):
            for b in range(inner):
                i, n = (b, a) if heads_outer else (a, b)
                at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, False)
                r = i * num_n + n
                got_m = _lane0(m_bufs, m_cols, at[0], at[1], at[2])
                got_l = _lane0(l_bufs, l_cols, at[0], at[1], at[2])
                new_max = neg_inf
                for k in range(parts):
                    m = _part_max(got_m[k], lse_form, scale, like)
                    maxima[k] = m
                    if m > new_max or m != m:  # NaN propagates
                        new_max = m
                all_empty = new_max == neg_inf
                shift = zero if all_empty else new_max  # all parts empty: exp(-inf - 0) = 0, never NaN
                new_sum = zero
                for k in range(parts):
                    decay = np.exp(maxima[k] - shift)
                    scaled = decay
                    if not lse_form:
                        scaled *= _compute(got_l[k], like)
                    rows[r, parts + k], rows[r, 2 * parts + k] = scaled, decay
                    new_sum = scaled if k == 0 else new_sum + scaled
                inv_sum = zero if all_empty else one / new_sum
                ties = zero  # the max is shared equally by tied parts (torch.maximum's rule)
                for k in range(parts):
                    ties += one if maxima[k] == new_max else zero
                for k in range(parts):
                    rows[r, k] = rows[r, parts + k] * inv_sum
                    rows[r, 3 * parts + k] = (one if maxima[k] == new_max else zero) / ties
                rows[r, 4 * parts], rows[r, 4 * parts + 1] = new_sum, inv_sum
        # Phase 2, attention order: do_k = w_k g and d_k = <g, o_k>, one pass over D per part.
        _dots_phase(
            grad_o, grad_strides[2:], o_bufs, o_strides, do_bufs, do_strides, token_p, token_q, num_n, dim, rows, dots
        )
        # Phase 3, statistics in their memory order; each output lane held the same statistic, so its gradient is
        # the lane sum of the incoming one.
        for a in range(outer):
            for b in range(inner):
                i, n = (b, a) if heads_outer else (a, b)
                at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, False)
                r = i * num_n + n
                mean_dot = zero  # <g, o>, recomputed from the parts
                for k in range(parts):
                    mean_dot = rows[r, k] * dots[r, k] if k == 0 else mean_dot + rows[r, k] * dots[r, k]
                g_m = _lane_sum(grad_ms[0], grad_cols, 0, at, lanes_in, like)
                if lse_form:
                    for k in range(parts):
                        values[k] = rows[r, k] * (scale * (dots[r, k] - mean_dot) + g_m)
                    _write_lane0(dm_bufs, dm_cols, at, values, lanes_out)
                    continue
                g_l = _lane_sum(grad_ms[1], grad_cols, 1, at, lanes_in, like)
                new_sum, inv_sum = rows[r, 4 * parts], rows[r, 4 * parts + 1]
                max_grad = g_m - new_sum * g_l
                for k in range(parts):
                    values[k] = ((dots[r, k] - mean_dot) * inv_sum + g_l) * rows[r, 2 * parts + k]
                _write_lane0(dl_bufs, dl_cols, at, values, lanes_out)
                for k in range(parts):
                    dm = rows[r, k] * (dots[r, k] - mean_dot) + rows[r, parts + k] * g_l
                    values[k] = dm + rows[r, 3 * parts + k] * max_grad
                _write_lane0(dm_bufs, dm_cols, at, values, lanes_out)


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
        statistics float32 (float64 allowed with float64 parts), only lane 0 read; ``parts_l`` None for the LSE
        form, whose natural log is ``lse * lse_scale`` (``ln 2`` for base 2) and where ``+inf`` reads as empty.
    grad_parts_o : K CPU tensors shaped like ``parts_o``, their dtype: receive ``w_k g``, rounded once.
    grad_parts_m, grad_parts_l : K CPU tensors shaped like ``parts_m`` (``grad_parts_l`` None in LSE form), the
        statistics' dtype: receive the row's gradient in lane 0 and 0 in every other lane.

    Outputs must not overlap inputs or each other. Arithmetic is float32 (float64 for float64 parts). Empty parts
    get zero gradients; rows empty in every part give finite gradients (``dm_k = g_m / K``); NaN inputs give NaN.
    Threads follow ``torch.get_num_threads()``, whose value is left unchanged.
    """
    lse_form = parts_l is None
    row_base, row_step = (_NO_ROW_MAP, _NO_ROW_MAP) if row_map is None else (t.numpy() for t in row_map)
    (num_p, num_q, num_n, dim), lanes_in, lanes_out = grad_o.shape, grad_m.shape[-1], parts_m[0].shape[-1]
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
        np.array((num_p, num_q, num_n, dim, lanes_in, lanes_out), dtype=np.int64),
        np.ascontiguousarray(row_base, dtype=np.int64),
        np.ascontiguousarray(row_step, dtype=np.int64),
        heads_outer(parts_m, row_map),
        lse_form,
        float(lse_scale),
        _threads(nbytes) * _TILES_PER_THREAD,
    )
