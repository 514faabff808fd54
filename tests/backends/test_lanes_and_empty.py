"""Atlas A2 lane semantics (issue 13) and empty parts whose output is never read (issue 17), on every backend.

Lanes: the 8 statistics lanes of a row merge each on their own, and output element ``d`` takes the weights of lane
``d % 8``; checked against ``ringattn.reference`` (float64, the lane rule written out) on independent lanes,
MindSpore's own example among them, forward and backward.

Empty parts: a part whose statistic says "no keys" (LSE ``+-inf``; Ascend max ``-inf`` with sum 0, per lane) is not
read. Its output holds NaN, ``+inf`` or huge finite garbage here, and the merged row must be bitwise the merge of
the other parts; a row empty in every part is ``(0, -inf)``; its gradients are 0.

Tolerances (atol = rtol against float64): float32 1e-4, float16 1e-3, bfloat16 5e-3 (``inputs.TOL``: one rounding
of the output plus float32 weights). MindSpore's example draws sums in [-1, 1), so ``L = a + b`` can nearly cancel
and float32 weights ``a / L`` lose ``eps32 * (|a| + |b|) / |L|`` relative: that case is compared at
``1e-4 * (1 + |terms| * (|a| + |b|) / |L|)`` per element, what any float32 evaluation of the formula can reach (the
float32 ``torch`` formula itself is off by 1.8e-3 there).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from inputs import TOL, available_backends, backend_device
from ringattn.merge import merge_states
from ringattn.reference import merge_states_reference, merge_stats_reference, ring_attention_update_reference

UPDATE_BACKENDS = ["reference", *available_backends()]
MERGE_BACKENDS = available_backends()
GARBAGE = (float("nan"), float("inf"), 3e38)


def on(backend: str, tensors):
    device = backend_device(backend)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def lanes_case(layout, dtype, gen, *, seq=5, batch=2, heads=3, head_dim=12, lens=(2, 0, 3), token_major=False):
    """Inputs with 8 independent lanes (sums in [0.5, 1.5): well conditioned) and some empty lanes and rows."""
    if layout == "SBH":
        attn, rows, kw = (seq, batch, heads * head_dim), (batch, heads, seq), {}
    else:
        offsets = np.concatenate([[0], np.cumsum(lens)]).tolist()
        attn, rows = (offsets[-1], heads, head_dim), (offsets[-1], heads)
        kw = {"actual_seq_qlen": offsets, "layout": "TND", "ascend_limits": False}
        if token_major:
            kw["softmax_layout"] = "TND"
    stats = (*rows, 8)
    m = [torch.randn(stats, generator=gen) * 3 for _ in range(2)]
    l = [torch.rand(stats, generator=gen) + 0.5 for _ in range(2)]
    o = [(torch.rand(attn, generator=gen) * 2 - 1).to(dtype) for _ in range(2)]
    flat_m, flat_l = [t.view(-1, 8) for t in m], [t.view(-1, 8) for t in l]
    if flat_m[0].shape[0] >= 3:
        flat_m[1][0, 3], flat_l[1][0, 3] = -math.inf, 0.0  # cur empty in one lane only
        flat_m[0][1], flat_l[0][1] = -math.inf, 0.0  # prev empty in a whole row
        flat_m[0][2, 5], flat_l[0][2, 5] = -math.inf, 0.0  # both empty in one lane
        flat_m[1][2, 5], flat_l[1][2, 5] = -math.inf, 0.0
        flat_m[0][2, 1] = flat_m[1][2, 1]  # equal maxima in one lane
    return [o[0], m[0], l[0], o[1], m[1], l[1]], kw


def reference(args, kw):
    return ring_attention_update_reference(
        *args, kw.get("actual_seq_qlen"), kw.get("layout", "SBH"), kw.get("softmax_layout")
    )


# --- lanes, forward ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_mindspore_example_follows_atlas_a2(backend):
    """The MindSpore page's own example, as the page runs it (NumPy in, through ``ringattn.ops``)."""
    np.random.seed(123)  # noqa: NPY002 - the page's own (legacy) calls, for its exact numbers
    S, B, H, N = 4, 6, 16, 8

    def draw(*size):
        return np.random.uniform(-1, 1, size=size).astype(np.float32)  # noqa: NPY002

    prev_o, prev_m, prev_l = draw(S, B, H), draw(B, N, S, 8), draw(B, N, S, 8)
    cur_o, cur_m, cur_l = draw(S, B, H), draw(B, N, S, 8), draw(B, N, S, 8)
    args = [prev_o, prev_m, prev_l, cur_o, cur_m, cur_l]
    if backend_device(backend).type == "cuda":
        args = [torch.from_numpy(a).cuda() for a in args]
    got = [torch.as_tensor(x).cpu().double() for x in ringattn.ops.ring_attention_update(*args, backend=backend)]
    t = [torch.from_numpy(a) for a in (prev_o, prev_m, prev_l, cur_o, cur_m, cur_l)]
    want = ring_attention_update_reference(*t)
    # Statistics lane by lane: max exactly, sum to float32 accuracy.
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)
    # Output element d of head n uses lane d % 8 (D = 2 here: lanes 0 and 1), with the conditioning bound.
    pm, pl, cm, cl = (x.double() for x in t[1:3] + t[4:6])
    new_max = torch.maximum(pm, cm)
    a, b = pl * torch.exp(pm - new_max), cl * torch.exp(cm - new_max)
    _, _, p, c = merge_stats_reference(*t[1:3], *t[4:6])
    head_dim = H // N
    lane = torch.arange(head_dim) % 8

    def per_element(x):  # (B, N, S, 8) -> (S, B, H) by lane d % 8
        return x[..., lane].permute(2, 0, 1, 3).reshape(S, B, H)

    terms = (t[0].double() * per_element(p)).abs() + (t[3].double() * per_element(c)).abs()
    cond = per_element((a.abs() + b.abs()) / (a + b).abs())
    assert torch.all((got[0] - want[0]).abs() <= 1e-4 * (1 + terms * cond))
    # Not lane 0 broadcast: the odd elements (lane 1) differ from what lane 0's weights give.
    lane0 = t[0].double() * per_element(p[..., :1].expand_as(p)) + t[3].double() * per_element(c[..., :1].expand_as(c))
    assert (got[0][..., 1::2] - lane0[..., 1::2]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("layout", ["SBH", "TND", "TND-token-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_independent_lanes_against_float64_lane_rule(backend, layout, dtype):
    gen = torch.Generator().manual_seed(11)
    args, kw = lanes_case(layout[:3], dtype, gen, token_major=layout.endswith("major"))
    got = ringattn.ring_attention_update(*on(backend, args), **kw, backend=backend)
    want = reference(args, kw)
    tol = TOL[dtype]
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=tol, rtol=tol)
    assert torch.equal(got[1].cpu().double(), want[1])
    torch.testing.assert_close(got[2].cpu().double(), want[2], atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    seq=st.integers(1, 6),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 20),
    backend=st.sampled_from(UPDATE_BACKENDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_independent_lanes_any_head_size(seq, heads, head_dim, backend, seed):
    """Head sizes below 8 and not multiples of 8 included (lanes past D are merged but read by no element)."""
    args, kw = lanes_case("SBH", torch.float32, torch.Generator().manual_seed(seed), seq=seq, heads=heads,
                          head_dim=head_dim)  # fmt: skip
    got = ringattn.ring_attention_update(*on(backend, args), backend=backend)
    want = reference(args, kw)
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1].cpu().double(), want[1])
    torch.testing.assert_close(got[2].cpu().double(), want[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("layout", ["SBH", "TND", "SBH strided lanes"])
@pytest.mark.parametrize("odd", ["max lane 1", "sum lane 7", "empty", "nan lane 4", "-0 lane 3"])
def test_one_odd_row_among_equal_ones(backend, layout, odd):
    """Equal lanes everywhere but one row, in the middle of a long run of rows: the CPU kernel tests whole chunks of
    128 statistics rows first (Note [lane check vector]; statistics whose lanes are not contiguous, row by row); the
    chunk holding the odd row must find it (any lane, max or sum, an empty part, a NaN in one lane, a -0 beside +0:
    equal as floats, not as bits) and send that row alone lane by lane. Every other row stays bitwise what it was
    without the odd row; the odd row matches the float64 lane rule, signs of zero included; garbage in an empty
    part is not read."""
    strided = layout.endswith("strided lanes")
    layout = layout.split()[0]
    gen = torch.Generator().manual_seed(21)
    seq, heads, head_dim = 300, 2, 16  # 300 rows per head: three chunks of the head-major statistics
    if layout == "SBH":
        attn, rows, kw = (seq, 1, heads * head_dim), (1, heads, seq), {}
    else:
        attn, rows = (seq, heads, head_dim), (seq, heads)
        kw = {"actual_seq_qlen": [0, 170, seq], "layout": "TND", "ascend_limits": False}

    def lanes(one: torch.Tensor) -> torch.Tensor:  # (*rows, 1) -> (*rows, 8) equal lanes, unit or row-sized stride
        if not strided:
            return one.expand(*rows, 8).contiguous()
        return one.expand(*rows, 8).movedim(-1, 0).contiguous().movedim(0, -1)

    m = [lanes(torch.randn((*rows, 1), generator=gen) * 3) for _ in range(2)]
    l = [lanes(torch.rand((*rows, 1), generator=gen) + 0.5) for _ in range(2)]
    assert (m[0].stride(-1) == 1) != strided
    o = [torch.rand(attn, generator=gen) * 2 - 1 for _ in range(2)]
    plain = ringattn.ring_attention_update(*on(backend, [o[0], m[0], l[0], o[1], m[1], l[1]]), **kw, backend=backend)

    # SBH: head 1, token 200, in the second chunk of the head's run. TND's default statistics are per batch ((N, S_b)
    # rows of batch b, packed): row (200, 1) of the (T, N, 8) tensor is flat row 401, i.e. head 0, token 170 + 61.
    row = (0, 1, 200) if layout == "SBH" else (200, 1)
    token, head = (200, 1) if layout == "SBH" else (231, 0)
    if odd == "max lane 1":
        m[1][row][1] += 0.75
    elif odd == "sum lane 7":
        l[0][row][7] *= 1.5
    elif odd == "nan lane 4":
        m[0][row][4] = math.nan
    elif odd == "-0 lane 3":  # the merged max of this row: +0 in every lane but lane 3
        m[0][row], m[1][row] = 0.0, -1.0
        m[0][row][3] = -0.0
    else:  # cur is empty in this row: its output there is garbage, never read
        m[1][row], l[1][row] = -math.inf, 0.0
        if layout == "SBH":
            o[1][token, 0, head * head_dim : (head + 1) * head_dim] = math.nan
        else:
            o[1][token, head] = math.nan
    args = [o[0], m[0], l[0], o[1], m[1], l[1]]
    got = [t.cpu() for t in ringattn.ring_attention_update(*on(backend, args), **kw, backend=backend)]
    want = reference(args, kw)

    # The odd row against the float64 lane rule (NaN where the rule gives NaN).
    torch.testing.assert_close(got[1].double(), want[1], atol=0, rtol=0, equal_nan=True)
    number = ~want[1].isnan()  # a NaN's sign bit is arbitrary
    assert torch.equal(got[1].signbit()[number], want[1].signbit()[number])  # -0 and +0 apart, as the lane rule
    torch.testing.assert_close(got[2].double(), want[2], atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-4, rtol=1e-4, equal_nan=True)

    # Every other row bitwise unchanged; the odd row's statistics changed.
    def changed(a, b):
        return ((a != b) & ~(a.isnan() & b.isnan())).any(-1)

    stats_changed = changed(got[1], plain[1].cpu()) | changed(got[2], plain[2].cpu())
    assert stats_changed.nonzero().tolist() == [list(row)]
    out_rows = got[0].reshape(seq, heads, head_dim) if layout == "SBH" else got[0]
    plain_rows = plain[0].cpu().reshape(seq, heads, head_dim) if layout == "SBH" else plain[0].cpu()
    assert set(map(tuple, changed(out_rows, plain_rows).nonzero().tolist())) <= {(token, head)}


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lanes_no_element_reads_do_not_change_the_output(backend, dtype):
    """D = 4 reads lanes 0-3 only: lanes 4-7 set apart from lane 0 (so the CPU kernel takes its lane-by-lane path
    for those rows) leave ``attn_out`` bitwise as it is with 8 equal lanes, and merge on their own."""
    gen = torch.Generator().manual_seed(12)
    args, _ = lanes_case("SBH", dtype, gen, head_dim=4)
    for i in (1, 2, 4, 5):  # equal lanes, no empty part
        lane = torch.randn if i in (1, 4) else torch.rand
        args[i] = (lane(args[i].shape[:-1] + (1,), generator=gen) + 0.5).expand_as(args[i]).contiguous()
    equal = ringattn.ring_attention_update(*on(backend, args), backend=backend)
    apart = [t.clone() for t in args]
    for i in (1, 2, 4, 5):
        apart[i][..., 4:] += torch.rand(apart[i][..., 4:].shape, generator=gen)
    got = ringattn.ring_attention_update(*on(backend, apart), backend=backend)
    assert torch.equal(got[0], equal[0])
    want = reference(apart, {})
    assert torch.equal(got[1].cpu().double(), want[1])
    torch.testing.assert_close(got[2].cpu().double(), want[2], atol=1e-5, rtol=1e-5)


# --- lanes, backward --------------------------------------------------------------------------------------------------


def finite(outs):
    """gradcheck's finite differences of a -inf output (an all-empty lane's max) are NaN: compare 0 there."""
    return tuple(torch.where(torch.isneginf(t), torch.zeros_like(t), t) for t in outs)


# The fused CPU kernels in float64 (a forward and a backward of their own, ~40 s to compile): in the `slow` run; the
# default run checks their backward in float32 against float64 autograd (test_numba_cpu_backward.py).
@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("cpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["SBH", "TND", "TND-token-major"])
def test_independent_lanes_gradcheck(backend, layout):
    """float64 gradcheck (the Triton kernels compile no float64; their backward is checked in float32 below)."""
    if backend not in UPDATE_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available (numba not installed)")
    args, kw = lanes_case(layout[:3], torch.float64, torch.Generator().manual_seed(13), seq=3, heads=2, head_dim=10,
                          token_major=layout.endswith("major"))  # fmt: skip
    args = [t.double() for t in args]
    # Garbage where a part is empty (lanes_case: prev in statistics row 1, cur in lane 3 of row 0): never read.
    prev_row = {"SBH": (1, 0, slice(0, 10)), "TND": (1, 0), "TND-token-major": (0, 1)}[layout]
    args[0][prev_row] = 1e30
    args[3].view(-1)[3] = -1e30
    leaves = [t.clone().requires_grad_() for t in args]
    fn = lambda *x: finite(ringattn.ring_attention_update(*x, **kw, backend=backend))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("layout", ["SBH", "TND"])
def test_independent_lanes_backward_against_autograd_of_reference(backend, layout):
    """Each lane's statistics get the gradient of the elements d % 8 == lane and of the lane's merged statistics:
    the fused float32 backward against torch autograd through ``ring_attention_update_reference`` (float64)."""
    gen = torch.Generator().manual_seed(14)
    args, kw = lanes_case(layout, torch.float32, gen, seq=4, heads=2, head_dim=20)
    outs = ringattn.ring_attention_update(*args, **kw)
    grads = [torch.randn(t.shape, generator=gen) for t in outs]
    leaves = [t.to(backend_device(backend)).requires_grad_() for t in args]
    got = torch.autograd.grad(ringattn.ring_attention_update(*leaves, **kw, backend=backend), leaves,
                              [g.to(backend_device(backend)) for g in grads])  # fmt: skip
    exact = [t.double().requires_grad_() for t in args]
    want_out = reference(exact, kw)
    # Lanes empty in every part: the reference's max splits g_m over the tied -inf parts; ours gives empty parts 0.
    all_empty = torch.isneginf(want_out[1]).detach()
    masked = [g.double() if i == 0 else g.double().masked_fill(all_empty, 0.0) for i, g in enumerate(grads)]
    want = list(torch.autograd.grad(want_out, exact, masked))
    for i in (1, 2, 4, 5):  # there the reference's autograd is NaN (exp(-inf) through a where); ours is 0
        assert torch.all(got[i].cpu()[all_empty] == 0)
        want[i] = want[i].masked_fill(all_empty, 0.0)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        torch.testing.assert_close(g.cpu().double(), w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=1e-4)


# --- empty parts (issue 17) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_empty_cur_is_never_read(backend, garbage, dtype):
    """Rows (or single lanes) where ``cur`` is empty give ``prev`` bitwise, whatever ``cur_attn_out`` holds."""
    gen = torch.Generator().manual_seed(15)
    args, _ = lanes_case("SBH", dtype, gen, head_dim=16)
    prev_o, prev_m, prev_l, cur_o, cur_m, cur_l = args
    rows = torch.rand(prev_m.shape[:-1], generator=gen) < 0.4  # (B, N, S): cur empty in every lane
    lanes = torch.rand(prev_m.shape, generator=gen) < 0.2  # and in single lanes
    prev_m.masked_fill_(torch.isneginf(prev_m), 0.0).clamp_(-5, 5)  # prev never empty here
    prev_l.masked_fill_(prev_l == 0, 1.0)
    empty = rows.unsqueeze(-1) | lanes
    cur_m.masked_fill_(empty, -math.inf)
    cur_l.masked_fill_(empty, 0.0)
    head_dim = 16
    lane_of = torch.arange(head_dim) % 8
    per_element = empty[..., lane_of].permute(2, 0, 1, 3).reshape(cur_o.shape)  # (S, B, H)
    cur_o.masked_fill_(per_element, torch.finfo(dtype).max if garbage == 3e38 else garbage)  # huge: the dtype's max
    got = ringattn.ring_attention_update(*on(backend, args), backend=backend)
    o, m, l = (t.cpu() for t in got)
    assert not o.isnan().any()
    full = per_element & rows.permute(2, 0, 1).repeat_interleave(head_dim, dim=2)
    assert torch.equal(o[full], prev_o[full])  # the merge of prev alone is prev, bitwise
    assert torch.equal(m[rows], prev_m[rows]) and torch.equal(l[rows], prev_l[rows])
    want = reference(args, {})
    tol = TOL[dtype]
    torch.testing.assert_close(o.double(), want[0], atol=tol, rtol=tol)


def canonical_parts(gen, k, dtype, shape=(2, 5, 3, 24)):
    """K parts ``(B, S, N, D)`` with natural LSEs ``(B, S, N)``; no part empty yet."""
    o = [torch.randn(shape, generator=gen).to(dtype) for _ in range(k)]
    lse = [torch.randn(shape[:-1], generator=gen) * 3 for _ in range(k)]
    return o, lse


LAYOUTS = [("BSND", "BNS"), ("BNSD", "BNS"), ("SBH", "BNS"), ("TND", "NT"), ("TND", "TN")]


def to_layout(o, lse, layout, lse_layout):
    """Canonical ``(B, S, N, D)`` / ``(B, S, N)`` -> the layout pair (TND uses batch 0)."""
    if layout == "BSND":
        o = o
    elif layout == "BNSD":
        o = o.permute(0, 2, 1, 3)
    elif layout == "SBH":
        o = o.permute(1, 0, 2, 3).reshape(o.shape[1], o.shape[0], -1)
    else:
        o = o[0]
    if lse_layout == "BNS":
        return o, lse.permute(0, 2, 1)
    return o, lse[0].t() if lse_layout == "NT" else lse[0]


def from_layout(o, lse, layout, lse_layout, shape):
    """Inverse of :func:`to_layout` for the merged result."""
    b, s, n, d = shape
    if layout == "BNSD":
        o = o.permute(0, 2, 1, 3)
    elif layout == "SBH":
        o = o.reshape(s, b, n, d).permute(1, 0, 2, 3)
    elif layout == "TND":
        o = o.unsqueeze(0)
    if lse_layout == "BNS":
        return o, lse.permute(0, 2, 1)
    return o, (lse.t() if lse_layout == "NT" else lse).unsqueeze(0)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize(("layout", "lse_layout"), LAYOUTS)
# K = 4..8 compile five more fused kernels (15-45 s each on 2 cores): in the `slow` run (issue 15: the test command
# under 4 minutes); K = 2 (bfloat16) and 3 (float32) use kernels the default run compiles anyway.
@pytest.mark.parametrize("k", [2, 3, *(pytest.param(k, marks=pytest.mark.slow) for k in range(4, 9))])
def test_merge_states_empty_parts_are_never_read(backend, layout, lse_layout, k):
    """Parts ``E`` empty on rows ``R`` (LSE ``-inf`` or ``+inf``, outputs NaN / inf / huge): those rows are bitwise
    the merge of the other parts; rows empty in every part are ``(0, -inf)``; float32, bfloat16, base e and 2."""
    gen = torch.Generator().manual_seed(100 + k)
    dtype = torch.bfloat16 if k % 2 == 0 else torch.float32  # K = 2, 3: kernels tests/backends compiles anyway
    shape = (1 if layout == "TND" else 2, 5, 3, 24)
    o, lse = canonical_parts(gen, k, dtype, shape)
    rows = torch.rand(shape[:-1], generator=gen) < 0.5
    dead = sorted(torch.randperm(k, generator=gen)[: k // 2].tolist())  # at least one part stays
    live = [j for j in range(k) if j not in dead]
    everywhere = torch.zeros(shape[:-1], dtype=torch.bool)
    everywhere.view(-1)[::7] = True  # and rows empty in every part
    for j in range(k):
        mask = (rows if j in dead else torch.zeros_like(rows)) | everywhere
        lse[j] = lse[j].masked_fill(mask, (-math.inf, math.inf)[j % 2])
        o[j] = o[j].masked_fill(mask.unsqueeze(-1), GARBAGE[j % 3])
    base = (2, "e")[k % 2]
    scale = math.log(2.0) if base == 2 else 1.0
    device = backend_device(backend)

    def run(parts):
        pairs = [to_layout(o[j], lse[j] / scale, layout, lse_layout) for j in parts]
        got = merge_states([p[0].to(device) for p in pairs], [p[1].to(device) for p in pairs], layout=layout,
                           lse_layout=lse_layout, lse_base=base, backend=backend)  # fmt: skip
        return from_layout(got[0].cpu(), got[1].cpu(), layout, lse_layout, shape)

    all_o, all_lse = run(range(k))
    live_o, live_lse = run(live)
    assert not all_o.isnan().any() and not all_lse.isnan().any()
    keep = rows & ~everywhere
    assert torch.equal(all_o[keep], live_o[keep]) and torch.equal(all_lse[keep], live_lse[keep])
    assert torch.all(all_o[everywhere] == 0) and torch.all(torch.isneginf(all_lse[everywhere]))
    assert not torch.signbit(all_o[everywhere]).any()  # +0, not -0
    want_o, want_lse = merge_states_reference(o, lse)
    tol = TOL[dtype]
    torch.testing.assert_close(all_o.double(), want_o, atol=tol, rtol=tol)
    torch.testing.assert_close(all_lse.double() * scale, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.slow)])  # float64: see above
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_merge_states_empty_parts_gradcheck(backend, k, garbage):
    if backend not in MERGE_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available (numba not installed)")
    gen = torch.Generator().manual_seed(200 + k)
    o = [torch.randn(4, 3, 10, generator=gen, dtype=torch.float64) for _ in range(k)]
    lse = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(k)]
    lse[0][0, 0], o[0][0, 0] = -math.inf, garbage
    lse[1][1, 1], o[1][1, 1] = math.inf, garbage
    for j in range(k):
        lse[j][2, 2], o[j][2, 2] = -math.inf, garbage
    leaves = [t.clone().requires_grad_() for t in o + lse]

    def fn(*x):
        return finite(merge_states(x[:k], x[k:], layout="TND", lse_layout="TN", backend=backend, lse_base="e"))

    if garbage == garbage:  # NaN inputs make gradcheck's own finite differences NaN; checked below instead
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    got = torch.autograd.grad(fn(*leaves), leaves, [torch.randn(t.shape, generator=gen, dtype=torch.float64)
                                                    for t in fn(*leaves)])  # fmt: skip
    assert not any(g.isnan().any() for g in got)
    assert got[0][0, 0].eq(0).all() and got[k][0, 0] == 0 and got[1][1, 1].eq(0).all() and got[k + 1][1, 1] == 0
    assert all(g[2, 2].eq(0).all() for g in got)
