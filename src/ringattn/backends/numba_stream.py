"""Non-temporal (streaming) stores and the bfloat16 chunk merge for the numba CPU kernels, as numba intrinsics.

Note [streaming stores]
-----------------------
A plain store to a line that is not in cache first *reads* the line (write-allocate, "read for ownership"), so
a kernel that writes W bytes of a large output moves 2W over the memory bus. A non-temporal store writes whole
lines straight to memory through the write-combining buffers: W bytes. For the merge (read K parts, write one)
that removes a quarter of the output phase's traffic at K = 2: measured on the default ``ringattn bench`` cases
(2 threads, interleaved A/B in one process), 1.10-1.25x faster for float32 and 1.04-1.08x for bfloat16. glibc's
``memcpy`` does the same above a cache-size threshold, and so do we (``numba_cpu._STREAM_BYTES``): below it the
output would still be in cache for its next reader. Streaming the 8 replicated statistics lanes as well (one
32-byte store per row) measured 3-10% *slower* (those lines are written half a line per row, interleaved with the
statistics reads), so the statistics use plain stores.

numba exposes no such store, and LLVM's loop vectoriser refuses ``!nontemporal`` stores it cannot prove
aligned, so the kernels use them in a fixed pattern:

* the row is computed into a small tile-local staging array (L1-resident) by the ordinary vectorised loop;
* :func:`stream32` then copies it out 32 bytes at a time with one ``!nontemporal`` vector store each, which
  x86 lowers to ``vmovntdq`` (other targets to their streaming store, or a plain one);
* the destination must be 32-byte aligned: the launcher checks the output's address and strides once per call
  and takes plain stores otherwise (a first version that tested each row's address inside the kernel, through
  ``ptrtoint``, measured slower than plain stores);
* streaming stores are weakly ordered, so each thread ends its work with :func:`store_fence` (a sequentially
  consistent fence: ``mfence`` on x86, which drains the write-combining buffers) before the results are used.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["STREAM_BYTES", "BF16_CHUNK", "bf16_merge_chunk", "bf16_merge_chunk_stream", "stream32", "store_fence"]

STREAM_BYTES = 32  # bytes per streaming store; destinations must be aligned to it

_VECTOR = ir.VectorType(ir.IntType(64), STREAM_BYTES // 8)


def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _store_streaming(builder, value, pointer) -> None:
    store = builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=STREAM_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def stream32(typingctx, dst, dst_index, src, src_index):
    """``dst[dst_index:][:32 bytes] = src[src_index:][:32 bytes]``, one non-temporal store.

    ``dst`` and ``src`` are 1-D arrays of one element size; indices are in elements; the destination address
    must be 32-byte aligned (the source need not be).
    """
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        return None
    if dst.dtype.bitwidth != src.dtype.bitwidth:
        return None
    sig = types.void(dst, dst_index, src, src_index)

    def codegen(context, builder, signature, args):
        dst_v, dst_i, src_v, src_i = args
        source = _element_pointer(context, builder, signature.args[2], src_v, src_i)
        value = builder.load(builder.bitcast(source, _VECTOR.as_pointer()), align=1)
        _store_streaming(builder, value, _element_pointer(context, builder, signature.args[0], dst_v, dst_i))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """Order this thread's earlier streaming stores before everything after (Note [streaming stores])."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------
