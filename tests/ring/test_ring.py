"""Ring attention on spawned gloo ranks against a single-process float64 reference.

Every rank builds the full inputs from one seed, computes the float64 reference locally and checks
its own shard: output, LSE and dq, dk, dv for a random upstream gradient. One spawn per world size
runs the whole grid.

Tolerances (atol = rtol, against float64 on the same rounded inputs): float64 1e-12 (pure rounding
of a few sums); float32 1e-4 and float16 1e-3 (``docs/contract.md``, "Numerics"); bfloat16 3e-2, because every block
kernel rounds its output and gradients to bfloat16 once (2^-8 relative) and gradients sum S terms.
On top, the ring's error must stay within 2x the error of the same code as a ring of one on the whole
sequence (plus a floor of tol / 10), so error cannot grow with the world size.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from ring_spawn import SoloComm, reference, run_ranks

import ringattn
from ringattn.errors import BackendError, ConfigError, DTypeError, LayoutError, ShapeError
from ringattn.ring import ring_attention, shard_sequence
from ringattn.ring.attention import RingOptions, run_ring
from ringattn.ring.comm import RingComm
from ringattn.ring.schedule import messages_per_rank

SEQ_LEN = 48  # divisible by 2W for W = 1..4
TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    causal: bool
    sharding: str = "zigzag"
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 16
    layout: str = "BSND"
    impl: str = "auto"
    strided: bool = False  # pass q as a non-contiguous view


CASES = [
    Case(torch.float32, causal=False, batch=2, strided=True),
    Case(torch.float32, causal=True, heads=3, kv_heads=1, head_dim=13),  # MQA, odd N and D
    Case(torch.float32, causal=True, impl="torch", heads=6, kv_heads=3),
    Case(torch.float32, causal=True, sharding="contiguous", heads=5, kv_heads=5, layout="BNSD"),
    Case(torch.bfloat16, causal=True, heads=6, kv_heads=2),  # GQA
    Case(torch.float16, causal=False, heads=4, kv_heads=2, head_dim=8),
    Case(torch.float64, causal=True, batch=2, heads=2, kv_heads=1, head_dim=8),  # torch impl (auto)
    Case(torch.float64, causal=True, sharding="contiguous", heads=3, kv_heads=3, impl="sdpa"),
]


class CountingComm(RingComm):
    """The real ring, counting exchanges per tag."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[int, int] = {}

    def exchange(self, send, recv, *, tag=0):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        return super().exchange(send, recv, tag=tag)


def _inputs(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    b, n, nkv, d = case.batch, case.heads, case.kv_heads, case.head_dim

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(b, SEQ_LEN, heads, d, generator=gen).to(case.dtype)

    return randn(n), randn(nkv), randn(nkv), randn(n)


def _run(case: Case, q, k, v, g, rank: int, world: int, comm):
    """Ring attention on this rank's shard: ``out, lse, dq, dk, dv``, all in BSND order."""
    q, k, v, g = (shard_sequence(x, rank, world, sharding=case.sharding) for x in (q, k, v, g))
    if case.strided:
        q = torch.cat([q, q], dim=-1)[..., : q.shape[-1]]
        assert not q.is_contiguous()
    if case.layout == "BNSD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    options = RingOptions(causal=case.causal, layout=case.layout, sharding=case.sharding, impl=case.impl)
    out, lse = run_ring(q, k, v, comm if comm is not None else RingComm(None), options, return_lse=True)
    if case.layout == "BNSD":
        out.backward(g.transpose(1, 2))
        return out.transpose(1, 2), lse, *(x.grad.transpose(1, 2) for x in (q, k, v))
    out.backward(g)
    return out, lse, q.grad, k.grad, v.grad


def _errors(results, expected) -> list[float]:
    return [(r.to(torch.float64) - e).abs().max().item() for r, e in zip(results, expected, strict=True)]


def _check_case(case: Case, seed: int, rank: int, world: int) -> None:
    q, k, v, g = _inputs(case, seed)
    ref = reference(q, k, v, g, causal=case.causal, scale=case.head_dim**-0.5)
    dims = (1, 2, 1, 1, 1)  # sequence dim of out, lse, dq, dk, dv
    mine = [shard_sequence(r, rank, world, sharding=case.sharding, dim=d) for r, d in zip(ref, dims, strict=True)]
    comm = CountingComm() if world > 1 else SoloComm()
    got = _run(case, q, k, v, g, rank, world, comm)
    tol = TOL[case.dtype]
    for name, x, e in zip(("out", "lse", "dq", "dk", "dv"), got, mine, strict=True):
        torch.testing.assert_close(x.to(torch.float64), e, atol=tol, rtol=tol, msg=lambda m, n=name: f"{case} {n}: {m}")
    # Error growth: the same code as a ring of one on the whole sequence, compared on this rank's rows.
    solo = [
        shard_sequence(r, rank, world, sharding=case.sharding, dim=d)
        for r, d in zip(_run(case, q, k, v, g, 0, 1, SoloComm()), dims, strict=True)
    ]
    for name, ring_err, solo_err in zip(
        "out lse dq dk dv".split(), _errors(got, mine), _errors(solo, mine), strict=True
    ):
        assert ring_err <= 2 * solo_err + tol / 10, f"{case} {name}: ring error {ring_err} vs one rank {solo_err}"
    if world > 1:
        expected_counts = messages_per_rank(world)
        assert comm.counts == {
            0: expected_counts["forward_kv"] + expected_counts["backward_kv"],
            1: expected_counts["backward_dkv"],
        }


def _check_mismatches(rank: int, world: int) -> None:
    """Bad inputs on one rank raise the same error on every rank (the group stays usable)."""
    q = k = v = torch.randn(1, 8, 2, 4)
    last = world - 1
    with pytest.raises(ShapeError, match=f"k \\(rank {last}\\)"):
        short = rank == last
        ring_attention(q, k[:, :4] if short else k, v[:, :4] if short else v, causal=False, layout="BSND")
    with pytest.raises(DTypeError, match="v \\(rank 0\\)"):
        ring_attention(q, k, v.double() if rank == 0 else v, layout="BSND")
    with pytest.raises(ShapeError, match="q \\(rank 0\\).*4-D"):
        ring_attention(q[0] if rank == 0 else q, k, v, layout="BSND")
    with pytest.raises(ConfigError, match=f"causal \\(rank {last}\\)"):
        ring_attention(q, k, v, causal=rank != last, layout="BSND")
    # Options are checked in the same all-gather: a bad value on one rank raises on every rank.
    with pytest.raises(LayoutError, match=f"sharding \\(rank {last}\\)"):
        ring_attention(q, k, v, causal=True, sharding="zig" if rank == last else "zigzag", layout="BSND")
    with pytest.raises(BackendError, match="impl \\(rank 0\\)"):
        ring_attention(q, k, v, impl="fast" if rank == 0 else "auto", layout="BSND")
    with pytest.raises(LayoutError, match=f"layout \\(rank {last}\\)"):
        ring_attention(q, k, v, layout="SBH" if rank == last else "BSND")
    with pytest.raises(ConfigError, match=f"softmax_scale \\(rank {last}\\)"):
        ring_attention(q, k, v, softmax_scale=0.5 if rank == last else None, layout="BSND")
    with pytest.raises(ConfigError, match=f"requires_grad \\(rank {last}\\)"):
        ring_attention(q.detach().requires_grad_(rank != last), k, v, layout="BSND")


def _check_empty_shards(rank: int, world: int) -> None:
    """A zero-length local sequence is a valid shard (PyTorch's CPU flash kernel dies of SIGFPE on one)."""
    empty = torch.randn(1, 0, 2, 4, requires_grad=True)
    for causal in (False, True):
        out, lse = ring_attention(empty, empty, empty, causal=causal, return_lse=True, layout="BSND")
        out.backward(torch.randn_like(out))
        assert out.shape == (1, 0, 2, 4) and lse.shape == (1, 2, 0) and empty.grad.shape == empty.shape
    q = torch.randn(1, 4, 2, 4, requires_grad=True)  # queries that see no key at all: an empty result
    out, lse = ring_attention(q, empty, empty, return_lse=True, layout="BSND")
    out.backward(torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    assert torch.equal(q.grad, torch.zeros_like(q))


def _check_all(rank: int, world: int) -> None:
    for i, case in enumerate(CASES):
        _check_case(case, seed=1000 + i, rank=rank, world=world)
    _check_empty_shards(rank, world)
    if world > 1:
        _check_mismatches(rank, world)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_matches_reference(world_size: int, tmp_path) -> None:
    run_ranks(_check_all, world_size, tmp_path)


@pytest.mark.timeout(60)
def test_without_process_group_is_plain_attention() -> None:
    case = Case(torch.float32, causal=True)
    q, k, v, g = _inputs(case, seed=7)
    ref = reference(q, k, v, g, causal=True, scale=0.25)
    got = _run(case, q, k, v, g, 0, 1, None)
    for x, e in zip(got, ref, strict=True):
        torch.testing.assert_close(x.to(torch.float64), e, atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(60)
def test_local_errors_without_process_group() -> None:
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ShapeError, match="head count dividing"):
        ring_attention(torch.randn(1, 6, 3, 4), q, q, layout="BSND")
    with pytest.raises(DTypeError, match="float16, bfloat16, float32 or float64"):
        ring_attention(q.int(), q.int(), q.int(), layout="BSND")
    with pytest.raises(LayoutError, match="layout"):
        ring_attention(q, q, q, layout="SBH")


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_ring_of_one_takes_any_causal_length(sharding) -> None:
    """A ring of one needs no chunks: an odd causal length is plain causal attention (issue 22 item 7)."""
    q, k, v, g = (torch.randn(1, 7, 2, 8, dtype=torch.float64) for _ in range(4))
    want = reference(q, k, v, g, causal=True, scale=8**-0.5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*leaves, causal=True, sharding=sharding, layout="BSND", return_lse=True)
    out.backward(g)
    for got, exp in zip((out.detach(), lse, *(x.grad for x in leaves)), want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-12)
    virtual = ringattn.simulate_ring_attention(q, k, v, world_size=1, causal=True, sharding=sharding, layout="BSND")
    torch.testing.assert_close(virtual, want[0], atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("process_group", [False, True], ids=["no-group", "nccl-group-of-one"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ring_attention_on_cuda(process_group, dtype):
    """Ring attention on the GPU (a ring of one here: NCCL needs one GPU per rank), fused CUDA flash blocks
    for bfloat16 and plain-torch blocks for float32, against float64 attention, forward and backward."""
    gen = torch.Generator().manual_seed(8)
    b, s, n, nkv, d = 2, 256, 8, 2, 64
    q, g = (torch.randn(b, s, n, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, s, nkv, d, generator=gen).to(dtype) for _ in range(2))
    want_out, want_lse, *want_grads = reference(q, k, v, g, causal=True, scale=d**-0.5)
    leaves = [t.to("cuda").requires_grad_() for t in (q, k, v)]
    with tempfile.TemporaryDirectory() as tmp:
        if process_group:
            store = dist.FileStore(os.path.join(tmp, "store"), 1)
            dist.init_process_group(
                "nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", torch.cuda.current_device())
            )
        try:
            out, lse = ring_attention(*leaves, causal=True, return_lse=True, layout="BSND")
            grads = torch.autograd.grad(out, leaves, g.to("cuda"))
        finally:
            if process_group:
                dist.destroy_process_group()
    tol = {torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=1e-4, atol=1e-4)
    for name, got, exp in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        torch.testing.assert_close(got.double().cpu(), exp, rtol=tol, atol=tol, msg=lambda m, w=name: f"{w}: {m}")
