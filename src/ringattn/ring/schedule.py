"""Pure schedule functions of ring attention: who sends to whom, and which blocks each rank computes.

No tensors, no processes: everything here is integer arithmetic, so it is tested exhaustively.

Note [ring schedule]
--------------------
``W`` ranks form a ring; rank ``r`` sends to ``r + 1`` and receives from ``r - 1`` (mod W). Every rank
holds ``S_local`` query tokens and the key/value tokens at the same global positions. Key/value blocks
travel the ring, so at step ``s = 0 .. W-1`` rank ``r`` holds the block owned by ``src = (r - s) mod W``
(step 0: its own). The transfer of the next block is posted before the current one is computed.

The local sequence is cut into ``chunks_per_rank`` equal chunks; :func:`step_blocks` names the block
pairs ``(query chunks, key chunks, causal?)`` a rank computes at a step. ``causal=True`` on a block means
the top-left causal mask of a square diagonal block; every other block is computed unmasked, and fully
masked pairs are skipped (never computed, never merged).

Non-causal (any sharding): every step computes all local queries against the whole received block.

Causal, ``sharding="zigzag"`` (load balanced; the default). The sequence is cut into ``2W`` chunks and
rank ``r`` holds chunks ``r`` and ``2W-1-r`` (local chunks 0 and 1). With ``c = S_local / 2``::

    step 0 (src == r):  queries [r, 2W-1-r] x keys [r, 2W-1-r], causal. Chunk r never sees chunk
                        2W-1-r; chunk 2W-1-r sees chunk r fully: exactly the top-left causal mask of
                        the concatenated 2c tokens.                              (2c x 2c, half masked)
    src < r:            both query chunks see key chunk src (src < r) and neither sees 2W-1-src
                        (> 2W-1-r):  queries [0, 2) x keys [0, 1), unmasked.      (2c x c)
    src > r:            query chunk r sees nothing (src > r and 2W-1-src >= W > r); query chunk
                        2W-1-r sees both key chunks: queries [1, 2) x keys [0, 2), unmasked. (c x 2c)

Every rank does the same work, ``2c^2`` score entries, at every step (the diagonal step computes
``(2c)^2 / 2``), which is why zigzag balances the ring. Causal, ``sharding="contiguous"`` (rank r holds
the r-th of W contiguous chunks): step 0 causal, ``src < r`` unmasked, ``src > r`` skipped; rank W-1
works W times as much as rank 0.

Backward (same steps): dq accumulates locally; each block's dk/dv partial travels with it, rank
``r`` adds its contribution at step ``s`` to the partial received from ``r - 1`` (computed there at step
``s - 1`` for the same block) and passes it on; after step ``W-1`` one more hop returns every dk/dv to
its owner. Messages per rank: forward ``W-1`` (key/value), backward ``W-1`` (key/value) plus ``W``
(dk/dv); none at all when ``W == 1``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHARDINGS = ("zigzag", "contiguous")


@dataclasses.dataclass(frozen=True)
class Block:
    """One block pair: local query chunks ``[q_lo, q_hi)`` against received key chunks ``[k_lo, k_hi)``."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool  # top-left causal mask of a square block; else unmasked (or ``band``)
    band: tuple[int, int] | None = None  # a window's band: row i sees columns i + lo .. i + hi (Note [windows])


def next_rank(rank: int, world_size: int) -> int:
    """The rank that ``rank`` sends to."""
    return (rank + 1) % world_size


def prev_rank(rank: int, world_size: int) -> int:
    """The rank that ``rank`` receives from."""
    return (rank - 1) % world_size


def source_rank(rank: int, step: int, world_size: int) -> int:
    """Owner of the key/value block that ``rank`` holds at ``step`` (Note [ring schedule])."""
    return (rank - step) % world_size


def chunks_per_rank(causal: bool, sharding: str) -> int:
    """How many equal chunks the local sequence is cut into: 2 for causal zigzag, else 1."""
    return 2 if causal and sharding == "zigzag" else 1