# Note [bf16 chunk merge]
# ~~~~~~~~~~~~~~~~~~~~~~~
# The bfloat16 merge is compute-bound on a core (per element: widen K inputs, K products, K - 1 adds, round to
# nearest even with a NaN test, narrow): LLVM's vectorisation of the scalar loop widens with vpmovzxwd + shift,
# packs both the rounded and the NaN results across 128-bit lanes and blends them, ~41 instructions per 16
# elements, plus the copy out of the streaming stage. This intrinsic does 16 elements (32 bytes) with ~29:
#
# * a 32-byte load, read as 8 int32 lanes, holds elements 2i (low half) and 2i + 1 (high half) of lane i, so
#   ``lane << 16`` and ``lane & 0xFFFF0000`` are the even and the odd elements widened to float32, in place;
# * the contract's arithmetic in float32, products then adds in part order (fmul / fadd, no contraction), so
#   the results are bitwise those of the scalar loop;
# * rounding as ``_narrow``: ``(b + 0x7FFF + ((b >> 16) & 1)) >> 16``, NaN kept NaN as ``(b >> 16) | 0x40``;
# * the two halves recombine as ``(even >> 16) | (odd & 0xFFFF0000)``: no pack, no lane crossing;
# * one 32-byte store, non-temporal (destination 32-byte aligned, Note [streaming stores]) or plain.

BF16_CHUNK = STREAM_BYTES // 2  # bfloat16 elements per chunk

_I32 = ir.IntType(32)
_I32X8 = ir.VectorType(_I32, 8)
_F32X8 = ir.VectorType(ir.FloatType(), 8)


def _splat(builder, value, vector_type):
    out = ir.Constant(vector_type, None)
    for lane in range(vector_type.count):
        out = builder.insert_element(out, value, ir.Constant(_I32, lane))
    return out


def _i32x8(value):
    return ir.Constant(_I32X8, [value] * 8)


def _round_bf16_high(builder, x):
    """float32 lanes -> int32 lanes whose high half is the bfloat16 rounding of ``x`` (nearest even, NaN quiet)."""
    b = builder.bitcast(x, _I32X8)
    lsb = builder.and_(builder.lshr(b, _i32x8(16)), _i32x8(1))
    rounded = builder.add(builder.add(b, _i32x8(0x7FFF)), lsb)
    nan = builder.fcmp_unordered("uno", x, x)
    return builder.select(nan, builder.or_(b, _i32x8(0x00400000)), rounded)


def _bf16_merge_chunk(nontemporal: bool):
    @intrinsic
    def merge_chunk(typingctx, bufs, bases, weights, d, dst, dst_index):
        if not (isinstance(bufs, types.UniTuple) and isinstance(bufs.dtype, types.Array)):
            return None
        if bufs.dtype.dtype != types.uint16 or not (isinstance(dst, types.Array) and dst.dtype == types.uint16):
            return None
        parts = len(bufs)
        sig = types.void(bufs, types.UniTuple(types.uint64, parts), types.UniTuple(types.float32, parts), types.uint64,
                         dst, types.uint64)  # fmt: skip

        def codegen(context, builder, signature, args):
            bufs_v, bases_v, weights_v, d_v, dst_v, dst_i = args
            even = odd = None
            for k in range(parts):
                index = builder.add(builder.extract_value(bases_v, k), d_v)
                buf = builder.extract_value(bufs_v, k)
                source = _element_pointer(context, builder, signature.args[0].dtype, buf, index)
                lanes = builder.load(builder.bitcast(source, _I32X8.as_pointer()), align=2)
                weight = _splat(builder, builder.extract_value(weights_v, k), _F32X8)
                e = builder.fmul(builder.bitcast(builder.shl(lanes, _i32x8(16)), _F32X8), weight)
                o = builder.fmul(builder.bitcast(builder.and_(lanes, _i32x8(-65536)), _F32X8), weight)
                even, odd = (e, o) if k == 0 else (builder.fadd(even, e), builder.fadd(odd, o))
            value = builder.or_(
                builder.lshr(_round_bf16_high(builder, even), _i32x8(16)),
                builder.and_(_round_bf16_high(builder, odd), _i32x8(-65536)),
            )
            target = _element_pointer(context, builder, signature.args[4], dst_v, dst_i)
            if nontemporal:
                _store_streaming(builder, value, target)
            else:
                builder.store(value, builder.bitcast(target, _I32X8.as_pointer()), align=2)
            return context.get_dummy_value()

        return sig, codegen

    return merge_chunk


