"""Triton-specific tests of ``backends/triton_cuda.py`` (the shared property tests live in
``test_ring_attention_update.py``).

Without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1``, which must be set before
Triton is first imported; the interpreter is ~1000x slower than compiled code, so shapes are small but
chosen to cross tile edges (rows not a multiple of BLOCK_ROWS, D not a power of two, D = 1, D looping
over several BLOCK_D chunks). Tolerances: ``inputs.TOL``
(``docs/contract.md``, "Numerics"; atol = rtol), statistics at the float32 entry.

Both forward kernels (Note [triton row tiles], Note [triton flat merge]) run the public-path tests through the
``merge_kernel`` fixture (``RINGATTN_TRITON_MERGE``); the flat kernel's own tests compare its bits with the tile
kernel's (the same arithmetic) and with a float64 lane-by-lane reference.
"""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest does this too; kept for running this file alone

pytest.importorskip("triton", reason="the triton package is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ringattn  # noqa: E402
from inputs import TOL, UpdateInputs, make_update_inputs, random_stats  # noqa: E402
from ringattn._contract import _row_map, per_batch_row_map, validate_update  # noqa: E402
from ringattn.backends import torch_eager, triton_cuda  # noqa: E402
from ringattn.reference import ring_attention_update_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not triton_cuda._INTERPRETED:
    pytest.skip("no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

pytestmark = pytest.mark.triton
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATS_TOL = TOL[torch.float32]
INF = math.inf


def strided(t: torch.Tensor, how: str, fill: float = math.nan) -> torch.Tensor:
    """``t``'s values on DEVICE in a non-contiguous layout: 'gap' (a strided slice of a ``fill`` buffer in
    every dimension) or 'transposed' (dimensions reversed in memory); 'contiguous' copies as is."""
    if how == "contiguous":
        return t.to(DEVICE, copy=True)
    if how == "gap":
        big = torch.full([2 * s + 1 for s in t.shape], fill, dtype=t.dtype, device=DEVICE)
        view = big[tuple(slice(1, 2 * s + 1, 2) for s in t.shape)]
    else:
        view = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype, device=DEVICE).permute(*reversed(range(t.dim())))
    view.copy_(t)
    return view


def on_device(x: UpdateInputs, hows: tuple[str, ...] = ("contiguous",) * 6) -> UpdateInputs:
    moved = [strided(t, how) for t, how in zip(x.tensors(), hows, strict=True)]
    return UpdateInputs(x.layout, *moved, x.seq_offsets, x.softmax_layout)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(
        got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def assert_update_matches(x: UpdateInputs, got, dtype: torch.dtype) -> None:
    want = ring_attention_update_reference(*[t.cpu() for t in x.tensors()], x.seq_offsets, x.layout, x.softmax_layout)
    for name, g, w, tol in zip(("attn_out", "max", "sum"), got, want, (TOL[dtype], STATS_TOL, STATS_TOL), strict=True):
        assert_close(g, w, tol, name)


def poisoned_outputs(x: UpdateInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.full_like(x.prev_o, math.nan),
        torch.full_like(x.prev_m, math.nan),
        torch.full_like(x.prev_m, math.nan),
    )


LAYOUTS = {
    "SBH": dict(layout="SBH", seq=5, batch=3, heads=3, head_dim=24),
    "TND-per-batch": dict(layout="TND", seq_lens=[3, 0, 4, 2], heads=3, head_dim=40),
    "TND-token-major": dict(layout="TND", seq_lens=[3, 0, 4, 2], heads=3, head_dim=40, softmax_layout="TND"),
}


# The flat kernel (not the default) runs the shared tests in the `slow` run; its own tests below run by default.
@pytest.fixture(
    params=[
        k if k == triton_cuda.MERGE_KERNELS[0] else pytest.param(k, marks=pytest.mark.slow)
        for k in triton_cuda.MERGE_KERNELS
    ]
)
def merge_kernel(request, monkeypatch) -> str:
    """Each forward merge kernel in turn, selected as a user would: RINGATTN_TRITON_MERGE (read at every launch)."""
    monkeypatch.setenv(triton_cuda.MERGE_KERNEL_ENV, request.param)
    return request.param


def update_inputs(case: str, dtype: torch.dtype, seed: int, **kw) -> UpdateInputs:
    return make_update_inputs(dtype=dtype, gen=torch.Generator().manual_seed(seed), **{**LAYOUTS[case], **kw})


def run_update(x: UpdateInputs, backend: str = "triton", out=None):
    return ringattn.ring_attention_update(
        *x.args(), softmax_layout=x.softmax_layout, ascend_limits=False, out=out, backend=backend
    )


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_and_dtypes(case, dtype, merge_kernel):
    """Every layout and kernel dtype against float64; mean error at most 2x the torch backend's (the maximum
    is one rounding for both, so it says nothing about the kernel's arithmetic)."""
    x = on_device(update_inputs(case, dtype, seed=1))
    out = poisoned_outputs(x)
    got = run_update(x, out=out)
    assert all(g is o for g, o in zip(got, out, strict=True))
    assert_update_matches(x, got, dtype)
    want = ring_attention_update_reference(*[t.cpu() for t in x.tensors()], x.seq_offsets, x.layout, x.softmax_layout)
    if dtype == torch.bfloat16 and triton_cuda._INTERPRETED:
        return  # Triton 3.9's interpreter casts float32 to bfloat16 by truncation; compiled code rounds (cvt.rn)
    eager = run_update(x, backend="torch")
    finite = want[0].isfinite()
    err = (got[0].cpu().double() - want[0])[finite].abs().mean()
    eager_err = (eager[0].cpu().double() - want[0])[finite].abs().mean()
    assert err <= 2 * eager_err + 1e-7


@pytest.mark.parametrize("case", ["SBH", "TND-per-batch"])
def test_non_contiguous_every_argument(case, merge_kernel):
    """Strided reads of all six inputs and strided writes of all three outputs; gaps stay untouched."""
    x = on_device(
        update_inputs(case, torch.float16, seed=2), ("gap", "transposed", "gap", "transposed", "gap", "transposed")
    )
    assert not any(t.is_contiguous() for t in x.tensors())
    sentinel = 12345.0
    out = tuple(strided(t, "gap", fill=sentinel).fill_(math.nan) for t in poisoned_outputs(x))
    got = run_update(x, out=out)
    assert_update_matches(x, got, torch.float16)
    for o in out:
        buffer = o._base
        gaps = torch.ones_like(buffer, dtype=torch.bool)
        gaps[tuple(slice(1, None, 2) for _ in range(o.dim()))] = False
        assert (buffer[gaps] == sentinel).all(), "a write landed outside the output view"


@pytest.mark.parametrize("side", ["prev", "cur"])
@pytest.mark.parametrize("case", ["SBH", "TND-per-batch"])
def test_out_aliases_inputs_in_place(case, side, merge_kernel):
    """out= exactly the prev (or cur) views accumulates in place; per-batch rows are read before written."""
    x = on_device(update_inputs(case, torch.bfloat16, seed=3), ("gap", "contiguous", "transposed") * 2)
    before = UpdateInputs(x.layout, *[t.clone() for t in x.tensors()], x.seq_offsets, x.softmax_layout)
    dst = (x.prev_o, x.prev_m, x.prev_l) if side == "prev" else (x.cur_o, x.cur_m, x.cur_l)
    got = run_update(x, out=dst)
    assert all(g is d for g, d in zip(got, dst, strict=True))
    assert_update_matches(before, got, torch.bfloat16)


def test_tnd_zero_length_batches(merge_kernel):
    """Empty batches at the start, middle and end leave the per-batch row map a bijection."""
    x = on_device(update_inputs("TND-per-batch", torch.float32, seed=4, seq_lens=[0, 2, 0, 0, 5, 1, 0]))
    assert x.seq_offsets == [0, 0, 2, 2, 2, 7, 8, 8]
    got = run_update(x, out=poisoned_outputs(x))
    assert not got[1].isnan().any() and not got[2].isnan().any()  # every stats row was written
    assert_update_matches(x, got, torch.float32)


# --- merge_rows: K parts, stats and LSE form -----------------------------------------------------------


def merge_reference(parts_o, parts_m, parts_l, lse_scale=1.0, row_index=None):
    """Note [row merge] in float64, transcribed independently. ``row_index`` (T, N): per-batch stats row."""

    def lane0(s):
        s = s[..., 0].double().cpu()
        return s if row_index is None else s.reshape(-1)[row_index].unsqueeze(1)

    m = torch.stack([lane0(s) for s in parts_m])
    if parts_l is None:
        m = m * lse_scale
        m = m.masked_fill(m == INF, -INF)
        l = torch.ones_like(m)
    else:
        l = torch.stack([lane0(s) for s in parts_l])
    new_max = m.max(0).values
    empty = new_max == -INF
    w = l * torch.exp(m - torch.where(empty, 0.0, new_max))
    new_sum = w.sum(0)
    weights = torch.where(empty, 0.0, w / new_sum)
    o = (torch.stack([x.double().cpu() for x in parts_o]) * weights.unsqueeze(-1)).sum(0)
    if parts_l is None:
        return o, torch.where(empty, -INF, (new_max + torch.log(new_sum)) / lse_scale), None
    return o, new_max, new_sum


def per_batch_index(offsets: list[int], heads: int) -> torch.Tensor:
    """``docs/contract.md``'s statistics order literally: token t of batch i, head n -> stats row
    c_i*N + n*S_i + (t - c_i)."""
    index = torch.empty(offsets[-1], heads, dtype=torch.int64)
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        for t in range(start, end):
            for n in range(heads):
                index[t, n] = start * heads + n * (end - start) + (t - start)
    return index


def make_parts(k, rows_shape, head_dim, dtype, gen, form, lanes, lse_scale=1.0):
    """K parts on DEVICE, alternately contiguous / strided; LSE form: lse in the caller's base."""
    hows = ("contiguous", "gap", "transposed")
    parts_o, parts_m, parts_l = [], [], []
    for i in range(k):
        o = (torch.rand((*rows_shape, head_dim), generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        m, l = random_stats(rows_shape, gen, empty_fraction=0.2)
        if form != "stats":
            m = torch.where(l > 0, (m + torch.log(l)) / lse_scale, -INF).float()
        parts_o.append(strided(o, hows[i % 3]))
        parts_m.append(strided(m[..., :lanes].contiguous(), hows[(i + 1) % 3]))
        parts_l.append(strided(l[..., :lanes].contiguous(), hows[(i + 2) % 3]))
    return parts_o, parts_m, None if form != "stats" else parts_l


def merge_outputs(rows_shape, head_dim, dtype, lanes, form):
    out_o = torch.full((*rows_shape, head_dim), math.nan, dtype=dtype, device=DEVICE)
    out_m = torch.full((*rows_shape, lanes), math.nan, device=DEVICE)
    out_l = None if form != "stats" else torch.full_like(out_m, math.nan)
    return out_o, out_m, out_l


def check_merge(got, want, dtype, lanes):
    out_o, out_m, out_l = got
    want_o, want_m, want_l = want
    assert_close(out_o, want_o, TOL[dtype], "out_o")
    lane_shape = out_m.shape
    assert_close(out_m, want_m.reshape(*lane_shape[:-1], 1).expand(lane_shape), STATS_TOL, "out_m")
    if out_l is not None:
        assert_close(out_l, want_l.reshape(*lane_shape[:-1], 1).expand(lane_shape), STATS_TOL, "out_l")


FORMS = {"stats": 1.0, "lse": 1.0, "lse-base2": math.log(2)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_merge_rows_k_parts(k, form, merge_kernel):
    """K = 1..5 parts, stats and LSE form (natural and base 2), strided parts, against float64."""
    dtype = torch.float32 if k != 3 else torch.float16
    lse_scale, lanes = FORMS[form], 8 if form == "stats" else 1
    rows_shape, head_dim = (3, 2, 3), 20
    gen = torch.Generator().manual_seed(10 + k)
    parts_o, parts_m, parts_l = make_parts(k, rows_shape, head_dim, dtype, gen, form, lanes, lse_scale)
    if form != "stats":
        parts_m[0][0, 0, 0] = INF  # old FlashAttention's empty row: read as -inf
    for m in parts_m:  # one row empty in every part
        m[1, 1, 2] = -INF
    if parts_l is not None:
        for s in parts_l:
            s[1, 1, 2] = 0.0
    out = merge_outputs(rows_shape, head_dim, dtype, lanes, form)
    triton_cuda.merge_rows(parts_o, parts_m, parts_l, *out, lse_scale=lse_scale)
    check_merge(out, merge_reference(parts_o, parts_m, parts_l, lse_scale), dtype, lanes)
    assert (out[0][1, 1, 2] == 0).all() and (out[1][1, 1, 2] == -INF).all()
    if out[2] is not None:
        assert (out[2][1, 1, 2] == 0).all()


@pytest.mark.parametrize("form", ["stats", "lse"])
def test_merge_rows_per_batch_row_map(form, merge_kernel):
    """K = 3 with per-batch TND statistics located through the device row map."""
    offsets, heads, head_dim = [0, 3, 3, 7], 3, 9
    gen = torch.Generator().manual_seed(20)
    parts_o, parts_m, parts_l = make_parts(3, (offsets[-1], 1, heads), head_dim, torch.float32, gen, form, 8)
    row_map = per_batch_row_map(torch.tensor(offsets, device=DEVICE), offsets[-1], heads)
    out = merge_outputs((offsets[-1], 1, heads), head_dim, torch.float32, 8, form)
    triton_cuda.merge_rows(parts_o, parts_m, parts_l, *out, row_map=row_map)
    want_o, want_m, want_l = merge_reference(parts_o, parts_m, parts_l, row_index=per_batch_index(offsets, heads))
    assert_close(out[0], want_o, TOL[torch.float32], "out_o")
    index = per_batch_index(offsets, heads)
    for got, want in ((out[1], want_m), (out[2], want_l)):
        if got is None:
            continue
        flat = got[..., 0].reshape(-1).cpu()
        assert_close(flat[index], want.squeeze(1), STATS_TOL, "stats")
        assert (got == got[..., :1]).all(), "every lane is written"


def test_merge_rows_lse_in_place(merge_kernel):
    """LSE form accumulating into part 0 (out_o is parts_o[0], out_m is parts_m[0])."""
    gen = torch.Generator().manual_seed(21)
    parts_o, parts_m, _ = make_parts(3, (4, 1, 2), 16, torch.bfloat16, gen, "lse", 1)
    want = merge_reference(parts_o, parts_m, None)
    triton_cuda.merge_rows(parts_o, parts_m, None, parts_o[0], parts_m[0], None)
    check_merge((parts_o[0], parts_m[0], None), want, torch.bfloat16, 1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf on purpose
def test_empty_rows_nan_and_inf(merge_kernel):
    """Row by row: all parts empty, one part empty, NaN max, NaN element, +inf max (K = 3, stats form)."""
    gen = torch.Generator().manual_seed(22)
    rows_shape, head_dim = (6, 1, 1), 5
    parts_o, parts_m, parts_l = make_parts(3, rows_shape, head_dim, torch.float32, gen, "stats", 8)
    for m, s in zip(parts_m, parts_l, strict=True):
        m[:2] = torch.randn(2, 1, 1, 1).to(DEVICE)  # rows 2.. below get their special values
        s[:2] = 1.0
        m[2], s[2] = -INF, 0.0  # row 2: all empty
    parts_m[0][3], parts_l[0][3] = -INF, 0.0  # row 3: part 0 empty
    parts_m[1][4] = math.nan  # row 4: NaN statistics
    parts_o[2][5, 0, 0, 1] = math.nan  # row 5: one NaN element
    parts_m[0][1] = INF  # row 1: +inf max -> inf - inf = NaN
    out = merge_outputs(rows_shape, head_dim, torch.float32, 8, "stats")
    triton_cuda.merge_rows(parts_o, parts_m, parts_l, *out)
    out_o, out_m, out_l = out
    assert (out_o[2] == 0).all() and (out_m[2] == -INF).all() and (out_l[2] == 0).all()
    assert out_o[4].isnan().all() and out_m[4].isnan().all() and out_l[4].isnan().all()
    assert out_o[1].isnan().all() and out_l[1].isnan().all()
    assert out_o[5, 0, 0, 1].isnan() and out_o[5, 0, 0, [0, 2, 3, 4]].isfinite().all()
    assert out_o[[0, 3]].isfinite().all()
    check_merge(out, merge_reference(parts_o, parts_m, parts_l), torch.float32, 8)


@pytest.mark.parametrize(
    ("rows_shape", "head_dim", "block_rows", "block_d"),
    [
        ((13, 1, 1), 1, 4, None),  # D = 1, rows not a multiple of BLOCK_ROWS
        ((5, 1, 3), 40, 4, 16),  # D loops over three BLOCK_D chunks, the last ragged
        ((7, 2, 1), 24, 8, 32),  # D not a power of two inside one chunk
        ((37, 1, 1), 64, None, None),  # default tile (32 x 64), 37 rows -> a partial second tile
        ((3, 1, 2), 300, None, None),  # default tile with D > 256: two chunks
    ],
)
def test_tile_edges(rows_shape, head_dim, block_rows, block_d):
    gen = torch.Generator().manual_seed(30 + head_dim)
    parts_o, parts_m, parts_l = make_parts(2, rows_shape, head_dim, torch.bfloat16, gen, "stats", 8)
    out = merge_outputs(rows_shape, head_dim, torch.bfloat16, 8, "stats")
    triton_cuda._launch_merge_rows(parts_o, parts_m, parts_l, *out, None, 1.0, block_rows, block_d, kernel="tile")
    check_merge(out, merge_reference(parts_o, parts_m, parts_l), torch.bfloat16, 8)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 4),
    rows_shape=st.tuples(st.integers(1, 6), st.integers(1, 2), st.integers(1, 3)),
    head_dim=st.integers(1, 33),
    dtype=st.sampled_from(KERNEL_DTYPES),
    form=st.sampled_from(list(FORMS)),
    block_rows=st.sampled_from([None, 1, 2, 4]),
    block_d=st.sampled_from([None, 1, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_rows_random(k, rows_shape, head_dim, dtype, form, block_rows, block_d, seed):
    lse_scale, lanes = FORMS[form], 8 if form == "stats" else 3
    gen = torch.Generator().manual_seed(seed)
    parts_o, parts_m, parts_l = make_parts(k, rows_shape, head_dim, dtype, gen, form, lanes, lse_scale)
    out = merge_outputs(rows_shape, head_dim, dtype, lanes, form)
    triton_cuda._launch_merge_rows(parts_o, parts_m, parts_l, *out, None, lse_scale, block_rows, block_d, kernel="tile")
    check_merge(out, merge_reference(parts_o, parts_m, parts_l, lse_scale), dtype, lanes)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=40), heads=st.integers(1, 5))
def test_per_batch_row_map_kernel(lengths, heads):
    """The one-launch device row map equals the torch one (and so its definition, tests/test_contract.py), with
    empty batches anywhere and more batches than one search step covers."""
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(DEVICE)
    tokens = int(offsets[-1])
    got = triton_cuda.per_batch_row_map(offsets, tokens, heads)
    want = _row_map(offsets.cpu(), tokens, heads)
    for g, w in zip(got, want, strict=True):
        assert g.device.type == DEVICE.type and g.dtype == torch.int64
        assert torch.equal(g.cpu(), w)


def test_float64_and_many_parts_run_on_torch():
    """float64 is not compiled: unsupported_reason says so (``auto`` falls back) and merge_rows delegates."""
    x = on_device(update_inputs("SBH", torch.float64, seed=40))
    problem = validate_update(*x.args(), softmax_layout=None, ascend_limits=False)
    assert "float64" in triton_cuda.unsupported_reason(problem)
    gen = torch.Generator().manual_seed(41)
    for dtype, k in ((torch.float64, 2), (torch.float32, triton_cuda.MAX_PARTS + 1)):
        parts = make_parts(k, (2, 1, 2), 8, dtype, gen, "stats", 8)
        out = merge_outputs((2, 1, 2), 8, dtype, 8, "stats")
        if dtype == torch.float64:
            out = (out[0], out[1].double(), out[2].double())
            parts = (parts[0], [m.double() for m in parts[1]], [s.double() for s in parts[2]])
        triton_cuda.merge_rows(*parts, *out)
        eager = merge_outputs((2, 1, 2), 8, dtype, 8, "stats")
        eager = (eager[0], eager[1].to(out[1].dtype), eager[2].to(out[1].dtype))
        torch_eager.merge_rows(*parts, *eager)
        for got, want in zip(out, eager, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_supported_here():
    x = on_device(update_inputs("TND-per-batch", torch.bfloat16, seed=42))
    problem = validate_update(*x.args(), softmax_layout=None, ascend_limits=False)
    assert triton_cuda.unavailable_reason() is None
    assert triton_cuda.unsupported_reason(problem) is None


# --- the flat forward kernel: Note [triton flat merge] ---------------------------------------------------


def lane_merge_reference(parts_o, parts_m, parts_l, lse_scale=1.0):
    """Note [row merge] lane by lane in float64 (statistics merged per lane, element ``d`` weighted by lane
    ``d % lanes``; the LSE form reads lane 0), transcribed apart from the kernels; an empty part is selected out."""
    m = torch.stack([t.double().cpu() for t in parts_m])
    if parts_l is None:
        m = m[..., :1] * lse_scale
        empty = m.isinf()
        m = m.masked_fill(empty, -INF)
        l = torch.ones_like(m)
    else:
        l = torch.stack([t.double().cpu() for t in parts_l])
        empty = (m == -INF) & (l == 0)
    new_max = m.max(0).values  # NaN propagates
    all_empty = new_max == -INF
    a = l * torch.exp(m - torch.where(all_empty, 0.0, new_max))
    new_sum = a.sum(0)
    weights = torch.where(all_empty, 0.0, a / torch.where(all_empty, 1.0, new_sum))
    lane_of = torch.arange(parts_o[0].shape[-1]) % m.shape[-1]
    o = sum(
        torch.where(e[..., lane_of], 0.0, x.double().cpu() * w[..., lane_of])
        for x, w, e in zip(parts_o, weights, empty, strict=True)
    )
    if parts_l is None:
        return o, torch.where(all_empty, -INF, (new_max + torch.log(new_sum)) / lse_scale), None
    return o, new_max, new_sum


def lane_parts(k, rows_shape, head_dim, dtype, gen, form, lse_scale=1.0, layout="contiguous"):
    """K parts with independent lanes (stats form: every lane its own max and sum, about a fifth of the lanes
    empty, half the rows with equal lanes as FlashAttention writes them), one NaN max lane, and NaN or inf
    garbage in every element an empty part's lane covers (never to be read). LSE form: one lane of three read,
    a fifth of the rows empty (``-inf``, or ``+inf`` as old FlashAttention writes them)."""
    lanes = 8 if form == "stats" else 3
    parts_o, parts_m, parts_l = [], [], []
    lane_of = torch.arange(head_dim) % (8 if form == "stats" else 1)
    for i in range(k):
        o = (torch.rand((*rows_shape, head_dim), generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        m = torch.randn((*rows_shape, lanes), generator=gen) * 4
        l = 1 + torch.rand((*rows_shape, lanes), generator=gen) * 63
        if form == "stats":
            equal = torch.rand((*rows_shape, 1), generator=gen) < 0.5
            m, l = torch.where(equal, m[..., :1], m), torch.where(equal, l[..., :1], l)
            empty = torch.rand((*rows_shape, lanes), generator=gen) < 0.2
            m, l = m.masked_fill(empty, -INF), l.masked_fill(empty, 0.0)
        else:
            m = torch.where(l > 0, (m + torch.log(l)) / lse_scale, -INF)
            empty = (torch.rand((*rows_shape, 1), generator=gen) < 0.2).expand(m.shape)
            m = m.masked_fill(empty, INF if i % 2 else -INF)
        garbage = torch.tensor(math.nan if i % 2 else -INF).to(dtype)
        o = torch.where(empty[..., lane_of], garbage, o)
        if i == k - 1:
            m[(0,) * len(rows_shape) + (3 if form == "stats" else 0,)] = math.nan  # a NaN lane (read) in row 0
        parts_o.append(strided(o, layout))
        parts_m.append(strided(m.contiguous(), layout))
        parts_l.append(strided(l.contiguous(), layout))
    return parts_o, parts_m, parts_l if form == "stats" else None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.cpu().view(ints), b.cpu().view(ints))


def merge_both(parts, lse_scale, flat_block=None, row_map=None, lane_check=True, int64_index=False):
    """The tile kernel's and the flat kernel's outputs of the same merge, into NaN-poisoned outputs."""
    parts_o, parts_m, parts_l = parts
    form = "stats" if parts_l is not None else "lse"
    rows_shape, head_dim = parts_o[0].shape[:-1], parts_o[0].shape[-1]
    got = {}
    for kernel in triton_cuda.MERGE_KERNELS:
        out = merge_outputs(rows_shape, head_dim, parts_o[0].dtype, parts_m[0].shape[-1], form)
        flat = dict(flat_block=flat_block, flat_lane_check=lane_check, flat_int64_index=int64_index)
        flat = flat if kernel == "flat" else {}
        triton_cuda._launch_merge_rows(*parts, *out, row_map, lse_scale, kernel=kernel, **flat)
        got[kernel] = out
    return got["tile"], got["flat"]


def check_lane_merge(got, want, dtype):
    out_o, out_m, out_l = got
    want_o, want_m, want_l = want
    assert_close(out_o, want_o, TOL[dtype], "out_o")
    lanes = out_m.shape[-1]
    assert_close(out_m, want_m.expand(*want_m.shape[:-1], lanes) if want_m.shape[-1] == 1 else want_m, STATS_TOL, "m")
    if out_l is not None:
        assert_close(out_l, want_l, STATS_TOL, "out_l")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic on purpose
@pytest.mark.parametrize(("layout", "flat_block"), [("contiguous", None), ("gap", 32)])
@pytest.mark.parametrize(("k", "head_dim"), [(2, 5), (3, 6), (2, 72), (3, 72)])
@pytest.mark.parametrize(  # float16 packs as bfloat16 does: its share of the grid in the `slow` run
    "dtype", [pytest.param(d, marks=pytest.mark.slow) if d == torch.float16 else d for d in KERNEL_DTYPES], ids=str
)
@pytest.mark.parametrize("form", ["stats", "lse"])  # base-2 LSEs: test_flat_kernel_int64_index
def test_flat_kernel_bitwise_equal_to_tile(form, dtype, k, head_dim, layout, flat_block):
    """The flat kernel computes the tile kernel's bits (the same helpers, the same arithmetic) and matches the float64
    lane-by-lane reference: unequal lanes, empty lanes with garbage outputs, a NaN lane, odd D (5: one element per
    pack; 6: packs of two of the eight lanes in 16-bit types; 72: 16-byte packs that Triton's divisibility-by-16
    specialisation cannot see), contiguous (packs) and strided (one element per pack; a 32-element block, so D = 72 rows
    take the chunk loop)."""
    lse_scale = FORMS[form]
    gen = torch.Generator().manual_seed(200 + head_dim + 10 * k)
    parts = lane_parts(k, (3, 2, 2), head_dim, dtype, gen, form, lse_scale, layout)
    tile, flat = merge_both(parts, lse_scale, flat_block)
    for name, a, b in zip(("out_o", "out_m", "out_l"), tile, flat, strict=True):
        assert a is None or same_bits(a, b), f"{name}: the flat kernel's bits differ from the tile kernel's"
    check_lane_merge(flat, lane_merge_reference(*parts, lse_scale), dtype)
    assert flat[0][0, 0, 0].isnan().any() and not flat[0][1:].isnan().any(), "NaN stays in its row"


@pytest.mark.parametrize("int64_index", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("form", ["stats", "lse"])
def test_flat_kernel_per_batch_row_map_bitwise(form, int64_index):
    """Per-batch TND statistics through the device row map (zero-length batches at both ends and inside), K = 3,
    with the flat kernel's programs holding one row (block 8 < D) and several rows (block 64)."""
    offsets, heads, head_dim = [0, 0, 3, 3, 7, 8, 8], 3, 16
    gen = torch.Generator().manual_seed(210)
    parts = lane_parts(3, (offsets[-1], 1, heads), head_dim, torch.bfloat16, gen, form)
    row_map = per_batch_row_map(torch.tensor(offsets, device=DEVICE), offsets[-1], heads)
    for flat_block in (8,) if int64_index else (8, 64):
        tile, flat = merge_both(parts, 1.0, flat_block, row_map=row_map, int64_index=int64_index)
        for a, b in zip(tile, flat, strict=True):
            assert a is None or same_bits(a, b)
        assert not flat[1][1:].isnan().any(), "every statistics row is written (row 0 holds the NaN lane)"


@pytest.mark.parametrize(("block", "int64_index"), [(8, False), (16, True), (1024, False)])
def test_flat_kernel_in_place_rows_across_programs(block, int64_index):
    """out= exactly part 0's views (stats form, K = 3, unequal lanes, D = 24), with programs of one row walked in
    chunks of 8 or 16 elements, and of all six rows (block 1024): every row's statistics are read before written."""
    gen = torch.Generator().manual_seed(220)
    parts = lane_parts(3, (6, 1, 2), 24, torch.float32, gen, "stats")
    want = lane_merge_reference(*parts)
    tile, _ = merge_both(parts, 1.0)
    out = (parts[0][0], parts[1][0], parts[2][0])
    triton_cuda._launch_merge_rows(
        *parts, *out, None, 1.0, kernel="flat", flat_block=block, flat_int64_index=int64_index
    )
    check_lane_merge(out, want, torch.float32)
    for a, b in zip(tile, out, strict=True):
        assert same_bits(a, b)


def lanes_seen(monkeypatch) -> list[int]:
    """Under the interpreter, the lane count of every weight tile the flat kernel forms (1: one lane per pack, the
    equal-lanes shortcut); jit helpers are looked up in the module at each interpreted call."""
    from ringattn.backends import triton_kernels

    seen: list[int] = []
    flat_sum = triton_kernels._flat_sum

    def recorded(o_tiles, stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes, VEC):
        seen.append(lanes.shape[1])
        return flat_sum(o_tiles, stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes, VEC)

    monkeypatch.setattr(triton_kernels, "_flat_sum", recorded)
    return seen


@pytest.mark.parametrize("head_dim", [6, 72])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_flat_kernel_equal_lanes_shortcut(dtype, head_dim, monkeypatch):
    """Stats form: where every pack's lanes are equal bit for bit (NaN and empty rows included) the weights come from
    one lane per pack, and a single differing lane (one bit of one sum) sends the program back to every lane's own
    weights; both give the tile kernel's bits and those of the flat kernel without the check."""
    seen = lanes_seen(monkeypatch) if triton_cuda._INTERPRETED else None
    gen = torch.Generator().manual_seed(240 + head_dim)
    parts = make_parts(2, (4, 1, 3), head_dim, dtype, gen, "stats", 8)  # equal lanes, a fifth of the rows empty
    parts = tuple([t.contiguous() for t in ts] for ts in parts)  # packs of several lanes need unit strides
    parts[1][1][0, 0, 1] = math.nan  # a NaN max in every lane of one row
    for unequal in (False, True):
        if unequal:
            lane = 2 if head_dim > 2 else 0
            parts[2][0][3, 0, 2, lane] = torch.nextafter(parts[2][0][3, 0, 2, lane], torch.tensor(INF))
        results, lane_counts = [], []
        for check in (True, False):
            results.append(merge_both(parts, 1.0, lane_check=check))
            if seen is not None:  # one entry per program (chunk)
                lane_counts.append({int(v) for v in seen})
                seen.clear()
        (tile, flat), (_, flat_each) = results
        for a, b, c in zip(tile, flat, flat_each, strict=True):
            assert same_bits(a, b) and same_bits(a, c)
        check_lane_merge(flat, lane_merge_reference(*parts), dtype)
        if seen is not None:
            pack_lanes = min(16 // dtype.itemsize, 8) if head_dim == 72 else 2
            # Checked: every program takes the shortcut, but the one holding the differing lane.
            want = pack_lanes in lane_counts[0] <= {1, pack_lanes} if unequal else lane_counts[0] == {1}
            assert want, lane_counts
            assert lane_counts[1] == {pack_lanes}, lane_counts  # unchecked: every lane of the pack


@pytest.mark.parametrize("block", [None, 64])
def test_flat_kernel_ring_accumulate_in_place(block):
    """Ring attention's merge: a float32 accumulator (a slice of a larger buffer) takes a bfloat16 block output in
    place, LSE form with (N, T)-ordered LSEs; the flat kernel gives the tile kernel's bits."""
    gen = torch.Generator().manual_seed(250)
    tokens, heads, head_dim = 9, 4, 64
    acc_o = (torch.rand(tokens + 3, 1, heads, head_dim, generator=gen) * 2 - 1).to(DEVICE)[2 : 2 + tokens]
    acc_lse = (torch.randn(heads, tokens + 3, generator=gen) * 3).to(DEVICE)[:, 2 : 2 + tokens]
    acc_lse[1, 4] = -INF  # no key reached this row yet
    acc_o[4, 0, 1] = math.nan  # ... so its accumulator is garbage
    block_o = (torch.rand(tokens, 1, heads, head_dim, generator=gen) * 2 - 1).to(torch.bfloat16).to(DEVICE)
    block_lse = (torch.randn(heads, tokens, generator=gen) * 3).to(DEVICE)

    def lse_rows(t):  # (N, T) -> (T, 1, N, 1) view, as ring/attention.py reads it
        return t.t().unsqueeze(1).unsqueeze(-1)

    results = []
    for kernel in triton_cuda.MERGE_KERNELS:
        o, lse = acc_o.clone(), acc_lse.clone()
        parts = ([o, block_o], [lse_rows(lse), lse_rows(block_lse)], None)
        want = lane_merge_reference(*parts)
        triton_cuda._launch_merge_rows(*parts, o, lse_rows(lse), None, None, 1.0, kernel=kernel, flat_block=block)
        check_lane_merge((o, lse_rows(lse), None), want, torch.float32)
        results.append((o, lse))
    assert all(same_bits(a, b) for a, b in zip(*results, strict=True))
    assert results[1][0][4, 0, 1].isfinite().all(), "the empty accumulator's garbage is not read"


@pytest.mark.parametrize("form", ["stats", "lse"])
def test_flat_kernel_zero_head_dim(form):
    """D = 0: no elements, but every row's statistics are still merged and written (the tile kernel's bits)."""
    gen = torch.Generator().manual_seed(260)
    parts = lane_parts(2, (3, 1, 2), 0, torch.float16, gen, form, layout="contiguous")
    tile, flat = merge_both(parts, 1.0)
    assert flat[0].numel() == 0 and not flat[1][1:].isnan().any()
    for a, b in zip(tile, flat, strict=True):
        assert a is None or same_bits(a, b)


@pytest.mark.parametrize(
    ("form", "layout", "dtype"),
    [
        ("stats", "contiguous", torch.bfloat16),
        ("lse", "contiguous", torch.float16),
        ("stats", "transposed", torch.float32),
        ("lse-base2", "gap", torch.bfloat16),
    ],
    ids=str,
)
def test_flat_kernel_int64_index(form, layout, dtype):
    """The 64-bit index path (taken where an offset passes 2**31; forced here) gives the 32-bit path's bits."""
    lse_scale = FORMS[form]
    gen = torch.Generator().manual_seed(270)
    parts = lane_parts(3, (3, 2, 2), 24, dtype, gen, form, lse_scale, layout)
    tile, flat32 = merge_both(parts, lse_scale, flat_block=32)
    _, flat64 = merge_both(parts, lse_scale, flat_block=32, int64_index=True)
    for a, b, c in zip(tile, flat32, flat64, strict=True):
        assert a is None or (same_bits(a, b) and same_bits(a, c))


def test_flat_plan_index_width():
    """32-bit indices only where every row number and every element offset of every tensor fits (meta tensors: the
    plan reads shapes and strides only)."""

    def plan(o_strides=None, m_strides=None, int64_index=False):
        o = torch.empty_strided((4, 1, 2, 64), o_strides or (128, 128, 64, 1), dtype=torch.bfloat16, device="meta")
        m = torch.empty_strided((4, 1, 2, 8), m_strides or (16, 16, 8, 1), device="meta")
        return triton_cuda._flat_plan([o, o], [m, m], [m, m], o, int64_index=int64_index, stats=[m])

    assert plan().int32_index
    assert not plan(int64_index=True).int32_index
    assert not plan(o_strides=(2**30, 128, 64, 1)).int32_index  # 3 * 2**30 + ... > 2**31
    assert plan(o_strides=(2**28, 128, 64, 1)).int32_index
    assert not plan(m_strides=(2**30, 16, 8, 1)).int32_index


def test_flat_vector_width():
    """16-byte packs only where every attention tensor allows them (unit column stride, D and strides multiples of
    the pack): the kernel promises the compiler that alignment, so the launcher's check is what keeps it true."""
    x = torch.empty(4, 2, 3, 64, dtype=torch.bfloat16)
    assert triton_cuda._flat_vector([x, x], 64, 2) == 8
    assert triton_cuda._flat_vector([x.float()], 64, 4) == 4
    assert triton_cuda._flat_vector([torch.empty(4, 2, 3, 72, dtype=torch.bfloat16)], 72, 2) == 8
    assert triton_cuda._flat_vector([torch.empty(4, 2, 3, 6, dtype=torch.bfloat16)], 6, 2) == 2
    assert triton_cuda._flat_vector([torch.empty(4, 2, 3, 5)], 5, 4) == 1
    assert triton_cuda._flat_vector([x, x.transpose(0, 3).contiguous().transpose(0, 3)], 64, 2) == 1
    assert triton_cuda._flat_vector([x, torch.empty(4, 2, 3, 68, dtype=torch.bfloat16)[..., :64]], 64, 2) == 4
    assert triton_cuda._flat_vector([torch.empty(4, 1, 3, 64, dtype=torch.bfloat16)[:, :, :, :]], 64, 2) == 8


def test_merge_kernel_selection(monkeypatch):
    """RINGATTN_TRITON_MERGE picks the forward kernel at each launch ('tile' when unset or empty, any case); the
    launcher's keyword overrides it."""
    calls: list[str] = []
    flat_launch = triton_cuda._launch_merge_flat

    def counted(*args, **kwargs):
        calls.append("flat")
        return flat_launch(*args, **kwargs)

    monkeypatch.setattr(triton_cuda, "_launch_merge_flat", counted)
    gen = torch.Generator().manual_seed(230)
    parts = make_parts(2, (2, 1, 2), 8, torch.float32, gen, "stats", 8)
    want = merge_reference(*parts)
    for value, ran_flat in (("flat", True), ("FLAT", True), ("tile", False), ("", False), (None, False)):
        if value is None:
            monkeypatch.delenv(triton_cuda.MERGE_KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(triton_cuda.MERGE_KERNEL_ENV, value)
        calls.clear()
        out = merge_outputs((2, 1, 2), 8, torch.float32, 8, "stats")
        triton_cuda.merge_rows(*parts, *out)
        check_merge(out, want, torch.float32, 8)
        assert bool(calls) == ran_flat, value
        assert triton_cuda.merge_kernel() == ("flat" if ran_flat else "tile")
    monkeypatch.setenv(triton_cuda.MERGE_KERNEL_ENV, "tile")
    calls.clear()
    triton_cuda._launch_merge_rows(*parts, *merge_outputs((2, 1, 2), 8, torch.float32, 8, "stats"), None, 1.0,
                                   kernel="flat")  # fmt: skip
    assert calls == ["flat"]


@pytest.mark.parametrize("value", ["tiles", "Flat2", "row"])
def test_merge_kernel_bad_value_raises(monkeypatch, value):
    """A value of RINGATTN_TRITON_MERGE that names no kernel raises BackendError naming the variable, from the public
    op too; a bad launcher keyword names ``kernel``."""
    monkeypatch.setenv(triton_cuda.MERGE_KERNEL_ENV, value)
    with pytest.raises(ringattn.BackendError, match=f"RINGATTN_TRITON_MERGE: expected 'tile' or 'flat', got '{value}'"):
        triton_cuda.merge_kernel()
    x = on_device(update_inputs("SBH", torch.float32, seed=231))
    with pytest.raises(ringattn.BackendError, match="RINGATTN_TRITON_MERGE"):
        run_update(x)
    monkeypatch.delenv(triton_cuda.MERGE_KERNEL_ENV)
    with pytest.raises(ringattn.BackendError, match=f"kernel: expected 'tile' or 'flat', got '{value}'"):
        triton_cuda.merge_kernel(value)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 5),
    rows_shape=st.tuples(st.integers(1, 9), st.integers(1, 2), st.integers(1, 4)),
    head_dim=st.integers(1, 80),
    dtype=st.sampled_from(KERNEL_DTYPES),
    form=st.sampled_from(list(FORMS)),
    layout=st.sampled_from(["contiguous", "gap", "transposed"]),
    flat_block=st.sampled_from([None, 8, 32, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_flat_kernel_random(k, rows_shape, head_dim, dtype, form, layout, flat_block, seed):
    lse_scale = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    parts = lane_parts(k, rows_shape, head_dim, dtype, gen, form, lse_scale, layout)
    tile, flat = merge_both(parts, lse_scale, flat_block)
    for a, b in zip(tile, flat, strict=True):
        assert a is None or same_bits(a, b)
    check_lane_merge(flat, lane_merge_reference(*parts, lse_scale), dtype)


# --- merge_rows_backward: Note [row merge backward] ----------------------------------------------------


def backward_reference(grads, parts, lse_scale=1.0, row_index=None):
    """Autograd, in float64, of Note [row merge] written as a differentiable formula (independent of the closed
    form): the gradients of ``<out_o, grad_o> + <out_m, grad_m> + <out_l, grad_l>`` with respect to every part
    tensor, every lane included. Stats form lane by lane (element d uses lane ``d % lanes``), LSE form from lane 0;
    an empty part is selected out. ``torch.amax`` shares its gradient equally among ties; a lane empty in every part
    has the constant max ``-inf`` (no gradient) and shifts by 0."""
    grad_o, grad_m, grad_l = grads
    leaves = [[t.detach().double().cpu().requires_grad_() for t in ts] for ts in parts if ts is not None]
    parts_o, parts_m, parts_l = leaves[0], leaves[1], leaves[2] if len(leaves) == 3 else None

    def rows(s):  # (..., lanes) aligned with the attention rows
        return s if row_index is None else s.reshape(-1, s.shape[-1])[row_index].unsqueeze(1)

    if parts_l is None:
        m = torch.stack([rows(s[..., :1]) for s in parts_m]) * lse_scale
        empty = m.isinf()
        m = m.masked_fill(empty, -INF)
        l = torch.ones_like(m)
        g_m = rows(grad_m.double().cpu()).sum(-1, keepdim=True)
    else:
        m = torch.stack([rows(s) for s in parts_m])
        l = torch.stack([rows(s) for s in parts_l])
        empty = (m == -INF) & (l == 0)
        g_m = rows(grad_m.double().cpu())
    all_empty = empty.all(0)
    new_max = torch.where(all_empty, -INF, torch.amax(m, 0))
    a = l * torch.exp(m - torch.where(all_empty, 0.0, new_max))
    new_sum = a.sum(0)
    safe_sum = torch.where(all_empty, 1.0, new_sum)
    lane_of = torch.arange(parts_o[0].shape[-1]) % m.shape[-1]
    weights = (a / safe_sum)[..., lane_of]
    o = sum(torch.where(e[..., lane_of], 0.0, x * w) for x, w, e in zip(parts_o, weights, empty, strict=True))
    objective = (o * grad_o.double().cpu()).sum()
    if parts_l is None:
        objective = objective + (torch.where(all_empty, 0.0, (new_max + torch.log(safe_sum)) / lse_scale) * g_m).sum()
    else:
        g_l = rows(grad_l.double().cpu())
        objective = objective + (torch.where(all_empty, 0.0, new_max) * g_m).sum() + (new_sum * g_l).sum()
    flat = [t for ts in leaves for t in ts]
    got = torch.autograd.grad(objective, flat, allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for g, t in zip(got, flat, strict=True)]
    k = len(parts_o)
    return got[:k], got[k : 2 * k], got[2 * k :] if parts_l is not None else None


def make_grads(rows_shape, head_dim, dtype, gen, form, lanes):
    """Incoming gradients on DEVICE, strided: grad_o uniform in [-1, 1) (so ``w_k g`` stays below 1 in magnitude,
    where one bf16 truncation by the interpreter is inside TOL), statistic gradients standard normal."""
    grad_o = (torch.rand((*rows_shape, head_dim), generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    grad_m = torch.randn((*rows_shape, lanes), generator=gen)
    grad_l = torch.randn((*rows_shape, lanes), generator=gen)
    return strided(grad_o, "gap"), strided(grad_m, "transposed"), strided(grad_l, "gap") if form == "stats" else None


def poisoned_grads(parts, hows=("gap", "transposed", "contiguous")):
    """NaN-filled destinations shaped like the parts, in strided layouts (``None`` stays None)."""
    return tuple(
        None if ts is None else [strided(torch.full_like(t, math.nan).cpu(), hows[i % 3]) for i, t in enumerate(ts)]
        for ts in parts
    )


def run_backward(grads, parts, lse_scale=1.0, row_map=None, backend=triton_cuda):
    out = poisoned_grads(parts)
    backend.merge_rows_backward(*grads, *parts, *out, row_map=row_map, lse_scale=lse_scale)
    return out


def check_backward(got, want, dtype, what):
    for name, got_ts, want_ts, tol in zip(("o", "m", "l"), got, want, (TOL[dtype], STATS_TOL, STATS_TOL), strict=True):
        if got_ts is None:
            assert want_ts is None
            continue
        for k, (g, w) in enumerate(zip(got_ts, want_ts, strict=True)):
            assert_close(g, w, tol, f"{what}: grad of parts_{name}[{k}]")
            if name != "o" and got[2] is None:
                assert (g[..., 1:] == 0).all(), "the LSE form reads lane 0: lanes 1.. of its gradient are exactly 0"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_merge_rows_backward_k_parts(k, form, dtype):
    """K parts, both forms, every dtype, strided everything, against the torch backend and against autograd of
    the float64 formula; with a row whose parts are all empty, a row of tied maxima, a row with part 0 empty."""
    lse_scale, lanes = FORMS[form], 8
    rows_shape, head_dim = (3, 2, 3), 20
    gen = torch.Generator().manual_seed(100 + k)
    parts = make_parts(k, rows_shape, head_dim, dtype, gen, form, lanes, lse_scale)
    parts_m, parts_l = parts[1], parts[2]
    for i, m in enumerate(parts_m):
        m[1, 1, 2] = -INF  # all parts empty
        m[0, 1, 0] = 1.5  # every part ties for the maximum
        m[2, 0, 1] = -INF if i == 0 else 0.5 + i  # part 0 empty
    if form != "stats":
        parts_m[0][0, 0, 0] = INF  # old FlashAttention's empty row: read as -inf
    else:
        for i, s in enumerate(parts_l):
            s[1, 1, 2] = 0.0
            s[0, 1, 0] = 1.0 + i
            if i == 0:
                s[2, 0, 1] = 0.0
    grads = make_grads(rows_shape, head_dim, dtype, gen, form, lanes)
    got = run_backward(grads, parts, lse_scale)
    check_backward(got, run_backward(grads, parts, lse_scale, backend=torch_eager), dtype, "vs torch")
    check_backward(got, backward_reference(grads, parts, lse_scale), dtype, "vs float64 autograd")
    # All parts empty: no NaN, every gradient 0 (empty parts get none).
    for i in range(k):
        assert (got[0][i][1, 1, 2] == 0).all()
        assert (got[1][i][1, 1, 2] == 0).all()
        if got[2] is not None:
            assert (got[2][i][1, 1, 2] == 0).all()
    if k > 1:  # the empty part 0 gets zero gradients
        assert (got[0][0][2, 0, 1] == 0).all() and got[1][0][2, 0, 1, 0] == 0
        if got[2] is not None:
            assert got[2][0][2, 0, 1, 0] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic on purpose
@pytest.mark.parametrize("form", ["stats", "lse"])
def test_merge_rows_backward_nan_propagates(form):
    """NaN statistics poison the whole row; a NaN element poisons the statistic gradients, not the do_k."""
    gen = torch.Generator().manual_seed(110)
    rows_shape, head_dim = (4, 1, 1), 6
    parts = make_parts(3, rows_shape, head_dim, torch.float32, gen, form, 8)
    for m in parts[1]:
        m[:] = torch.randn(rows_shape + (1,), generator=gen).to(DEVICE)  # no empty rows: NaN must come from NaN
    if parts[2] is not None:
        for s in parts[2]:
            s[:] = 2.0
    parts[1][1][0] = math.nan  # row 0: NaN statistic
    parts[0][2][1, 0, 0, 3] = math.nan  # row 1: one NaN element of part 2
    grads = make_grads(rows_shape, head_dim, torch.float32, gen, form, 8)
    grads[0][2, 0, 0, 0] = math.nan  # row 2: a NaN incoming gradient element
    got = run_backward(grads, parts)
    check_backward(got, run_backward(grads, parts, backend=torch_eager), torch.float32, "vs torch")
    stat_grads = [t for ts in got[1:] if ts is not None for t in ts]
    assert all(g[0, ..., 0].isnan().all() for g in got[0] + stat_grads), "NaN statistics: every gradient NaN"
    assert all(g[1].isfinite().all() for g in got[0]), "a NaN element leaves do_k = w_k g finite"
    # The NaN element is d = 3: it reaches lane 3 of the stats form's statistic gradients (lane 0: the LSE form).
    lane = 3 if form == "stats" else 0
    assert all(g[1, ..., lane].isnan().all() for g in stat_grads), "a NaN element reaches its lane's gradients"
    assert all(g[2, ..., 0].isnan().all() for g in got[0] + stat_grads)
    assert all(g[3].isfinite().all() for g in got[0] + stat_grads), "rows are independent"


def test_merge_rows_backward_non_contiguous_every_argument():
    """All nine tensor arguments strided (gaps / transposed); writes stay inside the gradient views."""
    gen = torch.Generator().manual_seed(111)
    rows_shape, head_dim = (3, 2, 2), 12
    parts = make_parts(2, rows_shape, head_dim, torch.float16, gen, "stats", 8)
    parts = tuple([strided(t.cpu(), ("gap", "transposed")[i % 2]) for i, t in enumerate(ts)] for ts in parts)
    grads = make_grads(rows_shape, head_dim, torch.float16, gen, "stats", 8)
    assert not any(t.is_contiguous() for t in [*grads, *parts[0], *parts[1], *parts[2]])
    sentinel = 12345.0
    out = tuple([strided(t.cpu(), "gap", fill=sentinel).fill_(math.nan) for t in ts] for ts in parts)
    triton_cuda.merge_rows_backward(*grads, *parts, *out)
    check_backward(out, backward_reference(grads, parts), torch.float16, "vs float64 autograd")
    for o in (t for ts in out for t in ts):
        gaps = torch.ones_like(o._base, dtype=torch.bool)
        gaps[tuple(slice(1, None, 2) for _ in range(o.dim()))] = False
        assert (o._base[gaps] == sentinel).all(), "a write landed outside the gradient view"


@pytest.mark.parametrize("form", ["stats", "lse"])
def test_merge_rows_backward_per_batch_row_map(form):
    """Per-batch TND statistics (zero-length batches at the start, middle and end) through the row map."""
    offsets, heads, head_dim = [0, 0, 3, 3, 7, 8, 8], 3, 9
    gen = torch.Generator().manual_seed(112)
    rows_shape = (offsets[-1], 1, heads)
    parts = make_parts(3, rows_shape, head_dim, torch.bfloat16, gen, form, 8)
    grads = make_grads(rows_shape, head_dim, torch.bfloat16, gen, form, 8)
    row_map = per_batch_row_map(torch.tensor(offsets, device=DEVICE), offsets[-1], heads)
    got = run_backward(grads, parts, row_map=row_map)
    assert not any(g.isnan().any() for ts in got if ts is not None for g in ts), "every gradient row is written"
    check_backward(got, run_backward(grads, parts, row_map=row_map, backend=torch_eager), torch.bfloat16, "vs torch")
    want = backward_reference(grads, parts, row_index=per_batch_index(offsets, heads))
    check_backward(got, want, torch.bfloat16, "vs float64 autograd")


@pytest.mark.parametrize(
    ("rows_shape", "head_dim", "block_rows", "block_d"),
    [
        ((13, 1, 1), 1, 4, None),  # D = 1, rows not a multiple of BLOCK_ROWS
        ((5, 1, 3), 40, 4, 16),  # D loops over three BLOCK_D chunks, the last ragged
        ((7, 2, 1), 24, 8, 32),  # D not a power of two inside one chunk
        ((3, 1, 2), 300, None, None),  # default tile with D > 256: two chunks
    ],
)
def test_merge_rows_backward_tile_edges(rows_shape, head_dim, block_rows, block_d):
    gen = torch.Generator().manual_seed(120 + head_dim)
    parts = make_parts(3, rows_shape, head_dim, torch.float32, gen, "stats", 8)
    grads = make_grads(rows_shape, head_dim, torch.float32, gen, "stats", 8)
    out = poisoned_grads(parts)
    triton_cuda._launch_merge_rows_backward(*grads, *parts, *out, None, 1.0, block_rows, block_d)
    check_backward(out, backward_reference(grads, parts), torch.float32, "vs float64 autograd")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 4),
    rows_shape=st.tuples(st.integers(1, 5), st.integers(1, 2), st.integers(1, 3)),
    head_dim=st.integers(1, 33),
    dtype=st.sampled_from(KERNEL_DTYPES),
    form=st.sampled_from(list(FORMS)),
    block_rows=st.sampled_from([None, 1, 4]),
    block_d=st.sampled_from([None, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_rows_backward_random(k, rows_shape, head_dim, dtype, form, block_rows, block_d, seed):
    lse_scale, lanes = FORMS[form], 8 if form == "stats" else 3  # the LSE form reads lane 0 of any lane count
    gen = torch.Generator().manual_seed(seed)
    parts = make_parts(k, rows_shape, head_dim, dtype, gen, form, lanes, lse_scale)
    grads = make_grads(rows_shape, head_dim, dtype, gen, form, lanes)
    out = poisoned_grads(parts)
    triton_cuda._launch_merge_rows_backward(*grads, *parts, *out, None, lse_scale, block_rows, block_d)
    check_backward(out, backward_reference(grads, parts, lse_scale), dtype, "vs float64 autograd")


def test_merge_rows_backward_float64_and_many_parts_run_on_torch():
    """float64 and more than MAX_PARTS parts are the torch backend's, bit for bit."""
    gen = torch.Generator().manual_seed(130)
    for dtype, k in ((torch.float64, 2), (torch.float32, triton_cuda.MAX_PARTS + 1)):
        parts = make_parts(k, (2, 1, 2), 8, dtype, gen, "stats", 8)
        grads = make_grads((2, 1, 2), 8, dtype, gen, "stats", 8)
        if dtype == torch.float64:
            parts = (parts[0], [m.double() for m in parts[1]], [s.double() for s in parts[2]])
            grads = (grads[0], grads[1].double(), grads[2].double())
        got = run_backward(grads, parts)
        want = run_backward(grads, parts, backend=torch_eager)
        for g, w in zip((t for ts in got for t in ts), (t for ts in want for t in ts), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def counting_backward_launches(monkeypatch) -> list[int]:
    """Count launches of the fused backward, so an end-to-end test cannot pass on the torch fallback."""
    calls: list[int] = []
    launch = triton_cuda._launch_merge_rows_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_cuda, "_launch_merge_rows_backward", counted)
    return calls


@pytest.mark.parametrize("case", ["SBH", "TND-per-batch"])
def test_autograd_ring_attention_update_end_to_end(case, monkeypatch):
    """torch.autograd.grad through ring_attention_update(backend="triton") equals backend="torch"."""
    calls = counting_backward_launches(monkeypatch)
    x = on_device(update_inputs(case, torch.float16, seed=140))
    gen = torch.Generator().manual_seed(141)
    weights = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (x.prev_o, x.prev_m, x.prev_l)]

    def grads(backend):
        leaves = [t.detach().clone().requires_grad_() for t in x.tensors()]
        y = UpdateInputs(x.layout, *leaves, x.seq_offsets, x.softmax_layout)
        out = run_update(y, backend=backend)
        objective = sum((o.float() * w).sum() for o, w in zip(out, weights, strict=True))
        return torch.autograd.grad(objective, leaves)

    got, want = grads("triton"), grads("torch")
    assert calls, "the fused backward ran"
    for name, g, w in zip(("prev_o", "prev_m", "prev_l", "cur_o", "cur_m", "cur_l"), got, want, strict=True):
        assert g.isfinite().all(), name
        assert_close(g, w, TOL[torch.float16] if name.endswith("_o") else STATS_TOL, name)


def test_autograd_merge_states_end_to_end(monkeypatch):
    """torch.autograd.grad through merge_states(backend="triton"), K = 3, base-2 LSEs, equals backend="torch"."""
    calls = counting_backward_launches(monkeypatch)
    gen = torch.Generator().manual_seed(150)
    tokens, heads, head_dim = 5, 2, 12
    outs = [(torch.rand(tokens, heads, head_dim, generator=gen) * 2 - 1).to(DEVICE) for _ in range(3)]
    lses = [(torch.randn(tokens, heads, generator=gen) * 3).to(DEVICE) for _ in range(3)]
    lses[1][0] = -INF  # one part empty in the first token
    for lse in lses:
        lse[4, 1] = -INF  # every part empty
    g_o = torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE)
    g_lse = torch.randn(tokens, heads, generator=gen).to(DEVICE)

    def grads(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (*outs, *lses)]
        o, lse = ringattn.merge_states(
            leaves[:3], leaves[3:], layout="TND", lse_layout="TN", lse_base=2, backend=backend
        )
        objective = (o * g_o).sum() + (torch.where(lse.isfinite(), lse, 0.0) * g_lse).sum()
        return torch.autograd.grad(objective, leaves)

    got, want = grads("triton"), grads("torch")
    assert calls, "the fused backward ran"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.isfinite().all(), i
        assert_close(g, w, TOL[torch.float32] if i < 3 else STATS_TOL, f"gradient {i}")


# --- 64-bit column offsets of the tile kernels --------------------------------------------------------------------


def test_wide_columns_are_chosen_where_a_column_offset_passes_2_31():
    """``d * stride(3)`` in int32 wraps for a transposed view of a large tensor: the launchers switch the tile
    kernels to int64 column offsets exactly where some ``(D - 1) * |stride(3)|`` reaches 2**31."""

    def view(stride: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(stride=lambda dim: stride if dim == 3 else 1)

    assert not triton_cuda._wide_columns([view(1), view(2**24)], 128)  # 127 * 2**24 < 2**31
    assert triton_cuda._wide_columns([view(1), view(2**24 + 2**20)], 128)
    assert triton_cuda._wide_columns([view(-(2**31))], 2)  # negative strides count by magnitude
    assert not triton_cuda._wide_columns([view(2**40)], 1)  # D = 1: only column 0


@pytest.mark.parametrize(("head_dim", "block_d"), [(24, None), (40, 16)])  # one chunk; three chunks
def test_tile_kernels_with_wide_columns_give_the_same_bits(head_dim, block_d):
    """The int64 column path (forced: a real one needs a tensor of over 2**31 elements) writes the int32 path's bits,
    forward and backward, one chunk and a chunk loop."""
    gen = torch.Generator().manual_seed(140 + head_dim)
    parts = make_parts(3, (5, 1, 3), head_dim, torch.bfloat16, gen, "stats", 8)
    got = []
    for wide in (False, True):
        out = merge_outputs((5, 1, 3), head_dim, torch.bfloat16, 8, "stats")
        triton_cuda._launch_merge_rows(*parts, *out, None, 1.0, None, block_d, kernel="tile", wide_cols=wide)
        got.append(out)
    for a, b in zip(*got, strict=True):
        assert same_bits(a, b)
    grads = make_grads((5, 1, 3), head_dim, torch.bfloat16, gen, "stats", 8)
    back = []
    for wide in (False, True):
        out = poisoned_grads(parts)
        triton_cuda._launch_merge_rows_backward(*grads, *parts, *out, None, 1.0, None, block_d, wide_cols=wide)
        back.append(out)
    for a, b in zip(*back, strict=True):
        for x, y in zip(a, b, strict=True):
            assert same_bits(x, y)
    check_backward(back[1], backward_reference(grads, parts), torch.bfloat16, "int64 columns vs float64 autograd")
