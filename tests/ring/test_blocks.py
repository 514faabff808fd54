"""``ring/blocks.py``: block attention with its LSE, and the backward that takes the FINAL out and LSE.

The property the ring relies on: attend over two key blocks separately, merge the two results by their LSEs,
and the merged output is attention over all keys; then each block's backward, given the merged (final) output
and LSE, returns that block's exact share of the gradients, so the shares sum to the full gradients. Checked
against float64 autograd of plain attention, with fresh random inputs, for every implementation that runs
here: ``flash`` and ``torch`` on CPU, and ``cudnn``, ``flash``, ``efficient`` and ``torch`` on CUDA when there is a
GPU (on CPU, ``test_block_doubles.py`` runs the CUDA branch through kernel doubles).

Tolerances (atol = rtol, against float64): float32 1e-4; float16 1e-2 and bfloat16 5e-2, because the kernels
round each block's output and gradients once to the half dtype (2^-11 / 2^-8 relative) and gradients sum
over 2 x 24 keys of values of order 1.
"""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.errors import BackendError
from ringattn.ring import blocks

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CUDA = torch.cuda.is_available()


def _runs():
    runs = [("cpu", impl, dtype) for impl in ("flash", "torch") for dtype in (torch.float32, torch.bfloat16)]
    runs += [("cpu", "torch", torch.float64), ("cpu", "flash", torch.float64)]
    runs += [
        ("cuda", impl, dtype) for impl in ("cudnn", "flash", "efficient") for dtype in (torch.float16, torch.bfloat16)
    ]
    runs += [("cuda", "efficient", torch.float32), ("cuda", "torch", torch.float32)]
    return [
        pytest.param(*r, marks=pytest.mark.skipif(r[0] == "cuda" and not CUDA, reason="needs a CUDA GPU")) for r in runs
    ]


def _exact_attention(q, k, v, causal: bool, scale: float, keys_per_block: int):
    """float64 attention of the query block over the concatenated key blocks; the causal mask is the ring's:
    the first key block is the query block itself (square, top-left causal), the second lies wholly before."""
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[2], keys_per_block, dtype=torch.bool, device=q.device).triu_(1)
        s[..., :keys_per_block] = s[..., :keys_per_block].masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("device", "impl", "dtype"), _runs())
def test_two_blocks_merge_to_full_attention_and_back(device, impl, dtype, causal):
    gen = torch.Generator().manual_seed(17 + causal)
    b, n, nkv, s, d = 2, 4, 2, 24, 64
    scale = d**-0.5

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q64, g64 = randn(b, n, s, d), randn(b, n, s, d)
    k64, v64 = randn(b, nkv, 2 * s, d), randn(b, nkv, 2 * s, d)
    q, k, v, g = (x.to(device=device, dtype=dtype) for x in (q64, k64, v64, g64))
    own, earlier = slice(0, s), slice(s, 2 * s)  # key block 0: the diagonal block; block 1: strictly before
    assert blocks.resolve_impl(impl, q.device, dtype, d) == impl  # the kernel runs here

    o0, lse0 = blocks.attend(q, k[:, :, own], v[:, :, own], causal=causal, scale=scale, impl=impl)
    o1, lse1 = blocks.attend(q, k[:, :, earlier], v[:, :, earlier], causal=False, scale=scale, impl=impl)
    assert lse0.shape == (b, n, s) and lse0.dtype == blocks.compute_dtype(dtype)
    out, lse = ringattn.merge_states((o0, o1), (lse0, lse1), layout="BNSD", lse_layout="BNS", lse_base="e")

    # The exact answer from the same rounded inputs, with GQA heads repeated, through float64 autograd.
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    k_rep, v_rep = (x.repeat_interleave(n // nkv, dim=1) for x in leaves[1:])
    want = _exact_attention(leaves[0], k_rep, v_rep, causal, scale, s)
    want_dq, want_dk, want_dv = torch.autograd.grad(want, leaves, g.double().cpu())

    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=tol, atol=tol)

    shares = [
        blocks.attend_backward(g, q, k[:, :, keys], v[:, :, keys], out, lse, causal=c, scale=scale, impl=impl)
        for keys, c in ((own, causal), (earlier, False))
    ]
    dq = shares[0][0].double() + shares[1][0].double()
    dk = torch.cat([shares[0][1], shares[1][1]], dim=2)
    dv = torch.cat([shares[0][2], shares[1][2]], dim=2)
    for name, got, exp in (("dq", dq, want_dq), ("dk", dk, want_dk), ("dv", dv, want_dv)):
        torch.testing.assert_close(got.double().cpu(), exp, rtol=tol, atol=tol, msg=lambda m, w=name: f"{w}: {m}")


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "want"),
    [
        ("cpu", torch.float32, 13, "flash"),
        ("cpu", torch.bfloat16, 64, "flash"),
        ("cpu", torch.float64, 64, "torch"),
        ("cuda", torch.float64, 64, "torch"),
        ("cuda", torch.bfloat16, 12, "torch"),
        ("meta", torch.float32, 64, "torch"),
    ],
)
def test_auto_picks_the_fused_kernel_where_one_runs(device, dtype, head_dim, want):
    assert blocks.resolve_impl("auto", torch.device(device), dtype, head_dim) == want


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "named"),
    [
        ("cuda", torch.float64, 64, "float64"),
        ("cuda", torch.bfloat16, 12, "got 12"),
        ("meta", torch.float32, 64, "meta"),
    ],
)
def test_sdpa_where_no_fused_kernel_runs_is_an_error(device, dtype, head_dim, named):
    with pytest.raises(BackendError, match="impl") as info:
        blocks.resolve_impl("sdpa", torch.device(device), dtype, head_dim)
    assert named in str(info.value) and "'sdpa'" in str(info.value)


@pytest.mark.parametrize("impl", ["fast", None, "cudnn"])
def test_unknown_or_unavailable_kernel_is_an_error(impl):
    with pytest.raises(BackendError, match="impl"):
        blocks.resolve_impl(impl, torch.device("cpu"), torch.float32, 64)


@pytest.mark.parametrize("impl", ["flash", "torch"])
@pytest.mark.parametrize(("sq", "sk"), [(0, 5), (5, 0), (0, 0)])
def test_empty_blocks_are_empty_partial_results(impl, sq, sk):
    """No kernel is called on zero rows (PyTorch's CPU flash kernel dies of SIGFPE there): output 0, LSE -inf."""
    q, k = torch.randn(1, 2, sq, 8), torch.randn(1, 1, sk, 8)
    o, lse = blocks.attend(q, k, k, causal=False, scale=1.0, impl=impl)
    assert o.shape == (1, 2, sq, 8) and torch.equal(o, torch.zeros_like(o))
    assert lse.shape == (1, 2, sq) and bool((lse == float("-inf")).all())
    grads = blocks.attend_backward(q, q, k, k, o, lse, causal=False, scale=1.0, impl=impl)
    for g, x in zip(grads, (q, k, k), strict=True):
        assert g.shape == x.shape and not g.any()
