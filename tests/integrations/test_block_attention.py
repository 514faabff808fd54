"""``ringattn.block_attention``: the producer half of the merges, against float64 autograd of plain attention.

Every layout (BSND, BNSD, SBH, TND) x statistics form (LSE, Ascend; TND Ascend in both softmax layouts) x causal,
with GQA heads, unequal and zero-length TND batches, non-contiguous inputs, and random upstream gradients on EVERY
output (the statistics included: a partial result is only ever used merged, so its LSE always has a gradient,
Note [gradient of the LSE output] in ``block.py``). Then the property the merges rely on: two key blocks merged by
``merge_states`` / ``ring_attention_update`` are attention over both, gradients included.

Tolerances (atol = rtol, against float64 autograd of the same rounded inputs): float64 1e-10 (plain torch
kernel, reassociation only); float32 1e-4 (the fused flash kernel accumulates in float32 over <= 24 keys);
float16 1e-2 (CUDA kernels; 2^-11 rounding of out, dq, dk, dv, dlse) and bfloat16 5e-2 (out, dq, dk, dv rounded
once to 8 bits, gradients summed over 2 x 12 keys of values of order 1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn.errors import BackendError, DeviceError, DTypeError, LayoutError, SeqLenError, ShapeError

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
N, NKV, D = 4, 2, 16


def _dense_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)
    return x


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "SBH":
        b, n, s, d = x.shape
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    return x


def _attend64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """float64 attention of ``(N, Sq, D)`` over ``(Nkv, Sk, D)``: ``(o, lse (N, Sq))``; no keys: (0, -inf)."""
    if k.shape[1] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:2], float("-inf"))
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def reference(q, k, v, *, layout, causal, scale, stats, softmax_layout=None, cq=None, ck=None):
    """What block_attention must return, in float64, from float64 leaves (differentiable)."""
    if layout == "TND":
        outs, lses = [], []
        for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
            o, lse = _attend64(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1), causal, scale)
            outs.append(o.transpose(0, 1))
            lses.append(lse)
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)  # (T, N, D), (N, T)
        if stats == "lse":
            return out, lse
        rows = lse.transpose(0, 1) if softmax_layout else torch.cat([x.reshape(-1) for x in lses]).view(lse.T.shape)
    else:
        qb, kb, vb = (_dense_bnsd(x, layout, h) for x, h in ((q, N), (k, NKV), (v, NKV)))
        pairs = [_attend64(qb[i], kb[i], vb[i], causal, scale) for i in range(qb.shape[0])]
        out = _from_bnsd(torch.stack([o for o, _ in pairs]), layout)
        rows = lse = torch.stack([x for _, x in pairs])
        if stats == "lse":
            return out, lse
    m = rows.unsqueeze(-1).expand(*rows.shape, 8)
    return out, m, (~rows.isinf()).to(rows.dtype).unsqueeze(-1).expand(*rows.shape, 8)


def _weighted_sum(outputs, weights) -> torch.Tensor:
    """sum <output, weight>, with -inf statistics (empty rows) counted as 0 (their gradient is 0)."""
    total = 0
    for o, w in zip(outputs, weights, strict=True):
        o = o.double()
        total = total + torch.where(o.isinf(), torch.zeros_like(o), o * w).sum()
    return total


def _inputs(layout: str, dtype: torch.dtype, gen: torch.Generator, cq=None, ck=None, b=2, sq=12, sk=10, d=D):
    """q, k, v in ``layout`` (made non-contiguous for the dense layouts), as float64 originals and in dtype."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if layout == "TND":
        shapes = [(cq[-1], N, d), (ck[-1], NKV, d), (ck[-1], NKV, d)]
        made = [randn(*s) for s in shapes]
    else:
        bnsd = [randn(b, N, sq, d), randn(b, NKV, sk, d), randn(b, NKV, sk, d)]
        # Strided views, as in practice: BNSD and SBH from (B, S, N, D) buffers, BSND from a (B, N, S, D) one.
        if layout == "BNSD":
            made = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in bnsd]
        elif layout == "BSND":
            made = [x.transpose(1, 2) for x in bnsd]
        else:
            made = [_from_bnsd(x, "SBH").transpose(0, 1).contiguous().transpose(0, 1) for x in bnsd]
    return [x.to(dtype) for x in made]


CASES = [
    (layout, stats, softmax_layout)
    for layout in ("BSND", "BNSD", "SBH", "TND")
    for stats, softmax_layout in (("lse", None), ("ascend", None), ("ascend", "TND"))
    if softmax_layout is None or layout == "TND"
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("layout", "stats", "softmax_layout"), CASES)
def test_block_attention_matches_float64_attention_with_gradients(layout, stats, softmax_layout, causal, dtype):
    _check(layout, stats, softmax_layout, causal, dtype)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("impl", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("layout", "stats", "softmax_layout"), [("BSND", "lse", None), ("TND", "ascend", None)])
