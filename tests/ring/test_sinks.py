"""Attention sinks (Note [attention sinks] in ``ring/attention.py``) against float64 attention with one more logit per
head in every row's softmax, carrying no value.

Output, LSE, dq, dk, dv and the sinks' gradient (random upstream gradients) for the virtual ring at W = 1..4, dense
(zigzag causal, contiguous causal, full) and packed, the ring of one, and gloo W = 2 (each rank's sink gradient is
its rows' share: the shares sum to the total). float32 within 1e-5 relative to the reference's largest magnitude
(float32 accumulation over <= 24 keys); float64 by gradcheck. Errors: wrong shape, dtype or a non-tensor, naming
``sinks``.
"""

from __future__ import annotations

import pytest
import torch
from ring_spawn import run_ranks

import ringattn
from ringattn.errors import DTypeError, ShapeError
from ringattn.ring import checks
from ringattn.ring.attention import RingOptions

N, NKV, D = 4, 2, 8


def attention_with_sinks64(q, k, v, sinks, mask):
    """float64 ``(out, lse)`` of ``(B, S, N, D)`` tensors, a keep-mask ``(S, S)`` and sink logits ``(N,)``."""
    groups = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    s = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return torch.einsum("bnqk,bknd->bqnd", p, v), torch.logsumexp(torch.cat([s, sink], -1), -1)


def _inputs(s: int, seed: int, batch: int = 2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, s, N, D, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, s, NKV, D, generator=gen, dtype=dtype) for _ in range(2))
    sinks = torch.randn(N, generator=gen, dtype=dtype) * 2
    g = torch.randn(batch, s, N, D, generator=gen, dtype=dtype)
    return q, k, v, sinks, g


def _close(got, want, what) -> None:
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    assert err <= 1e-5 * scale, f"{what}: error {err:.3g} (relative {err / scale:.3g})"


def _check(fn, q, k, v, sinks, g, mask, what) -> None:
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, g)
    ref = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    out64, lse64 = attention_with_sinks64(*ref, mask)
    want = torch.autograd.grad(out64, ref, g.double())
    _close(out.detach(), out64.detach(), f"{what} out")
    _close(lse, lse64.detach(), f"{what} lse")
    for name, got, exp in zip(("dq", "dk", "dv", "dsinks"), grads, want, strict=True):
        _close(got, exp, f"{what} {name}")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("causal", "sharding"), [(True, "zigzag"), (True, "contiguous"), (False, "zigzag")])
def test_virtual_ring_with_sinks(world, causal, sharding) -> None:
    q, k, v, sinks, g = _inputs(24, seed=world)
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask = mask.tril() if causal else mask

    def fn(q, k, v, sinks):
        return ringattn.simulate_ring_attention(q, k, v, world_size=world, causal=causal, sharding=sharding,
                                                layout="BSND", sinks=sinks, return_lse=True)  # fmt: skip

    _check(fn, q, k, v, sinks, g, mask, f"W={world} causal={causal} {sharding}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_virtual_ring_with_sinks(world) -> None:
    cu = [0, 7, 8, 24]
    q, k, v, sinks, g = _inputs(24, seed=10 + world, batch=1)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(cu).diff())
    mask = (doc[:, None] == doc[None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
    cu_t = torch.tensor(cu)

    def fn(q, k, v, sinks):
        out, lse = ringattn.simulate_ring_attention(q[0], k[0], v[0], world_size=world, cu_seqlens=cu_t, sinks=sinks,
                                                    return_lse=True)  # fmt: skip
        return out.unsqueeze(0), lse.unsqueeze(0)

    _check(fn, q, k, v, sinks, g, mask, f"packed W={world}")


def test_ring_of_one_with_sinks_and_bnsd() -> None:
    q, k, v, sinks, g = _inputs(9, seed=20)

    def fn(q, k, v, sinks):
        out, lse = ringattn.ring_attention(*(x.transpose(1, 2) for x in (q, k, v)), layout="BNSD", causal=True,
                                           sinks=sinks, return_lse=True)  # fmt: skip
        return out.transpose(1, 2), lse

    _check(fn, q, k, v, sinks, g, torch.ones(9, 9, dtype=torch.bool).tril(), "ring of one BNSD")


def test_sinks_gradcheck_float64() -> None:
    q, k, v, sinks, _ = _inputs(8, seed=21, batch=1, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, sinks)]
    assert torch.autograd.gradcheck(
        lambda *x: ringattn.simulate_ring_attention(*x[:3], world_size=2, layout="BSND", causal=True, sinks=x[3]),
        leaves,
    )


def _gloo_rank(rank: int, world_size: int) -> None:
    q, k, v, sinks, g = _inputs(16, seed=30)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    shard = [ringattn.shard_sequence(x, rank, world_size) for x in (q, k, v, g)]
    leaves = [x.requires_grad_() for x in shard[:3]] + [sinks.clone().requires_grad_()]
    out = ringattn.ring_attention(*leaves[:3], layout="BSND", causal=True, sinks=leaves[3])
    grads = list(torch.autograd.grad(out, leaves, shard[3]))
    torch.distributed.all_reduce(grads[3])  # the ranks' shares of the sinks' gradient add up to the total
    ref = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    out64, _ = attention_with_sinks64(*ref, mask)
    want = torch.autograd.grad(out64, ref, g.double())
    _close(out.detach(), ringattn.shard_sequence(out64.detach(), rank, world_size), "gloo out")
    for name, got, exp in zip(("dq", "dk", "dv"), grads, want, strict=False):
        _close(got, ringattn.shard_sequence(exp, rank, world_size), f"gloo {name}")
    _close(grads[3], want[3], "gloo dsinks (summed over the ranks)")


@pytest.mark.distributed
def test_gloo_ring_with_sinks(tmp_path) -> None:
    run_ranks(_gloo_rank, 2, tmp_path)


@pytest.mark.parametrize(
    ("sinks", "error", "fragment"),
    [
        (torch.zeros(N + 1), ShapeError, "sinks: expected shape (4,)"),
        (torch.zeros(1, N), ShapeError, "sinks: expected shape (4,)"),
        (torch.zeros(N, dtype=torch.int64), DTypeError, "sinks: expected float16"),
        ([0.0] * N, DTypeError, "sinks: expected None or a torch.Tensor"),
    ],
)
def test_bad_sinks_name_the_argument(sinks, error, fragment) -> None:
    q = torch.randn(1, 4, N, D)
    with pytest.raises(error) as info:
        ringattn.ring_attention(q, q[:, :, :NKV], q[:, :, :NKV], layout="BSND", sinks=sinks)
    assert fragment in str(info.value)


def test_ranks_that_disagree_on_sinks_raise_on_every_rank() -> None:
    q = torch.randn(1, 4, N, D)
    rows = [
        checks.encode(q, q, q, RingOptions(layout="BSND"), needs_grad=False, sinks=sinks)
        for sinks in (torch.zeros(N), None)
    ]
    with pytest.raises(Exception, match=r"sinks \(rank 1\)"):
        checks.check_table(rows)
