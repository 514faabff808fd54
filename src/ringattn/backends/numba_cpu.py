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

Work is split over threads in tiles of 1024 to 65536 rows (whole tokens, all heads; ``_TILE_ROWS_*``), about
``_TILES_PER_THREAD`` per thread.
A tile runs in two phases, each walking memory in its own order:

1. statistics: lane 0 of each part's max and sum, visited in the statistics' memory order (head-major
   for SBH and per-batch TND, whose statistics rows of one token are far apart), in chunks of
   ``_CHUNK_ROWS`` rows whose values stay in L1: (A) gather lane 0 of every part's max and sum into per-part
   arrays (one ``_stats_at`` per row), (B) SPEC section 3 over the chunk in branch-free loops that vectorise
   (merged max, ``exp`` as a polynomial, products, sum, the K weights ``w_k / L`` as K vector divisions),
   (C) store the weights, contiguous in visit order, and write the output statistics to every lane.
   (A) also marks a row *general* when a part's lanes differ from its lane 0, or a part is empty (max
   ``-inf`` and sum 0, or an LSE of ``+-inf``); (C) then merges that row's lanes one by one
   (``_row_lanes``) and writes lane c of the output statistics from lane c. Rows whose lanes are all equal
   (the contract: Ascend writes one value to all 8) and that have no empty part are exactly the lane rule
   with lane 0's weights, computed once: bitwise what this kernel gave before it told lanes apart.
   The lane check compares bits, not floats: bit-equal lanes (NaNs with one payload included) give bitwise
   lane 0's results under every lane formula, and float-equal lanes with different bits (+0 / -0) go lane
   by lane, which is exact too. It tests a chunk at once: for 8 lanes of unit stride (Ascend's layout) (A)
   ORs every row's ``lane c ^ lane 0`` into 8 accumulators, one vector per part and statistic
   (``or_lane_diffs``, Note [lane check vector] in ``numba_stream.py``), and a loop over the gathered lane-0
   values looks for empty parts; only a chunk where either finds something is classified row by row
   (``or_lane_diffs`` per row; other lane layouts always are, by ``_lanes_same`` on the bits). A row's flag
   is stored only when it is general, and the flags are read (in (C), phase 2, phase 3) only in a chunk /
   tile that has one, so the common case stores and branches on registers. Time against the kernel before lanes
   (``benchmarks/kernel_ab.py --rev 1e90c9b``: bench inputs, interleaved in one process, medians of 21): a
   per-row test, 1.09-1.21x on bfloat16 (1.00-1.09x float32); the chunk test, 0.99-1.07x on bfloat16,
   0.96-1.02x on float32;
   Strides used per row are fixed-size tuples (``_columns``), not array loads, and the output statistics
   are written in the kernel body, not in an inlined helper: numba reference-counts array arguments of
   inlined helpers per call, which cost more than the arithmetic. (The previous shape, per-row loops over
   the whole tile with the weights scattered in attention order, was 1.0-1.16x slower on the bf16 merge);
2. outputs: rows in attention order; each element reads every part once, forms ``o_0 * p_0 + o_1 * p_1
   + ...`` (SPEC section 3: products, then adds in part order) and writes the rounded value once. K is
   a compile-time constant (the tuple length) and the sum is written out term by term for it
   (``_weighted_sum``); the per-row bases and weights are fixed-size tuples built per K
   (``_part_offsets``, ``_part_values``: no array views per row), i.e. registers, which lets LLVM vectorise.
   bfloat16 rows whose parts and output all have unit element stride go 16 elements at a time through
   ``bf16_merge_chunk`` (Note [bf16 chunk merge] in ``numba_stream.py``): the same arithmetic and rounding
   in ~30 instructions per 16 elements instead of ~41 plus a staging copy; the merge is compute-bound on a
   core in bfloat16, so this is 1.14-1.2x on the whole merge. General rows (phase 1) recompute their lane
   weights and go element by element (``_general_row``): element d takes lane ``d % lanes``, and an empty
   part's element is not read (a select of -0.0, the identity of ``+``, so the row is bitwise the merge of
   the other parts; an element empty in every part is +0). They are the exception (unequal lanes, as on
   MindSpore's own example, or rows some part never reached), so they are not vectorised.

Calls over ``_STREAM_BYTES`` whose output rows are contiguous and 32-byte aligned compute each row into an
L1-resident stage (bfloat16 chunks: straight from registers) and write it with streaming stores (Note
[streaming stores] in ``numba_stream.py``). The output statistics use plain stores: streaming their 32-byte
rows measured 1.3x slower on the statistics phase, even now that a chunk writes them in runs.

Compiled kernels are cached in a per-user directory (Note [kernel cache] in ``_kernel_cache.py``), valid for the
contents of every ``backends/numba_*.py`` (an edit of any of them compiles again); ``ringattn compile --clear``
empties it.

A row's inputs are read before its outputs are written and rows never share memory, so outputs may be
exactly the input views (in-place accumulation).

Note [one part]
---------------
A merge of K = 1 parts has nothing to merge: the output is the part (times ``l / l = 1``) and the statistics pass
through, lane by lane. Both fused kernels hand it to the ``torch`` backend, which does that at the same memory
cost, rather than compile a specialisation for it (15-30 s per dtype on a 2-core machine, for a copy).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from .._contract import UpdateProblem
from . import _kernel_cache, _warm, heads_outer, torch_eager
from .numba_stream import (
    BF16_CHUNK,
    STREAM_BYTES,
    bf16_merge_chunk,
    bf16_merge_chunk_stream,
    or_lane_diffs,
    store_fence,
    stream32,
)

_kernel_cache.install()  # before the first cache=True kernel below (Note [kernel cache])

NAME = "cpu"

_PARALLEL_BYTES = 4 << 20
# Calls moving at least this many bytes write their outputs with streaming stores (Note [streaming stores]):
# about the last-level cache of a server CPU, above which the output is evicted before anyone reads it anyway.
_STREAM_BYTES = 32 << 20
# Rows per unit of work: about _TILES_PER_THREAD tiles per thread (the launcher passes the count: reading
# numba.get_num_threads() in the kernel would make it uncacheable), within these bounds. Phase 1 of a tile
# reads one run of tokens per head and part (head-major statistics), so long tiles keep the hardware
# prefetcher streaming: 1024-row tiles (32 tokens of 32 heads) left phase 1 latency-bound, 8192-16384 rows
# ran it ~1.5x faster, and 2 tiles per thread of up to 65536 rows another 3-8% on the whole merge (2 threads).
# A tile's weights (rows x K compute values) then stay in L2/L3 for phase 2.
_TILES_PER_THREAD = 2
_TILE_ROWS_MIN = 1024
_TILE_ROWS_MAX = 65536
# Statistics rows per chunk of phase 1: the chunk's values (about 4K + 5 per row) stay in L1.
_CHUNK_ROWS = 128
_F32_TWO_POW_M24 = np.float32(2.0**-24)
_F32_HALF = np.float32(0.5)
_U32 = np.uint32


def unavailable_reason() -> str | None:
    return None  # importing this module imported numba


def device_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run tensors on ``device``, or None."""
    if device.type != "cpu":
        return f"the 'cpu' backend runs CPU tensors only, got device {device}"
    return None


def unsupported_reason(problem: UpdateProblem) -> str | None:
    return device_reason(problem.device)


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
            f = np.float32(value)
            b = f.view(np.uint32)
            if f != f:  # NaN (a float compare: one vector instruction, the integer test took four)
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


def _exp_in_place(values):  # pragma: no cover - numba stub
    """``values[:] = exp(values)`` for a 1-D float32 or float64 array of arguments ``<= 0``, ``-inf`` or NaN."""


# Cephes' single-precision exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, degree-7 polynomial,
# within 2 ulp of exp in float32 (the float32 statistics tolerance is 1e-4).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-110.0)  # exp(-110) rounds to 0 in float32: clamping keeps 2**n finite
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))  # fmt: skip


@numba.njit(inline="always", cache=True)
def _exp2i(n):
    """2**n as float32 for integer ``-126 <= n <= 127``, from its bits."""
    return _bits_to_f32(_U32(n + np.int32(127)) << _U32(23))


@overload(_exp_in_place)
def _exp_in_place_impl(values):
    if values.dtype == types.float64:

        def exp_f64(values):
            for j in range(values.size):
                values[j] = np.exp(values[j])

        return exp_f64

    def exp_f32(values):
        # libm's expf is a call per element; this branch-free polynomial vectorises (selects, no branches).
        # NaN stays NaN through r and the polynomial; n comes from a NaN-free copy because float -> int of NaN
        # is undefined in LLVM. 2**n is applied in two halves, so that results below 2**-126 round to
        # subnormals instead of needing 2**n itself to be one.
        for j in range(np.uint64(values.size)):
            x = values[j]
            x = _EXP_FLOOR if x < _EXP_FLOOR else x
            finite = x if x == x else np.float32(0.0)
            n = np.floor(finite * _LOG2E + _F32_HALF)
            r = x - n * _LN2_HI - n * _LN2_LO
            poly = _EXP_POLY[0]
            for c in _EXP_POLY[1:]:
                poly = poly * r + c
            poly = poly * r * r + r + np.float32(1.0)
            ni = np.int32(n)
            half = ni >> np.int32(1)
            values[j] = poly * _exp2i(half) * _exp2i(ni - half)

    return exp_f32


# ---------------------------------------------------------------------------------------------------
# Kernel


def _weighted_sum(o_bufs, bases, steps, weights, d):  # pragma: no cover - numba stub
    """``sum_k widen(o_k[bases[k] + d * steps[k]]) * weights[k]``: SPEC section 3's products, then adds in
    part order, in the compute type."""


@overload(_weighted_sum, inline="always")
def _weighted_sum_impl(o_bufs, bases, steps, weights, d):
    # Written out term by term for this K: a ``for k in range(1, K)`` loop indexing the tuples with k compiles
    # to the same arithmetic, but LLVM then reloads the buffers' data pointers inside the vectorised element
    # loop, which measured 20-25% slower over a whole merge.
    terms = [f"_widen(o_bufs[{k}][bases[{k}] + d * steps[{k}]]) * weights[{k}]" for k in range(len(o_bufs))]
    body = "".join(f"    x += {term}\n" for term in terms[1:])
    source = f"def weighted_sum(o_bufs, bases, steps, weights, d):\n    x = {terms[0]}\n{body}    return x\n"
    namespace = {"_widen": _widen}
    exec(source, namespace)  # noqa: S102 - generated from the integer K only
    return namespace["weighted_sum"]


def _columns(strides, bufs):  # pragma: no cover - numba stub
    """The four stride columns of ``strides`` (its first ``len(bufs)`` rows) as fixed-size tuples:
    registers, where strides read from an array are reloaded after every store (LLVM cannot rule out that a
    float store aliases the int64 strides)."""


@overload(_columns, inline="always")
def _columns_impl(strides, bufs):
    parts = len(bufs)  # a typing-time constant, as to_fixed_tuple needs

    def columns(strides, bufs):
        return (
            to_fixed_tuple(strides[:parts, 0].copy(), parts),
            to_fixed_tuple(strides[:parts, 1].copy(), parts),
            to_fixed_tuple(strides[:parts, 2].copy(), parts),
            to_fixed_tuple(strides[:parts, 3].copy(), parts),
        )

    return columns


@numba.njit(inline="always", cache=True)
def _at(columns, k, p, q, n):
    """Element offset of index ``(p, q, n, 0)`` in buffer ``k`` of ``columns`` (see ``_columns``), unsigned."""
    return np.uint64(p * columns[0][k] + q * columns[1][k] + n * columns[2][k])


@numba.njit(inline="always", cache=True)
def _stats_at(p, q, n, num_n, row_base, row_step, row_strides):
    """Index ``(p, q, n)`` of attention row ``(p, q, n)`` in the stats views: itself, or through the
    per-batch row map (Note [canonical rows]) when there is one."""
    if row_base.size == 0:
        return p, q, n
    r = row_base[p] + n * row_step[p]
    return (r, 0, 0) if row_strides else (r // num_n, 0, r % num_n)


@numba.njit(inline="always", cache=True)
def _stream_row(stage, dst, dst_base, dim):
    """``dst[dst_base:][:dim] = stage[:dim]``: whole 32-byte chunks by streaming stores, the tail by plain ones.
    ``dst[dst_base]`` must be 32-byte aligned (Note [streaming stores])."""
    per_chunk = np.uint64(STREAM_BYTES // dst.itemsize)
    chunks = np.uint64(dim) // per_chunk
    for chunk in range(chunks):
        stream32(dst, dst_base + chunk * per_chunk, stage, chunk * per_chunk)
    for d in range(chunks * per_chunk, np.uint64(dim)):
        dst[dst_base + d] = stage[d]


@numba.njit(inline="always", cache=True)
def _fill(buf, base, step, lanes, value):
    """``buf[base + lane * step] = value`` for every lane (unsigned offsets)."""
    if step == 1 and lanes == 8:  # Ascend's layout: a constant trip count lets LLVM emit one vector store
        for lane in range(np.uint64(8)):
            buf[base + lane] = value
        return
    for lane in range(np.uint64(lanes)):
        buf[base + lane * step] = value


@numba.njit(inline="always", cache=True)
def _part_max(raw, lse_form, scale, like):
    """A part's row maximum (lane 0 as read) in the compute dtype of ``like``; in the LSE form ``lse * scale``,
    with ``+inf`` (old FlashAttention's empty rows) read as ``-inf``."""
    m = _compute(raw, like)
    if lse_form:
        m *= scale
        if m == np.inf:
            m = _compute(-np.inf, like)
    return m


def _lane0(bufs, cols, p, q, n):  # pragma: no cover - numba stub
    """The K elements ``bufs[k][(p, q, n, 0)]`` (offsets through ``cols``, see ``_columns``) as a tuple."""


def _per_part_tuple(name: str, params: str, item: Callable[[int], str], parts: int, **names: object) -> Callable:
    """``def name(params): return (item(0), ..., item(parts - 1),)``, compiled from source for one K.

    For the reason given in ``_weighted_sum_impl``: indexing a tuple of buffers with a loop variable spills the
    whole tuple to the stack at every access, so per-part code is written out with literal indices. ``names``
    are the globals the items use. The source depends on the integer K only.
    """
    namespace = dict(names)
    items = ", ".join(item(k) for k in range(parts))
    exec(f"def {name}({params}):\n    return ({items},)\n", namespace)  # noqa: S102 - generated from K only
    return namespace[name]


@overload(_lane0, inline="always")
def _lane0_impl(bufs, cols, p, q, n):
    item = lambda k: f"bufs[{k}][_at(cols, {k}, p, q, n)]"  # noqa: E731
    return _per_part_tuple("lane0", "bufs, cols, p, q, n", item, len(bufs), _at=_at)


def _part_values(values, first, like):  # pragma: no cover - numba stub
    """``(values[first], ..., values[first + K - 1])`` for ``K = len(like)``, as a fixed-size tuple (registers)."""


@overload(_part_values, inline="always")
def _part_values_impl(values, first, like):
    # Generated per K, as _lane0: a slice + to_fixed_tuple per row costs an array view (and its reference count).
    item = lambda k: f"values[first + np.uint64({k})]"  # noqa: E731
    return _per_part_tuple("part_values", "values, first, like", item, len(like), np=np)


def _part_offsets(cols, like, p, q, n):  # pragma: no cover - numba stub
    """``(_at(cols, 0, p, q, n), ..., _at(cols, K - 1, p, q, n))`` for ``K = len(like)``."""


@overload(_part_offsets, inline="always")
def _part_offsets_impl(cols, like, p, q, n):
    item = lambda k: f"_at(cols, {k}, p, q, n)"  # noqa: E731
    return _per_part_tuple("part_offsets", "cols, like, p, q, n", item, len(like), _at=_at)


def _chunked_row(o_bufs, bases, steps, weights, out, out_base, dim, stream):  # pragma: no cover - numba stub
    """Phase 2 for one row of unit-stride bfloat16 parts and output, by 16-element chunks (Note [bf16 chunk merge]
    in ``numba_stream.py``) and a scalar tail; returns True. For other dtypes it does nothing and returns False."""


@overload(_chunked_row, inline="always")
def _chunked_row_impl(o_bufs, bases, steps, weights, out, out_base, dim, stream):
    if out.dtype != types.uint16 or sys.byteorder != "little":  # the chunk reads element pairs as int32 lanes
        return lambda o_bufs, bases, steps, weights, out, out_base, dim, stream: False

    def chunked_row(o_bufs, bases, steps, weights, out, out_base, dim, stream):
        per_chunk = np.uint64(BF16_CHUNK)
        chunks = np.uint64(dim) // per_chunk
        if stream:
            for chunk in range(chunks):
                bf16_merge_chunk_stream(o_bufs, bases, weights, chunk * per_chunk, out, out_base + chunk * per_chunk)
        else:
            for chunk in range(chunks):
                bf16_merge_chunk(o_bufs, bases, weights, chunk * per_chunk, out, out_base + chunk * per_chunk)
        for d in range(chunks * per_chunk, np.uint64(dim)):
            out[out_base + d] = _narrow(_weighted_sum(o_bufs, bases, steps, weights, d), out)
        return True

    return chunked_row


@numba.njit(cache=True)
def _lanes_same(buf, base, step, lanes):
    """Whether the ``lanes`` entries ``buf[base + lane * step]`` all equal the first (given the statistics' bits
    (``_bits``): bitwise equal, NaN payloads included)."""
    first = buf[base]
    for lane in range(np.uint64(1), np.uint64(lanes)):
        if buf[base + lane * step] != first:
            return False
    return True


def _bits(bufs):  # pragma: no cover - numba stub
    """The K flat statistics buffers viewed as unsigned integers of their width (a tuple; no copy)."""


@overload(_bits, inline="always")
def _bits_impl(bufs):
    # Generated per K, as _lane0. float32 -> uint32, float64 -> uint64: 1-D contiguous views of any length.
    width = {32: "np.uint32", 64: "np.uint64"}
    item = lambda k: f"bufs[{k}].view({width[bufs[k].dtype.bitwidth]})"  # noqa: E731
    return _per_part_tuple("bits", "bufs", item, len(bufs), np=np)


@numba.njit(cache=True, error_model="numpy")
def _row_lanes(m_bufs, m_cols, l_bufs, l_cols, sp, sq, sn, lanes, lse_form, scale, like, weights, empty, merged):
    """The lane-by-lane merge of one statistics row ``(sp, sq, sn)`` (Note [cpu merge kernel], general rows).

    Writes, for part k and lane c: ``weights[k * lanes + c]`` (``w_k / L`` of that lane, 0 where every part is
    empty) and ``empty[k * lanes + c]`` (the part is empty there: max ``-inf`` and sum 0, or an LSE of
    ``+-inf``); per lane c: ``merged[c]`` the merged max (LSE form: the LSE in the caller's base),
    ``merged[lanes + c]`` the merged sum and ``merged[2 * lanes + c]`` 1 where every part is empty, else 0.
    The arithmetic is phase 1's, in its order, with the same ``exp``: lanes equal to lane 0 give bitwise its
    weights, and an empty part adds an exact 0 to the sum.
    """
    parts = len(m_bufs)
    neg_inf = _compute(-np.inf, like)
    zero = _compute(0.0, like)
    for c in range(lanes):
        top = neg_inf
        for k in range(parts):
            base = _at(m_cols, k, sp, sq, sn) + np.uint64(c * m_cols[3][k])
            m = _part_max(m_bufs[k][base], lse_form, scale, like)
            if lse_form:
                empty[k * lanes + c] = m == neg_inf
                weights[k * lanes + c] = m
            else:
                s = _compute(l_bufs[k][_at(l_cols, k, sp, sq, sn) + np.uint64(c * l_cols[3][k])], like)
                empty[k * lanes + c] = m == neg_inf and s == zero
                weights[k * lanes + c] = m
            top = m if (m > top or m != m) else top  # NaN propagates
        merged[c] = top
        merged[2 * lanes + c] = 1.0 if top == neg_inf else 0.0
        shift = zero if top == neg_inf else top  # all empty: exp(-inf - 0) = 0, not NaN
        for k in range(parts):
            weights[k * lanes + c] -= shift
    _exp_in_place(weights[: parts * lanes])
    for c in range(lanes):
        total = zero
        for k in range(parts):
            scaled = weights[k * lanes + c]
            if not lse_form:
                scaled *= _compute(l_bufs[k][_at(l_cols, k, sp, sq, sn) + np.uint64(c * l_cols[3][k])], like)
            weights[k * lanes + c] = scaled
            total = scaled if k == 0 else total + scaled
        all_empty = merged[2 * lanes + c] != zero
        for k in range(parts):
            w = weights[k * lanes + c] / total
            weights[k * lanes + c] = zero if all_empty else w
        top = merged[c]
        if lse_form:
            top = top if all_empty else (top + np.log(total)) / scale
        merged[c] = top
        merged[lanes + c] = total


@numba.njit(cache=True, error_model="numpy")
def _general_row(o_bufs, o_strides, p, q, n, weights, empty, merged, lanes, out_o, out_base, out_step, dim):
    """Phase 2 for a general row: element ``d`` weighted by lane ``d % lanes`` (``_row_lanes``' arrays); an
    empty part's element is not read (a select of -0.0, the identity of +, so the sum is bitwise the merge of
    the other parts), and a lane empty in every part gives +0."""
    parts = len(o_bufs)
    zero = _compute(0.0, out_o)
    for d in range(dim):
        c = d % lanes
        if merged[2 * lanes + c] != zero:
            out_o[out_base + np.uint64(d) * out_step] = _narrow(zero, out_o)
            continue
        x = _compute(-0.0, out_o)
        for k in range(parts):
            if not empty[k * lanes + c]:
                at = np.uint64(p * o_strides[k, 0] + q * o_strides[k, 1] + n * o_strides[k, 2] + d * o_strides[k, 3])
                x += _widen(o_bufs[k][at]) * weights[k * lanes + c]
        out_o[out_base + np.uint64(d) * out_step] = _narrow(x, out_o)


@numba.njit(parallel=True, cache=True, error_model="numpy")
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
    shape,  # int64 (P, Q, N, D, lanes_out, lanes_in)
    row_base,  # int64 (P,): per-batch row map (Note [canonical rows]), or empty for none
    row_step,  # int64 (P,)
    row_strides,  # bool: with a row map, every stats stride row 0 is the stride of a logical row (no divisions)
    heads_outer,  # bool: the statistics' head stride exceeds their token stride (visit order of phase 1)
    lse_form,  # bool: parts_m are LSEs (natural log after * lse_scale); no parts_l / out_l
    lse_scale,  # float
    tiles,  # int: number of tiles to aim for (a few per thread)
    stream,  # bool: out_o rows are contiguous and 32-byte aligned; write them with streaming stores
    unit_rows,  # bool: every part's rows and out_o's are contiguous (bfloat16 then goes by chunks)
):
    num_p, num_q, num_n, dim, lanes, lanes_in = shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]
    parts = len(o_bufs)
    tokens = num_p * num_q
    tile_rows = min(_TILE_ROWS_MAX, max(_TILE_ROWS_MIN, tokens * num_n // max(tiles, 1)))
    per_tile = max(1, tile_rows // max(num_n, 1))
    chunk = np.uint64(_CHUNK_ROWS)
    for tile in numba.prange((tokens + per_tile - 1) // per_tile):
        first = tile * per_tile
        count = min(tokens - first, per_tile)
        outer, inner = (num_n, count) if heads_outer else (count, num_n)
        weights = _scratch(count * num_n * parts, out_o)  # in phase 1's visit order (outer, inner, part)
        lead = inner * parts
        scale = _compute(lse_scale, out_o)
        neg_inf = _compute(-np.inf, out_o)
        zero = _compute(0.0, out_o)
        token_p = np.empty(count, np.int64)  # divisions once per token, not per row
        token_q = np.empty(count, np.int64)
        for i in range(count):
            token_p[i], token_q[i] = (first + i) // num_q, (first + i) % num_q
        # Phase 1: statistics, visited in their memory order, in chunks of _CHUNK_ROWS rows (Note [cpu merge
        # kernel]): gather lane 0 of the parts (A), merge them vectorised over the chunk (B), scatter (C).
        m_cols, l_cols = _columns(m_strides, m_bufs), _columns(l_strides, l_bufs)
        unit_lanes = True  # every statistics input has lanes of unit stride (Ascend's layout)
        for k in range(parts):
            unit_lanes &= m_cols[3][k] == 1 and l_cols[3][k] == 1
        quick_lanes = lanes_in == 1 or (lanes_in == 8 and unit_lanes)  # chunks tested whole (phase 1, A)
        m_bits, l_bits = _bits(m_bufs), _bits(l_bufs)  # the lane check compares bits (Note [cpu merge kernel])
        lanes_m = np.zeros(8, m_bits[0].dtype)  # or_lane_diffs' accumulators: per chunk, and per row below
        lanes_l = np.zeros(8, l_bits[0].dtype)
        row_m, row_l = np.zeros(8, m_bits[0].dtype), np.zeros(8, l_bits[0].dtype)
        out_cols = _columns(out_strides, (out_m, out_l))
        step_m, step_l = np.uint64(out_cols[3][0]), np.uint64(out_cols[3][1])
        part_m = _scratch(parts * _CHUNK_ROWS, out_o)  # [k * chunk + j]: m_k, then exp(m_k - shift), then w_k / L
        part_l = _scratch(parts * _CHUNK_ROWS, out_o)  # [k * chunk + j]: l_k
        new_max = _scratch(_CHUNK_ROWS, out_o)
        new_sum = _scratch(_CHUNK_ROWS, out_o)
        at_m = np.empty(_CHUNK_ROWS, np.uint64)  # offsets of its output statistics
        at_l = np.empty(_CHUNK_ROWS, np.uint64)
        general = np.zeros(count * num_n, np.bool_)  # in visit order: the row takes the lane-by-lane path
        tile_general = False  # any row of the tile is general: only then are the flags read
        lane_w = _scratch(parts * lanes_in, out_o)  # _row_lanes' arrays, for one general row at a time
        lane_e = np.empty(parts * lanes_in, np.bool_)
        lane_m = _scratch(3 * lanes_in, out_o)
        part_m[:] = zero  # the exp runs over whole chunks: keep the unused tail finite
        for a in range(outer):
            for start in range(0, inner, _CHUNK_ROWS):
                size = np.uint64(min(_CHUNK_ROWS, inner - start))
                chunk_general = False
                lanes_m[:] = 0
                lanes_l[:] = 0
                # A: gather lane 0 of every part.
                for j in range(size):
                    b = start + np.int64(j)
                    i, n = (b, a) if heads_outer else (a, b)
                    at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, row_strides)
                    maxima = _lane0(m_bufs, m_cols, at[0], at[1], at[2])
                    for k in range(parts):
                        part_m[np.uint64(k) * chunk + j] = _part_max(maxima[k], lse_form, scale, out_o)
                    if not lse_form:
                        sums = _lane0(l_bufs, l_cols, at[0], at[1], at[2])
                        for k in range(parts):
                            part_l[np.uint64(k) * chunk + j] = _compute(sums[k], out_o)
                    if quick_lanes and lanes_in == 8:  # Note [lane check vector]
                        or_lane_diffs(lanes_m, m_bits, _part_offsets(m_cols, m_bufs, at[0], at[1], at[2]))
                        if not lse_form:
                            or_lane_diffs(lanes_l, l_bits, _part_offsets(l_cols, l_bufs, at[0], at[1], at[2]))
                    at_m[j] = _at(out_cols, 0, at[0], at[1], at[2])
                    at_l[j] = _at(out_cols, 1, at[0], at[1], at[2])
                # Rows whose lanes all equal lane 0 (the contract) and that have no empty part use lane 0's weights;
                # others are general and go lane by lane. Quick lanes (1 lane, or 8 of unit stride): the chunk is
                # tested as a whole (lanes or-ed above; empty parts in one loop that vectorises), and only a chunk
                # that fails is classified row by row. Other lane layouts are classified row by row.
                suspect = not quick_lanes or lanes_m.any() or lanes_l.any()
                for k in range(parts):
                    for j in range(size):
                        suspect |= (part_m[np.uint64(k) * chunk + j] == neg_inf) & (
                            lse_form | (part_l[np.uint64(k) * chunk + j] == zero)
                        )
                for j in range(size if suspect else 0):
                    b = start + np.int64(j)
                    i, n = (b, a) if heads_outer else (a, b)
                    at = _stats_at(token_p[i], token_q[i], n, num_n, row_base, row_step, row_strides)
                    same = True
                    if quick_lanes and lanes_in == 8:  # this row's lanes, by the chunk's vector test
                        row_m[:] = 0
                        row_l[:] = 0
                        or_lane_diffs(row_m, m_bits, _part_offsets(m_cols, m_bufs, at[0], at[1], at[2]))
                        if not lse_form:
                            or_lane_diffs(row_l, l_bits, _part_offsets(l_cols, l_bufs, at[0], at[1], at[2]))
                        same = not (row_m.any() or row_l.any())
                    elif lanes_in != 1:
                        for k in range(parts):
                            same &= _lanes_same(m_bits[k], _at(m_cols, k, at[0], at[1], at[2]),
                                                np.uint64(m_cols[3][k]), lanes_in)  # fmt: skip
                            if not lse_form:
                                same &= _lanes_same(l_bits[k], _at(l_cols, k, at[0], at[1], at[2]),
                                                    np.uint64(l_cols[3][k]), lanes_in)  # fmt: skip
                    empty = False  # a part is empty: the lane-by-lane path must select (its output is not read)
                    for k in range(parts):
                        empty |= (part_m[np.uint64(k) * chunk + j] == neg_inf) & (
                            lse_form | (part_l[np.uint64(k) * chunk + j] == zero)
                        )
                    if empty or not same:
                        general[a * inner + b] = True
                        chunk_general = True
                tile_general |= chunk_general
                # B: SPEC section 3 for the chunk; branch-free loops that vectorise.
                for j in range(size):
                    top = neg_inf
                    for k in range(parts):
                        m = part_m[np.uint64(k) * chunk + j]
                        top = m if (m > top or m != m) else top  # NaN propagates
                    new_max[j] = top
                    shift = zero if top == neg_inf else top  # all empty: exp(-inf - 0) = 0, not NaN
                    for k in range(parts):
                        part_m[np.uint64(k) * chunk + j] -= shift
                _exp_in_place(part_m)
                for j in range(size):
                    total = zero
                    for k in range(parts):
                        scaled = part_m[np.uint64(k) * chunk + j]
                        if not lse_form:
                            scaled *= part_l[np.uint64(k) * chunk + j]
                        part_m[np.uint64(k) * chunk + j] = scaled
                        total = scaled if k == 0 else total + scaled
                    new_sum[j] = total
                    all_empty = new_max[j] == neg_inf
                    for k in range(parts):
                        w = part_m[np.uint64(k) * chunk + j] / total
                        part_m[np.uint64(k) * chunk + j] = zero if all_empty else w
                # C: store the weights (in visit order, contiguous) and the output statistics.
                first_weight = np.uint64(a * lead + start * parts)
                for j in range(size):
                    for k in range(parts):
                        weights[first_weight + j * np.uint64(parts) + np.uint64(k)] = part_m[np.uint64(k) * chunk + j]
                    if chunk_general and general[a * inner + start + np.int64(j)]:
                        continue  # phase 3 writes its statistics (reading its inputs first: they may be the outputs)
                    top = new_max[j]
                    if lse_form:
                        top = top if top == neg_inf else (top + np.log(new_sum[j])) / scale
                    _fill(out_m, at_m[j], step_m, lanes, top)
                    if not lse_form:
                        _fill(out_l, at_l[j], step_l, lanes, new_sum[j])
        # Phase 2: outputs, in attention order; one read of each part, one rounded write per element.
        # Per-part bases, steps and weights are fixed-size tuples so that they are registers in the element
        # loop (read from arrays there, LLVM cannot prove them loop-invariant and does not vectorise).
        o_cols = _columns(o_strides, o_bufs)
        step_scratch = np.empty(parts, np.uint64)
        for k in range(parts):
            step_scratch[k] = o_strides[k, 3]
        steps = to_fixed_tuple(step_scratch, parts)
        out_step = np.uint64(out_strides[2, 3])
        out_p, out_q, out_n = out_strides[2, 0], out_strides[2, 1], out_strides[2, 2]
        stage = np.empty(dim if stream else 0, out_o.dtype)  # L1-resident row for streaming stores
        for i in range(count):
            p, q = token_p[i], token_q[i]
            for n in range(num_n):
                bases = _part_offsets(o_cols, o_bufs, p, q, n)
                first_weight = n * lead + i * parts if heads_outer else i * lead + n * parts
                if tile_general and general[first_weight // parts]:
                    continue  # phase 3
                out_base = np.uint64(p * out_p + q * out_q + n * out_n)
                w = _part_values(weights, np.uint64(first_weight), o_bufs)
                if unit_rows and _chunked_row(o_bufs, bases, steps, w, out_o, out_base, dim, stream):
                    continue
                if stage.size:
                    for d in range(np.uint64(dim)):
                        stage[d] = _narrow(_weighted_sum(o_bufs, bases, steps, w, d), stage)
                    _stream_row(stage, out_o, out_base, dim)
                    continue
                for d in range(np.uint64(dim)):
                    out_o[out_base + d * out_step] = _narrow(_weighted_sum(o_bufs, bases, steps, w, d), out_o)
        # Phase 3: general rows (unequal lanes, or an empty part), lane by lane with selects; kept out of the
        # loops above, whose vectorised code a call in their body slowed down (float32 1.4-1.9x).
        for slot in range(count * num_n if tile_general else 0):
            if not general[slot]:
                continue
            a, b = slot // inner, slot % inner
            i, n = (b, a) if heads_outer else (a, b)
            p, q = token_p[i], token_q[i]
            at = _stats_at(p, q, n, num_n, row_base, row_step, row_strides)
            _row_lanes(m_bufs, m_cols, l_bufs, l_cols, at[0], at[1], at[2], lanes_in, lse_form, scale, out_o,
                       lane_w, lane_e, lane_m)  # fmt: skip
            base_m, base_l = _at(out_cols, 0, at[0], at[1], at[2]), _at(out_cols, 1, at[0], at[1], at[2])
            for lane in range(lanes):  # output lane c holds merged lane c % lanes_in
                out_m[base_m + np.uint64(lane) * step_m] = lane_m[lane % lanes_in]
                if not lse_form:
                    out_l[base_l + np.uint64(lane) * step_l] = lane_m[lanes_in + lane % lanes_in]
            out_base = np.uint64(p * out_p + q * out_q + n * out_n)
            _general_row(o_bufs, o_strides, p, q, n, lane_w, lane_e, lane_m, lanes_in, out_o, out_base, out_step, dim)
        if stream:
            store_fence()


# ---------------------------------------------------------------------------------------------------
# Launcher


# Element type of a flat buffer per tensor dtype (16-bit formats as integer bits, Note [cpu merge kernel]).
_BUFFER_TYPES = {
    torch.float16: (ctypes.c_int16, np.int16),
    torch.bfloat16: (ctypes.c_uint16, np.uint16),
    torch.float32: (ctypes.c_float, np.float32),
    torch.float64: (ctypes.c_double, np.float64),
}


def _flat(t: torch.Tensor) -> np.ndarray:
    """The 1-D NumPy view over ``t``'s memory span (Note [cpu merge kernel]); no copy.

    The view borrows the memory without holding a reference to ``t``: it is valid while the caller holds ``t``,
    i.e. for one synchronous kernel launch. Built from the address (about 1 us) rather than through
    ``as_strided(...).numpy()`` (about 7 us, times 9 tensors per call).
    """
    c_type, np_type = _BUFFER_TYPES[t.dtype]
    if t.numel() == 0:
        return np.empty(0, np_type)
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return np.frombuffer((c_type * span).from_address(t.data_ptr()), np_type)


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row ``t[p, q, n, :]`` is contiguous and starts on a ``STREAM_BYTES`` boundary."""
    size = t.element_size()
    return (
        (t.stride(3) == 1 or t.shape[3] == 1)
        and t.data_ptr() % STREAM_BYTES == 0
        and all((stride * size) % STREAM_BYTES == 0 for stride in t.stride()[:3])
    )


def _strides(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.array([t.stride() for t in tensors], dtype=np.int64).reshape(len(tensors), 4)


def _threads(nbytes: int) -> int:
    """Threads follow torch's setting, except that a pass over fewer than ``_PARALLEL_BYTES`` runs on the
    calling thread: waking a second thread costs more than it saves there (milliseconds on a busy machine)."""
    threads = torch.get_num_threads() if nbytes >= _PARALLEL_BYTES else 1
    return max(1, min(threads, numba.config.NUMBA_NUM_THREADS))


def _launch(kernel, nbytes: int, *args) -> None:
    """``kernel(*args)`` on the threads ``_threads(nbytes)`` picks, leaving torch's thread count alone.

    numba's OpenMP layer shares libgomp with torch, and starting its pool (on the first ``set_num_threads``
    or parallel launch of the process) sets the OpenMP thread count that ``torch.get_num_threads()``
    reports: a ``torch.set_num_threads(1)`` would silently become ``NUMBA_NUM_THREADS``. So torch's count
    is read first (numba then follows it) and written back only if the launch changed it.
    """
    _warm.check(kernel, args)  # backend="auto": NotReady while the kernel compiles (Note [cold start] in _warm.py)
    torch_threads = torch.get_num_threads()
    try:
        numba.set_num_threads(_threads(nbytes))
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
        or float64 with float64 ``out_o``; merged lane by lane. Stats form: row max of the scaled scores
        and ``sum(exp(s - max))``. LSE form (``parts_l`` None): the log-sum-exp, whose natural log is
        ``lse * lse_scale`` (``lse_scale = ln 2`` for base-2 producers); ``+inf`` reads as empty.
    out_o, out_m, out_l : outputs shaped like ``parts_o[0]`` / ``parts_m[0]`` (any lane count, any
        strides, no internal overlap); ``out_l`` None in LSE form, where ``out_m`` receives the LSE in the
        caller's base (divided by ``lse_scale``), ``-inf`` for rows empty in every part. Each output may be
        exactly the same view as an input; any other overlap is undefined.
    row_map : ``(row_base, row_step)`` int64 ``(T,)`` CPU tensors of the per-batch TND statistics layout
        (Note [canonical rows]), or None.
    lse_scale : float, multiplies input LSEs into natural log.

    Output element d uses the weights of lane ``d % lanes``; an empty part's output is not read (Note [row
    merge]). Rows whose lanes are equal are evaluated once (lane 0) and written to every output lane. Concurrent calls
    from several Python threads need numba's ``omp`` or ``tbb`` threading layer (``workqueue`` aborts).
    """
    if len(parts_o) == 1:  # nothing to merge (Note [one part])
        torch_eager.merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map=row_map, lse_scale=lse_scale)
        return
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

    nbytes = out_o.numel() * out_o.element_size() * (len(parts_o) + 1)
    _launch(
        _merge_rows_kernel,
        nbytes,
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
        # Lanes merged: every lane in the stats form, lane 0 (one LSE per row) in the LSE form.
        np.array((num_p, num_q, num_n, dim, lanes, 1 if lse_form else parts_m[0].shape[-1]), dtype=np.int64),
        np.ascontiguousarray(row_base, dtype=np.int64),
        np.ascontiguousarray(row_step, dtype=np.int64),
        row_strides,
        heads_outer(parts_m, row_map),
        lse_form,
        float(lse_scale),
        _threads(nbytes) * _TILES_PER_THREAD,
        nbytes >= _STREAM_BYTES and _rows_aligned(out_o),
        all(t.stride(3) == 1 or dim <= 1 for t in (*parts_o, out_o)),
    )


def merge_rows_backward(*args, **kwargs) -> None:
    """Note [row merge backward] in ``_backward.py``, fused: ``numba_cpu_backward.merge_rows_backward``.

    Imported on first use: that module builds on this one's buffer helpers.
    """
    from .numba_cpu_backward import merge_rows_backward as fused

    fused(*args, **kwargs)
