"""Fused CPU backend: the row merge of Note [row merge] as one numba kernel, one pass over memory.

The merge is memory-bound (per output element it reads K inputs and writes one), so the kernel's job is
to touch every byte once: statistics and weights of a row are computed in registers, the row's output
elements are produced from one read of each part, and nothing else is materialised. Threads follow
``torch.get_num_threads()``; compiled code is cached on disk (numba ``cache=True``).

Note [cpu merge kernel]
-----------------------
Every tensor travels as a *flat buffer*: a 1-D, C-contiguous NumPy view over the tensor's memory span
(from its first element to its last, no copy) plus its element strides as int64. Three reasons:

* all K parts then have one numba type, so they form a homogeneous tuple and one compiled kernel per
  (dtype, K) serves every mix of contiguous, strided and expanded (zero-stride) tensors and every layout;
* offsets are explicit 64-bit integer arithmetic (tensors over 2**31 elements), unsigned in the element
  loop: numba's negative-index wraparound on signed indices would block vectorisation;
* LLVM versions the element loop on unit strides itself, so strided inputs need no second loop.

16-bit formats travel as integer bits, and the integer type says which format it is: bfloat16 as uint16,
float16 as int16 (numba has no float16 arithmetic on CPU). ``_widen`` / ``_narrow`` convert exactly /
with round-to-nearest-even (as torch rounds); they are overloaded on the buffer type, so one kernel
source serves fp16, bf16, fp32 and fp64. Arithmetic is float32 (float64 when the output is float64).

Work is split over threads in tiles of about ``_TILE_ROWS`` rows (whole tokens, all heads). A tile runs
in two phases, each walking memory in its own order:

1. statistics: lane 0 of each part's max and sum, visited in the statistics' memory order (head-major
   for SBH and per-batch TND, whose statistics rows of one token are far apart); writes the output
   statistics to every lane and keeps the K weights ``w_k / L`` of each row in a small per-tile array;
2. outputs: rows in attention order; each element reads every part once, forms ``o_0 * p_0 + o_1 * p_1
   + ...`` (SPEC section 3: products, then adds in part order) and writes the rounded value once. K is
   a compile-time constant (the tuple length), so the part loop is unrolled; the per-row bases, steps
   and weights are fixed-size tuples (``to_fixed_tuple``), i.e. registers, which lets LLVM vectorise.

A row's inputs are read before its outputs are written and rows never share memory, so outputs may be
exactly the input views (in-place accumulation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from .._contract import UpdateProblem

NAME = "cpu"

_PARALLEL_BYTES = 4 << 20
_TILE_ROWS = 1024  # rows per unit of work: statistics of a tile stay in L1/L2 between phases
_F32_TWO_POW_M24 = np.float32(2.0**-24)
_F32_HALF = np.float32(0.5)
_U32 = np.uint32


def unavailable_reason() -> str | None:
    return None  # importing this module imported numba


def unsupported_reason(problem: UpdateProblem) -> str | None:
    if problem.device.type != "cpu":
        return f"the 'cpu' backend runs CPU tensors only, got device {problem.device}"
    return None


# ---------------------------------------------------------------------------------------------------
# Element conversions, overloaded on the flat buffer's dtype (Note [cpu merge kernel]).


def _widen(bits):  # pragma: no cover - numba stub
    """Element of a flat buffer -> compute value (float32, or float64 for float64 buffers)."""


def _narrow(value, like):  # pragma: no cover - numba stub
    """Compute value -> element of ``like``'s dtype, rounded to nearest even."""


def _compute(value, like):  # pragma: no cover - numba stub
    """A statistics value in the compute type of output buffer ``like`` (float64 iff it is float64)."""


def _scratch(shape, like):  # pragma: no cover - numba stub
    """An uninitialised compute-type array of ``shape`` for output buffer ``like``."""


@numba.njit
def _bits_to_f32(bits):
    return _U32(bits).view(np.float32)


