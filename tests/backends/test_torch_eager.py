"""The portable ``torch`` backend's fast path (Note [torch merge passes] in ``backends/torch_eager.py``) against its
gather path (``torch_eager_before.py``: the backend before the fast path), row by row.

Tolerances, fast path against gather path (both float32 arithmetic; float64 for float64):

* forward statistics (max, sum, LSE): bitwise for K = 2; for K > 2 within 4 float32 (float64) ulps (the stacked sum
  may add in another order);
* forward attention output: ``|fast - gather| <= K * eps_c * max_k |o_k| + eps_out * |gather|``, i.e. one rounding
  of the compute dtype per part (an FMA in place of a rounded product and a sum; the weights sum to 1) and one
  rounding to the output dtype (``eps`` = ``torch.finfo(dtype).eps``);
* backward: 1e-5 relative to the largest gradient for float32 and lower-precision parts, 1e-12 for float64 (the
  dots are summed in another order).

An empty part's output is never read: NaN and inf garbage there changes nothing, and a row empty in every part
is +0 - both exactly, not within tolerance. The merge functions of a backend have no error paths of their own
(arguments are validated by the public ops; ``tests/test_bad_inputs.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch_eager_before
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn.backends import torch_eager

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _case(gen, dtype, k, shape, lanes, equal, empty_frac=0.3, lse=False, noncontig=False):
    """K parts ``(P, Q, N, D)`` with statistics of ``lanes`` lanes (bitwise equal lanes when ``equal``); a fraction
    of each part's rows empty (max -inf, sum 0, output NaN or inf garbage), some rows empty in every part, and
    (stats form) some rows with max -inf but a sum of 1 (not empty)."""
    p, q, n, d = shape
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    def big():
        if noncontig:  # (N, P, Q, D + 3) storage, seen as a (P, Q, N, D) view: every stride unusual
            return torch.randn(n, p, q, d + 3, generator=gen).to(dtype).permute(1, 2, 0, 3)[..., 1 : d + 1]
        return torch.randn(p, q, n, d, generator=gen).to(dtype)

    def small(fn):
        x = fn((p, q, n, 1 if equal else lanes))
        x = x.expand(p, q, n, lanes) if equal else x
        return x.contiguous().to(stat)

    parts_o = [big() for _ in range(k)]
    parts_m = [small(lambda s: torch.randn(*s, generator=gen) * 3) for _ in range(k)]
    parts_l = [small(lambda s: torch.rand(*s, generator=gen) + 0.25) for _ in range(k)]
    every = torch.rand(p, q, n, 1, generator=gen) < 0.1  # rows empty in every part
    for i in range(k):
        rows = (torch.rand(p, q, n, 1, generator=gen) < empty_frac) | every
        parts_m[i].masked_fill_(rows, -math.inf)
        parts_l[i].masked_fill_(rows, 0.0)
        parts_o[i].masked_fill_(rows, math.nan if i % 2 else math.inf)
    if not lse and k > 1:  # max -inf but l = 1: not empty, weight 0
        odd = (torch.rand(p, q, n, 1, generator=gen) < 0.05) & ~every
        parts_m[1].masked_fill_(odd, -math.inf)
        parts_l[1].masked_fill_(odd, 1.0)
        parts_o[1].masked_fill_(odd, 0.5)
    if lse:
        parts_m = [m.masked_fill(m == -math.inf, math.inf) if i % 2 else m for i, m in enumerate(parts_m)]
    return parts_o, parts_m, (None if lse else parts_l)


def _outs(parts_o, parts_m, parts_l, lanes_out):
    o = parts_o[0]
    stat = parts_m[0].dtype
    shape = (*o.shape[:-1], lanes_out)
    return (
        torch.full(o.shape, 7.0, dtype=o.dtype),
        torch.full(shape, 7.0, dtype=stat),
        None if parts_l is None else torch.full(shape, 7.0, dtype=stat),
    )


def _check_forward(parts_o, parts_m, parts_l, lanes_out, lse_scale=1.0):
    want = _outs(parts_o, parts_m, parts_l, lanes_out)
    got = _outs(parts_o, parts_m, parts_l, lanes_out)
    torch_eager_before._merge_rows_gather(parts_o, parts_m, parts_l, *want, lse_scale=lse_scale)
    torch_eager.merge_rows(parts_o, parts_m, parts_l, *got, lse_scale=lse_scale)
    k = len(parts_o)
    dtype = parts_o[0].dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for g, w in zip(got[1:], want[1:], strict=True):
        if w is None:
            continue
        if k <= 2:
            assert torch.equal(_bits(g), _bits(w))
        else:
            torch.testing.assert_close(g, w, atol=0, rtol=4 * torch.finfo(g.dtype).eps, equal_nan=True)
    g, w = got[0].double(), want[0].double()
    assert torch.equal(g.isnan(), w.isnan())
    assert not g.isnan().any()  # the garbage of empty parts is never read
    assert torch.equal(g.signbit(), w.signbit()) or k > 1  # the sign of zeros where every part is empty
    zero = w == 0
    assert torch.equal(_bits(got[0])[zero], _bits(want[0])[zero])  # +0 where every part is empty, as the select
    largest = torch.stack([o.double().nan_to_num(0, 0, 0).abs() for o in parts_o]).amax(0)
    bound = k * torch.finfo(compute).eps * largest + torch.finfo(dtype).eps * w.abs()
    assert ((g - w).abs() <= bound).all(), float(((g - w).abs() - bound).max())
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("lanes,equal", [(8, True), (8, False), (1, True)])
@pytest.mark.parametrize("d", [128, 24, 5])
def test_forward_against_the_gather_path(dtype, k, lanes, equal, d):
    gen = torch.Generator().manual_seed(1000 * k + d + lanes + equal)
    parts = _case(gen, dtype, k, (9, 2, 3, d), lanes, equal)
    _check_forward(*parts, lanes_out=lanes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lanes_in,lanes_out,lse_scale", [(1, 1, 1.0), (8, 8, math.log(2)), (1, 8, 1.0)])
def test_lse_form_against_the_gather_path(dtype, k, lanes_in, lanes_out, lse_scale):
    """LSEs of +-inf are empty (old FlashAttention's +inf included); base-2 LSEs through ``lse_scale``."""
    gen = torch.Generator().manual_seed(k + lanes_in + lanes_out)
    parts_o, parts_m, _ = _case(gen, dtype, k, (11, 1, 4, 16), lanes_in, True, lse=True)
    _check_forward(parts_o, parts_m, None, lanes_out=lanes_out, lse_scale=lse_scale)


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    k=st.integers(1, 5),
    shape=st.tuples(st.integers(1, 7), st.integers(1, 3), st.integers(1, 4), st.integers(1, 40)),
    lanes=st.sampled_from([1, 8]),
    equal=st.booleans(),
    empty_frac=st.sampled_from([0.0, 0.3, 1.0]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_random_shapes(dtype, k, shape, lanes, equal, empty_frac, noncontig, seed):
    parts = _case(torch.Generator().manual_seed(seed), dtype, k, shape, lanes, equal, empty_frac, noncontig=noncontig)
    _check_forward(*parts, lanes_out=lanes)


def test_chunks_do_not_change_the_result(monkeypatch):
    """Rows cut into many chunks (a scratch dtype, so the forward chunks) give bitwise the result of one chunk, in
    both directions."""
    gen = torch.Generator().manual_seed(3)
    parts = _case(gen, torch.bfloat16, 3, (37, 2, 3, 16), 8, False)
    grads = [torch.randn(37, 2, 3, 16, generator=gen).to(torch.bfloat16), torch.randn(37, 2, 3, 8, generator=gen),
             torch.randn(37, 2, 3, 8, generator=gen)]  # fmt: skip

    def run():
        outs = _outs(*parts, lanes_out=8)
        torch_eager.merge_rows(*parts, *outs)
        back = [[torch.empty_like(t) for t in ts] for ts in parts]
        torch_eager.merge_rows_backward(*grads, *parts, *back)
        return [*outs, *(t for ts in back for t in ts)]

    whole = run()
    monkeypatch.setattr(torch_eager, "_CHUNK_ELEMENTS", 100)  # 1 (P, Q, N) row of 16 per chunk up to 6
    assert len(torch_eager._chunks((37, 2, 3, 16), whole=False)) > 30
    for a, b in zip(whole, run(), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alias", ["part 0", "part 1", "shifted"])
def test_outputs_may_alias_inputs(dtype, alias):
    """In-place accumulation into either part's own views gives the result of fresh outputs; so does an output that
    overlaps a part at an offset (then computed whole before writing)."""
    gen = torch.Generator().manual_seed(5)
    storage = torch.randn(3, 20, 1, 4, 16, generator=gen).to(dtype)
    parts_o = [storage[0, :19], storage[1, :19]]
    stats = [torch.randn(19, 1, 4, 1, generator=gen).expand(19, 1, 4, 8).contiguous() for _ in range(2)]
    sums = [torch.rand(19, 1, 4, 1, generator=gen).expand(19, 1, 4, 8).contiguous() + 0.5 for _ in range(2)]
    stats[0][3], sums[0][3] = -math.inf, 0.0  # an empty row in part 0
    want = _outs(parts_o, stats, sums, 8)
    torch_eager.merge_rows([o.clone() for o in parts_o], stats, sums, *want)
    out_o = {"part 0": parts_o[0], "part 1": parts_o[1], "shifted": storage[1, 1:]}[alias]
    out_m, out_l = (stats[0], sums[0]) if alias == "part 0" else (torch.empty_like(stats[0]), torch.empty_like(sums[0]))
    torch_eager.merge_rows(parts_o, stats, sums, out_o, out_m, out_l)
    assert torch.equal(_bits(out_o), _bits(want[0]))
    assert torch.equal(out_m, want[1]) and torch.equal(out_l, want[2])


def test_equal_lanes_means_bitwise_equal():
    """-0 beside +0 and NaNs of different payloads are different lanes (the lane rule then runs lane by lane)."""
    same = torch.full((3, 8), 1.5)
    assert torch_eager._equal_lanes([same, same.clone()])
    signed = same.clone()
    signed[1] = 0.0
    signed[1, 5] = -0.0
    assert not torch_eager._equal_lanes([same, signed])
    nan = torch.full((2, 8), math.nan)
    assert torch_eager._equal_lanes([nan])
    other = nan.clone()
    other.view(torch.int32)[0, 3] ^= 1  # another NaN payload
    assert other.isnan().all() and not torch_eager._equal_lanes([other])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("lanes,equal,lse", [(8, True, False), (8, False, False), (1, True, False), (8, True, True)])
@pytest.mark.parametrize("d", [32, 12])
def test_backward_against_the_gather_path(dtype, k, lanes, equal, lse, d):
    gen = torch.Generator().manual_seed(77 * k + d + lanes + equal + lse)
    shape = (13, 2, 3, d)
    parts_o, parts_m, parts_l = _case(gen, dtype, k, shape, lanes, equal, lse=lse)
    stat = parts_m[0].dtype
    grad_o = torch.randn(shape, generator=gen).to(dtype)
    grad_m = torch.randn(*shape[:-1], lanes, generator=gen).to(stat)
    grad_l = None if lse else torch.randn(*shape[:-1], lanes, generator=gen).to(stat)

    def run(fn):
        back = [[torch.full_like(t, 7.0) for t in ts] for ts in (parts_o, parts_m, parts_l or [])]
        fn(grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, back[0], back[1], back[2] if parts_l else None)
        return [t for ts in back for t in ts]

    want = run(torch_eager_before._merge_rows_backward_gather)
    got = run(torch_eager.merge_rows_backward)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    lowp = dtype in (torch.bfloat16, torch.float16)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()  # empty parts' garbage is never read
        scale = float(w.double().abs().max()) or 1.0
        if lowp and g.dtype == dtype:  # w_k g rounded once to the parts' dtype: at most one ulp apart
            torch.testing.assert_close(g.double(), w.double(), atol=0, rtol=torch.finfo(dtype).eps)
        else:
            torch.testing.assert_close(g.double(), w.double(), atol=tol * scale, rtol=0)
    empty = [m[..., :1].isinf().squeeze(-1) for m in parts_m]  # the rows where part k is empty have 0 gradients
    for k_, e in enumerate(empty):
        if parts_l is not None:
            e = e & (parts_l[k_][..., 0] == 0)
        assert (got[k_][e] == 0).all()
