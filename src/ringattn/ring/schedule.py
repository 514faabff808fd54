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

SHARDINGS = ("zigzag", "contiguous")


@dataclasses.dataclass(frozen=True)
class Block:
    """One block pair: local query chunks ``[q_lo, q_hi)`` against received key chunks ``[k_lo, k_hi)``."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool  # top-left causal mask of a square block; else unmasked


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
