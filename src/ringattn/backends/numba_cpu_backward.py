"""Fused CPU backward of the row merge: Note [row merge backward] (``_backward.py``) as one numba kernel.

Like the forward (Note [cpu merge kernel] in ``numba_cpu.py``, whose flat buffers and element conversions this
module reuses), the backward is memory-bound: per row it reads ``g`` and the K parts once and writes K gradients
once, so the kernel's job is to touch each of those bytes once and keep everything else in registers.

Note [cpu merge backward kernel]
--------------------------------
Per row (one (token, head) pair), in float32 (float64 for float64 parts):

1. read the K lane-0 statistics and recompute ``M``, ``L``, ``exp(m_k - M)`` and ``w_k`` (K scalars; cheaper
   than reading the forward's merged statistics, which are not inputs);
2. for each part k, one loop over D that reads ``g`` and ``o_k``, accumulates ``d_k = <g, o_k>`` and writes
   ``do_k = w_k g`` rounded once (``_scale_and_dot``). ``w_k`` does not depend on any dot, so the write needs
   no second pass; ``g`` is re-read K times, but from L1 (one row of ``g`` is at most a few KiB);
3. sum the incoming statistic gradients over their lanes and write the 2K (stats form) or K (LSE form)
   statistic gradients to lane 0, zeros to the other lanes.

The dot is the only reduction; ``_scale_and_dot`` alone is compiled with ``reassoc`` (and ``contract``) so that
LLVM vectorises it with partial sums, as a BLAS dot does. No other fast-math flag is set anywhere: ``nnan`` /
``ninf`` would break the empty-row (``-inf``) and NaN semantics. K is the length of a tuple of flat buffers, so
one kernel source compiles once per (dtype, statistics dtype, K) and the part loops unroll.

Work is split over threads by tiles of whole tokens (about ``_TILE_ROWS`` rows); rows are visited in attention
order. (Visiting SBH's head-major statistics in their memory order instead, as the forward's phase 1 does, measured
~1.35x slower here: the statistics are ~10% of the bytes, and the attention rows then jump by a token's stride.)
Gradient outputs never alias inputs (Note [row merge backward]), so no ordering of reads and writes matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch

from .numba_cpu import _compute, _flat, _launch, _narrow, _offset, _scratch, _strides, _widen

_TILE_ROWS = 1024
_NO_ROW_MAP = np.empty(0, dtype=np.int64)


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def _scale_and_dot(g_buf, g_base, g_step, o_buf, o_base, o_step, out_buf, out_base, out_step, weight, dim):
    """Write ``weight * g`` (rounded once to ``out_buf``'s dtype) over one row and return ``<g, o>``.

    ``reassoc`` lets LLVM keep vector partial sums of the dot (Note [cpu merge backward kernel]); every other
    operation here is a single rounding, which the flag cannot change.
    """
    dot = _compute(0.0, out_buf)
    for d in range(np.uint64(dim)):
        g = _widen(g_buf[g_base + d * g_step])
        dot += g * _widen(o_buf[o_base + d * o_step])
        out_buf[out_base + d * out_step] = _narrow(g * weight, out_buf)
    return dot


@numba.njit(inline="always", cache=True)
def _lane_sum(buf, strides, k, at, lanes, like):
    """Sum over the ``lanes`` entries of statistics row ``at`` of buffer ``buf`` (strides row ``k``)."""
    base, step = _offset(strides, k, at[0], at[1], at[2]), np.uint64(strides[k, 3])
    total = _compute(0.0, like)
    for lane in range(np.uint64(lanes)):
        total += _compute(buf[base + lane * step], like)
    return total


@numba.njit(inline="always", cache=True)
def _write_lane0(buf, strides, k, at, lanes, value):
    """Write ``value`` to lane 0 of statistics row ``at`` and 0 to its other lanes (the forward reads lane 0)."""
    base, step = _offset(strides, k, at[0], at[1], at[2]), np.uint64(strides[k, 3])
    buf[base] = value
    for lane in range(np.uint64(1), np.uint64(lanes)):
        buf[base + lane * step] = 0.0


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
    lse_form,  # bool: parts_m are LSEs (natural log after * lse_scale); no parts_l, grad_l, grad_parts_l
    lse_scale,  # float
):
    num_p, num_q, num_n, dim = shape[0], shape[1], shape[2], shape[3]
    lanes_in, lanes_out = shape[4], shape[5]
    parts = len(o_bufs)
    tokens = num_p * num_q
    per_tile = max(1, _TILE_ROWS // max(num_n, 1))
    for tile in numba.prange((tokens + per_tile - 1) // per_tile):
        like = do_bufs[0]  # decides the compute type: float64 iff the parts are float64
        scale = _compute(lse_scale, like)
        zero, one, neg_inf = _compute(0.0, like), _compute(1.0, like), _compute(-np.inf, like)
        # Per-part row values: maxima, exp(m_k - M), a_k, w_k, d_k.
        maxima, decay, scaled = _scratch(parts, like), _scratch(parts, like), _scratch(parts, like)
        weights, dots = _scratch(parts, like), _scratch(parts, like)
        for token in range(tile * per_tile, min(tokens, (tile + 1) * per_tile)):
            p, q = token // num_q, token % num_q
            for n in range(num_n):
                at = (p, q, n)
                if row_base.size > 0:  # per-batch TND: logical stats row r sits at [r // N, 0, r % N]
                    r = row_base[p] + n * row_step[p]
                    at = (r // num_n, 0, r % num_n)
                # 1. Statistics of the forward, recomputed from lane 0 of the parts.
                new_max = neg_inf
                for k in range(parts):
                    m = _compute(m_bufs[k][_offset(m_strides, k, at[0], at[1], at[2])], like)
                    if lse_form:
                        m *= scale
                        if m == np.inf:  # old FlashAttention writes +inf for empty rows
                            m = neg_inf
                    maxima[k] = m
                    if m > new_max or m != m:  # NaN propagates
                        new_max = m
                all_empty = new_max == neg_inf
                shift = zero if all_empty else new_max  # all parts empty: exp(-inf - 0) = 0, never NaN
                new_sum = zero
                for k in range(parts):
                    decay[k] = np.exp(maxima[k] - shift)
                    scaled[k] = decay[k]
                    if not lse_form:
                        scaled[k] *= _compute(l_bufs[k][_offset(l_strides, k, at[0], at[1], at[2])], like)
                    new_sum = scaled[k] if k == 0 else new_sum + scaled[k]
                inv_sum = zero if all_empty else one / new_sum
                # 2. One pass over D per part: d_k = <g, o_k> and do_k = w_k g.
                g_base, g_step = _offset(grad_strides, 2, p, q, n), np.uint64(grad_strides[2, 3])
                mean_dot = zero  # <g, o>, recomputed from the parts
                for k in range(parts):
                    weights[k] = scaled[k] * inv_sum
                    dots[k] = _scale_and_dot(
                        grad_o, g_base, g_step,
                        o_bufs[k], _offset(o_strides, k, p, q, n), np.uint64(o_strides[k, 3]),
                        do_bufs[k], _offset(do_strides, k, p, q, n), np.uint64(do_strides[k, 3]),
                        weights[k], dim,
                    )  # fmt: skip
                    mean_dot = weights[k] * dots[k] if k == 0 else mean_dot + weights[k] * dots[k]
                # 3. Statistic gradients; each output lane held the same statistic, so its gradient is the lane sum.
                g_m = _lane_sum(grad_ms[0], grad_strides, 0, at, lanes_in, like)
                if lse_form:
                    for k in range(parts):
                        dx = weights[k] * (scale * (dots[k] - mean_dot) + g_m)
                        _write_lane0(dm_bufs[k], dm_strides, k, at, lanes_out, dx)
                    continue
                g_l = _lane_sum(grad_ms[1], grad_strides, 1, at, lanes_in, like)
                ties = zero  # the max is shared equally by tied parts (torch.maximum's rule)
                for k in range(parts):
                    ties += one if maxima[k] == new_max else zero
                max_grad = g_m - new_sum * g_l
                for k in range(parts):
                    tie = (one if maxima[k] == new_max else zero) / ties
                    dl = ((dots[k] - mean_dot) * inv_sum + g_l) * decay[k]
                    dm = weights[k] * (dots[k] - mean_dot) + scaled[k] * g_l + tie * max_grad
                    _write_lane0(dl_bufs[k], dl_strides, k, at, lanes_out, dl)
                    _write_lane0(dm_bufs[k], dm_strides, k, at, lanes_out, dm)


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
        lse_form,
        float(lse_scale),
    )
