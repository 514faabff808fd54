"""Gradients of ring_attention_update and merge_states: gradcheck in float64, and the closed-form backward
(``_backward.py``) against autograd through plain float64 formulas.

Edge rows in every case: one side empty, both sides empty, equal maxima (where ``max`` is not differentiable and
the backward splits its gradient equally, as the central difference gradcheck uses does).
Tolerances for the fp32/fp16/bf16 backward against the float64 gradient: the gradient of a part's output is
``w_k g`` rounded once to the dtype (``docs/contract.md``, "Numerics": fp32 1e-4, fp16 1e-3, bf16 5e-3); the statistics'
gradients are float32 sums of D products, compared at 1e-4 relative to their scale.
"""

from __future__ import annotations

import math

import pytest
import torch

import ringattn
from ringattn.merge import merge_states
from ringattn.reference import ring_attention_update_reference

TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def stats_parts(gen, rows_shape, lanes=8, dtype=torch.float64):
    m = torch.randn(*rows_shape, 1, generator=gen, dtype=dtype).expand(*rows_shape, lanes).contiguous()
    l = (torch.rand(*rows_shape, 1, generator=gen, dtype=dtype) + 0.5).expand(*rows_shape, lanes).contiguous()
    return m, l


def sbh_case(gen, s=3, b=2, n=2, d=3):
    prev_m, prev_l = stats_parts(gen, (b, n, s))
    cur_m, cur_l = stats_parts(gen, (b, n, s))
    prev_m[0, 0, 0], prev_l[0, 0, 0] = float("-inf"), 0.0  # prev empty
    cur_m[0, 1, 1], cur_l[0, 1, 1] = float("-inf"), 0.0  # cur empty
    prev_m[1, 0, 2] = cur_m[1, 0, 2]  # equal maxima
    prev_m[1, 1, 0], prev_l[1, 1, 0] = float("-inf"), 0.0  # both empty
    cur_m[1, 1, 0], cur_l[1, 1, 0] = float("-inf"), 0.0
    o = [torch.randn(s, b, n * d, generator=gen, dtype=torch.float64) for _ in range(2)]
    return (o[0], prev_m, prev_l, o[1], cur_m, cur_l), {}


def tnd_case(gen, token_major, t=5, n=2, d=3):
    prev_m, prev_l = stats_parts(gen, (t, n))
    cur_m, cur_l = stats_parts(gen, (t, n))
    prev_m[0, 1], prev_l[0, 1] = float("-inf"), 0.0
    cur_m[3, 0], cur_l[3, 0] = float("-inf"), 0.0
    prev_m[2, 0] = cur_m[2, 0]
    o = [torch.randn(t, n, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    kw = {"actual_seq_qlen": [0, 2, 2, t], "layout": "TND", "ascend_limits": False}
    if token_major:
        kw["softmax_layout"] = "TND"
    return (o[0], prev_m, prev_l, o[1], cur_m, cur_l), kw


CASES = {
    "SBH": lambda g: sbh_case(g),
    "TND-per-batch": lambda g: tnd_case(g, False),
    "TND-token-major": lambda g: tnd_case(g, True),
}


def finite(outs):
    """gradcheck's finite differences of a -inf output (an all-empty row's max or LSE) are NaN: compare 0 there.

    The gradient flowing into those entries is checked against autograd by the formula tests below.
    """
    return tuple(torch.where(torch.isneginf(t), torch.zeros_like(t), t) for t in outs)


def leaf(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_update_gradcheck(case):
    inputs, kw = CASES[case](torch.Generator().manual_seed(0))
    # fast_mode (random projections of the Jacobian): the 8-lane statistics make the full Jacobian slow.
    fn = lambda *x: finite(ringattn.ring_attention_update(*x, **kw))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaf(inputs), fast_mode=True)


def test_ring_attention_update_matches_autograd_of_float64_formula():
    """Closed form vs autograd through the float64 lane rule (``ringattn.reference``: lanes merged one by one, element
    d weighted by lane d % 8, empty parts selected out), independent lanes, random output gradients (SBH)."""
    gen = torch.Generator().manual_seed(1)
    inputs, _ = sbh_case(gen, s=4, b=2, n=3, d=10)
    inputs = list(inputs)
    for i in (1, 2, 4, 5):  # independent lanes, the empty entries kept
        noise = torch.rand(inputs[i].shape, generator=gen, dtype=torch.float64)
        inputs[i] = torch.where(inputs[i].isinf() | (inputs[i] == 0), inputs[i], inputs[i] + noise)
    x = leaf(inputs)
    outs = ringattn.ring_attention_update(*x)
    grads_out = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in outs]
    got = torch.autograd.grad(outs, x, grads_out)

    y = leaf(inputs)
    want_outs = ring_attention_update_reference(*y)
    # Lanes empty in both parts: the reference's max splits its gradient over the tied -inf parts and its exp(-inf)
    # terms give NaN through torch.where; ours gives every empty part 0.
    all_empty = torch.isneginf(want_outs[1]).detach()
    masked = [grads_out[0]] + [g.masked_fill(all_empty, 0.0) for g in grads_out[1:]]
    want = list(torch.autograd.grad(want_outs, y, masked))
    for i in (1, 2, 4, 5):
        assert torch.all(got[i][all_empty] == 0)
        want[i] = want[i].masked_fill(all_empty, 0.0)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_backward_against_float64(dtype):
    gen = torch.Generator().manual_seed(2)
    inputs, kw = tnd_case(gen, False, t=7, n=3, d=16)
    low = [t.to(dtype) if i in (0, 3) else t.float() for i, t in enumerate(inputs)]
    exact = [t.to(dtype).double() if i in (0, 3) else t.float().double() for i, t in enumerate(inputs)]
    g_out = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (inputs[0], inputs[1], inputs[1])]
    xl, xe = leaf(low), leaf(exact)
    got = torch.autograd.grad(
        ringattn.ring_attention_update(*xl, **kw), xl, [g.to(t.dtype) for g, t in zip(g_out, low[:3], strict=True)]
    )
    want = torch.autograd.grad(
        ringattn.ring_attention_update(*xe, **kw),
        xe,
        [g.to(dtype).double() if i == 0 else g.float().double() for i, g in enumerate(g_out)],
    )
    for g, w in zip(got, want, strict=True):
        assert g.dtype == (dtype if g.shape == inputs[0].shape else torch.float32)
        tol = TOL[dtype] if g.dtype == dtype else 1e-4
        torch.testing.assert_close(g.double(), w, atol=tol * max(1.0, w.abs().max().item()), rtol=tol)