def zigzag_chunks(rank: int, world_size: int) -> tuple[int, int]:
    """Global chunk indices (of ``2 * world_size``) that ``rank`` holds under zigzag sharding."""
    return rank, 2 * world_size - 1 - rank


def step_blocks(rank: int, step: int, world_size: int, *, causal: bool, sharding: str) -> tuple[Block, ...]:
    """The block pairs ``rank`` computes at ``step``, in local chunk units (Note [ring schedule]).

    Invariant used by the forward: step 0 is one block covering every local query.
    """
    n = chunks_per_rank(causal, sharding)
    src = source_rank(rank, step, world_size)
    if not causal:
        return (Block(0, n, 0, n, False),)
    if src == rank:
        return (Block(0, n, 0, n, True),)
    if sharding == "contiguous":
        return (Block(0, 1, 0, 1, False),) if src < rank else ()
    if src < rank:
        return (Block(0, 2, 0, 1, False),)
    return (Block(1, 2, 0, 2, False),)


# Note [windows]
# --------------
# A sliding window ``(left, right)`` (flash-attn's convention, -1 unbounded) lets the query at global position i see
# the keys j with ``i - left <= j <= i + right`` (and ``j <= i`` when causal). Relative to a pair of chunks of c
# tokens, query chunk at global start ``qs`` and key chunk at ``ks`` (``d = ks - qs``), local row a sees local
# columns b with ``lo <= b - a <= hi`` for ``lo = -left - d``, ``hi = right - d`` (``min(right, 0) - d`` causal). Each
# pair is then empty (skipped: never computed, never merged), full (unmasked), the top-left causal square, or a band
# (:func:`band_of`). :func:`window_step_blocks` lists the pairs of a step, or today's :func:`step_blocks` when
# the window changes nothing at that step (same kernels, same merges: a window of S gives exactly the causal ring).
#
# Work follows the window: a step whose pairs are all empty on a rank costs that rank nothing, and a step no rank
# needs is not taken at all (:func:`active_steps`: no transfer, no kernel, forward and backward alike). Skipped steps
# break the relay of Note [ring schedule] (a block that travels rank to rank needs every hop), so a ring with skipped
# steps sends each block straight to the rank that needs it (step s: rank r sends its own key/values to r + s and
# receives those of r - s; dk/dv partials go straight back to their owner), only between ranks that need it.
#
# A band block is computed in row tiles of half the window, each against only the keys its rows see
# (``blocks.band_pieces``): the CPU flash kernel computes every score of a block whatever its mask, and the tiles
# measured 2.5-7.7x faster than one masked call, on a par with compiled FlexAttention (``benchmarks/RESULTS.md``,
# "Sliding windows"). On CUDA the tiles run FlashAttention-2's window arguments (Note [block kernels]).
#
# Sharding: zigzag balances the causal triangle; under a window much shorter than S the work is a diagonal band,
# which contiguous shards cut into equal pieces too (each rank's band plus a spill into its predecessor), and the
# band then reaches fewer ranks: rank r needs ranks ``r - 1 .. r - ceil(left / c)`` only, where zigzag's second chunk
# reaches the other way round the ring as well. ``ringattn bench ring --window`` measures both; the caller picks
# (``sharding=``), as without a window.


def band_of(sq: int, sk: int, window: tuple[int, int], causal: bool, offset: int = 0) -> tuple[int, int] | None:
    """The band ``(lo, hi)`` (local row i sees local columns ``i + lo .. i + hi``) of an ``sq x sk`` block whose keys
    start ``offset`` positions after its queries, under ``window`` (flash-attn's ``(left, right)``, -1 unbounded),
    clipped to the block's ``[-(sq - 1), sk - 1]``; None when no row sees a key (Note [windows])."""
    left, right = window
    lo = -(sq - 1) if left < 0 else max(-left - offset, -(sq - 1))
    hi = sk - 1 if right < 0 else min(right - offset, sk - 1)
    if causal:
        hi = min(hi, -offset)
    return None if lo > hi or sq == 0 or sk == 0 else (lo, hi)


