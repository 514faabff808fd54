"""Packed variable-length ring attention (issue 14): schedule arithmetic, shards, and the ring against float64.

Pure functions (Note [packed zigzag]) are checked exhaustively against brute force; the virtual ring and spawned
gloo ranks against single-process float64 attention with a block-diagonal (per-document) causal mask: output, LSE
and dq, dk, dv for a random upstream gradient, document lengths including 0, 1, lengths not divisible by 2W,
documents longer than a shard and shorter than a chunk. Tolerances (atol = rtol, against float64 of the same
rounded inputs), those of ``test_virtual.py``: float64 1e-12; float32 1e-4 (``docs/contract.md``, "Numerics");
bfloat16 3e-2 (each block rounds its output and gradients to bfloat16 once, 2^-8 relative, and gradients sum up to
~40 terms).
"""

from __future__ import annotations

import itertools
import random

import cuda_doubles
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ring_spawn import SoloComm, run_ranks

import ringattn
from ringattn.errors import ConfigError, DeviceError, DTypeError, SeqLenError, ShapeError
from ringattn.ring import blocks, varlen
from ringattn.ring.attention import RingOptions
from ringattn.ring.schedule import (
    packed_block_flops,
    packed_chunk_sizes,
    packed_local_offsets,
    packed_slot_tokens,
    packed_step_blocks,
)
from ringattn.ring.varlen import run_ring_varlen

TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def lengths_for(world: int) -> list[int]:
    """Documents of length 0 (twice, one at the start), 1, 2W + 1 (not divisible), 2W - 1 (shorter than two
    chunks... and than one for W > 1), one longer than a shard, and odd ones."""
    return [0, 1, 2 * world + 1, 7, 0, 2 * world - 1, 41, 3, 12]