# ``dst[dst_index:][:16] = bf16(sum_k float32(bufs[k][bases[k] + d:][:16]) * weights[k])`` for K bfloat16 (uint16)
# buffers with unit element stride (Note [bf16 chunk merge]); a plain store, or a streaming one (then
# ``dst[dst_index]`` must be 32-byte aligned).
bf16_merge_chunk = _bf16_merge_chunk(nontemporal=False)
bf16_merge_chunk_stream = _bf16_merge_chunk(nontemporal=True)


# ---------------------------------------------------------------------------------------------------
# Note [lane check vector]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# Ascend's statistics hold one value per row in 8 lanes, which the contract says are equal; the CPU merge must still
# tell a row whose lanes differ (Note [cpu merge kernel], lane check). Written as scalar code (8 loads, 7 XORs with
# lane 0 and 7 ORs per part and statistic, reduced and tested per row), the check cost the bfloat16 merge 1.09-1.21x
# the time of the kernel before lanes: LLVM vectorised neither the per-row reduction nor 8 loop-carried accumulators.
# This intrinsic does a row of every part in one vector each: a 32- or 64-byte load of the 8 lanes, an XOR with lane
# 0 broadcast, an OR into an 8-lane accumulator kept in a small array; the chunk reduces the accumulator once.


@intrinsic
def or_lane_diffs(typingctx, acc, bufs, bases):
    """``acc[c] |= bufs[k][bases[k] + c] ^ bufs[k][bases[k]]`` for the 8 lanes ``c`` and every part ``k``.

    ``bufs``: a tuple of K 1-D integer arrays (statistics viewed as their bits; lanes of unit stride); ``bases``: a
    tuple of K uint64 element indices of lane 0; ``acc``: a 1-D array of at least 8 elements of the same type.
    """
    if not (isinstance(bufs, types.UniTuple) and isinstance(bufs.dtype, types.Array) and isinstance(acc, types.Array)):
        return None
    element = bufs.dtype.dtype
    if not isinstance(element, types.Integer) or acc.dtype != element:
        return None
    parts = len(bufs)
    sig = types.void(acc, bufs, types.UniTuple(types.uint64, parts))
    vector = ir.VectorType(ir.IntType(element.bitwidth), 8)
    align = element.bitwidth // 8

    def codegen(context, builder, signature, args):
        acc_v, bufs_v, bases_v = args
        diff = None
        for k in range(parts):
            source = _element_pointer(context, builder, signature.args[1].dtype, builder.extract_value(bufs_v, k),
                                      builder.extract_value(bases_v, k))  # fmt: skip
            lanes = builder.load(builder.bitcast(source, vector.as_pointer()), align=align)
            first = builder.shuffle_vector(lanes, ir.Constant(vector, None), ir.Constant(_I32X8, [0] * 8))
            term = builder.xor(lanes, first)
            diff = term if diff is None else builder.or_(diff, term)
        target = builder.bitcast(
            _element_pointer(context, builder, signature.args[0], acc_v, ir.Constant(ir.IntType(64), 0)),
            vector.as_pointer(),
        )
        builder.store(builder.or_(builder.load(target, align=align), diff), target, align=align)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------
# Note [eight-lane row backward]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The backward of the stats form walks a row 8 elements at a time, element c of a block belonging to lane c (Note
# [eight lanes at once] in ``numba_cpu_backward.py``). Written as numba code, LLVM left the block mostly scalar (xmm
# registers, 5.7 GB/s in bfloat16 on one core); this intrinsic is the row loop itself, in vectors: per block a load
# of 8 elements of g and of o, widened to float32, ``acc += g * o`` and ``out = narrow(w * g)`` with one vector of
# 8 lane weights, a store of 8 elements. The arithmetic is the scalar code's, in its order (fmul, then fadd; no
# contraction), so both give the same bits. float32 and bfloat16 (uint16); other dtypes keep the numba code.

_F32 = ir.FloatType()