def test_block_attention_cuda_kernels(layout, stats, softmax_layout, causal, dtype, impl, head_dim):
    """Each CUDA kernel, forward and backward, the LSE's gradient included: its augmented call (Note [gradient of the
    LSE output]) pads D to D + 8; at D = 128 that exceeds cuDNN's largest head size and another kernel runs."""
    _check(layout, stats, softmax_layout, causal, dtype, device="cuda", impl=impl, head_dim=head_dim)


def _check(layout, stats, softmax_layout, causal, dtype, *, device="cpu", impl="auto", head_dim=D):
    gen = torch.Generator().manual_seed(hash((layout, stats, softmax_layout, causal)) % 2**31)
    # TND: unequal batches, a batch with no keys, a batch with no queries, more keys than queries and fewer.
    cq, ck = [0, 5, 5, 12, 15], [0, 7, 9, 9, 17]
    tnd = {"actual_seq_qlen": cq, "actual_seq_kvlen": ck} if layout == "TND" else {}
    q, k, v = _inputs(layout, dtype, gen, cq, ck, d=head_dim)
    scale = 0.3 * (D / head_dim) ** 0.5  # scores of the same size whatever D
    leaves = [x.detach().to(device).requires_grad_() for x in (q, k, v)]
    got = ringattn.block_attention(
        *leaves,
        layout=layout,
        causal=causal,
        softmax_scale=scale,
        stats=stats,
        head_num=N if layout == "SBH" else None,
        softmax_layout=softmax_layout,
        impl=impl,
        **tnd,
    )
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = reference(
        *ref_leaves,
        layout=layout,
        causal=causal,
        scale=scale,
        stats=stats,
        softmax_layout=softmax_layout,
        cq=cq,
        ck=ck,
    )
    assert len(got) == len(want)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert all(s.dtype == stat_dtype for s in got[1:])
    tol = TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            g.detach().cpu().double(), w.detach(), rtol=tol, atol=tol, msg=lambda m, i=i: f"{i}: {m}"
        )
    weights = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want]
    _weighted_sum(got, [w.to(device) for w in weights]).backward()
    _weighted_sum(want, weights).backward()
    for name, g, w in zip("qkv", leaves, ref_leaves, strict=True):
        assert g.grad.dtype == dtype
        got_grad = g.grad.cpu().double()
        torch.testing.assert_close(got_grad, w.grad, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


@settings(max_examples=12, deadline=None)
@given(
    q_lens=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    kv_extra=st.lists(st.integers(-3, 4), min_size=4, max_size=4),
    causal=st.booleans(),
)
def test_tnd_batches_of_any_lengths(q_lens, kv_extra, causal):
    kv_lens = [max(0, n + e) for n, e in zip(q_lens, kv_extra, strict=False)]
    cq = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    ck = [0, *torch.tensor(kv_lens).cumsum(0).tolist()]
    gen = torch.Generator().manual_seed(sum(q_lens) * 31 + sum(kv_lens))
    q, k, v = _inputs("TND", torch.float32, gen, cq, ck)
    out, m, l = ringattn.block_attention(
        q, k, v, layout="TND", causal=causal, stats="ascend", actual_seq_qlen=cq, actual_seq_kvlen=ck
    )
    want = reference(*(x.double() for x in (q, k, v)), layout="TND", causal=causal, scale=D**-0.5, stats="ascend",
                     cq=cq, ck=ck)  # fmt: skip
    for g, w in zip((out, m, l), want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def _two_key_blocks(layout: str, gen: torch.Generator):
    """q and two key/value blocks (the second strictly before the first in a causal sequence)."""
    if layout == "SBH":
        q, k0, v0, k1, v1 = (torch.randn(s, 2, h, generator=gen) for s, h in [(8, N * D)] + [(8, NKV * D)] * 4)
        return q, (k0, v0), (k1, v1), {"head_num": N}, {}
    cq = [0, 5, 5, 12]
    q = torch.randn(12, N, 64, generator=gen)
    kvs = [(torch.randn(12, NKV, 64, generator=gen), torch.randn(12, NKV, 64, generator=gen)) for _ in range(2)]
    tnd = {"actual_seq_qlen": cq, "actual_seq_kvlen": cq}
    return q, kvs[0], kvs[1], tnd, {"actual_seq_qlen": torch.tensor(cq)}


@pytest.mark.parametrize("layout", ["SBH", "TND"])
def test_ascend_partials_merged_by_ring_attention_update_are_full_attention(layout):
    """The MindSpeed step: diagonal block (causal) + an earlier block (full), merged; values and gradients."""
    gen = torch.Generator().manual_seed(5)
    q, (k0, v0), (k1, v1), kw, upd = _two_key_blocks(layout, gen)
    leaves = [x.clone().requires_grad_() for x in (q, k0, v0, k1, v1)]
    a = ringattn.block_attention(leaves[0], leaves[1], leaves[2], layout=layout, causal=True, stats="ascend", **kw)
    b = ringattn.block_attention(leaves[0], leaves[3], leaves[4], layout=layout, stats="ascend", **kw)
    out, _, _ = ringattn.ring_attention_update(*a, *b, layout=layout, **upd)
    # Reference: keys = [block 1, block 0] with the causal mask on block 0 only, in float64.
    ref = [x.double().requires_grad_() for x in (q, k0, v0, k1, v1)]
    if layout == "SBH":
        qb, k0b, v0b, k1b, v1b = (_dense_bnsd(x, "SBH", h) for x, h in zip(ref, (N, NKV, NKV, NKV, NKV), strict=True))
        spans = [(0, 8)]
    else:
        qb, k0b, v0b, k1b, v1b = (x.permute(1, 0, 2).unsqueeze(0) for x in ref)
        spans = [(0, 5), (5, 5), (5, 12)]
    outs = []
    for a_, b_ in spans:
        sl = slice(a_, b_)
        kk = torch.cat([k1b[:, :, sl], k0b[:, :, sl]], 2).repeat_interleave(N // NKV, 1)
        vv = torch.cat([v1b[:, :, sl], v0b[:, :, sl]], 2).repeat_interleave(N // NKV, 1)
        s = qb[:, :, sl] @ kk.transpose(-1, -2) * qb.shape[-1] ** -0.5
        n = b_ - a_
        mask = torch.zeros(n, 2 * n, dtype=torch.bool)
        mask[:, n:] = torch.ones(n, n, dtype=torch.bool).triu(1)
        outs.append(torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ vv)
    want = torch.cat(outs, 2)
    want = _from_bnsd(want, "SBH") if layout == "SBH" else want.squeeze(0).permute(1, 0, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * g).sum().backward()
    (want * g).sum().backward()
    for name, x, r in zip(["q", "k0", "v0", "k1", "v1"], leaves, ref, strict=True):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("layout", ["BSND", "TND"])
def test_lse_partials_merged_by_merge_states_are_full_attention(layout):
    gen = torch.Generator().manual_seed(9)
    if layout == "TND":
        cq = [0, 6, 10]
        q = torch.randn(10, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(2, 10, NKV, D, generator=gen, dtype=torch.float64, requires_grad=True)
        kw, lse_layout = {"actual_seq_qlen": cq, "actual_seq_kvlen": cq}, "NT"
        halves = [(kv[0], kv[1], {}), (kv[1], kv[0], {})]  # two different key sets per batch, same lengths
    else:
        q = torch.randn(2, 6, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(2, 2, 9, NKV, D, generator=gen, dtype=torch.float64, requires_grad=True)
        kw, lse_layout = {}, "BNS"
        halves = [(kv[0], kv[1], {}), (kv[1], kv[0], {})]
    parts = [ringattn.block_attention(q, k, v, layout=layout, **kw) for k, v, _ in halves]
    out, lse = ringattn.merge_states(
        [p[0] for p in parts], [p[1] for p in parts], layout=layout, lse_layout=lse_layout, lse_base="e"
    )
    # The same attention over the concatenated keys, computed by block_attention in one call.
    if layout == "TND":
        both_k = torch.cat([torch.cat([kv[0][a:b], kv[1][a:b]]) for a, b in ((0, 6), (6, 10))])
        both_v = torch.cat([torch.cat([kv[1][a:b], kv[0][a:b]]) for a, b in ((0, 6), (6, 10))])
        want, want_lse = ringattn.block_attention(
            q, both_k, both_v, layout="TND", actual_seq_qlen=cq, actual_seq_kvlen=[0, 12, 20]
        )
    else:
        want, want_lse = ringattn.block_attention(
            q, torch.cat([kv[0], kv[1]], 1), torch.cat([kv[1], kv[0]], 1), layout=layout
        )
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), (q, kv))
    want_grads = torch.autograd.grad((want * g).sum(), (q, kv))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64_every_output():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        return ringattn.block_attention(
            q, k, v, layout="TND", causal=True, stats="lse", actual_seq_qlen=[0, 2, 5], actual_seq_kvlen=[0, 4, 6]
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _call(**over):
    """block_attention on valid BNSD inputs with the arguments in ``over`` replaced."""
    kw = {"q": torch.randn(1, 4, 3, 8), "k": torch.randn(1, 2, 5, 8), "v": torch.randn(1, 2, 5, 8), "layout": "BNSD"}
    kw.update(over)
    return ringattn.block_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


T3 = torch.randn(6, 2, 8)
ERRORS = [
    ({"layout": "BHSD"}, LayoutError, "layout"),
    ({"layout": 3}, LayoutError, "layout"),
    ({"stats": "max"}, LayoutError, "stats"),
    ({"softmax_layout": "TND"}, LayoutError, "softmax_layout"),
    (
        {
            "layout": "TND",
            "q": T3,
            "k": T3,
            "v": T3,
            "stats": "ascend",
            "softmax_layout": "BNS",
            "actual_seq_qlen": [0, 6],
            "actual_seq_kvlen": [0, 6],
        },
        LayoutError,
        "softmax_layout",
    ),  # fmt: skip
    ({"impl": "fast"}, BackendError, "impl"),
    ({"causal": 1}, DTypeError, "causal"),
    ({"q": [1.0]}, DTypeError, "q"),
    ({"k": torch.randn(1, 2, 5, 8, dtype=torch.float64)}, DTypeError, "k"),
    ({"q": torch.randint(0, 3, (1, 4, 3, 8))}, DTypeError, "q"),
    ({"v": torch.randn(1, 2, 5, 8, device="meta")}, DeviceError, "v"),
    ({"q": torch.randn(4, 3, 8)}, ShapeError, "q"),
    ({"v": torch.randn(1, 2, 4, 8)}, ShapeError, "v"),
    ({"k": torch.randn(1, 2, 5, 4), "v": torch.randn(1, 2, 5, 4)}, ShapeError, "k"),
    ({"k": torch.randn(2, 2, 5, 8), "v": torch.randn(2, 2, 5, 8)}, ShapeError, "k"),
    ({"k": torch.randn(1, 3, 5, 8), "v": torch.randn(1, 3, 5, 8)}, ShapeError, "k"),
    ({"head_num": 2}, ShapeError, "head_num"),
    ({"layout": "SBH", "q": torch.randn(3, 1, 32), "k": T3, "v": T3}, ShapeError, "head_num"),
    ({"layout": "SBH", "q": torch.randn(3, 1, 32), "k": T3, "v": T3, "head_num": 3}, ShapeError, "head_num"),
    (
        {
            "layout": "SBH",
            "q": torch.randn(3, 1, 32),
            "k": torch.randn(3, 1, 12),
            "v": torch.randn(3, 1, 12),
            "head_num": 4,
        },
        ShapeError,
        "k",
    ),  # fmt: skip
    ({"softmax_scale": "big"}, DTypeError, "softmax_scale"),
    ({"softmax_scale": float("nan")}, DTypeError, "softmax_scale"),
    ({"actual_seq_qlen": [0, 3]}, SeqLenError, "actual_seq_qlen"),
    ({"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_kvlen": [0, 6]}, SeqLenError, "actual_seq_qlen"),
    ({"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [0, 6]}, SeqLenError, "actual_seq_kvlen"),
    (
        {"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [0, 5], "actual_seq_kvlen": [0, 6]},
        SeqLenError,
        "actual_seq_qlen",
    ),  # fmt: skip
    (
        {"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [1, 6], "actual_seq_kvlen": [0, 6]},
        SeqLenError,
        "actual_seq_qlen",
    ),  # fmt: skip
    (
        {"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [0, 4, 2, 6], "actual_seq_kvlen": [0, 2, 4, 6]},
        SeqLenError,
        "actual_seq_qlen",
    ),  # fmt: skip
    (
        {"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [0, 3, 6], "actual_seq_kvlen": [0, 6]},
        SeqLenError,
        "actual_seq_kvlen",
    ),  # fmt: skip
    (
        {
            "layout": "TND",
            "q": T3,
            "k": T3,
            "v": T3,
            "actual_seq_qlen": torch.tensor([0, 6], dtype=torch.int32),
            "actual_seq_kvlen": [0, 6],
        },
        DTypeError,
        "actual_seq_qlen",
    ),  # fmt: skip
    (
        {"layout": "TND", "q": T3, "k": T3, "v": T3, "actual_seq_qlen": [0, 6.0], "actual_seq_kvlen": [0, 6]},
        DTypeError,
        "actual_seq_qlen",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("kw", "error", "name"), ERRORS)
def test_bad_inputs_raise_naming_the_argument(kw, error, name):
    with pytest.raises(error) as info:
        _call(**kw)
    assert str(info.value).startswith(f"{name}: expected"), str(info.value)
