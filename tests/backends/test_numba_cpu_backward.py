"""The fused CPU backward of the row merge (``backends/numba_cpu_backward.py``, Note [row merge backward]).

Checked against ``torch_eager.merge_rows_backward`` (the portable implementation) and against autograd through a
float64 formula of the forward, in both statistics forms, with edge rows in every case: a part empty, every part
empty, maxima tied across all parts, an LSE of ``+inf``. Gradient outputs are poisoned with NaN before each call.
Statistics have 8 lanes: lane j gets the gradient of the elements ``d % 8 == j`` (Note [row merge backward]).

Tolerances (``inputs.TOL``, ``docs/contract.md`` "Numerics"): a part's output gradient is ``w_k g`` rounded once to
its dtype, so it is within one rounding (plus float32 weights) of the float64 value: fp32 1e-4, fp16 1e-3, bf16 5e-3,
fp64 1e-12.
Statistic gradients are float32 (float64 for fp64) sums of D products whatever the parts' dtype: 1e-4 (1e-12),
relative to the largest gradient of the tensor. Against the eager backend the same tables apply (both round once;
they differ in ``exp``'s last bit and the dot's summation order).

Each (dtype, statistics dtype, K) compiles the kernel once (seconds; cached on disk afterwards): the tests use
fp32 at K = 1, 2, 3, 5 and fp16 / bf16 / fp64 at K = 2 only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba", reason="the cpu backend needs numba")

import ringattn  # noqa: E402
from inputs import TOL, strided_copy  # noqa: E402
from ringattn._contract import per_batch_row_map  # noqa: E402
from ringattn.backends import numba_cpu, torch_eager  # noqa: E402
from ringattn.backends.numba_cpu import _flat  # noqa: E402
from ringattn.backends.numba_cpu_backward import _eight_lanes, merge_rows_backward  # noqa: E402

LN2 = math.log(2.0)
FORMS = {"stats": None, "lse-e": 1.0, "lse-2": LN2}  # form -> lse_scale (None: stats form)
SHAPE = (3, 2, 3, 13)  # (P, Q, N, D): 18 rows, odd D
EMPTY_PART, ALL_EMPTY, TIED, PLUS_INF = 0, 1, 2, 3  # flat row indices of the edge rows


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(k: int, dtype: torch.dtype, form: str, gen: torch.Generator, shape=SHAPE, lanes: int = 8):
    """Forward inputs and incoming gradients of a K-part merge, with the edge rows of the module docstring.

    Returns ``(args, lse_scale)`` with ``args = (grad_o, grad_m, grad_l, parts_o, parts_m, parts_l)``; statistics
    are ``(P, Q, N, lanes)`` with equal lanes, ``parts_l`` / ``grad_l`` None in the LSE forms.
    """
    p, q, n, d = shape
    sdt, lse = stats_dtype(dtype), form != "stats"
    rows = (p, q, n, 1)

    def rand_o() -> torch.Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)

    maxima = [torch.randn(rows, generator=gen, dtype=torch.float64) * 2 for _ in range(k)]
    sums = [0.5 + torch.rand(rows, generator=gen, dtype=torch.float64) for _ in range(k)]
    for m, s in zip(maxima, sums, strict=True):
        m.view(-1)[TIED] = maxima[0].view(-1)[TIED]
        m.view(-1)[ALL_EMPTY], s.view(-1)[ALL_EMPTY] = -math.inf, 0.0
    maxima[0].view(-1)[EMPTY_PART], sums[0].view(-1)[EMPTY_PART] = -math.inf, 0.0
    if lse:  # LSE form: one number per part; FORMS gives the scale into natural log
        maxima = [(m + s.log()) / FORMS[form] for m, s in zip(maxima, sums, strict=True)]
        maxima[-1].view(-1)[PLUS_INF] = math.inf  # old FlashAttention's empty marker

    def lanes_of(t: torch.Tensor) -> torch.Tensor:
        return t.to(sdt).expand(p, q, n, lanes).contiguous()

    parts_m = [lanes_of(m) for m in maxima]
    parts_l = None if lse else [lanes_of(s) for s in sums]
    grad_m = torch.randn((p, q, n, lanes), generator=gen, dtype=torch.float64).to(sdt)
    grad_l = None if lse else torch.randn((p, q, n, lanes), generator=gen, dtype=torch.float64).to(sdt)
    args = (rand_o(), grad_m, grad_l, [rand_o() for _ in range(k)], parts_m, parts_l)
    return args, (1.0 if not lse else FORMS[form])


def poisoned(parts_o, parts_m, lse: bool):
    """NaN-filled gradient outputs ``(grad_parts_o, grad_parts_m, grad_parts_l)``."""
    fill = lambda ts: [torch.full_like(t, math.nan) for t in ts]  # noqa: E731
    return fill(parts_o), fill(parts_m), (None if lse else fill(parts_m))


def run(kernel, args, lse_scale: float, row_map=None, outs=None):
    """Gradients of the parts from ``kernel`` as ``[do_1..do_K, dm_1..dm_K, dl_1..dl_K]``, into poisoned outputs."""
    grad_o, grad_m, grad_l, parts_o, parts_m, parts_l = args
    outs = poisoned(parts_o, parts_m, parts_l is None) if outs is None else outs
    kernel(grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, *outs, row_map=row_map, lse_scale=lse_scale)
    return [t for ts in outs if ts is not None for t in ts]


def float64_autograd(args, lse_scale: float):
    """The gradients by autograd through the forward (Note [row merge]) written in float64 torch operations, lane by
    lane: element d of a row uses lane ``d % lanes``; an empty part is selected out (never multiplied by 0).

    Ties of the max share its gradient equally among non-empty parts (``amax``'s rule, and the closed form's); a lane
    empty in every part passes no gradient (its merged max is the constant ``-inf``).
    """
    grad_o, grad_m, grad_l, parts_o, parts_m, parts_l = args
    leaves = [t.detach().double().requires_grad_() for t in (*parts_o, *parts_m, *(parts_l or []))]
    k, lanes = len(parts_o), parts_m[0].shape[-1]
    o, m, s = leaves[:k], leaves[k : 2 * k], leaves[2 * k :]
    if s:
        x, empty = m, [(t == -math.inf) & (u == 0) for t, u in zip(m, s, strict=True)]
    else:  # LSE form: lane 0 (one LSE per row), natural log after scaling; +-inf are empty (no gradient there)
        empty = [t[..., :1].isinf() for t in m]
        x = [(t[..., :1] * lse_scale).masked_fill(e, -math.inf) for t, e in zip(m, empty, strict=True)]
    all_empty = torch.stack(empty).all(0)
    new_max = torch.where(all_empty, -math.inf, torch.stack(x).amax(0))
    shift = torch.where(all_empty, 0.0, new_max)
    scaled = [torch.exp(t - shift) * (s[i] if s else 1.0) for i, t in enumerate(x)]
    new_sum = sum(scaled)
    safe = torch.where(new_sum == 0, 1.0, new_sum)
    lane_of = torch.arange(parts_o[0].shape[-1]) % x[0].shape[-1]

    def spread(t: torch.Tensor) -> torch.Tensor:  # (..., lanes) -> (..., D)
        return t[..., lane_of]

    merged = sum(
        torch.where(spread(e), 0.0, part * spread(torch.where(all_empty, 0.0, a / safe)))
        for part, a, e in zip(o, scaled, empty, strict=True)
    )
    if s:
        stats = [new_max, new_sum]
    else:  # one LSE per row, written to every lane
        stats = [torch.where(all_empty, -math.inf, (new_max + safe.log()) / lse_scale).expand(*x[0].shape[:-1], lanes)]
    grads = [grad_o] + [t for t in (grad_m, grad_l) if t is not None]
    return torch.autograd.grad([merged, *stats], leaves, [g.double() for g in grads])


def assert_grads_close(got, want, dtype: torch.dtype, k: int) -> None:
    """Output gradients at ``TOL[dtype]``, statistic gradients at the float32 (float64) arithmetic tolerance."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        tol = TOL[dtype] if i < k else TOL[stats_dtype(dtype)]
        scale = max(1.0, w.double().abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w.double(), atol=tol * scale, rtol=tol)


