"""merge_states (every layout, base, K) and the Ascend statistics <-> LSE conversions, against float64 formulas.

The oracle builds every layout from canonical ``(K, B, S, N, D)`` / ``(K, B, S, N)`` tensors with its own
permutes (not ringattn's row views) and evaluates the merge with ``torch.logsumexp`` in float64.
Tolerances (the contract's, atol = rtol): float32 1e-4, float16 1e-3 and bfloat16 5e-3 (the output is rounded
once to the dtype: half an ulp relative, plus the float32 weights), float64 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn.errors import AliasError, DTypeError, LayoutError, ShapeError
from ringattn.merge import lse_to_stats, merge_states, stats_to_lse

TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3, torch.float64: 1e-12}
PAIRS = [("BSND", "BNS"), ("BNSD", "BNS"), ("SBH", "BNS"), ("TND", "NT"), ("TND", "TN")]
BASES = {"e": 1.0, 2: math.log(2.0)}


def to_layout(o: torch.Tensor, layout: str) -> torch.Tensor:
    """Canonical (B, S, N, D) -> layout (TND needs B == 1). Views where the producer would give views."""
    if layout == "BSND":
        return o
    if layout == "BNSD":
        return o.permute(0, 2, 1, 3)  # SDPA: logical BNSD over a BSND buffer
    if layout == "SBH":
        return o.permute(1, 0, 2, 3).reshape(o.shape[1], o.shape[0], -1)
    return o[0]


def lse_to_layout(lse: torch.Tensor, lse_layout: str) -> torch.Tensor:
    """Canonical (B, S, N) -> lse_layout; deliberately non-contiguous views."""
    if lse_layout == "BNS":
        return lse.permute(0, 2, 1)
    if lse_layout == "NT":
        return lse[0].t()
    return lse[0]


def oracle(o: torch.Tensor, lse_nat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 merge of canonical parts (K, B, S, N, D), natural LSE (K, B, S, N); +inf and -inf are empty."""
    x = lse_nat.double().masked_fill(lse_nat == float("inf"), float("-inf"))
    total = torch.logsumexp(x, 0)
    empty = total == float("-inf")
    w = torch.exp(x - total.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    return (w.unsqueeze(-1) * o.double()).sum(0), total


def make_parts(gen, k, b, s, n, d, dtype, empty_p=0.3):
    o = torch.randn(k, b, s, n, d, generator=gen).to(dtype)
    lse = torch.randn(k, b, s, n, generator=gen, dtype=torch.float64) * 3
    lse[torch.rand(k, b, s, n, generator=gen) < empty_p] = float("-inf")
    return o, lse if dtype == torch.float64 else lse.float()


def run(o, lse, layout, lse_layout, base, **kw):
    scale = BASES[base]
    parts_o = [to_layout(o[k], layout) for k in range(o.shape[0])]
    parts_lse = [lse_to_layout((lse[k] / scale).float(), lse_layout) for k in range(o.shape[0])]
    return merge_states(parts_o, parts_lse, layout=layout, lse_layout=lse_layout, lse_base=base, **kw)


def check(o, lse, layout, lse_layout, base, dtype, got):
    want_o, want_lse = oracle(o, lse.double())
    tol = TOL[dtype]
    torch.testing.assert_close(got[0].double(), to_layout(want_o, layout), atol=tol, rtol=tol)
    lse_tol = 1e-12 if dtype == torch.float64 else 1e-5  # the LSE is float32 whatever the output dtype
    want = lse_to_layout(want_lse / BASES[base], lse_layout)
    torch.testing.assert_close(got[1].double(), want, atol=lse_tol, rtol=lse_tol)


def layout_base_k_case(pair, base, dtype, k, b, s, n, d, seed, backend):
    layout, lse_layout = pair
    b = 1 if layout == "TND" else b
    gen = torch.Generator().manual_seed(seed)
    o, lse = make_parts(gen, k, b, s, n, d, dtype)
    lse = (lse / BASES[base]).float() * BASES[base]  # representable in the caller's base
    got = run(o, lse.double(), layout, lse_layout, base, backend=backend)
    check(o, lse.double(), layout, lse_layout, base, dtype, got)


# Note [merge test budget]: merge_states' own work (layout views, base, K, validation) is the same whatever the
# backend, so the full grid runs on the portable backend, which compiles nothing. numba compiles the fused kernel
# once per (dtype, K), 8-30 s each on 2 cores (more under load): 21 compiles for K = 2..8 x 3 dtypes. The default
# run takes the fused kernel through every layout and base with the (dtype, K) pairs tests/backends compiles
# anyway (float32 for K = 2, 3, 16-bit formats for K = 2), so it adds no compile; the `slow` run (CI's second
# step) covers every pair.
FUSED_PAIRS = [(torch.float32, 2), (torch.float32, 3), (torch.float16, 2), (torch.bfloat16, 2)]
CASE = dict(
    pair=st.sampled_from(PAIRS),
    base=st.sampled_from(list(BASES)),
    b=st.integers(1, 3),
    s=st.integers(1, 5),
    n=st.integers(1, 3),
    d=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=40, deadline=None)
@given(dtype=DTYPES, k=st.integers(2, 8), **CASE)
def test_every_layout_base_and_k_against_float64(pair, base, dtype, k, b, s, n, d, seed):
    layout_base_k_case(pair, base, dtype, k, b, s, n, d, seed, backend="torch")


@settings(max_examples=25, deadline=None)
@given(dtype_k=st.sampled_from(FUSED_PAIRS), **CASE)
def test_fused_cpu_kernel_every_layout_and_base_against_float64(pair, base, dtype_k, b, s, n, d, seed):
    layout_base_k_case(pair, base, *dtype_k, b, s, n, d, seed, backend="cpu")


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(dtype=DTYPES, k=st.integers(2, 8), **CASE)
def test_fused_cpu_kernel_every_k_and_dtype_against_float64(pair, base, dtype, k, b, s, n, d, seed):
    layout_base_k_case(pair, base, dtype, k, b, s, n, d, seed, backend="cpu")


@pytest.mark.parametrize("layout,lse_layout", PAIRS)
def test_float64_is_exact(layout, lse_layout):
    gen = torch.Generator().manual_seed(1)
    o, lse = make_parts(gen, 5, 1 if layout == "TND" else 2, 7, 3, 5, torch.float64)
    parts_o = [to_layout(o[k], layout) for k in range(5)]
    parts_lse = [lse_to_layout(lse[k].double(), lse_layout) for k in range(5)]
    got = merge_states(parts_o, parts_lse, layout=layout, lse_layout=lse_layout, lse_base="e")
    check(o, lse.double(), layout, lse_layout, "e", torch.float64, got)


def test_empty_rows_plus_inf_and_nan():
    gen = torch.Generator().manual_seed(2)
    o, lse = make_parts(gen, 3, 1, 6, 2, 4, torch.float32, empty_p=0.0)
    lse[:, 0, 0, :] = float("-inf")  # empty in every part
    lse[:, 0, 1, :] = float("inf")  # old FlashAttention's empty marker, every part
    lse[0, 0, 2, :] = float("inf")  # empty in one part only
    lse[1, 0, 3, 0] = float("nan")
    got_o, got_lse = run(o, lse.double(), "TND", "TN", "e")
    assert torch.equal(got_o[:2], torch.zeros_like(got_o[:2]))
    assert torch.isneginf(got_lse[:2]).all()
    want_o, want_lse = oracle(o[1:, :, 2:3], lse[1:, :, 2:3].double())
    torch.testing.assert_close(got_o[2].double(), want_o[0, 0], atol=1e-4, rtol=1e-4)
    assert got_o[3, 0].isnan().all() and got_lse[3, 0].isnan()
    assert not got_o[3, 1].isnan().any()  # NaN stays in its row


def test_order_and_grouping_do_not_matter():
    gen = torch.Generator().manual_seed(3)
    o, lse = make_parts(gen, 3, 2, 5, 3, 8, torch.float32)  # K = 3, then 2 + 1 (Note [merge test budget])
    parts_o, parts_lse = list(o.unbind(0)), list(lse.unbind(0))
    ref = merge_states(parts_o, [x.permute(0, 2, 1) for x in parts_lse], layout="BSND", lse_base="e")
    perm = torch.randperm(3, generator=gen).tolist()
    shuffled = merge_states(
        [parts_o[i] for i in perm], [parts_lse[i].permute(0, 2, 1) for i in perm], layout="BSND", lse_base="e"
    )
    left = merge_states(parts_o[:2], [x.permute(0, 2, 1) for x in parts_lse[:2]], layout="BSND", lse_base="e")
    right = merge_states(parts_o[2:], [x.permute(0, 2, 1) for x in parts_lse[2:]], layout="BSND", lse_base="e")
    folded = merge_states((left[0], right[0]), (left[1], right[1]), layout="BSND", lse_base="e")
    for got in (shuffled, folded):
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_stacked_tensor_equals_list_and_single_part_is_identity():
    gen = torch.Generator().manual_seed(4)
    o, lse = make_parts(gen, 3, 1, 5, 2, 3, torch.float32)  # K = 3: compiled anyway
    stacked = merge_states(o[:, 0], lse[:, 0], layout="TND", lse_layout="TN", lse_base="e")
    listed = merge_states(list(o[:, 0]), list(lse[:, 0]), layout="TND", lse_layout="TN", lse_base="e")
    assert torch.equal(stacked[0], listed[0]) and torch.equal(stacked[1], listed[1])
    one = merge_states([o[0, 0]], [lse[0, 0]], layout="TND", lse_layout="TN", lse_base="e")
    empty = torch.isneginf(lse[0, 0]).unsqueeze(-1)
    assert torch.equal(one[0], o[0, 0].masked_fill(empty, 0.0)) and torch.equal(one[1], lse[0, 0])


def test_mixed_log_bases_need_declaring():
    """A FlashInfer part (base 2) merged with a flash-attn part (base e): right only when the base is declared."""
    gen = torch.Generator().manual_seed(5)
    o, lse_nat = make_parts(gen, 2, 1, 16, 4, 8, torch.float64, empty_p=0.0)
    want_o, _ = oracle(o, lse_nat)
    fa = (o[0, 0], lse_nat[0, 0])
    flashinfer = (o[1, 0], lse_nat[1, 0] / math.log(2.0))  # what FlashInfer reports
    right = merge_states(
        (fa[0], flashinfer[0]), (fa[1], flashinfer[1] * math.log(2.0)), layout="TND", lse_layout="TN", lse_base="e"
    )
    torch.testing.assert_close(right[0], want_o[0], atol=1e-12, rtol=1e-12)
    wrong = merge_states((fa[0], flashinfer[0]), (fa[1], flashinfer[1]), layout="TND", lse_layout="TN", lse_base="e")
    assert (wrong[0] - want_o[0]).abs().max() > 0.1  # silently wrong: the docs' warning
    # Both parts in base 2, declared: right again.
    both2 = merge_states(o[:, 0], lse_nat[:, 0] / math.log(2.0), layout="TND", lse_layout="TN", lse_base=2)
    torch.testing.assert_close(both2[0], want_o[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("alias", [None, 0, 1])
def test_out_poisoned_and_aliasing_an_input(alias):
    gen = torch.Generator().manual_seed(6)
    o, lse = make_parts(gen, 3, 2, 4, 2, 8, torch.float32)
    parts_o = [to_layout(o[k], "SBH").clone() for k in range(3)]
    parts_lse = [x.permute(0, 2, 1).contiguous() for x in lse]
    want = merge_states(parts_o, parts_lse, layout="SBH", lse_base="e")
    if alias is None:
        out, out_lse = torch.full_like(parts_o[0], float("nan")), torch.full_like(parts_lse[0], float("nan"))
    else:
        out, out_lse = parts_o[alias], parts_lse[alias]
    got = merge_states(parts_o, parts_lse, layout="SBH", out=out, out_lse=out_lse, lse_base="e")
    assert got[0] is out and got[1] is out_lse
    torch.testing.assert_close(out, want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_lse, want[1], atol=1e-6, rtol=1e-6)


def test_errors():
    o = [torch.randn(4, 2, 8)] * 2
    lse = [torch.randn(2, 4)] * 2
    with pytest.raises(LayoutError, match="lse_layout"):
        merge_states(o, lse, layout="TND", lse_base="e")  # NT or TN must be named
    with pytest.raises(LayoutError, match="lse_base"):
        merge_states(o, lse, layout="TND", lse_layout="NT", lse_base=10)
    with pytest.raises(ShapeError, match=r"lses\[0\]"):
        merge_states(o, lse, layout="TND", lse_layout="TN", lse_base="e")
    with pytest.raises(DTypeError, match=r"lses\[1\]"):
        merge_states(o, [lse[0], lse[1].half()], layout="TND", lse_layout="NT", lse_base="e")
    with pytest.raises(DTypeError, match=r"outputs\[1\]"):
        merge_states([o[0], o[1].double()], lse, layout="TND", lse_layout="NT", lse_base="e")
    with pytest.raises(ShapeError, match="one LSE per output"):
        merge_states(o, lse[:1], layout="TND", lse_layout="NT", lse_base="e")
    buf = torch.randn(5, 2, 8)
    with pytest.raises(AliasError, match="out"):
        merge_states([buf[:4], buf[1:]], lse, layout="TND", lse_layout="NT", out=buf[1:], lse_base="e")
    with pytest.raises(ringattn.RingAttnError, match="backend"):
        merge_states(o, lse, layout="TND", lse_layout="NT", backend="nope", lse_base="e")


def test_zero_size():
    got = merge_states([torch.empty(0, 3, 4)] * 2, [torch.empty(3, 0)] * 2, layout="TND", lse_layout="NT", lse_base="e")
    assert got[0].shape == (0, 3, 4) and got[1].shape == (3, 0)


# --- conversions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", list(BASES))
def test_stats_lse_round_trip_and_empty_rows(base):
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(2, 3, 5, 1, generator=gen).expand(2, 3, 5, 8).contiguous()
    l = (torch.rand(2, 3, 5, 1, generator=gen) + 0.1).expand(2, 3, 5, 8).contiguous()
    m[0, 0, 0], l[0, 0, 0] = float("-inf"), 0.0
    lse = stats_to_lse(m, l, lse_base=base)
    want = (m[..., 0].double() + torch.log(l[..., 0].double())) / BASES[base]
    torch.testing.assert_close(lse.double(), want, atol=1e-6, rtol=1e-6)
    m2, l2 = lse_to_stats(lse, lse_base=base)
    assert m2.shape == (2, 3, 5, 8) and m2.is_contiguous()
    torch.testing.assert_close(m2 + torch.log(l2), m + torch.log(l), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(m2[0, 0, 0]).all() and (l2[0, 0, 0] == 0).all()
    plus_inf = lse_to_stats(torch.tensor([float("inf")]))
    assert torch.isneginf(plus_inf[0]).all() and (plus_inf[1] == 0).all()


def test_converted_lse_merge_matches_ring_attention_update():
    """Ascend stats -> LSE -> merge_states == ring_attention_update on the stats (SBH, both directions)."""
    gen = torch.Generator().manual_seed(8)
    s, b, n, d = 4, 2, 3, 8
    parts = []
    for _ in range(2):
        m = torch.randn(b, n, s, 1, generator=gen).expand(b, n, s, 8).contiguous()
        l = (torch.rand(b, n, s, 1, generator=gen) + 0.5).expand(b, n, s, 8).contiguous()
        parts.append((torch.randn(s, b, n * d, generator=gen), m, l))
    parts[0][1][0, 0, 0], parts[0][2][0, 0, 0] = float("-inf"), 0.0
    want_o, want_m, want_l = ringattn.ring_attention_update(*parts[0], *parts[1])
    got_o, got_lse = merge_states(
        [p[0] for p in parts], [stats_to_lse(p[1], p[2], lse_base=2) for p in parts], layout="SBH", lse_base=2
    )
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, stats_to_lse(want_m, want_l, lse_base=2), atol=1e-5, rtol=1e-5)
    back = [(p[0], *lse_to_stats(stats_to_lse(p[1], p[2]))) for p in parts]
    torch.testing.assert_close(ringattn.ring_attention_update(*back[0], *back[1])[0], want_o, atol=1e-5, rtol=1e-5)
