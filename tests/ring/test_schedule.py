"""Pure schedule and sharding functions (no processes), and message counts through a RingComm double."""

from __future__ import annotations

import itertools

import pytest
import torch

from ringattn.errors import ShapeError
from ringattn.ring import shard_sequence, unshard_sequence
from ringattn.ring.attention import RingOptions, run_ring
from ringattn.ring.schedule import (
    chunks_per_rank,
    global_chunk_order,
    messages_per_rank,
    source_rank,
    step_blocks,
)

WORLD_SIZES = range(1, 7)


def _global_positions(rank: int, world: int, sharding: str, tokens_per_chunk: int) -> list[int]:
    """Global token position of every local token of ``rank``."""
    per_rank = 2 if sharding == "zigzag" else 1
    chunks = global_chunk_order(world, sharding)[rank * per_rank : (rank + 1) * per_rank]
    return [c * tokens_per_chunk + t for c in chunks for t in range(tokens_per_chunk)]


@pytest.mark.parametrize(
    ("causal", "sharding"), [(False, "zigzag"), (False, "contiguous"), (True, "zigzag"), (True, "contiguous")]
)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_blocks_cover_exactly_the_visible_pairs(world: int, causal: bool, sharding: str) -> None:
    """Across ranks and steps, every visible (query, key) pair is computed exactly once, no masked pair."""
    tokens = 3  # per global chunk
    local = tokens * (2 if sharding == "zigzag" else 1)
    chunk = local // chunks_per_rank(causal, sharding)
    seen: list[tuple[int, int]] = []
    for rank, step in itertools.product(range(world), range(world)):
        q_pos = _global_positions(rank, world, sharding, tokens)
        k_pos = _global_positions(source_rank(rank, step, world), world, sharding, tokens)
        for b in step_blocks(rank, step, world, causal=causal, sharding=sharding):
            for i in range(b.q_lo * chunk, b.q_hi * chunk):
                for j in range(b.k_lo * chunk, b.k_hi * chunk):
                    if not (b.causal and j - b.k_lo * chunk > i - b.q_lo * chunk):
                        seen.append((q_pos[i], k_pos[j]))
    total = world * local
    visible = [(i, j) for i in range(total) for j in range(total) if not causal or j <= i]
    assert sorted(seen) == visible


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_step_zero_is_one_block_over_all_queries(world: int) -> None:
    for rank, causal, sharding in itertools.product(range(world), (False, True), ("zigzag", "contiguous")):
        (block,) = step_blocks(rank, 0, world, causal=causal, sharding=sharding)
        n = chunks_per_rank(causal, sharding)
        assert (block.q_lo, block.q_hi, block.k_lo, block.k_hi, block.causal) == (0, n, 0, n, causal)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_zigzag_balances_every_step(world: int) -> None:
    """Score entries per rank and step (a causal block counts half) are the same on every rank."""
    for step in range(world):
        work = set()
        for rank in range(world):
            blocks = step_blocks(rank, step, world, causal=True, sharding="zigzag")
            work.add(sum((b.q_hi - b.q_lo) * (b.k_hi - b.k_lo) / (2 if b.causal else 1) for b in blocks))
        assert work == {2.0}


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1, -2])
def test_shard_unshard_round_trip(world: int, sharding: str, dim: int) -> None:
    x = torch.randn(4 * world, 2 * world, 2 * world, 3)
    shards = [shard_sequence(x, r, world, sharding=sharding, dim=dim) for r in range(world)]
    assert all(s.shape[dim] == x.shape[dim] // world for s in shards)
    assert torch.equal(unshard_sequence(shards, sharding=sharding, dim=dim), x)


def test_zigzag_shard_holds_chunks_r_and_2w_minus_1_minus_r() -> None:
    x = torch.arange(8)
    assert [shard_sequence(x, r, 2, dim=0).tolist() for r in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    with pytest.raises(ShapeError, match="multiple of 4"):
        shard_sequence(torch.arange(6), 0, 2, dim=0)


class LoopbackComm:
    """RingComm double for one rank of a ring: receives what it sends and counts exchanges per tag."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.counts: dict[int, int] = {}

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values)] * self.world_size

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, *, tag: int = 0):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        recv.copy_(send)
        return self

    def wait(self) -> None:
        pass


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_message_counts(world: int, causal: bool) -> None:
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    expected = messages_per_rank(world)
    for rank in range(world):
        comm = LoopbackComm(rank, world)
        run_ring(q, q, q, comm, RingOptions(causal=causal, layout="BSND")).backward(torch.randn(1, 4, 2, 8))
        kv, dkv = expected["forward_kv"] + expected["backward_kv"], expected["backward_dkv"]
        assert comm.counts == ({0: kv, 1: dkv} if world > 1 else {})