def assert_lanes_and_edges(got, args, k: int) -> None:
    """Empty parts get exactly 0 (every lane, whatever their output holds); rows empty in every part give 0 to every
    part; nothing is NaN."""
    rows = [t.reshape(-1, t.shape[-1]) for t in got]  # (rows, D) and (rows, lanes)
    for t in rows:
        assert (t[ALL_EMPTY] == 0).all()
    if k > 1:  # part 0 is empty in row EMPTY_PART (with K = 1 the whole row is)
        for t in (rows[0], rows[k], *rows[2 * k :][:1]):
            assert (t[EMPTY_PART] == 0).all()
    for t in got:
        assert not t.isnan().any()


CASES = [(torch.float32, k, form) for k in (1, 2, 3) for form in FORMS]
CASES += [(dtype, 2, form) for dtype in (torch.float16, torch.bfloat16) for form in FORMS]
# K = 5 and float64 compile one more kernel each (10-30 s on 2 cores): in the `slow` run (issue 15: the test command
# under 4 minutes).
CASES += [pytest.param(torch.float32, 5, form, marks=pytest.mark.slow) for form in FORMS]
CASES += [pytest.param(torch.float64, 2, form, marks=pytest.mark.slow) for form in FORMS]


@pytest.mark.parametrize("dtype,k,form", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_against_eager_and_float64_autograd(dtype: torch.dtype, k: int, form: str) -> None:
    args, lse_scale = make_case(k, dtype, form, torch.Generator().manual_seed(k))
    got = run(merge_rows_backward, args, lse_scale)
    assert_lanes_and_edges(got, args, k)
    assert_grads_close(got, run(torch_eager.merge_rows_backward, args, lse_scale), dtype, k)
    assert_grads_close(got, float64_autograd(args, lse_scale), dtype, k)


@pytest.mark.parametrize("head_dim", [1, 0])
def test_tiny_and_zero_head_dim(head_dim: int) -> None:
    args, _ = make_case(2, torch.float32, "stats", torch.Generator().manual_seed(3), shape=(2, 1, 3, head_dim))
    assert_grads_close(
        run(merge_rows_backward, args, 1.0), run(torch_eager.merge_rows_backward, args, 1.0), torch.float32, 2
    )


def test_zero_rows_write_nothing() -> None:
    args, _ = make_case(2, torch.float32, "stats", torch.Generator().manual_seed(4))
    empty = tuple(t[:0] if isinstance(t, torch.Tensor) else [x[:0] for x in t] for t in args)
    assert run(merge_rows_backward, empty, 1.0)[0].shape == (0, *SHAPE[1:])


def test_nan_propagates_to_its_row_only() -> None:
    args, _ = make_case(2, torch.float32, "stats", torch.Generator().manual_seed(5))
    grad_o, grad_m, grad_l, parts_o, parts_m, parts_l = args
    parts_o[0][0, 1, 1, 4] = math.nan  # row 4: the dots of that row
    parts_m[1][1, 0, 2, 0] = math.nan  # row 8: the row's max and weights
    grad_o[2, 0, 0, 7] = math.nan  # row 12: one element of each part's output gradient
    grad_l[2, 1, 1, 3] = math.nan  # row 16: a lane of the sum's gradient
    got = run(merge_rows_backward, args, 1.0)
    want = run(torch_eager.merge_rows_backward, args, 1.0)
    nan_rows = set()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan())
        nan_rows |= set(g.reshape(-1, g.shape[-1]).isnan().any(-1).nonzero().flatten().tolist())
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert nan_rows == {4, 8, 12, 16}