@overload(_widen)
def _widen_impl(bits):
    if bits == types.uint16:  # bfloat16: the high half of a float32

        def widen_bf16(bits):
            return _bits_to_f32(_U32(bits) << _U32(16))

        return widen_bf16
    if bits == types.int16:  # float16, exact

        def widen_f16(bits):
            h = _U32(bits) & _U32(0xFFFF)
            sign = (h & _U32(0x8000)) << _U32(16)
            mag = h & _U32(0x7FFF)
            if mag >= _U32(0x7C00):  # inf / NaN (payload kept)
                out = _U32(0x7F800000) | ((mag & _U32(0x3FF)) << _U32(13))
            elif mag >= _U32(0x0400):  # normal: rebias the exponent 15 -> 127
                out = (mag << _U32(13)) + _U32(112 << 23)
            else:  # zero / subnormal: mag * 2**-24 is exact in float32
                out = np.float32(np.float32(mag) * _F32_TWO_POW_M24).view(np.uint32)
            return _bits_to_f32(out | sign)

        return widen_f16
    if bits == types.float64:
        return lambda bits: bits
    if bits == types.float32:
        return lambda bits: bits
    return None


@overload(_narrow)
def _narrow_impl(value, like):
    if like.dtype == types.uint16:  # bfloat16, as torch rounds: nearest even, NaN stays NaN

        def narrow_bf16(value, like):
            b = np.float32(value).view(np.uint32)
            if (b & _U32(0x7FFFFFFF)) > _U32(0x7F800000):
                return np.uint16((b >> _U32(16)) | _U32(0x40))
            return np.uint16((b + _U32(0x7FFF) + ((b >> _U32(16)) & _U32(1))) >> _U32(16))

        return narrow_bf16
    if like.dtype == types.int16:  # float16, nearest even; overflow to inf

        def narrow_f16(value, like):
            b = np.float32(value).view(np.uint32)
            sign = (b >> _U32(16)) & _U32(0x8000)
            a = b & _U32(0x7FFFFFFF)
            if a > _U32(0x7F800000):  # NaN, quietened
                out = _U32(0x7E00) | ((a >> _U32(13)) & _U32(0x3FF))
            elif a >= _U32(0x477FF000):  # >= 65520 rounds to inf
                out = _U32(0x7C00)
            elif a >= _U32(0x38800000):  # normal half: rebias and round the 13 dropped bits
                out = (a - _U32(112 << 23) + _U32(0xFFF) + ((a >> _U32(13)) & _U32(1))) >> _U32(13)
            else:  # subnormal half: adding 0.5 makes the FPU round at the half's 2**-24 step
                out = np.float32(np.abs(np.float32(value)) + _F32_HALF).view(np.uint32) - _U32(0x3F000000)
            return np.int16(out | sign)

        return narrow_f16
    if like.dtype == types.float64:
        return lambda value, like: np.float64(value)
    if like.dtype == types.float32:
        return lambda value, like: np.float32(value)
    return None


@overload(_compute)
def _compute_impl(value, like):
    if like.dtype == types.float64:
        return lambda value, like: np.float64(value)
    return lambda value, like: np.float32(value)


@overload(_scratch)
def _scratch_impl(shape, like):
    if like.dtype == types.float64:
        return lambda shape, like: np.empty(shape, np.float64)
    return lambda shape, like: np.empty(shape, np.float32)


# ---------------------------------------------------------------------------------------------------
# Kernel


@numba.njit(inline="always", cache=True)
def _offset(strides, k, p, q, n):
    """Element offset of index ``(p, q, n, 0)`` with the strides of row ``k``, unsigned: unsigned
    indices skip numba's negative-index wraparound, which would block vectorisation."""
    return np.uint64(p * strides[k, 0] + q * strides[k, 1] + n * strides[k, 2])


