"""Cutting a full sequence into the per-rank shards ring attention expects, and putting it back.

``zigzag`` (Note [ring schedule]): the sequence is cut into ``2W`` equal chunks and rank ``r`` holds
chunks ``r`` and ``2W-1-r``, concatenated in that order. ``contiguous``: rank ``r`` holds the ``r``-th
of ``W`` equal chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeviceError, DTypeError, LayoutError, ShapeError, expected
from .schedule import SHARDINGS, global_chunk_order


def _num_chunks(world_size: int, sharding: str) -> int:
    if sharding not in SHARDINGS:
        raise LayoutError(expected("sharding", f"one of {', '.join(map(repr, SHARDINGS))}", repr(sharding)))
    return 2 * world_size if sharding == "zigzag" else world_size


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high)`` (``high`` None: no upper bound); bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, torch.SymInt)):
        raise DTypeError(expected(name, "an int", repr(value)))
    if value < low or (high is not None and value >= high):
        want = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
        raise ShapeError(expected(name, want, int(value)))
    return int(value)


def _check_dim(x: torch.Tensor, dim: Any, name: str) -> int:
    """``dim`` as a non-negative dimension of ``x`` (negative counts from the end, as in torch)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise DTypeError(expected("dim", "an int", repr(dim)))
    if not -x.dim() <= dim < x.dim():
        raise ShapeError(expected("dim", f"a dimension of {name} (rank {x.dim()})", int(dim)))
    return int(dim) % x.dim()


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, *, sharding: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """The part of the full sequence ``x`` (sequence along ``dim``) that ``rank`` holds; a new tensor.

    ``world_size`` is an int >= 1, ``rank`` an int in ``[0, world_size)``; ``x.shape[dim]`` must be a multiple of
    ``2 * world_size`` (zigzag) or ``world_size`` (contiguous). Bad arguments raise DTypeError (not a tensor, not
    an int), ShapeError (out of range, indivisible length) or LayoutError (unknown ``sharding``), naming them.
    """
    if not isinstance(x, torch.Tensor):
        raise DTypeError(expected("x", "a torch.Tensor", type(x).__name__))
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size)
    n = _num_chunks(world_size, sharding)
    dim = _check_dim(x, dim, "x")
    if x.shape[dim] % n:
        raise ShapeError(
            expected(f"x.shape[{dim}]", f"a multiple of {n} ({sharding}, world size {world_size})", x.shape[dim])
        )
    chunks = x.chunk(n, dim=dim) if x.shape[dim] else [x] * n  # chunk() of an empty dim gives one chunk, not n
    per_rank = n // world_size
    order = global_chunk_order(world_size, sharding)[rank * per_rank : (rank + 1) * per_rank]
    return torch.cat([chunks[c] for c in order], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], *, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from every rank's shard, in rank order.

    ``shards``: a non-empty list of tensors of one shape, dtype and device (one per rank), each with a length along
    ``dim`` divisible by 2 (zigzag). Anything else raises DTypeError, ShapeError or DeviceError naming ``shards``.
    """
    if not isinstance(shards, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shards):
        raise DTypeError(expected("shards", "a list of tensors, one per rank", type(shards).__name__))
    if not shards:
        raise ShapeError(expected("shards", "one tensor per rank (at least one)", "an empty sequence"))
    first = shards[0]
    for k, t in enumerate(shards):
        if t.shape != first.shape:
            want = f"shape {tuple(first.shape)} (that of shards[0])"
            raise ShapeError(expected(f"shards[{k}]", want, tuple(t.shape)))
        if t.dtype != first.dtype:
            raise DTypeError(expected(f"shards[{k}]", f"dtype {first.dtype} (that of shards[0])", t.dtype))
        if t.device != first.device:
            raise DeviceError(expected(f"shards[{k}]", f"device {first.device} (that of shards[0])", str(t.device)))
    world_size = len(shards)
    n = _num_chunks(world_size, sharding)
    dim = _check_dim(first, dim, "shards[0]")
    per_rank = n // world_size
    if first.shape[dim] % per_rank:
        raise ShapeError(
            expected(f"shards[0].shape[{dim}]", f"a multiple of {per_rank} ({sharding})", first.shape[dim])
        )
    if not first.shape[dim]:
        return torch.cat(list(shards), dim=dim)
    pieces = [piece for shard in shards for piece in shard.chunk(per_rank, dim=dim)]
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