def reference(q, k, v, g, cu, *, causal: bool, scale: float):
    """float64 attention over the packed ``(T, N, D)`` batch, block-diagonal (causal) mask: out, lse (N, T),
    dq, dk, dv for the upstream gradient g."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    t, groups = q.shape[0], q.shape[1] // k.shape[1]
    kr, vr = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu.cpu()))
    visible = doc[:, None] == doc[None, :]
    if causal:
        visible &= torch.ones(t, t, dtype=torch.bool).tril()
    s = torch.einsum("qnd,knd->nqk", q, kr).mul(scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("nqk,knd->qnd", torch.softmax(s, dim=-1), vr)
    out.backward(g.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def packed_inputs(lengths, heads, kv_heads, head_dim, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, g = (torch.randn(t, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(t, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    return [x.to(device) for x in (q, k, v, g)], cu


def simulate(q, k, v, g, cu, world, **kw):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = ringattn.simulate_ring_attention(*leaves, world_size=world, cu_seqlens=cu, return_lse=True, **kw)
    return [out.detach(), lse, *torch.autograd.grad(out, leaves, g)]


def check_virtual(lengths, world, dtype=torch.float32, causal=True, heads=4, kv_heads=2, head_dim=16, seed=0, **kw):
    (q, k, v, g), cu = packed_inputs(lengths, heads, kv_heads, head_dim, dtype, seed, kw.pop("device", "cpu"))
    want = reference(*(x.cpu() for x in (q, k, v, g)), cu, causal=causal, scale=head_dim**-0.5)
    got = simulate(q, k, v, g, cu, world, causal=causal, **kw)
    tol = TOL[dtype]
    for name, x, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert x.shape == e.shape, f"{name}: shape {tuple(x.shape)} vs {tuple(e.shape)}"
        torch.testing.assert_close(
            x.double().cpu(), e, atol=tol, rtol=tol, msg=lambda m, n=name: f"W={world} {lengths} {dtype} {n}: {m}"
        )


# --- pure index arithmetic -------------------------------------------------------------------------------------

LENGTH_SETS = [[], [0], [1], [0, 0, 3], [5], [8, 1, 0, 13], [2, 7, 1, 1, 30], list(range(12))]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", range(1, 6))
def test_packed_blocks_compute_exactly_the_visible_pairs(world: int, causal: bool) -> None:
    """Across ranks and steps every visible (query, key) token pair of every document is computed exactly once;
    no padding slot and no pair across documents is ever computed."""
    for lengths in LENGTH_SETS:
        slots = [packed_slot_tokens(lengths, r, world) for r in range(world)]
        seen = []
        for rank, step in itertools.product(range(world), range(world)):
            src = (rank - step) % world
            for b in packed_step_blocks(lengths, rank, step, world, causal=causal):
                for q0, nq, k0, nk in zip(b.q_start, b.q_len, b.k_start, b.k_len, strict=True):
                    assert not b.causal or nq == nk
                    for i, j in itertools.product(range(nq), range(nk)):
                        if not (b.causal and j > i):
                            seen.append((slots[rank][q0 + i], slots[src][k0 + j]))
        starts = [0, *itertools.accumulate(lengths)]
        visible = [
            (a + i, a + j)
            for a, n in zip(starts, lengths, strict=False)
            for i in range(n)
            for j in range(n)
            if not causal or j <= i
        ]
        assert sorted(seen) == sorted(visible), f"W={world} lengths={lengths}"


@pytest.mark.parametrize("world", range(1, 6))
def test_slots_hold_every_token_once(world: int) -> None:
    for lengths in LENGTH_SETS:
        chunks, offsets = packed_chunk_sizes(lengths, world), packed_local_offsets(lengths, world)
        assert chunks == [-(-n // (2 * world)) for n in lengths]
        tokens = []
        for rank in range(world):
            slots = packed_slot_tokens(lengths, rank, world)
            assert len(slots) == offsets[-1] == 2 * sum(chunks)
            tokens += [t for t in slots if t >= 0]
            for a, b in itertools.pairwise(offsets):  # a document's real slots are a prefix of its segment
                real = [t for t in slots[a:b] if t >= 0]
                assert slots[a:b] == real + [-1] * (b - a - len(real))
        assert sorted(tokens) == list(range(sum(lengths)))


def test_work_is_balanced_for_random_document_lengths() -> None:
    """The slowest rank's block FLOPs are within 5% of the mean (issue 14's target) for 16 random documents
    summing to 16384 tokens, W = 2..8, and the count is the brute-force count of computed score entries."""
    rng = random.Random(14)
    for trial, world in itertools.product(range(5), range(2, 9)):
        cuts = sorted(rng.sample(range(1, 16384), 15))
        lengths = [b - a for a, b in itertools.pairwise([0, *cuts, 16384])]
        flops = packed_block_flops(lengths, world, causal=True, heads=8, head_dim=64)
        mean = sum(flops) / world
        assert max(flops) <= 1.05 * mean, f"trial {trial} W={world}: {flops}"
    lengths, world = [0, 1, 9, 17], 2
    entries = [0] * world
    for rank, step in itertools.product(range(world), range(world)):
        for b in packed_step_blocks(lengths, rank, step, world, causal=True):
            for nq, nk in zip(b.q_len, b.k_len, strict=True):
                entries[rank] += sum(1 for i in range(nq) for j in range(nk) if not (b.causal and j > i))
    assert packed_block_flops(lengths, world, causal=True, heads=3, head_dim=5) == [4 * 3 * 5 * e for e in entries]


@pytest.mark.parametrize("world", range(1, 5))
def test_shard_unshard_round_trip(world: int) -> None:
    lengths = lengths_for(world)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    x = torch.randn(3, sum(lengths), 2)
    shards = [ringattn.shard_packed(x, cu, r, world, dim=1) for r in range(world)]
    assert torch.equal(ringattn.unshard_packed(shards, cu, dim=1), x)
    for rank, shard in enumerate(shards):
        info = ringattn.packed_shard_info(cu, rank, world)
        assert info.cu_seqlens.tolist() == packed_local_offsets(lengths, world)
        assert shard.shape[1] == info.cu_seqlens[-1]
        real = info.token_index >= 0
        assert torch.equal(shard[:, real], x[:, info.token_index[real]])
        assert bool((shard[:, ~real] == 0).all())  # padding slots are zero
        starts = cu[:-1][torch.bucketize(info.token_index[real], cu[1:], right=True)]
        assert torch.equal(info.position_ids[real], info.token_index[real] - starts)  # position in the document
        assert bool((info.position_ids[~real] == 0).all())
        for a, b in itertools.pairwise(info.cu_seqlens.tolist()):  # positions rise within each chunk
            half = (b - a) // 2
            for lo in (a, a + half):
                pos = info.position_ids[lo : lo + half][real[lo : lo + half]]
                assert torch.equal(pos, torch.arange(pos[0], pos[0] + len(pos))) if len(pos) else True


@pytest.mark.parametrize(
    ("cu", "error", "fragment"),
    [
        ([0, 3, 8], None, None),
        ("nope", DTypeError, "cu_seqlens: expected a 1-D int64"),
        (torch.tensor([0, 3, 8], dtype=torch.int32), DTypeError, "cu_seqlens: expected dtype torch.int64"),
        (torch.tensor([[0, 3, 8]]), ShapeError, "cu_seqlens: expected a 1-D"),
        (torch.tensor([1, 3, 8]), SeqLenError, "cu_seqlens: expected a first entry of 0"),
        (torch.tensor([0, 5, 3, 8]), SeqLenError, "cu_seqlens: expected non-decreasing"),
        (torch.tensor([0, 3, 9]), SeqLenError, "cu_seqlens: expected a last entry equal to"),
        (torch.tensor([0, 3, 8], device="meta"), DeviceError, "cu_seqlens: expected a CPU or CUDA"),
    ],
)
def test_bad_cu_seqlens_named_in_every_entry_point(cu, error, fragment) -> None:
    cu = torch.tensor(cu) if isinstance(cu, list) else cu
    x = torch.randn(8, 2, 8)
    calls = [
        lambda: ringattn.shard_packed(x, cu, 0, 2),
        lambda: ringattn.simulate_ring_attention(x, x, x, world_size=2, cu_seqlens=cu),
    ]
    if error is None:
        for call in calls:
            call()
        return
    for call in calls:
        with pytest.raises(error, match=fragment.replace("(", r"\(")):
            call()
    if error is not SeqLenError or "last entry" not in fragment:  # the shard's own length is checked otherwise
        with pytest.raises(error, match=fragment.split(":")[0]):
            ringattn.ring_attention_varlen(x, x, x, cu)


def test_shard_length_mismatch_and_other_errors() -> None:
    x = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 5, 10])  # W = 1: 6 + 10 slots
    with pytest.raises(ShapeError, match="cu_seqlens: expected documents whose shards over 1 ranks hold q's 10"):
        ringattn.ring_attention_varlen(x, x, x, cu)
    with pytest.raises(ShapeError, match="k: expected 16 tokens like q"):
        ringattn.ring_attention_varlen(torch.randn(16, 2, 8), x, x, cu)
    with pytest.raises(ShapeError, match="q: expected a 3-D tensor"):
        ringattn.ring_attention_varlen(x[None], x, x, cu)
    with pytest.raises(ShapeError, match="k.shape\\[0\\]"):
        ringattn.simulate_ring_attention(x, x[:5], x[:5], world_size=2, cu_seqlens=cu)
    with pytest.raises(ShapeError, match="shards\\[1\\]"):
        ringattn.unshard_packed([torch.zeros(6), torch.zeros(5)], torch.tensor([0, 10]))
    with pytest.raises(ShapeError, match="rank"):
        ringattn.shard_packed(x, cu, 2, 2)


# --- the ring ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world", "dtype", "causal", "heads", "kv_heads", "head_dim"),
    [
        (1, torch.float64, True, 2, 1, 8),
        (2, torch.float32, True, 3, 1, 13),  # MQA, odd N and D
        (2, torch.float64, False, 4, 4, 8),
        (3, torch.bfloat16, True, 6, 2, 16),  # GQA
        (3, torch.float32, False, 2, 1, 8),
        (4, torch.float64, True, 4, 2, 8),
        (4, torch.float32, True, 4, 2, 16),
    ],
)
def test_virtual_ring_matches_block_diagonal_float64_attention(world, dtype, causal, heads, kv_heads, head_dim):
    check_virtual(lengths_for(world), world, dtype, causal, heads, kv_heads, head_dim, seed=world)


@settings(max_examples=8, deadline=None)
@given(
    world=st.integers(1, 4),
    lengths=st.lists(st.integers(0, 20), min_size=0, max_size=5),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_virtual_ring_property(world, lengths, causal, dtype, seed) -> None:
    check_virtual(lengths, world, dtype, causal, seed=seed)


def test_documents_do_not_see_each_other() -> None:
    """Perturbing one document's keys and values moves its own outputs and nobody else's (bitwise)."""
    world, lengths = 3, lengths_for(3)
    (q, k, v, _), cu = packed_inputs(lengths, 4, 2, 16, torch.float32, seed=5)
    base = ringattn.simulate_ring_attention(q, k, v, world_size=world, cu_seqlens=cu)
    doc = slice(int(cu[6]), int(cu[7]))  # the 41-token document
    k2, v2 = k.clone(), v.clone()
    k2[doc] += torch.randn_like(k2[doc])
    v2[doc] += 1.0
    moved = ringattn.simulate_ring_attention(q, k2, v2, world_size=world, cu_seqlens=cu)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[doc] = False
    assert torch.equal(moved[others], base[others])
    assert not torch.allclose(moved[doc], base[doc])


def test_empty_batch_and_zero_length_documents() -> None:
    for lengths in ([], [0, 0]):
        (q, k, v, g), cu = packed_inputs(lengths, 2, 1, 8, torch.float32, seed=1)
        out, lse, dq, dk, dv = simulate(q, k, v, g, cu, 3)
        assert out.shape == (0, 2, 8) and lse.shape == (2, 0) and dk.shape == (0, 1, 8)


def test_ring_of_one_pads_odd_documents() -> None:
    """Without a process group: the W = 1 shard (one padding slot per odd document) is a valid input; padding rows
    come out empty (0, -inf) with zero gradients."""
    lengths = [3, 4]
    (q, k, v, g), cu = packed_inputs(lengths, 2, 2, 8, torch.float64, seed=2)
    want = reference(q, k, v, g, cu, causal=True, scale=8**-0.5)
    shards = [ringattn.shard_packed(x, cu, 0, 1).requires_grad_() for x in (q, k, v)]
    out, lse = ringattn.ring_attention_varlen(*shards, cu, return_lse=True)
    out.backward(ringattn.shard_packed(g, cu, 0, 1))
    pad = ringattn.packed_shard_info(cu, 0, 1).token_index < 0
    assert int(pad.sum()) == 1 and bool((out[pad] == 0).all()) and bool((lse[:, pad] == float("-inf")).all())
    assert all(bool((x.grad[pad] == 0).all()) for x in shards)
    for got, e in zip([out, lse.T, *(x.grad for x in shards)], [want[0], want[1].T, *want[2:]], strict=True):
        torch.testing.assert_close(ringattn.unshard_packed([got], cu), e.to(got.dtype), atol=1e-12, rtol=1e-12)


# --- the CUDA FlashAttention-2 varlen path, through CPU doubles (Note [packed blocks]) ---------------------------


@pytest.fixture
def cuda_path(monkeypatch):
    cuda_doubles.install(monkeypatch)


@pytest.mark.parametrize(("world", "causal", "impl"), [(1, True, "auto"), (3, True, "flash"), (2, False, "auto")])
def test_flash_varlen_path_through_its_double(cuda_path, monkeypatch, world, causal, impl) -> None:
    calls = []
    for name in ("flash_varlen", "flash_varlen_backward"):
        double = blocks.ATEN[name]
        monkeypatch.setitem(blocks.ATEN, name, lambda *a, _d=double, _n=name, **kw: calls.append(_n) or _d(*a, **kw))
    assert varlen.resolve_packed_impl("auto", torch.device("cpu"), torch.bfloat16, 16) == "flash"
    check_virtual(lengths_for(world), world, torch.bfloat16, causal, heads=4, kv_heads=2, impl=impl, seed=world)
    assert "flash_varlen" in calls and "flash_varlen_backward" in calls


def test_cudnn_runs_per_document_on_cuda(cuda_path) -> None:
    check_virtual(lengths_for(2), 2, torch.bfloat16, True, heads=4, kv_heads=2, impl="cudnn", seed=3)


def test_planted_int64_cumulative_lengths_fail_the_double(cuda_path, monkeypatch) -> None:
    """FA2 reads its cumulative lengths as int32: handing it int64 ones must fail the double."""
    real = varlen._gather_index

    def int64_lengths(starts, lengths):
        index, cu = real(starts, lengths)
        return index, cu.astype("int64")

    monkeypatch.setattr(varlen, "_gather_index", int64_lengths)
    with pytest.raises(AssertionError, match="int32 cumulative lengths"):
        check_virtual(lengths_for(2), 2, torch.bfloat16, True, impl="flash")


# --- spawned gloo ranks ---------------------------------------------------------------------------------------


def _rank_checks(rank: int, world: int) -> None:
    for i, (dtype, causal, heads, kv_heads) in enumerate(
        [(torch.float64, True, 4, 2), (torch.float32, False, 3, 1), (torch.float32, True, 2, 2)]
    ):
        lengths = lengths_for(world)
        (q, k, v, g), cu = packed_inputs(lengths, heads, kv_heads, 8, dtype, seed=40 + i)
        want = reference(q, k, v, g, cu, causal=causal, scale=8**-0.5)
        shards = [ringattn.shard_packed(x, cu, rank, world).requires_grad_() for x in (q, k, v)]
        out, lse = ringattn.ring_attention_varlen(*shards, cu, causal=causal, return_lse=True)
        out.backward(ringattn.shard_packed(g, cu, rank, world))
        tol = TOL[dtype]
        got = [out, lse, *(x.grad for x in shards)]
        for name, x, e, dim in zip(("out", "lse", "dq", "dk", "dv"), got, want, (0, 1, 0, 0, 0), strict=True):
            mine = ringattn.shard_packed(e, cu, rank, world, dim=dim)
            if name == "lse":  # padding slots: -inf, as the sharded reference cannot say
                pad = ringattn.packed_shard_info(cu, rank, world).token_index < 0
                mine[:, pad] = float("-inf")
            torch.testing.assert_close(x.double(), mine, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
        full = ringattn.gather_packed(out.detach(), cu)
        torch.testing.assert_close(full.double(), want[0], atol=tol, rtol=tol)
    if world > 1:
        x = ringattn.shard_packed(torch.randn(16, 2, 8), torch.tensor([0, 16]), rank, world)
        good = torch.tensor([0, 16])
        last = world - 1
        with pytest.raises(DTypeError, match=f"cu_seqlens \\(rank {last}\\): expected dtype torch.int64"):
            ringattn.ring_attention_varlen(x, x, x, good.int() if rank == last else good)
        with pytest.raises(SeqLenError, match="cu_seqlens \\(rank 0\\): expected non-decreasing"):
            ringattn.ring_attention_varlen(x, x, x, torch.tensor([0, 17, 16]) if rank == 0 else good)
        with pytest.raises(ShapeError, match=f"cu_seqlens \\(rank {last}\\): expected documents whose shards"):
            ringattn.ring_attention_varlen(x, x, x, torch.tensor([0, 16 + 2 * world]) if rank == last else good)
        with pytest.raises(DeviceError, match="cu_seqlens \\(rank 0\\): expected a CPU or CUDA tensor"):
            ringattn.ring_attention_varlen(x, x, x, good.to("meta") if rank == 0 else good)
        with pytest.raises(ConfigError, match=f"cu_seqlens \\(rank {last}\\): expected the same values"):
            ringattn.ring_attention_varlen(x, x, x, torch.tensor([0, 0, 16]) if rank == last else good)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gloo_ranks_match_block_diagonal_float64_attention(world_size: int, tmp_path) -> None:
    run_ranks(_rank_checks, world_size, tmp_path)


def test_solo_comm_is_a_ring_of_one() -> None:
    (q, k, v, _), cu = packed_inputs([5, 2], 2, 2, 8, torch.float64, seed=3)
    q, k, v = (ringattn.shard_packed(x, cu, 0, 1) for x in (q, k, v))
    assert torch.equal(
        run_ring_varlen(q, k, v, cu, SoloComm(), RingOptions(causal=True, layout="TND")),
        ringattn.ring_attention_varlen(q, k, v, cu),
    )


# --- a GPU, when there is one (the LEAD's CUDA session) -----------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("dtype", "impl"),
    [(torch.bfloat16, "auto"), (torch.float16, "flash"), (torch.bfloat16, "cudnn"), (torch.float32, "auto")],
)
def test_varlen_ring_on_cuda(dtype, impl) -> None:
    """The virtual ring on the GPU: FlashAttention-2's varlen kernels (auto / flash for fp16/bf16), per-document
    cuDNN and memory-efficient (float32) blocks, against float64 block-diagonal attention, forward and backward;
    W = 1..4, documents of length 0, 1, odd, longer than a shard; GQA; head size 64."""
    for world in (1, 2, 4):
        lengths = [0, 1, 2 * world + 1, 0, 300, 77, 5, 1000]
        check_virtual(lengths, world, dtype, True, heads=8, kv_heads=2, head_dim=64, impl=impl, seed=world,
                      device="cuda")  # fmt: skip


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_bench_varlen_case_agrees_with_single_process_attention() -> None:
    """``ringattn bench ring --documents``: the ring's gathered gradients and the block-diagonal mask's agree with
    the per-document SDPA reference (the correctness check the benchmark runs before timing)."""
    from ringattn.bench import ring as bench_ring

    case = bench_ring.Case(world_size=2, seq_len=40, heads=2, head_dim=8, repeats=1, documents=5)
    lengths = bench_ring.random_document_lengths(case)
    assert len(lengths) == 5 and sum(lengths) == 40 and min(lengths) >= 1
    rows = {r["provider"]: r for r in bench_ring.measure(case, ("single", "single-mask", "ringattn"))}
    assert set(rows) == {"single", "single-mask", "ringattn"}
    assert rows["ringattn"]["max_abs_diff"] < 1e-5 and rows["single-mask"]["max_abs_diff"] < 1e-5


def test_simulate_defaults_to_the_simulated_function_s_causal() -> None:
    """``simulate_ring_attention(cu_seqlens=...)`` is causal by default, as ``ring_attention_varlen`` is (the dense
    ring's default stays non-causal)."""
    (q, k, v, _), cu = packed_inputs([7, 5], 2, 2, 8, torch.float64, seed=4)
    packed = ringattn.simulate_ring_attention(q, k, v, world_size=2, cu_seqlens=cu)
    assert torch.equal(packed, ringattn.simulate_ring_attention(q, k, v, world_size=2, cu_seqlens=cu, causal=True))
    assert not torch.allclose(
        packed, ringattn.simulate_ring_attention(q, k, v, world_size=2, cu_seqlens=cu, causal=False)
    )
    dense = [x[None, :12] for x in (q, k, v)]
    assert torch.equal(
        ringattn.simulate_ring_attention(*dense, world_size=2, layout="BSND"),
        ringattn.simulate_ring_attention(*dense, world_size=2, causal=False, layout="BSND"),
    )


def test_non_contiguous_shards() -> None:
    """A strided q and head-major k/v (any strides) give the same result, forward and backward."""
    (q, k, v, g), cu = packed_inputs([5, 0, 9, 1], 4, 2, 16, torch.float32, seed=3)
    want = reference(q, k, v, g, cu, causal=True, scale=0.25)
    q1 = ringattn.shard_packed(q, cu, 0, 1)
    strided = torch.cat([q1, q1], dim=-1)[..., :16].requires_grad_()
    k1, v1 = (ringattn.shard_packed(x, cu, 0, 1).transpose(0, 1).contiguous().transpose(0, 1) for x in (k, v))
    assert not (strided.is_contiguous() or k1.is_contiguous())
    out = ringattn.ring_attention_varlen(strided, k1, v1, cu)
    out.backward(ringattn.shard_packed(g, cu, 0, 1))
    for got, e in ((out, want[0]), (strided.grad, want[2])):
        torch.testing.assert_close(ringattn.unshard_packed([got], cu).double(), e, atol=1e-4, rtol=1e-4)
