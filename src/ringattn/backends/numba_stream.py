"""Non-temporal (streaming) stores for the numba CPU kernels, as numba intrinsics.

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

__all__ = ["STREAM_BYTES", "stream32", "store_fence"]

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