def _chunk_starts(rank: int, world_size: int, causal: bool, sharding: str, chunk: int, windowed: bool) -> list[int]:
    """Global start of each local chunk of ``rank``."""
    if chunks_per_rank(causal or windowed, sharding) == 2:
        return [g * chunk for g in zigzag_chunks(rank, world_size)]
    return [rank * chunk]


def window_step_blocks(
    rank: int, step: int, world_size: int, *, causal: bool, sharding: str, chunk: int, window: tuple[int, int]
) -> tuple[Block, ...]:
    """The blocks ``rank`` computes at ``step`` under ``window`` (Note [windows]), in local chunk units of ``chunk``
    tokens: the step's chunk pairs that see something, each with its band; today's :func:`step_blocks` where the
    window changes nothing at this step."""
    src = source_rank(rank, step, world_size)
    mine = _chunk_starts(rank, world_size, causal, sharding, chunk, True)
    theirs = _chunk_starts(src, world_size, causal, sharding, chunk, True)
    blocks, unwindowed = [], True
    for a, qs in enumerate(mine):
        for b, ks in enumerate(theirs):
            band = band_of(chunk, chunk, window, causal, ks - qs)
            plain = band_of(chunk, chunk, (-1, -1), causal, ks - qs)
            unwindowed = unwindowed and band == plain
            if band is None:
                continue
            full, square = band == (-(chunk - 1), chunk - 1), band == (-(chunk - 1), 0)
            if full or (square and ks == qs):
                blocks.append(Block(a, a + 1, b, b + 1, not full))
            else:
                blocks.append(Block(a, a + 1, b, b + 1, False, band))
    if unwindowed and (causal or len(mine) == 1):
        return step_blocks(rank, step, world_size, causal=causal, sharding=sharding)
    return tuple(blocks)


def active_steps(world_size: int, blocks_of) -> list[int]:
    """The steps some rank computes a block at (``blocks_of(rank, step)``): the ring takes only these (Note
    [windows]); step 0 always (it initialises every rank's output)."""
    return [0] + [s for s in range(1, world_size) if any(blocks_of(r, s) for r in range(world_size))]


def global_chunk_order(world_size: int, sharding: str) -> list[int]:
    """Global chunk index of every local chunk, ranks in order (rank 0's chunks first).

    ``zigzag`` cuts the sequence into ``2 * world_size`` chunks, ``contiguous`` into ``world_size``;
    entry ``i`` is the global index of the ``i``-th chunk when the shards are concatenated in rank order.
    """
    if sharding == "contiguous":
        return list(range(world_size))
    return [c for r in range(world_size) for c in zigzag_chunks(r, world_size)]


def messages_per_rank(world_size: int) -> dict[str, int]:
    """P2P exchanges (one send plus one receive each) per rank and pass (Note [ring schedule])."""
    if world_size == 1:
        return {"forward_kv": 0, "backward_kv": 0, "backward_dkv": 0}
    return {"forward_kv": world_size - 1, "backward_kv": world_size - 1, "backward_dkv": world_size}


# --- packed batches: per-document zigzag (Note [packed zigzag]) ----------------------------------------------
#
# Note [packed zigzag]
# --------------------
# A packed batch is documents of lengths ``L_i`` laid end to end (``cu_seqlens = [0, L_0, L_0 + L_1, ...]``,
# T tokens). Every document is cut into ``2W`` chunks of ``c_i = ceil(L_i / 2W)`` token SLOTS (TransformerEngine's
# THD scheme) and rank r holds chunks r and ``2W-1-r`` of every document, in document order: its shard is
# ``[doc 0: chunk r, chunk 2W-1-r | doc 1: chunk r, chunk 2W-1-r | ...]``, ``T_local = sum_i 2 c_i`` slots, the
# same on every rank, and document i starts at local slot ``sum_{j<i} 2 c_j`` on every rank.
#
# When ``2W`` does not divide ``L_i`` the last ``2W c_i - L_i`` (< 2W) positions of the document are PADDING
# slots: they attend to nothing (output 0, LSE -inf) and nothing attends to them (their gradients are 0).
# Padding sits at the end of a document, so in every chunk the real tokens are a prefix, and in every local pair
# [chunk r, chunk 2W-1-r] too (chunk 2W-1-r holds a real token only if chunk r, which comes before it, is full).
# So each block below is, per document, a PREFIX of the query rows against a PREFIX of the key rows: the
# kernels never see a padding slot and never need a mask beyond the dense top-left causal one.
#
# The block pairs of a step are those of the dense zigzag (``step_blocks``), applied to every document with its
# own chunk size: the same chunk-pair structure, hence the same balance, document by document. A block whose
# query or key prefix is empty for a document (a short document, a padding chunk) is skipped for it.


