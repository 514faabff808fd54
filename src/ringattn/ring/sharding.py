"""Cutting a full sequence into the per-rank shards ring attention expects, and putting it back.

``zigzag`` (Note [ring schedule]): the sequence is cut into ``2W`` equal chunks and rank ``r`` holds
chunks ``r`` and ``2W-1-r``, concatenated in that order. ``contiguous``: rank ``r`` holds the ``r``-th
of ``W`` equal chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import LayoutError, ShapeError, expected
from .schedule import SHARDINGS, global_chunk_order


def _num_chunks(world_size: int, sharding: str) -> int:
    if sharding not in SHARDINGS:
        raise LayoutError(expected("sharding", f"one of {', '.join(map(repr, SHARDINGS))}", repr(sharding)))
    return 2 * world_size if sharding == "zigzag" else world_size


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, *, sharding: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """The part of the full sequence ``x`` (sequence along ``dim``) that ``rank`` holds; a new tensor.

    ``x.shape[dim]`` must be a multiple of ``2 * world_size`` (zigzag) or ``world_size`` (contiguous).
    """
    n = _num_chunks(world_size, sharding)
    if x.shape[dim] % n:
        raise ShapeError(
            expected(f"x.shape[{dim}]", f"a multiple of {n} ({sharding}, world size {world_size})", x.shape[dim])
        )
    chunks = x.chunk(n, dim=dim)
    per_rank = n // world_size
    order = global_chunk_order(world_size, sharding)[rank * per_rank : (rank + 1) * per_rank]
    return torch.cat([chunks[c] for c in order], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], *, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from every rank's shard, in rank order."""
    world_size = len(shards)
    n = _num_chunks(world_size, sharding)
    pieces = [piece for shard in shards for piece in shard.chunk(n // world_size, dim=dim)]
    order = global_chunk_order(world_size, sharding)
    by_position = [pieces[order.index(c)] for c in range(n)]
    return torch.cat(by_position, dim=dim)


def gather_sequence(
    x: torch.Tensor, *, sharding: str = "zigzag", dim: int = 1, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every rank's shard ``x`` gathered (all_gather) and unsharded into the full sequence, on every rank.

    Without an initialised process group, returns ``x`` (a ring of one).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, sharding=sharding, dim=dim)
