"""One test per error of ``docs/contract.md`` ("Errors") and of ringattn's extensions: exception types and
messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ringattn
from inputs import backend_device, make_update_inputs
from ringattn import _contract, errors


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def sbh(gen: torch.Generator, dtype: torch.dtype = torch.float32):
    return make_update_inputs("SBH", dtype, gen, seq=4, batch=2, heads=2, head_dim=3)


def tnd(gen: torch.Generator, dtype: torch.dtype = torch.float32, heads: int = 2, head_dim: int = 64):
    return make_update_inputs("TND", dtype, gen, seq_lens=[3, 0, 2], heads=heads, head_dim=head_dim)


def call(x, **overrides):
    kwargs = dict(
        prev_attn_out=x.prev_o,
        prev_softmax_max=x.prev_m,
        prev_softmax_sum=x.prev_l,
        cur_attn_out=x.cur_o,
        cur_softmax_max=x.cur_m,
        cur_softmax_sum=x.cur_l,
        actual_seq_qlen=x.seq_offsets,
        layout=x.layout,
    )
    kwargs.update(overrides)
    return ringattn.ring_attention_update(**kwargs)


def raises(types: tuple[type, ...], *fragments: str):
    """Context manager: the error is an instance of every type and its message names every fragment."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(types[0])
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            for t in types:
                assert isinstance(self.info.value, t), f"{type(self.info.value).__name__} is not a {t.__name__}"
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return handled

    return _Check()


@pytest.mark.parametrize("layout", ["BSND", "xyz", "", 3, None])
def test_unknown_layout(gen, layout):
    with raises((ValueError, errors.LayoutError), "layout", "'SBH' or 'TND'"):
        call(sbh(gen), layout=layout)


@pytest.mark.parametrize("layout", ["sbh", "Sbh", "tnd"])
def test_layout_is_case_insensitive(gen, layout):
    x = sbh(gen) if layout.upper() == "SBH" else tnd(gen)
    got, want = call(x, layout=layout), call(x, layout=layout.upper())
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("layout", "argument", "shape", "fragment"),
    [
        ("SBH", "prev_attn_out", (4, 6), "rank 3 (S, B, H)"),
        ("SBH", "cur_attn_out", (4, 2, 6, 1), "rank 3 (S, B, H)"),
        ("SBH", "prev_softmax_max", (2, 2, 4), "rank 4 (B, N, S, 8)"),
        ("SBH", "cur_softmax_sum", (2, 2, 4, 8, 1), "rank 4 (B, N, S, 8)"),
        ("TND", "prev_attn_out", (5, 2, 64, 1), "rank 3 (T, N, D)"),
        ("TND", "prev_softmax_sum", (5, 2, 1, 8), "rank 3 (T, N, 8)"),
        ("TND", "cur_softmax_max", (5, 16), "rank 3 (T, N, 8)"),
    ],
)
def test_wrong_rank(gen, layout, argument, shape, fragment):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    bad = torch.rand(shape)
    with raises((ValueError, errors.ShapeError), argument, fragment):
        call(x, **{argument: bad})


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("argument", ["prev_softmax_max", "prev_softmax_sum", "cur_softmax_max", "cur_softmax_sum"])
def test_stats_last_dim_not_8(gen, layout, argument):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    shape = (*getattr(x, {"prev_softmax_max": "prev_m"}.get(argument, "prev_m")).shape[:-1], 7)
    with raises((ValueError, errors.ShapeError), argument, "last dimension 8"):
        call(x, **{argument: torch.rand(shape)})


@pytest.mark.parametrize(
    ("stats_shape", "fragment"),
    [((2, 2, 5, 8), "S = 4"), ((3, 2, 4, 8), "B = 2")],
)
def test_sbh_stats_disagree_with_attention(gen, stats_shape, fragment):
    x = sbh(gen)
    stats = torch.rand(stats_shape)
    with raises((ValueError, errors.ShapeError), "prev_softmax_max", fragment, str(stats_shape)):
        call(x, prev_softmax_max=stats, prev_softmax_sum=stats, cur_softmax_max=stats, cur_softmax_sum=stats)