@numba.njit(inline="always", cache=True)
def _merge_row_stats(
    m_bufs, m_strides, l_bufs, l_strides, out_m, out_l, out_strides, at, lanes, lse_form, scale, weights, row
):
    """Merge the statistics row at index ``at = (p, q, n)`` of the stats views: write it to every lane of
    ``out_m`` (and ``out_l``) and the K output weights ``w_k / L`` to ``weights[row]``. Every input is
    read before the first write, so outputs may alias inputs."""
    parts = len(m_bufs)
    p, q, n = at
    neg_inf = _compute(-np.inf, weights)
    new_max = neg_inf
    for k in range(parts):  # weights[row] holds the maxima until the scaled sums replace them
        m = _compute(m_bufs[k][_offset(m_strides, k, p, q, n)], weights)
        if lse_form:
            m *= scale
            if m == np.inf:  # old FlashAttention writes +inf for empty rows
                m = neg_inf
        weights[row, k] = m
        if m > new_max or m != m:  # NaN propagates
            new_max = m
    all_empty = new_max == neg_inf
    shift = _compute(0.0, weights) if all_empty else new_max  # all parts empty: exp(-inf - 0) = 0, not NaN
    new_sum = _compute(0.0, weights)
    for k in range(parts):
        scaled = np.exp(weights[row, k] - shift)
        if not lse_form:
            scaled = _compute(l_bufs[k][_offset(l_strides, k, p, q, n)], weights) * scaled
        weights[row, k] = scaled
        new_sum = scaled if k == 0 else new_sum + scaled
    for k in range(parts):
        weights[row, k] = _compute(0.0, weights) if all_empty else weights[row, k] / new_sum

    base_m, base_l = _offset(out_strides, 0, p, q, n), _offset(out_strides, 1, p, q, n)
    step_m, step_l = np.uint64(out_strides[0, 3]), np.uint64(out_strides[1, 3])
    if lse_form:
        lse = neg_inf if all_empty else (new_max + np.log(new_sum)) / scale
        for lane in range(np.uint64(lanes)):
            out_m[base_m + lane * step_m] = lse
    else:
        for lane in range(np.uint64(lanes)):
            out_m[base_m + lane * step_m] = new_max
            out_l[base_l + lane * step_l] = new_sum