def relayout(args, fn):
    """``args`` with ``fn`` applied to every tensor (lists of parts included)."""
    return [t if t is None else [fn(x) for x in t] if isinstance(t, list) else fn(t) for t in args]


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` in another memory layout: 'gap', 'transposed', or 'expanded' (zero strides where ``t`` allows)."""
    if how != "expanded":
        return strided_copy(t, how)
    return t[..., :1].expand(t.shape) if t.shape[-1] == 8 else t[:1].expand(t.shape)


@pytest.mark.parametrize("how", ["gap", "transposed", "expanded"])
@pytest.mark.parametrize("form", ["stats", "lse-2"])
def test_strides_on_every_argument(how: str, form: str) -> None:
    args, lse_scale = make_case(2, torch.float32, form, torch.Generator().manual_seed(6))
    args = relayout(args, lambda t: strided(t, how))
    grad_o, _, _, parts_o, parts_m, _ = args
    out_how = "gap" if how == "expanded" else how  # outputs cannot be expanded
    outs = tuple(
        None if ts is None else [strided(x, out_how).fill_(math.nan) for x in ts]
        for ts in poisoned(parts_o, parts_m, form != "stats")
    )
    got = run(merge_rows_backward, args, lse_scale, outs=outs)
    want = run(merge_rows_backward, relayout(args, torch.Tensor.contiguous), lse_scale)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert not g.is_contiguous()
        if i < 2:  # w_k g is one product: bit-identical; the dots may sum in another order when strided
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_per_batch_row_map_with_zero_length_batches() -> None:
    gen = torch.Generator().manual_seed(7)
    heads, offsets = 3, torch.tensor([0, 2, 2, 5, 5, 6])
    total = int(offsets[-1])
    args, _ = make_case(2, torch.float32, "stats", gen, shape=(total, 1, heads, 13))
    # With a row map the statistics views are the raw (T, 1, N, lanes) tensors: reinterpret the same values.
    row_map = per_batch_row_map(offsets, total, heads)
    got = run(merge_rows_backward, args, 1.0, row_map=row_map)
    want = run(torch_eager.merge_rows_backward, args, 1.0, row_map=row_map)
    assert_grads_close(got, want, torch.float32, 2)
    strided_args = relayout(args, lambda t: strided_copy(t, "gap"))
    strided_args[4] = [strided_copy(t, "transposed") for t in args[4]]  # parts_m
    assert_grads_close(run(merge_rows_backward, strided_args, 1.0, row_map=row_map), want, torch.float32, 2)
    # The map is a bijection: every statistic row was written (no NaN left from the poison).
    assert not any(t.isnan().any() for t in got)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_identical_results_and_keep_torch_setting(monkeypatch, threads: int) -> None:
    monkeypatch.setattr(numba_cpu, "_PARALLEL_BYTES", 0)  # take the parallel path on a small problem
    args, _ = make_case(3, torch.float32, "stats", torch.Generator().manual_seed(8), shape=(40, 2, 3, 13))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = run(merge_rows_backward, args, 1.0)
        assert torch.get_num_threads() == threads
        torch.set_num_threads(1)
        want = run(merge_rows_backward, args, 1.0)
    finally:
        torch.set_num_threads(saved)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# --- end to end: the public ops' autograd with this kernel as the cpu backend's backward -------------------------


@pytest.fixture
def fused_backward(monkeypatch):
    """Install the kernel as ``numba_cpu.merge_rows_backward`` and count its calls."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        merge_rows_backward(*args, **kwargs)

    monkeypatch.setattr(numba_cpu, "merge_rows_backward", spy, raising=False)
    return calls


def grads_of(fn, inputs, backend: str, gen_seed: int):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, backend=backend)
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.autograd.grad(outs, leaves, [torch.randn(t.shape, generator=gen).to(t.dtype) for t in outs])


UPDATE_LAYOUTS = {
    "SBH": dict(layout="SBH"),
    "TND-per-batch": dict(actual_seq_qlen=[0, 2, 2, 5], layout="TND", ascend_limits=False),
    "TND-token-major": dict(actual_seq_qlen=[0, 2, 2, 5], layout="TND", ascend_limits=False, softmax_layout="TND"),
}


@pytest.mark.parametrize("layout", list(UPDATE_LAYOUTS))
def test_ring_attention_update_autograd_cpu_equals_torch(fused_backward, layout: str) -> None:
    gen = torch.Generator().manual_seed(9)
    attn, stats = ((5, 2, 12), (2, 3, 5, 8)) if layout == "SBH" else ((5, 3, 4), (5, 3, 8))
    inputs = []
    for _ in range(2):
        m = torch.randn(*stats[:-1], 1, generator=gen).expand(stats).contiguous()
        m.view(-1, 8)[1] = -math.inf  # an empty part in one row
        inputs += [
            torch.rand(attn, generator=gen) * 2 - 1,
            m,
            (0.5 + torch.rand(stats, generator=gen)) * (m > -math.inf),
        ]
    inputs[1].view(-1, 8)[3], inputs[4].view(-1, 8)[3] = 0.25, 0.25  # tied maxima

    def fn(*x, backend):
        return ringattn.ring_attention_update(*x, **UPDATE_LAYOUTS[layout], backend=backend)

    got = grads_of(fn, inputs, "cpu", 10)
    assert fused_backward
    for g, w in zip(got, grads_of(fn, inputs, "torch", 10), strict=True):
        torch.testing.assert_close(g, w, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_merge_states_autograd_cpu_equals_torch(fused_backward) -> None:
    gen = torch.Generator().manual_seed(11)
    outputs = [torch.rand(2, 5, 3, 13, generator=gen) * 2 - 1 for _ in range(3)]  # BSND
    lses = [torch.randn(2, 3, 5, generator=gen) for _ in range(3)]  # BNS
    lses[0][0, 0, 0] = -math.inf

    def fn(*x, backend):
        return ringattn.merge_states(x[:3], x[3:], layout="BSND", lse_base=2, backend=backend)

    got = grads_of(fn, outputs + lses, "cpu", 12)
    assert fused_backward
    for g, w in zip(got, grads_of(fn, outputs + lses, "torch", 12), strict=True):
        torch.testing.assert_close(g, w, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@numba.njit
def _eight_lane_row(g, g_base, o, o_base, out, out_base, rows, dots, dim):
    """``_eight_lanes`` on one row, part k = 1 (one compile per dtype, shared by the cases below)."""
    lane_w, lane_acc = np.empty(8, np.float32), np.empty(8, np.float32)
    return _eight_lanes(g, g_base, o, o_base, out, out_base, rows, 0, 1, dots, dim, lane_w, lane_acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [8, 37, 128])
def test_eight_lane_rows_match_the_scalar_arithmetic_bitwise(dtype: torch.dtype, dim: int) -> None:
    """Note [eight lanes at once]: the vector row (float32 / bfloat16) against the scalar arithmetic in its order,
    element by element: ``out[d] = round(w[d % 8] * g[d])`` and ``dot[c] = ((g[c] o[c] + g[c + 8] o[c + 8]) + ...)``
    in float32, from bases inside the buffers. float16 has no vector row: it declines and writes nothing."""
    gen = torch.Generator().manual_seed(dim)
    g, o = (torch.randn(dim + 5, generator=gen).to(dtype) for _ in range(2))
    if dim > 8:
        g[9] = math.nan  # element 7 of the row: a NaN stays in its lane (and its output element)
    rows = torch.randn(8, 3, generator=gen)  # column k = 1 holds the lane weights
    out = torch.full((dim + 3,), math.nan).to(dtype)
    dots = torch.full((8, 3), math.nan)
    done = _eight_lane_row(_flat(g), np.uint64(2), _flat(o), np.uint64(5), _flat(out), np.uint64(3), rows.numpy(),
                           dots.numpy(), dim)  # fmt: skip
    if dtype == torch.float16:
        assert not done and out.isnan().all() and dots.isnan().all()
        return
    assert done
    gf, of, w = g[2 : 2 + dim].float(), o[5 : 5 + dim].float(), rows[:, 1]
    want_out = (gf * w[torch.arange(dim) % 8]).to(dtype)
    torch.testing.assert_close(out[3 : 3 + dim], want_out, atol=0, rtol=0, equal_nan=True)
    assert out[:3].isnan().all()  # nothing written before the base
    for c in range(8):
        total = torch.zeros((), dtype=torch.float32)
        for d in range(c, dim, 8):
            total = total + gf[d] * of[d]
        torch.testing.assert_close(dots[c, 1], total, atol=0, rtol=0, equal_nan=True)
    assert dots[:, [0, 2]].isnan().all()  # other parts' columns untouched