def test_sbh_hidden_not_divisible_by_heads(gen):
    x = sbh(gen)  # H = 6, N = 2
    stats = torch.rand(2, 4, 4, 8)  # N = 4 does not divide H = 6
    with raises((ValueError, errors.ShapeError), "prev_attn_out", "H divisible by N = 4", "H = 6"):
        call(x, prev_softmax_max=stats, prev_softmax_sum=stats, cur_softmax_max=stats, cur_softmax_sum=stats)


@pytest.mark.parametrize(("stats_shape", "fragment"), [((6, 2, 8), "T = 5"), ((5, 3, 8), "N = 2")])
def test_tnd_stats_disagree_with_attention(gen, stats_shape, fragment):
    x = tnd(gen)
    stats = torch.rand(stats_shape)
    with raises((ValueError, errors.ShapeError), "prev_softmax_max", fragment):
        call(x, prev_softmax_max=stats, prev_softmax_sum=stats, cur_softmax_max=stats, cur_softmax_sum=stats)


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize(
    ("argument", "reference"),
    [
        ("cur_attn_out", "prev_attn_out"),
        ("prev_softmax_sum", "prev_softmax_max"),
        ("cur_softmax_max", "prev_softmax_max"),
        ("cur_softmax_sum", "prev_softmax_max"),
    ],
)
def test_shape_differs_from_prev_counterpart(gen, layout, argument, reference):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    good = {
        "cur_attn_out": x.cur_o,
        "prev_softmax_sum": x.prev_l,
        "cur_softmax_max": x.cur_m,
        "cur_softmax_sum": x.cur_l,
    }
    shape = list(good[argument].shape)
    shape[0] += 1
    with raises((ValueError, RuntimeError, errors.ShapeError), argument, reference):
        call(x, **{argument: torch.rand(shape).to(good[argument].dtype)})


def test_attention_dtypes_differ(gen):
    x = sbh(gen)
    with raises((TypeError, RuntimeError, errors.DTypeError), "cur_attn_out", "torch.float32", "torch.float16"):
        call(x, cur_attn_out=x.cur_o.half())


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.float8_e4m3fn])
def test_attention_dtype_unsupported(gen, dtype):
    x = sbh(gen)
    with raises(
        (TypeError, RuntimeError, errors.DTypeError), "prev_attn_out", "float16, bfloat16, float32", str(dtype)
    ):
        call(x, prev_attn_out=x.prev_o.to(dtype), cur_attn_out=x.cur_o.to(dtype))