@dataclasses.dataclass(frozen=True)
class PackedBlock:
    """One block pair of a packed step: for every document kept, local query rows
    ``[q_start, q_start + q_len)`` against received key rows ``[k_start, k_start + k_len)``.

    ``causal``: top-left causal mask of each document's square block (then ``q_len == k_len``); else unmasked.
    Only documents with ``q_len > 0`` and ``k_len > 0`` are listed.
    """

    causal: bool
    q_start: tuple[int, ...]
    q_len: tuple[int, ...]
    k_start: tuple[int, ...]
    k_len: tuple[int, ...]
    bands: tuple[tuple[int, int], ...] | None = None  # under a window: each document's band (Note [windows])


def packed_chunk_sizes(lengths: list[int], world_size: int) -> list[int]:
    """Slots per chunk of every document, ``ceil(L_i / 2W)`` (Note [packed zigzag])."""
    return [-(-length // (2 * world_size)) for length in lengths]


def packed_local_offsets(lengths: list[int], world_size: int) -> list[int]:
    """Local cumulative slot counts ``[0, 2 c_0, 2 c_0 + 2 c_1, ..., T_local]``, the same on every rank: the
    ``cu_seqlens`` of a shard (padding slots included)."""
    offsets = [0]
    for c in packed_chunk_sizes(lengths, world_size):
        offsets.append(offsets[-1] + 2 * c)
    return offsets


def packed_real_tokens(length: int, chunk: int, rank: int, world_size: int, lo: int, hi: int) -> int:
    """Real (non-padding) tokens of ``rank``'s local chunks ``[lo, hi)`` (of 2) of a document; a prefix of them."""
    held = zigzag_chunks(rank, world_size)[lo:hi]
    return sum(min(max(length - g * chunk, 0), chunk) for g in held)


def packed_step_blocks(lengths: list[int], rank: int, step: int, world_size: int, *, causal: bool) -> tuple:
    """The :class:`PackedBlock` s ``rank`` computes at ``step`` (Note [packed zigzag]): the dense zigzag blocks of
    :func:`step_blocks`, applied to every document. Step 0 covers every real local query (for the forward's
    initialisation the packed block attention writes padding rows as empty results)."""
    src = source_rank(rank, step, world_size)
    unit = 2 // chunks_per_rank(causal, "zigzag")  # local chunks per dense chunk unit
    chunks, offsets = packed_chunk_sizes(lengths, world_size), packed_local_offsets(lengths, world_size)
    result = []
    for block in step_blocks(rank, step, world_size, causal=causal, sharding="zigzag"):
        q_lo, q_hi, k_lo, k_hi = (x * unit for x in (block.q_lo, block.q_hi, block.k_lo, block.k_hi))
        docs = []
        for length, c, off in zip(lengths, chunks, offsets, strict=False):
            q_len = packed_real_tokens(length, c, rank, world_size, q_lo, q_hi)
            k_len = packed_real_tokens(length, c, src, world_size, k_lo, k_hi)
            if q_len and k_len:
                docs.append((off + q_lo * c, q_len, off + k_lo * c, k_len))
        if docs:
            q_start, q_len, k_start, k_len = zip(*docs, strict=True)
            result.append(PackedBlock(block.causal, q_start, q_len, k_start, k_len))
    return tuple(result)


def packed_window_step_blocks(
    lengths: list[int], rank: int, step: int, world_size: int, *, causal: bool, window: tuple[int, int]
) -> tuple:
    """The :class:`PackedBlock` s of ``step`` under ``window`` (Note [windows], per document): one block per received
    key chunk, holding every document's pieces (a query chunk's real prefix against the key chunk's) with the band
    each sees, pieces that see nothing left out; :func:`packed_step_blocks` where the window changes nothing."""
    src = source_rank(rank, step, world_size)
    chunks, offsets = packed_chunk_sizes(lengths, world_size), packed_local_offsets(lengths, world_size)
    mine, theirs = zigzag_chunks(rank, world_size), zigzag_chunks(src, world_size)
    result, unwindowed = [], True
    for b in (0, 1):
        pieces = []
        for length, c, off in zip(lengths, chunks, offsets, strict=False):
            k_len = packed_real_tokens(length, c, src, world_size, b, b + 1)
            for a in (0, 1):
                q_len = packed_real_tokens(length, c, rank, world_size, a, a + 1)
                if not (q_len and k_len):
                    continue
                offset = (theirs[b] - mine[a]) * c
                band = band_of(q_len, k_len, window, causal, offset)
                unwindowed = unwindowed and band == band_of(q_len, k_len, (-1, -1), causal, offset)
                if band is not None:
                    pieces.append((off + a * c, q_len, off + b * c, k_len, band))
        if pieces:
            q_start, q_len, k_start, k_len, bands = zip(*pieces, strict=True)
            result.append(PackedBlock(False, q_start, q_len, k_start, k_len, bands))
    if unwindowed:
        return packed_step_blocks(lengths, rank, step, world_size, causal=causal)
    return tuple(result)


def packed_block_flops(lengths: list[int], world_size: int, *, causal: bool, heads: int, head_dim: int) -> list[int]:
    """Forward block FLOPs of every rank over a whole ring pass (``4 N D`` per computed score entry: ``Q K^T`` and
    ``P V``; a causal square of n rows computes ``n (n + 1) / 2`` entries). The backward does 2.5x of each,
    so the balance of this count is the balance of the pass."""
    flops = []
    for rank in range(world_size):
        entries = 0
        for step in range(world_size):
            for b in packed_step_blocks(lengths, rank, step, world_size, causal=causal):
                if b.causal:
                    entries += sum(n * (n + 1) // 2 for n in b.q_len)
                else:
                    entries += sum(q * k for q, k in zip(b.q_len, b.k_len, strict=True))
        flops.append(4 * heads * head_dim * entries)
    return flops


def _slots(lengths: list[int], rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per local slot of ``rank``: its document and its position in it (-1: padding), vectorised."""
    lengths_ = np.asarray(lengths, dtype=np.int64).reshape(-1)
    c = -(-lengths_ // (2 * world_size))
    doc = np.repeat(np.arange(len(lengths_)), 2 * c)
    starts = np.concatenate([[0], np.cumsum(2 * c)])[:-1]
    slot = np.arange(len(doc)) - starts[doc]  # index within the document's 2c slots
    chunk = c[doc]
    held = np.where(slot < chunk, rank, 2 * world_size - 1 - rank)  # global chunk: r, then 2W-1-r
    position = held * chunk + slot - np.where(slot < chunk, 0, chunk)
    return doc, np.where(position < lengths_[doc], position, -1)


def packed_slot_positions(lengths: list[int], rank: int, world_size: int) -> list[int]:
    """Position within its document of every local slot of ``rank``, -1 for a padding slot."""
    return _slots(lengths, rank, world_size)[1].tolist()


def packed_slot_tokens(lengths: list[int], rank: int, world_size: int) -> list[int]:
    """Global token index (into the packed batch) of every local slot of ``rank``, -1 for a padding slot."""
    doc, position = _slots(lengths, rank, world_size)
    first = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])[:-1]  # each document's first token
    return np.where(position >= 0, first[doc] + position, -1).tolist()