def _widen8(builder, lanes, element):
    """8 elements of ``element`` type (float32 or bfloat16 bits as uint16) -> <8 x float>."""
    if element == types.float32:
        return lanes
    wide = builder.zext(lanes, _I32X8)
    return builder.bitcast(builder.shl(wide, _i32x8(16)), _F32X8)


def _narrow8(builder, values, element):
    """<8 x float> -> 8 elements of ``element`` type, rounded to nearest even (bfloat16: as ``_narrow``)."""
    if element == types.float32:
        return values
    high = builder.lshr(_round_bf16_high(builder, values), _i32x8(16))
    return builder.trunc(high, ir.VectorType(ir.IntType(16), 8))


@intrinsic
def scale_and_dot_blocks8(typingctx, g_buf, g_base, o_buf, o_base, out_buf, out_base, weights, acc, blocks):
    """For the ``blocks`` blocks of 8 elements from the given bases (unit stride): ``out = narrow(weights[c] * g)``
    and ``acc[c] += g * o`` summed over the blocks (``acc`` overwritten: it starts at 0), lane c = element c of a
    block. ``g_buf``, ``o_buf``, ``out_buf``: 1-D arrays of one dtype, float32 or uint16 (bfloat16 bits); ``weights``
    and ``acc``: 1-D float32 arrays of at least 8 elements."""
    arrays = (g_buf, o_buf, out_buf, weights, acc)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    element = g_buf.dtype
    if element not in (types.float32, types.uint16) or o_buf.dtype != element or out_buf.dtype != element:
        return None
    if weights.dtype != types.float32 or acc.dtype != types.float32:
        return None
    sig = types.void(g_buf, types.uint64, o_buf, types.uint64, out_buf, types.uint64, weights, acc, types.uint64)
    vector = _F32X8 if element == types.float32 else ir.VectorType(ir.IntType(16), 8)
    align = 4 if element == types.float32 else 2

    def codegen(context, builder, signature, args):
        g_v, g_b, o_v, o_b, out_v, out_b, w_v, acc_v, blocks_v = args
        i64 = ir.IntType(64)
        zero = ir.Constant(i64, 0)
        w_ptr = _element_pointer(context, builder, signature.args[6], w_v, zero)
        w = builder.load(builder.bitcast(w_ptr, _F32X8.as_pointer()), align=4)
        entry = builder.block
        header = builder.append_basic_block("blocks8.header")
        body = builder.append_basic_block("blocks8.body")
        done = builder.append_basic_block("blocks8.done")
        builder.branch(header)

        builder.position_at_end(header)
        j = builder.phi(i64)
        total = builder.phi(_F32X8)
        j.add_incoming(zero, entry)
        total.add_incoming(ir.Constant(_F32X8, [0.0] * 8), entry)
        builder.cbranch(builder.icmp_unsigned("<", j, blocks_v), body, done)

        builder.position_at_end(body)
        offset = builder.mul(j, ir.Constant(i64, 8))

        def lanes_at(position, array_v, base):
            pointer = _element_pointer(context, builder, signature.args[position], array_v, builder.add(base, offset))
            return builder.bitcast(pointer, vector.as_pointer())

        g = _widen8(builder, builder.load(lanes_at(0, g_v, g_b), align=align), element)
        o = _widen8(builder, builder.load(lanes_at(2, o_v, o_b), align=align), element)
        summed = builder.fadd(total, builder.fmul(g, o))
        builder.store(_narrow8(builder, builder.fmul(g, w), element), lanes_at(4, out_v, out_b), align=align)
        j_next = builder.add(j, ir.Constant(i64, 1))
        j.add_incoming(j_next, body)
        total.add_incoming(summed, body)
        builder.branch(header)

        builder.position_at_end(done)
        acc_ptr = _element_pointer(context, builder, signature.args[7], acc_v, zero)
        builder.store(total, builder.bitcast(acc_ptr, _F32X8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen
