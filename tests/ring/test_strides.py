"""Every attention entry point on views with odd strides on every dimension, the head dimension included.

ATen's CPU flash kernel reads q, k, v and out as if their stride along D were 1 (Note [block kernels] in
``ring/blocks.py``: NaN or relative errors of 0.6-3.6 otherwise). The block layer copies such views before the
call. Here each entry point (block attention in every layout, the ring at W = 1 and over gloo, the virtual
ring dense and packed, the packed ring, the merges) runs on the same values in four memory layouts (contiguous,
D outermost, every dimension strided by 2 with D among them, every dimension reversed), with the upstream
gradient in the same layout, against float64 autograd. A CPU double of the flash kernels asserts the contract at
every call (a planted violation must fail it).

Tolerance: float32 outputs and gradients within 1e-5 of float64, relative to the reference's largest magnitude
(the fused kernel accumulates in float32 over at most 24 keys: errors of a few 1e-7; a misread stride gives 0.6+).
"""

from __future__ import annotations

import pytest
import torch
from ring_spawn import run_ranks

import ringattn
from inputs import strided_copy
from ringattn.ring import blocks

REL_TOL = 1e-5
B, N, NKV, D = 2, 4, 2, 16
VIEWS = ("contiguous", "d_outermost", "gap", "transposed")


def as_view(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x``'s values in memory layout ``how`` (Module docstring)."""
    if how == "contiguous":
        return x.contiguous()
    if how == "d_outermost":  # k.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) and the like
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    return strided_copy(x, how)


def attention64(q, k, v, mask):
    """float64 ``(out, lse)`` of ``(B, S, N, D)`` tensors (GQA repeated) under a boolean ``(Sq, Sk)`` keep-mask."""
    groups = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    s = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


def causal_mask(s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril()


def document_mask(cu: list[int], causal: bool) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    same = doc[:, None] == doc[None, :]
    return same & causal_mask(cu[-1]) if causal else same


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    assert err <= REL_TOL * scale, f"{what}: error {err:.3g} relative {err / scale:.3g} > {REL_TOL}"


def check(fn, q, k, v, mask, how: str, what: str) -> None:
    """``fn(q, k, v) -> out (B, S, N, D)`` on ``how`` views of the inputs and of the upstream gradient."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(q.shape, generator=gen)
    leaves = [as_view(x, how).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, as_view(g, how))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out64, _ = attention64(*ref, mask)
    want = [out64.detach(), *torch.autograd.grad(out64, ref, g.double())]
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, *grads), want, strict=True):
        assert_close_rel(got.detach(), exp, f"{what} ({how}) {name}")


def random_qkv(seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, seq, heads, D, generator=gen) for heads in (N, NKV, NKV)]


@pytest.fixture
def flash_contract(monkeypatch):
    """The CPU flash kernels behind doubles that assert their stride contract, then run the real kernel."""
    real_fwd, real_bwd = blocks.ATEN["flash_cpu"], blocks.ATEN["flash_cpu_backward"]
    calls = []

    def require_unit_d(names, tensors):
        for name, t in zip(names, tensors, strict=True):
            assert t.stride(-1) == 1 or t.shape[-1] <= 1, f"CPU flash: {name} needs unit stride along D: {t.stride()}"

    def forward(q, k, v, *args, **kwargs):
        require_unit_d("qkv", (q, k, v))
        calls.append("forward")
        return real_fwd(q, k, v, *args, **kwargs)

    def backward(do, q, k, v, out, *args, **kwargs):
        require_unit_d(("dout", "q", "k", "v", "out"), (do, q, k, v, out))
        calls.append("backward")
        return real_bwd(do, q, k, v, out, *args, **kwargs)

    monkeypatch.setitem(blocks.ATEN, "flash_cpu", forward)
    monkeypatch.setitem(blocks.ATEN, "flash_cpu_backward", backward)
    yield calls
    assert "forward" in calls and "backward" in calls, "the fused CPU kernels never ran"


@pytest.mark.parametrize("how", VIEWS)
@pytest.mark.parametrize("layout", ["BSND", "BNSD", "TND"])
def test_block_attention(flash_contract, how, layout) -> None:
    q, k, v = random_qkv(12, seed=1)
    if layout == "TND":  # two batches of 12 tokens, packed
        cu = [0, 12, 24]

        def fn(q, k, v):
            q3, k3, v3 = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
            out, _ = ringattn.block_attention(
                q3, k3, v3, layout="TND", causal=True, actual_seq_qlen=cu, actual_seq_kvlen=cu
            )
            return out.reshape(q.shape)

        q, k, v = (x.reshape(1, 24, *x.shape[2:]) for x in (q, k, v))
        check(fn, q, k, v, document_mask(cu, causal=True), how, "block_attention TND")
        return

    def fn(q, k, v):
        if layout == "BNSD":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out, _ = ringattn.block_attention(q, k, v, layout=layout, causal=True)
        return out.transpose(1, 2) if layout == "BNSD" else out

    check(fn, q, k, v, causal_mask(12), how, f"block_attention {layout}")


@pytest.mark.parametrize("how", VIEWS)
@pytest.mark.parametrize(("world", "causal", "layout"), [(2, True, "BSND"), (3, False, "BNSD")])
def test_virtual_ring(flash_contract, how, world, causal, layout) -> None:
    q, k, v = random_qkv(12, seed=2)

    def fn(q, k, v):
        if layout == "BNSD":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out = ringattn.simulate_ring_attention(q, k, v, world_size=world, causal=causal, layout=layout)
        return out.transpose(1, 2) if layout == "BNSD" else out

    mask = causal_mask(12) if causal else torch.ones(12, 12, dtype=torch.bool)
    check(fn, q, k, v, mask, how, f"simulate_ring_attention W={world}")


@pytest.mark.parametrize("how", VIEWS)
def test_packed_rings(flash_contract, how) -> None:
    """The virtual packed ring at W = 2 and ``ring_attention_varlen`` as a ring of one (its W = 1 slots)."""
    cu = [0, 5, 17, 24]
    q, k, v = (x[:1].reshape(1, 24, *x.shape[2:]) for x in random_qkv(24, seed=3))
    cu_t = torch.tensor(cu)

    def virtual(q, k, v):
        return ringattn.simulate_ring_attention(q[0], k[0], v[0], world_size=2, cu_seqlens=cu_t).unsqueeze(0)

    check(virtual, q, k, v, document_mask(cu, causal=True), how, "simulate_ring_attention packed W=2")

    def solo(q, k, v):
        shards = [as_view(ringattn.shard_packed(x[0], cu_t, 0, 1), how) for x in (q, k, v)]
        out = ringattn.ring_attention_varlen(*shards, cu_t)
        return ringattn.unshard_packed([out], cu_t).unsqueeze(0)

    check(solo, q, k, v, document_mask(cu, causal=True), how, "ring_attention_varlen W=1")


@pytest.mark.parametrize("how", VIEWS)
def test_ring_of_one(flash_contract, how) -> None:
    q, k, v = random_qkv(12, seed=4)
    check(lambda q, k, v: ringattn.ring_attention(q, k, v, causal=True, layout="BSND"), q, k, v, causal_mask(12),
          how, "ring_attention W=1")  # fmt: skip


def _gloo_rank(rank: int, world_size: int) -> None:
    q, k, v = random_qkv(16, seed=5)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(q.shape, generator=gen)
    shard = [ringattn.shard_sequence(x, rank, world_size) for x in (q, k, v, g)]
    leaves = [as_view(x, "d_outermost").requires_grad_() for x in shard[:3]]
    out = ringattn.ring_attention(*leaves, causal=True, layout="BSND")
    grads = torch.autograd.grad(out, leaves, as_view(shard[3], "d_outermost"))
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    out64, _ = attention64(*ref, causal_mask(16))
    want = [out64.detach(), *torch.autograd.grad(out64, ref, g.double())]
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, *grads), want, strict=True):
        assert_close_rel(got.detach(), ringattn.shard_sequence(exp, rank, world_size), f"gloo rank {rank} {name}")


@pytest.mark.distributed
def test_gloo_ring_with_a_strided_head_dim(tmp_path) -> None:
    """The probe of the issue: real ranks with ``k.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)`` views."""
    run_ranks(_gloo_rank, 2, tmp_path)


@pytest.mark.parametrize("how", VIEWS)
def test_merge_states(how) -> None:
    """Two key blocks merged: attention over both, gradients included, on strided parts and LSEs."""
    q, k, v = random_qkv(12, seed=6)

    def fn(q, k, v):
        parts = [ringattn.block_attention(q, k[:, a:b], v[:, a:b], layout="BSND") for a, b in ((0, 5), (5, 12))]
        outs = [as_view(o, how) for o, _ in parts]
        lses = [as_view(lse, how) for _, lse in parts]
        out, _ = ringattn.merge_states(outs, lses, layout="BSND", lse_layout="BNS", lse_base="e")
        return out

    check(fn, q, k, v, torch.ones(12, 12, dtype=torch.bool), how, "merge_states")


def test_the_double_catches_a_misread_head_dim(flash_contract, monkeypatch) -> None:
    """Without the block layer's copy, a view with D outermost reaches the kernel: the contract double fails."""
    monkeypatch.setattr(blocks, "_cpu_layout", lambda x: x)
    q, k, v = (as_view(x, "d_outermost") for x in random_qkv(12, seed=8))
    with pytest.raises(AssertionError, match="unit stride along D"):
        ringattn.block_attention(q, k, v, layout="BSND")
    flash_contract.extend(["forward", "backward"])  # the fixture's own check does not apply here
