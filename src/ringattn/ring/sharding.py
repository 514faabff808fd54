"""Cutting a full sequence into the per-rank shards ring attention expects, and putting it back.

``zigzag`` (Note [ring schedule]): the sequence is cut into ``2W`` equal chunks and rank ``r`` holds
chunks ``r`` and ``2W-1-r``, concatenated in that order. ``contiguous``: rank ``r`` holds the ``r``-th
of ``W`` equal chunks. Packed batches (``*_packed``): every document is cut so, with padding slots where
``2W`` does not divide its length (Note [packed zigzag] in ``schedule.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeviceError, DTypeError, LayoutError, SeqLenError, ShapeError, expected
from .checks import cu_seqlens_error, inspect_cu_seqlens
from .schedule import SHARDINGS, global_chunk_order, packed_local_offsets, packed_slot_positions, packed_slot_tokens


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


# --- packed batches (Note [packed zigzag]) ----------------------------------------------------------------------


def document_lengths(cu_seqlens: Any, *, total: int | None = None, total_name: str = "T") -> list[int]:
    """The document lengths of ``cu_seqlens`` (1-D int64 ``[0, ..., T]``, non-decreasing, on the CPU or a GPU);
    with ``total``, ``T`` must equal it. Raises DTypeError, ShapeError, DeviceError or SeqLenError naming
    ``cu_seqlens``."""
    fields = inspect_cu_seqlens(cu_seqlens)
    error = cu_seqlens_error(fields)
    if error is not None:
        raise error
    values = cu_seqlens.tolist()
    if total is not None and values[-1] != total:
        raise SeqLenError(expected("cu_seqlens", f"a last entry equal to {total_name} = {total}", values[-1]))
    return [b - a for a, b in zip(values, values[1:], strict=False)]


class PackedShard(NamedTuple):
    """What :func:`packed_shard_info` says about one rank's shard of a packed batch (all int64, CPU)."""

    cu_seqlens: torch.Tensor  # (documents + 1,) the shard's own cumulative slot counts, the same on every rank
    position_ids: torch.Tensor  # (T_local,) position of each slot's token in its document; 0 for padding slots
    token_index: torch.Tensor  # (T_local,) index of each slot's token in the packed batch; -1 for padding slots


def _rank_args(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    return _check_int("rank", rank, 0, world_size), world_size


def packed_shard_info(cu_seqlens: torch.Tensor, rank: int, world_size: int) -> PackedShard:
    """Layout of ``rank``'s shard of the packed batch described by ``cu_seqlens`` (global, int64 ``[0, ..., T]``).

    Every document of length ``L`` is cut into ``2 * world_size`` chunks of ``ceil(L / (2 * world_size))`` slots;
    rank r holds chunks r and ``2W-1-r`` of every document, documents in order. Slots past a document's end are
    padding: they attend to nothing and nothing attends to them (:func:`ringattn.ring_attention_varlen`). Returns
    the shard's ``cu_seqlens`` (padding included; ``T_local`` is its last entry), the ``position_ids`` of its slots
    within their documents (for rotary embeddings; 0 on padding slots) and the ``token_index`` of each slot in the
    packed batch (-1 on padding slots). Bad arguments raise the errors of :func:`shard_packed`.
    """
    rank, world_size = _rank_args(rank, world_size)
    lengths = document_lengths(cu_seqlens)
    index = torch.tensor(packed_slot_tokens(lengths, rank, world_size), dtype=torch.int64)
    positions = torch.tensor(packed_slot_positions(lengths, rank, world_size), dtype=torch.int64).clamp_(min=0)
    local_cu = torch.tensor(packed_local_offsets(lengths, world_size), dtype=torch.int64)
    return PackedShard(local_cu, positions, index)


def shard_packed(
    x: torch.Tensor, cu_seqlens: torch.Tensor, rank: int, world_size: int, *, dim: int = 0
) -> torch.Tensor:
    """``rank``'s shard of the packed batch ``x`` (tokens along ``dim``, ``x.shape[dim] == cu_seqlens[-1]``): the
    slots of :func:`packed_shard_info` in order, padding slots zero; a new tensor.

    Raises DTypeError (``x`` not a tensor; ``rank``/``world_size`` not ints; ``cu_seqlens`` not an int64 tensor),
    ShapeError (rank out of range, bad ``dim``, ``cu_seqlens`` not 1-D), DeviceError (``cu_seqlens`` on a device
    whose values cannot be read) or SeqLenError (``cu_seqlens`` not non-decreasing from 0 to ``x.shape[dim]``).
    """
    if not isinstance(x, torch.Tensor):
        raise DTypeError(expected("x", "a torch.Tensor", type(x).__name__))
    rank, world_size = _rank_args(rank, world_size)
    dim = _check_dim(x, dim, "x")
    document_lengths(cu_seqlens, total=x.shape[dim], total_name=f"x.shape[{dim}]")
    index = packed_shard_info(cu_seqlens, rank, world_size).token_index.to(x.device)
    out = x.index_select(dim, index.clamp(min=0))
    shape = [1] * x.dim()
    shape[dim] = -1
    return out.masked_fill_((index < 0).view(shape), 0)  # a new tensor already: in place


def unshard_packed(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`shard_packed`: the packed batch (``cu_seqlens[-1]`` tokens along ``dim``) from every rank's
    shard, in rank order; padding slots are dropped. Bad ``shards`` raise as in :func:`unshard_sequence`, a bad
    ``cu_seqlens`` as in :func:`shard_packed`, shards of the wrong length ShapeError naming ``shards``."""
    if not isinstance(shards, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shards):
        raise DTypeError(expected("shards", "a list of tensors, one per rank", type(shards).__name__))
    if not shards:
        raise ShapeError(expected("shards", "one tensor per rank (at least one)", "an empty sequence"))
    world_size = len(shards)
    dim = _check_dim(shards[0], dim, "shards[0]")
    lengths = document_lengths(cu_seqlens)
    slots = packed_local_offsets(lengths, world_size)[-1]
    for k, t in enumerate(shards):
        if t.dim() != shards[0].dim() or t.shape[dim] != slots:
            want = f"{slots} slots along dim {dim} (the shard of cu_seqlens over {world_size} ranks)"
            raise ShapeError(expected(f"shards[{k}]", want, tuple(t.shape)))
    index = torch.cat([packed_shard_info(cu_seqlens, r, world_size).token_index for r in range(world_size)])
    keep = (index >= 0).nonzero().squeeze(1)
    order = torch.empty(len(keep), dtype=torch.int64)
    order[index[keep]] = keep  # packed token t sits at concatenated slot order[t]
    return torch.cat(list(shards), dim=dim).index_select(dim, order.to(shards[0].device))


def gather_packed(
    x: torch.Tensor, cu_seqlens: torch.Tensor, *, dim: int = 0, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every rank's packed shard ``x`` gathered (all_gather) and unsharded into the packed batch, on every rank.

    Without an initialised process group, the ring of one: ``x`` without its padding slots.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return unshard_packed([x], cu_seqlens, dim=dim)
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_packed(shards, cu_seqlens, dim=dim)