# --- merge_states --------------------------------------------------------------------------------------------------


def lse_parts(gen, k, shape):
    lse = torch.randn(k, *shape, generator=gen, dtype=torch.float64)
    lse[0].view(-1)[0] = float("-inf")  # one part empty in a row
    lse[:, ...].view(k, -1)[:, 1] = float("-inf")  # a row empty in every part
    lse[1].view(-1)[2] = float("inf")  # old FlashAttention's empty marker
    lse[1].view(-1)[3] = lse[0].view(-1)[3]  # equal LSEs
    return list(lse.unbind(0))


@pytest.mark.parametrize(
    "layout,lse_layout,o_shape,lse_shape",
    [("BSND", "BNS", (2, 3, 2, 3), (2, 2, 3)), ("TND", "NT", (4, 2, 3), (2, 4)), ("SBH", "BNS", (3, 2, 6), (2, 2, 3))],
)
@pytest.mark.parametrize("k,base", [(2, "e"), (3, 2)])
def test_merge_states_gradcheck(layout, lse_layout, o_shape, lse_shape, k, base):
    gen = torch.Generator().manual_seed(3)
    parts_o = [torch.randn(o_shape, generator=gen, dtype=torch.float64) for _ in range(k)]
    parts_lse = lse_parts(gen, k, lse_shape)

    def f(*x):
        return finite(merge_states(x[:k], x[k:], layout=layout, lse_layout=lse_layout, lse_base=base))

    assert torch.autograd.gradcheck(f, leaf(parts_o + parts_lse))


def test_merge_states_matches_autograd_of_logsumexp_and_has_no_nan():
    gen = torch.Generator().manual_seed(4)
    k, t, n, d = 4, 6, 3, 5
    parts_o = [torch.randn(t, n, d, generator=gen, dtype=torch.float64) for _ in range(k)]
    parts_lse = lse_parts(gen, k, (t, n))
    g_o = torch.randn(t, n, d, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(t, n, generator=gen, dtype=torch.float64)
    x = leaf(parts_o + parts_lse)
    out = merge_states(x[:k], x[k:], layout="TND", lse_layout="TN", lse_base=2)
    got = torch.autograd.grad(out, x, (g_o, g_lse))
    assert not any(g.isnan().any() for g in got)
    assert torch.all(got[k + 1].view(-1)[2] == 0)  # the +inf (empty) entry

    y = leaf(parts_o + parts_lse)
    lse = torch.stack(y[k:]) * math.log(2.0)
    lse = torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)
    lse_safe = torch.where(torch.isneginf(lse).all(0, keepdim=True), torch.zeros_like(lse), lse)
    total = torch.logsumexp(lse_safe, 0)
    w = torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lse_safe - total))
    merged = (w.unsqueeze(-1) * torch.stack(y[:k])).sum(0)
    want = torch.autograd.grad((merged, total / math.log(2.0)), y, (g_o, g_lse))
    empty_row = torch.isneginf(lse).all(0)
    for g, w_ in zip(got[:k], want[:k], strict=True):
        torch.testing.assert_close(g, w_, atol=1e-12, rtol=1e-12)
    for g, w_ in zip(got[k:], want[k:], strict=True):
        # The oracle's "all empty" rows use a fake lse of 0; ours give exactly 0 there.
        torch.testing.assert_close(g.masked_fill(empty_row, 0), w_.masked_fill(empty_row, 0), atol=1e-12, rtol=1e-12)
        assert torch.all(g[empty_row] == 0)


def test_requires_grad_does_not_change_forward_and_out_refuses_grad():
    gen = torch.Generator().manual_seed(5)
    inputs, _ = sbh_case(gen)
    plain = ringattn.ring_attention_update(*inputs)
    tracked = ringattn.ring_attention_update(*leaf(inputs))
    for p, t in zip(plain, tracked, strict=True):
        assert torch.equal(p, t.detach())
    outs = tuple(torch.empty_like(t) for t in plain)
    with pytest.raises(RuntimeError, match="requires? grad"):
        ringattn.ring_attention_update(*leaf(inputs), out=outs)
    with torch.no_grad():
        ringattn.ring_attention_update(*leaf(inputs), out=outs)
    for p, o in zip(plain, outs, strict=True):
        assert torch.equal(p, o)
    with pytest.raises(ringattn.RingAttnError, match="requires? grad"):
        merge_states(
            leaf([inputs[0], inputs[3]]),
            [torch.zeros(2, 2, 3, dtype=torch.float64)] * 2,
            layout="SBH",
            out=outs[0],
            lse_base="e",
        )
