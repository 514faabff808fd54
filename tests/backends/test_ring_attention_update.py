"""Every backend of ``ring_attention_update`` against the float64 reference (``docs/contract.md``).

Runs against each backend that can run here: ``torch`` always, ``cpu`` when numba imports, ``triton`` on the
GPU when there is one, else on CPU tensors under ``TRITON_INTERPRET=1`` (fewer, smaller examples: the
interpreter is slow). The reference always runs on CPU copies of the inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ringattn
from inputs import (
    ATTN_DTYPES,
    TOL,
    UpdateInputs,
    available_backends,
    backend_device,
    make_update_inputs,
    strided_copy,
)
from ringattn.reference import ring_attention_update_reference

BACKENDS = available_backends()


def interpreted(backend: str) -> bool:
    """Triton on CPU tensors runs in the interpreter, about a thousand times slower than compiled code."""
    return backend == "triton" and backend_device(backend).type == "cpu"


def backend_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """float64 is a torch/cpu extension; the Triton kernel refuses it (``auto`` then runs ``torch``). The fused CPU
    kernel's float64 (a kernel of its own, ~30 s to compile) runs in the `slow` run: test_cpu_float64_matches_reference.
    """
    return tuple(d for d in ATTN_DTYPES if not (backend in ("triton", "cpu") and d == torch.float64))


BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in backend_dtypes(b)]


def reference(x: UpdateInputs):
    return ring_attention_update_reference(*x.to(torch.device("cpu")).args(), softmax_layout=x.softmax_layout)


def assert_matches_reference(x: UpdateInputs, got, dtype: torch.dtype) -> None:
    want = reference(x)
    names = ("attn_out", "softmax_max", "softmax_sum")
    dtypes = (dtype, x.prev_m.dtype, x.prev_m.dtype)
    for name, g, w, d in zip(names, got, want, dtypes, strict=True):
        g = torch.as_tensor(g).cpu()
        assert g.shape == w.shape, name
        assert g.dtype == d, name
        tol = TOL[d]
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@st.composite
def update_cases(draw, small: bool, device: torch.device, dtypes: tuple[torch.dtype, ...] = ATTN_DTYPES):
    layout = draw(st.sampled_from(["SBH", "TND"]))
    dtype = draw(st.sampled_from(dtypes))
    heads = draw(st.integers(1, 3 if small else 6))
    head_dim = draw(st.integers(1, 9 if small else 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "SBH":
        x = make_update_inputs(
            "SBH",
            dtype,
            gen,
            seq=draw(st.integers(0, 4 if small else 9)),
            batch=draw(st.integers(1, 3)),
            heads=heads,
            head_dim=head_dim,
        )
    else:
        lens = draw(st.lists(st.integers(0, 4 if small else 7), min_size=1, max_size=4))
        x = make_update_inputs(
            "TND",
            dtype,
            gen,
            seq_lens=lens,
            heads=heads,
            head_dim=head_dim,
            softmax_layout=draw(st.sampled_from([None, "TND"])),
        )
    x = x.to(device)
    layouts = draw(st.lists(st.sampled_from(["contiguous", "gap", "transposed"]), min_size=6, max_size=6))
    tensors = [t if how == "contiguous" else strided_copy(t, how) for t, how in zip(x.tensors(), layouts, strict=True)]
    x.prev_o, x.prev_m, x.prev_l, x.cur_o, x.cur_m, x.cur_l = tensors
    out_mode = draw(st.sampled_from(["new", "out", "alias_prev", "alias_cur", "numpy"]))
    if out_mode == "numpy" and (dtype == torch.bfloat16 or device.type != "cpu"):  # NumPy: no bfloat16, no GPU
        out_mode = "new"
    return x, dtype, out_mode


def run_case(backend: str, x: UpdateInputs, dtype: torch.dtype, out_mode: str) -> None:
    before = [t.clone() for t in x.tensors()]
    kwargs = dict(softmax_layout=x.softmax_layout, ascend_limits=False, backend=backend)
    if out_mode == "numpy":
        args = [t.numpy() for t in x.tensors()]
        offsets = np.asarray(x.seq_offsets, dtype=np.int64) if x.seq_offsets is not None else None
        got = ringattn.ring_attention_update(*args[:6], offsets, x.layout, **kwargs)
        assert all(isinstance(g, np.ndarray) for g in got)
    elif out_mode == "out":
        out = (
            torch.full_like(x.prev_o, float("nan")),
            torch.full_like(x.prev_m, float("nan")),
            torch.full_like(x.prev_m, float("nan")),
        )
        got = ringattn.ring_attention_update(*x.args(), out=out, **kwargs)
        assert all(g is o for g, o in zip(got, out, strict=True))
    elif out_mode in ("alias_prev", "alias_cur"):
        side = (x.prev_o, x.prev_m, x.prev_l) if out_mode == "alias_prev" else (x.cur_o, x.cur_m, x.cur_l)
        x_before = UpdateInputs(x.layout, *before, x.seq_offsets, x.softmax_layout)
        got = ringattn.ring_attention_update(*x.args(), out=side, **kwargs)
        assert all(g is s for g, s in zip(got, side, strict=True))
        assert_matches_reference(x_before, got, dtype)
        return
    else:
        got = ringattn.ring_attention_update(*x.args(), **kwargs)
    assert_matches_reference(x, got, dtype)
    for name, b, a in zip(("prev_o", "prev_m", "prev_l", "cur_o", "cur_m", "cur_l"), before, x.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} was modified")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend):
    check_against_reference(backend, backend_dtypes(backend), 12 if interpreted(backend) else 80)


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in BACKENDS, reason="the fused CPU backend needs numba")
def test_cpu_float64_matches_reference():
    check_against_reference("cpu", (torch.float64,), 40)


def check_against_reference(backend: str, dtypes: tuple[torch.dtype, ...], examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
    @given(case=update_cases(interpreted(backend), backend_device(backend), dtypes))
    def check(case):
        run_case(backend, *case)

    check()


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_empty_rows(backend, layout, dtype):
    """Empty with empty is empty (0, -inf, 0); empty with x is exactly x (``docs/contract.md``, "Empty parts")."""
    gen = torch.Generator().manual_seed(7)
    x = make_update_inputs(layout, dtype, gen, seq=4, seq_lens=[2, 0, 3], head_dim=64, empty_fraction=0.0)
    assert x.prev_m.view(-1, 8).shape[0] > 3
    for tensor in (x.prev_m, x.cur_m):
        tensor.view(-1, 8)[0::3] = -math.inf  # rows 0, 3, 6, ...: both parts empty
    x.prev_l.view(-1, 8)[0::3] = 0.0
    x.cur_l.view(-1, 8)[0::3] = 0.0
    x.prev_m.view(-1, 8)[1::3] = -math.inf  # rows 1, 4, ...: only prev empty
    x.prev_l.view(-1, 8)[1::3] = 0.0
    x = x.to(backend_device(backend))
    o, m, l = ringattn.ring_attention_update(*x.args(), softmax_layout=x.softmax_layout, backend=backend)
    assert not o.isnan().any() and not m.isnan().any() and not l.isnan().any()
    assert (m.view(-1, 8)[0::3] == -math.inf).all() and (l.view(-1, 8)[0::3] == 0).all()
    # Only prev empty: the result is exactly cur (weight b / (0 + b) == 1 in IEEE arithmetic).
    torch.testing.assert_close(m.view(-1, 8)[1::3], x.cur_m.view(-1, 8)[1::3], rtol=0, atol=0)
    torch.testing.assert_close(l.view(-1, 8)[1::3], x.cur_l.view(-1, 8)[1::3], rtol=0, atol=0)
    assert_matches_reference(x, (o, m, l), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_follow_ieee(backend, dtype):
    """NaN statistics give NaN rows, NaN outputs NaN elements, +inf statistics NaN weights (IEEE arithmetic of the
    merge, ``docs/contract.md``)."""
    gen = torch.Generator().manual_seed(11)
    x = make_update_inputs("SBH", dtype, gen, seq=6, batch=1, heads=2, head_dim=5, empty_fraction=0.0)
    x.prev_m[0, 0, 0] = math.nan  # row (s=0, b=0, n=0)
    x.cur_l[0, 1, 1] = math.inf  # row (s=1, b=0, n=1): +inf sum -> inf / inf weight
    x.prev_m[0, 0, 2] = math.inf  # row (s=2, b=0, n=0): +inf max -> inf - inf
    x.cur_o[3, 0, 7] = math.nan  # one element of row (s=3, n=1)
    x = x.to(backend_device(backend))
    o, m, l = ringattn.ring_attention_update(*x.args(), backend=backend)
    assert o[0, 0, :5].isnan().all() and m[0, 0, 0].isnan().all() and l[0, 0, 0].isnan().all()
    assert o[1, 0, 5:].isnan().all()
    assert o[2, 0, :5].isnan().all()
    assert o[3, 0, 7].isnan() and o[3, 0, 5:7].isfinite().all() and o[3, 0, 8:].isfinite().all()
    nan_free = torch.ones_like(o, dtype=torch.bool)
    nan_free[0, 0, :5] = nan_free[1, 0, 5:] = nan_free[2, 0, :5] = nan_free[3, 0, 7] = False
    assert o[nan_free].isfinite().all()
    assert_matches_reference(x, (o, m, l), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mindspeed_causal_half_views(backend):
    """MindSpeed updates the second half of the sequence through views, in place."""
    seq, batch, heads, head_dim = 8, 2, 2, 4
    gen = torch.Generator().manual_seed(5)
    x = make_update_inputs("SBH", torch.bfloat16, gen, seq=seq, batch=batch, heads=heads, head_dim=head_dim)
    y = make_update_inputs("SBH", torch.bfloat16, gen, seq=seq // 2, batch=batch, heads=heads, head_dim=head_dim)
    x, y = x.to(backend_device(backend)), y.to(backend_device(backend))
    attn = x.prev_o.clone()
    stats_m, stats_l = x.prev_m.clone(), x.prev_l.clone()
    half_o = attn.view(2, seq // 2, batch, heads * head_dim)[1]
    half_m = stats_m.view(batch, heads, 2, seq // 2, 8)[:, :, 1]
    half_l = stats_l.view(batch, heads, 2, seq // 2, 8)[:, :, 1]
    want = ring_attention_update_reference(half_o, half_m, half_l, y.cur_o, y.cur_m, y.cur_l)
    ringattn.ring_attention_update(
        half_o, half_m, half_l, y.cur_o, y.cur_m, y.cur_l, out=(half_o, half_m, half_l), backend=backend
    )
    torch.testing.assert_close(half_o.double(), want[0], rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(half_m.double(), want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(half_l.double(), want[2], rtol=1e-4, atol=1e-4)
    first = slice(0, seq // 2)
    torch.testing.assert_close(attn[first], x.prev_o[first], rtol=0, atol=0)  # the untouched half
    torch.testing.assert_close(stats_m[:, :, first], x.prev_m[:, :, first], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("layout", "kw"),
    [
        ("SBH", dict(seq=0)),
        ("SBH", dict(seq=3, heads=2, head_dim=0)),
        ("TND", dict(seq_lens=[0, 0])),
        ("TND", dict(seq_lens=[])),
    ],
)
def test_zero_size(backend, layout, kw):
    gen = torch.Generator().manual_seed(3)
    x = make_update_inputs(layout, torch.float32, gen, **kw).to(backend_device(backend))
    got = ringattn.ring_attention_update(*x.args(), ascend_limits=False, backend=backend)
    assert got[0].shape == x.prev_o.shape and got[1].shape == x.prev_m.shape and got[2].shape == x.prev_m.shape
    assert_matches_reference(x, got, torch.float32)