@numba.njit(parallel=True, cache=True)
def _merge_rows_kernel(
    o_bufs,  # K flat buffers of parts_o (P, Q, N, D)
    o_strides,  # int64 (K, 4)
    m_bufs,  # K flat buffers of parts_m (P, Q, N, lanes); (T, 1, N, lanes) with a row map
    m_strides,  # int64 (K, 4)
    l_bufs,  # K flat buffers of parts_l, or m_bufs again in LSE form (then unread)
    l_strides,  # int64 (K, 4)
    out_o,  # flat buffer of out_o (P, Q, N, D)
    out_m,  # flat buffer of out_m (P, Q, N, lanes_out)
    out_l,  # flat buffer of out_l, or out_m again in LSE form (then unwritten)
    out_strides,  # int64 (3, 4): strides of out_m, out_l, out_o
    shape,  # int64 (P, Q, N, D, lanes_out)
    row_base,  # int64 (P,): per-batch row map (Note [canonical rows]), or empty for none
    row_step,  # int64 (P,)
    row_strides,  # bool: with a row map, every stats stride row 0 is the stride of a logical row (no divisions)
    heads_outer,  # bool: the statistics' head stride exceeds their token stride (visit order of phase 1)
    lse_form,  # bool: parts_m are LSEs (natural log after * lse_scale); no parts_l / out_l
    lse_scale,  # float
):
    num_p, num_q, num_n, dim, lanes = shape[0], shape[1], shape[2], shape[3], shape[4]
    parts = len(o_bufs)
    tokens = num_p * num_q
    per_tile = max(1, _TILE_ROWS // max(num_n, 1))
    for tile in numba.prange((tokens + per_tile - 1) // per_tile):
        first = tile * per_tile
        count = min(tokens - first, per_tile)
        weights = _scratch((count * num_n, parts), out_o)
        scale = _compute(lse_scale, out_o)
        token_p = np.empty(count, np.int64)  # divisions once per token, not per row
        token_q = np.empty(count, np.int64)
        for i in range(count):
            token_p[i], token_q[i] = (first + i) // num_q, (first + i) % num_q
        # Phase 1: statistics, visited in their memory order.
        outer, inner = (num_n, count) if heads_outer else (count, num_n)
        for a in range(outer):
            for b in range(inner):
                i, n = (b, a) if heads_outer else (a, b)
                p, q = token_p[i], token_q[i]
                at = (p, q, n)
                if row_base.size > 0:
                    r = row_base[p] + n * row_step[p]
                    at = (r, 0, 0) if row_strides else (r // num_n, 0, r % num_n)
                _merge_row_stats(
                    m_bufs, m_strides, l_bufs, l_strides, out_m, out_l, out_strides,
                    at, lanes, lse_form, scale, weights, i * num_n + n,
                )  # fmt: skip
        # Phase 2: outputs, in attention order; one read of each part, one rounded write per element.
        # Per-part bases, steps and weights go through fixed-size tuples so that they are registers in the
        # element loop (read from arrays there, LLVM cannot prove them loop-invariant and does not vectorise).
        scratch = np.empty(parts, np.uint64)
        for k in range(parts):
            scratch[k] = o_strides[k, 3]
        steps = to_fixed_tuple(scratch, parts)
        out_step = np.uint64(out_strides[2, 3])
        for i in range(count):
            p, q = token_p[i], token_q[i]
            for n in range(num_n):
                row = i * num_n + n
                for k in range(parts):
                    scratch[k] = _offset(o_strides, k, p, q, n)
                bases = to_fixed_tuple(scratch, parts)
                w = to_fixed_tuple(weights[row], parts)
                out_base = _offset(out_strides, 2, p, q, n)
                for d in range(np.uint64(dim)):
                    x = _widen(o_bufs[0][bases[0] + d * steps[0]]) * w[0]
                    for k in range(1, parts):  # SPEC section 3: products, then adds in part order
                        x += _widen(o_bufs[k][bases[k] + d * steps[k]]) * w[k]
                    out_o[out_base + d * out_step] = _narrow(x, out_o)


# ---------------------------------------------------------------------------------------------------
# Launcher


def _flat(t: torch.Tensor) -> np.ndarray:
    """The 1-D NumPy view over ``t``'s memory span (Note [cpu merge kernel]); no copy."""
    t = t.detach()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    if t.dtype in (torch.float16, torch.bfloat16):
        bits = t.view(torch.int16).as_strided((span,), (1,)).numpy()
        return bits.view(np.uint16) if t.dtype == torch.bfloat16 else bits
    return t.as_strided((span,), (1,)).numpy()


def _strides(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.array([t.stride() for t in tensors], dtype=np.int64).reshape(len(tensors), 4)


def _set_threads(nbytes: int) -> None:
    """Threads follow torch's setting, except that a pass over fewer than ``_PARALLEL_BYTES`` runs on the
    calling thread: waking a second thread costs more than it saves there (milliseconds on a busy machine)."""
    threads = torch.get_num_threads() if nbytes >= _PARALLEL_BYTES else 1
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _launch(kernel, nbytes: int, *args) -> None:
    """``kernel(*args)`` on the threads ``_set_threads(nbytes)`` picks, leaving torch's thread count alone.

    numba's OpenMP layer shares libgomp with torch, and starting its pool (on the first ``set_num_threads``
    or parallel launch of the process) sets the OpenMP thread count that ``torch.get_num_threads()``
    reports: a ``torch.set_num_threads(1)`` would silently become ``NUMBA_NUM_THREADS``. So torch's count
    is read first (numba then follows it) and written back only if the launch changed it.
    """
    torch_threads = torch.get_num_threads()
    try:
        _set_threads(nbytes)
        kernel(*args)
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


_NO_ROW_MAP = np.empty(0, dtype=np.int64)


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
    """Note [row merge] in ``backends/__init__.py``, fused: one read of each part, one write.

    Parameters
    ----------
    parts_o : K >= 1 CPU tensors ``(P, Q, N, D)``, one dtype (float16, bfloat16, float32, float64), any
        strides (zero strides included).
    parts_m, parts_l : K CPU tensors ``(P, Q, N, lanes)`` (``(T, 1, N, lanes)`` with ``row_map``), float32,
        or float64 with float64 ``out_o``; only lane 0 is read. Stats form: row max of the scaled scores
        and ``sum(exp(s - max))``. LSE form (``parts_l`` None): the log-sum-exp, whose natural log is
        ``lse * lse_scale`` (``lse_scale = ln 2`` for base-2 producers); ``+inf`` reads as empty.
    out_o, out_m, out_l : outputs shaped like ``parts_o[0]`` / ``parts_m[0]`` (any lane count, any
        strides, no internal overlap); ``out_l`` None in LSE form, where ``out_m`` receives the LSE in the
        caller's base (divided by ``lse_scale``), ``-inf`` for rows empty in every part. Each output may be
        exactly the same view as an input; any other overlap is undefined.
    row_map : ``(row_base, row_step)`` int64 ``(T,)`` CPU tensors of the per-batch TND statistics layout
        (Note [canonical rows]), or None.
    lse_scale : float, multiplies input LSEs into natural log.

    The statistics are evaluated once per row (lane 0) and written to every output lane. Concurrent calls
    from several Python threads need numba's ``omp`` or ``tbb`` threading layer (``workqueue`` aborts).
    """
    lse_form = parts_l is None
    row_base, row_step = (_NO_ROW_MAP, _NO_ROW_MAP) if row_map is None else (t.numpy() for t in row_map)
    (num_p, num_q, num_n, dim), lanes = out_o.shape, out_m.shape[-1]
    l_list = parts_m if lse_form else parts_l
    out_l_or_m = out_m if out_l is None else out_l
    stats = (*parts_m, *l_list, out_m, out_l_or_m)
    # Per-batch map: logical row r sits at stats[r // N, 0, r % N]; where every stats tensor has
    # stride(0) == N * stride(2), that is offset r * stride(2), and the kernel skips two divisions per row.
    row_strides = row_map is not None and all(t.stride(0) == num_n * t.stride(2) for t in stats)

    def stats_strides(tensors: Sequence[torch.Tensor]) -> np.ndarray:
        strides = _strides(tensors)
        if row_strides:
            strides[:, 0], strides[:, 1], strides[:, 2] = strides[:, 2], 0, 0
        return strides

    _launch(
        _merge_rows_kernel,
        out_o.numel() * out_o.element_size() * (len(parts_o) + 1),
        tuple(_flat(t) for t in parts_o),
        _strides(parts_o),
        tuple(_flat(t) for t in parts_m),
        stats_strides(parts_m),
        tuple(_flat(t) for t in l_list),
        stats_strides(l_list),
        _flat(out_o),
        _flat(out_m),
        _flat(out_l_or_m),
        np.concatenate((stats_strides((out_m, out_l_or_m)), _strides((out_o,)))),
        np.array((num_p, num_q, num_n, dim, lanes), dtype=np.int64),
        np.ascontiguousarray(row_base, dtype=np.int64),
        np.ascontiguousarray(row_step, dtype=np.int64),
        row_strides,
        row_map is not None or abs(parts_m[0].stride(2)) > abs(parts_m[0].stride(0)),
        lse_form,
        float(lse_scale),
    )


def merge_rows_backward(*args, **kwargs) -> None:
    """Note [row merge backward] in ``_backward.py``, fused: ``numba_cpu_backward.merge_rows_backward``.

    Imported on first use: that module builds on this one's buffer helpers.
    """
    from .numba_cpu_backward import merge_rows_backward as fused

    fused(*args, **kwargs)