@pytest.mark.parametrize("argument", ["prev_softmax_max", "prev_softmax_sum", "cur_softmax_max", "cur_softmax_sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_stats_not_float32(gen, argument, dtype):
    x = sbh(gen)
    good = {
        "prev_softmax_max": x.prev_m,
        "prev_softmax_sum": x.prev_l,
        "cur_softmax_max": x.cur_m,
        "cur_softmax_sum": x.cur_l,
    }
    with raises((TypeError, RuntimeError, errors.DTypeError), argument, "float32", str(dtype)):
        call(x, **{argument: good[argument].to(dtype)})


def test_float64_stats_allowed_with_float64_attention(gen):
    x = sbh(gen, torch.float64)
    stats = [s.double() for s in (x.prev_m, x.prev_l, x.cur_m, x.cur_l)]
    out = call(
        x, prev_softmax_max=stats[0], prev_softmax_sum=stats[1], cur_softmax_max=stats[2], cur_softmax_sum=stats[3]
    )
    assert out[1].dtype == torch.float64


def test_not_a_tensor(gen):
    with raises((TypeError, errors.DTypeError), "cur_softmax_sum", "torch.Tensor", "list"):
        call(sbh(gen), cur_softmax_sum=[1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_seq_qlen_not_int64(gen, dtype):
    x = tnd(gen)
    with raises((TypeError, errors.DTypeError), "actual_seq_qlen", "int64", str(dtype)):
        call(x, actual_seq_qlen=torch.tensor(x.seq_offsets, dtype=dtype))


def test_seq_qlen_list_of_non_ints(gen):
    with raises((TypeError, errors.DTypeError), "actual_seq_qlen", "integers"):
        call(tnd(gen), actual_seq_qlen=[0, 1.5, 5])


def test_tnd_without_seq_qlen(gen):
    with raises((ValueError, RuntimeError, errors.SeqLenError), "actual_seq_qlen", "'TND'", "None"):
        call(tnd(gen), actual_seq_qlen=None)


def test_sbh_ignores_seq_qlen(gen):
    x = sbh(gen)
    a = call(x, actual_seq_qlen=torch.tensor([7, 1], dtype=torch.int32))
    b = call(x, actual_seq_qlen=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("offsets", "fragment"),
    [
        ([1, 3, 5], "starting at 0"),
        ([0, 3, 4], "ending at T = 5"),
        ([0, 3, 6], "ending at T = 5"),
        ([0, 4, 2, 5], "non-decreasing"),
        ([], "non-empty 1-D"),
    ],
)
def test_seq_qlen_not_non_decreasing_from_0_to_T(gen, offsets, fragment):
    with raises((RuntimeError, errors.SeqLenError), "actual_seq_qlen", fragment):
        call(tnd(gen), actual_seq_qlen=torch.tensor(offsets, dtype=torch.int64))


def test_seq_qlen_not_1d(gen):
    with raises((RuntimeError, errors.SeqLenError), "actual_seq_qlen", "1-D"):
        call(tnd(gen), actual_seq_qlen=torch.tensor([[0, 5]], dtype=torch.int64))


@pytest.mark.parametrize("head_dim", [32, 96, 1])
def test_tnd_head_dim_not_multiple_of_64(gen, head_dim):
    x = tnd(gen, head_dim=head_dim)
    with raises(
        (RuntimeError, errors.HardwareLimitError), "prev_attn_out", "multiple of 64", f"D = {head_dim}", "ascend_limits"
    ):
        call(x)
    assert call(x, ascend_limits=False)[0].shape == x.prev_o.shape


@pytest.mark.parametrize(("dtype", "too_big"), [(torch.float32, True), (torch.float16, False), (torch.bfloat16, False)])
def test_tnd_ascend_size_bound(gen, dtype, too_big):
    # N*D = 6144: fp32 needs 6144*32 + 384*56 = 218112 > 196608 bytes; 16-bit needs 144384.
    x = make_update_inputs("TND", dtype, gen, seq_lens=[2, 1], heads=48, head_dim=128)
    if too_big:
        with raises((RuntimeError, errors.HardwareLimitError), "196608", "218112", "N = 48", "DataSize = 4"):
            call(x)
        assert call(x, ascend_limits=False)[0].shape == x.prev_o.shape
    else:
        assert call(x)[0].shape == x.prev_o.shape


@pytest.mark.parametrize("softmax_layout", ["BNSD", "tnd_", 5])
def test_unknown_softmax_layout(gen, softmax_layout):
    with raises((ValueError, errors.LayoutError), "softmax_layout", "None or 'TND'"):
        call(tnd(gen), softmax_layout=softmax_layout)


def test_softmax_layout_with_sbh(gen):
    with raises((ValueError, errors.LayoutError), "softmax_layout", "layout 'SBH'"):
        call(sbh(gen), softmax_layout="TND")


def test_unknown_backend(gen):
    with raises((ValueError, errors.BackendError), "backend", "'torch'", "'auto'", "numpy"):
        call(sbh(gen), backend="numpy")


def test_backend_that_cannot_run_the_call(gen):
    pytest.importorskip("triton", reason="needs the triton package")
    x = sbh(gen, torch.float64).to(backend_device("triton"))
    with raises((ValueError, errors.BackendError), "backend", "'triton' cannot run this call", "float64"):
        call(x, backend="triton")


def test_mixed_devices(gen):
    x = sbh(gen)
    with raises((ValueError, errors.DeviceError), "cur_softmax_sum", "device cpu", "device meta"):
        call(x, cur_softmax_sum=x.cur_l.to("meta"))


def test_out_not_a_triple(gen):
    x = sbh(gen)
    with raises((ValueError, errors.ShapeError), "out", "tuple (attn_out, softmax_max, softmax_sum)"):
        call(x, out=(torch.empty_like(x.prev_o),))


@pytest.mark.parametrize(
    ("index", "mutate", "error", "fragment"),
    [
        (0, lambda t: t[:-1], errors.ShapeError, "out[0] (attn_out)"),
        (1, lambda t: t.double(), errors.DTypeError, "out[1] (softmax_max)"),
        (2, lambda t: t.to("meta"), errors.DeviceError, "out[2] (softmax_sum)"),
        (0, lambda t: t[:, :1].expand_as(t), errors.AliasError, "internally overlapping"),
    ],
)
def test_out_mismatch(gen, index, mutate, error, fragment):
    x = sbh(gen)
    outs = [torch.empty_like(x.prev_o), torch.empty_like(x.prev_m), torch.empty_like(x.prev_m)]
    outs[index] = mutate(outs[index])
    with raises((error,), fragment):
        call(x, out=tuple(outs))


def test_out_partially_overlapping_an_input(gen):
    x = sbh(gen)
    shifted = torch.empty(x.prev_o.numel() + 1)
    x.prev_o = shifted[1:].view_as(x.prev_o)
    bad_out = shifted[:-1].view_as(x.prev_o)
    with raises((ValueError, errors.AliasError), "out[0] (attn_out)", "prev_attn_out", "partial overlap"):
        call(x, out=(bad_out, torch.empty_like(x.prev_m), torch.empty_like(x.prev_m)))


def test_outputs_overlapping_each_other(gen):
    x = sbh(gen)
    stats = torch.empty_like(x.prev_m)
    with raises((ValueError, errors.AliasError), "out[1] (softmax_max)", "out[2] (softmax_sum)"):
        call(x, out=(torch.empty_like(x.prev_o), stats, stats))


def row_map_by_definition(offsets: list[int], heads: int) -> tuple[list[int], list[int]]:
    """Note [canonical rows]: token t of batch b (c_b <= t < c_{b+1}) starts at row c_b * N + (t - c_b) and steps
    by the batch length S_b = c_{b+1} - c_b from one head to the next."""
    base, step = [], []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        for t in range(lo, hi):
            base.append(lo * heads + (t - lo))
            step.append(hi - lo)
    return base, step


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.just(0), st.integers(0, 80)), min_size=1, max_size=8),
    heads=st.integers(1, 5),
)
@example(lengths=[0], heads=3)
@example(lengths=[7], heads=1)
@example(lengths=[0, 4, 0, 0, 9, 0], heads=5)
def test_cpu_row_map_matches_torch_row_map_and_definition(lengths, heads):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    seq_offsets = torch.tensor(offsets, dtype=torch.int64)

    base, step = _contract.per_batch_row_map(seq_offsets, total, heads)
    want_base, want_step = _contract._row_map(seq_offsets, total, heads)
    for got, want in ((base, want_base), (step, want_step)):
        assert got.dtype == torch.int64 and got.shape == (total,) and got.device == seq_offsets.device
        assert torch.equal(got, want)
    def_base, def_step = row_map_by_definition(offsets, heads)
    assert base.tolist() == def_base and step.tolist() == def_step
    # Bijection between (token, head) pairs and the T * N statistics rows.
    rows = (base.unsqueeze(1) + torch.arange(heads) * step.unsqueeze(1)).flatten()
    assert torch.equal(rows.sort().values, torch.arange(total * heads))

    again = _contract.per_batch_row_map(seq_offsets.clone(), total, heads)
    assert torch.equal(again[0], base) and torch.equal(again[1], step)
    assert again[0].tolist() == def_base and again[1].tolist() == def_step  # nobody wrote into the cached map
