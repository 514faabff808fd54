"""Issue 13: every bad input gives a documented ringattn error naming the argument, never garbage, a raw torch or
Python error, a write into read-only memory, or a dead CUDA context. One test per row: exception type and the
argument's name in the message. Also the one-sync check of a device ``actual_seq_qlen`` (Note [checking
actual_seq_qlen]) and the byte bound of the row-map cache (Note [row map cache])."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from inputs import available_backends, backend_device, make_update_inputs
from ringattn import _contract, errors
from ringattn.merge import lse_to_stats, merge_states, stats_to_lse

_NAMES = ("prev_attn_out", "prev_softmax_max", "prev_softmax_sum", "cur_attn_out", "cur_softmax_max", "cur_softmax_sum")
UPDATE_BACKENDS = ("auto", "torch", "cpu", "reference")
MERGE_BACKENDS = ("auto", *available_backends())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1313)


def raises(error: type[BaseException], *fragments: str):
    """``pytest.raises(error)`` whose message must contain every fragment (the argument's name first)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(error)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert isinstance(self.info.value, errors.RingAttnError), type(self.info.value)
            for fragment in fragments:
                assert fragment in str(self.info.value), f"{fragment!r} not in {str(self.info.value)!r}"
            return handled

    return _Check()


def tnd(gen: torch.Generator):
    return make_update_inputs("TND", torch.float32, gen, seq_lens=[3, 0, 2], heads=2, head_dim=64)


def sbh(gen: torch.Generator):
    return make_update_inputs("SBH", torch.float32, gen, seq=4, batch=2, heads=2, head_dim=3)


def update(args, seq_offsets, layout, **kw):
    return ringattn.ring_attention_update(*args, actual_seq_qlen=seq_offsets, layout=layout, **kw)


def merge_parts(gen: torch.Generator, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Two BSND parts (B, S, N, D) = (2, 5, 3, 16) with BNS LSEs, some rows empty in one part."""
    o = [torch.rand(2, 5, 3, 16, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in range(2)]
    lse = [(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) * 3).float() for _ in range(2)]
    lse[1][0, 1, :2] = float("-inf")
    return o, [s.to(device) for s in lse]


# --- self-overlapping outputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        ("out", lambda dev: torch.empty(1, 1, 1, 16, device=dev).expand(2, 5, 3, 16)),
        ("out_lse", lambda dev: torch.empty(1, 1, 1, device=dev).expand(2, 3, 5)),
        ("out", lambda dev: torch.empty(2, 5, 1, 16, device=dev).expand(2, 5, 3, 16)),
    ],
)
def test_merge_states_self_overlapping_destination(gen, backend, argument, bad):
    device = backend_device(backend)
    o, lse = merge_parts(gen, device=device)
    with raises(errors.AliasError, argument, "internally overlapping"):
        merge_states(o, lse, layout="BSND", lse_base="e", backend=backend, **{argument: bad(device)})


def test_merge_states_destinations_overlapping_each_other(gen):
    o, lse = merge_parts(gen)
    buf = torch.empty(2 * 5 * 3 * 16)
    with raises(errors.AliasError, "out_lse", "out"):
        merge_states(o, lse, layout="BSND", out=buf.view(2, 5, 3, 16), out_lse=buf[:30].view(2, 3, 5), lse_base="e")


def test_merge_states_in_place_into_an_input_still_allowed(gen):
    o, lse = merge_parts(gen)
    want = merge_states(o, lse, layout="BSND", lse_base="e")
    got = merge_states(o, lse, layout="BSND", out=o[0], out_lse=lse[0], lse_base="e")
    assert got[0] is o[0] and got[1] is lse[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def brute_force_overlap(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    offsets = [
        sum(i * s for i, s in zip(index, strides, strict=True)) for index in itertools.product(*map(range, shape))
    ]
    return len(offsets) != len(set(offsets))


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    strides=st.lists(st.integers(0, 12), min_size=4, max_size=4),
)
def test_internal_overlap_never_missed(shape, strides):
    """has_internal_overlap may refuse an exotic non-overlapping layout, but never accepts an overlapping one."""
    strides = tuple(strides[: len(shape)])
    t = torch.empty(200).as_strided(shape, strides)
    if brute_force_overlap(tuple(shape), strides):
        assert _contract.has_internal_overlap(t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.empty(3, 4, 5),
        lambda: torch.empty(3, 4, 5).permute(2, 0, 1),
        lambda: torch.empty(6, 8, 10)[::2, 1::2, ::3],
        lambda: torch.empty(3, 1, 5).expand(3, 4, 5),
        lambda: torch.empty(5).expand(4, 5).t(),
        lambda: torch.empty(0, 3).expand(0, 3),
        lambda: torch.empty(1, 1).expand(1, 1),
    ],
)
def test_internal_overlap_exact_on_views(make):
    t = make()
    assert _contract.has_internal_overlap(t) == brute_force_overlap(tuple(t.shape), t.stride())


# --- NumPy arrays -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_read_only_numpy_out_is_refused_and_not_written(gen, index):
    x = sbh(gen)
    arrays = [t.numpy() for t in x.tensors()]
    outs = [np.full_like(arrays[0], 7.0), np.full_like(arrays[1], 7.0), np.full_like(arrays[1], 7.0)]
    outs[index].flags.writeable = False
    with raises(errors.AliasError, _contract.OUT_NAMES[index], "read-only"):
        update(arrays, None, "SBH", out=tuple(outs))
    assert (outs[index] == 7.0).all()


def test_numpy_out_with_negative_strides_is_refused(gen):
    x = sbh(gen)
    arrays = [t.numpy() for t in x.tensors()]
    bad = np.empty_like(arrays[0])[::-1]
    with raises(errors.AliasError, "out[0] (attn_out)", "non-negative strides"):
        update(arrays, None, "SBH", out=(bad, np.empty_like(arrays[1]), np.empty_like(arrays[1])))


def test_big_endian_numpy_out_is_refused(gen):
    x = sbh(gen)
    arrays = [t.numpy() for t in x.tensors()]
    bad = np.empty(arrays[1].shape, dtype=">f4")
    with raises(errors.DTypeError, "out[2] (softmax_sum)", "native byte order"):
        update(arrays, None, "SBH", out=(np.empty_like(arrays[0]), np.empty_like(arrays[1]), bad))


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("argument", _NAMES)
def test_numpy_object_input(gen, layout, argument):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    arrays = [t.numpy() for t in x.tensors()]
    arrays[_NAMES.index(argument)] = arrays[_NAMES.index(argument)].astype(object)
    with raises(errors.DTypeError, argument, "numeric dtype", "object"):
        update(arrays, x.seq_offsets, layout)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("kind", ["big_endian", "negative_strides", "read_only"])
def test_numpy_inputs_torch_cannot_view_are_copied_exactly(gen, backend, layout, kind):
    """Note [NumPy arrays]: big-endian and negatively strided inputs are copied once; results are bitwise those of
    native contiguous arrays with the same values; read-only inputs are read without a warning."""
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    native = [t.numpy() for t in x.tensors()]
    if kind == "big_endian":
        odd = [a.astype(a.dtype.newbyteorder(">")) for a in native]
    elif kind == "negative_strides":
        odd = [np.flip(np.flip(a, 0).copy(), 0) for a in native]  # same values, stride of dim 0 negative
        assert all(a.strides[0] < 0 for a in odd)
    else:
        odd = [a.copy() for a in native]
        for a in odd:
            a.flags.writeable = False
    seq = x.seq_offsets
    if layout == "TND" and kind != "read_only":  # the same treatment for actual_seq_qlen
        seq = np.array(seq, dtype=">i8") if kind == "big_endian" else np.flip(np.array(seq[::-1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = update(odd, seq, layout, backend=backend)
    assert not [w for w in caught if "writ" in str(w.message)]  # torch's "non-writable array" warning
    want = update(native, x.seq_offsets, layout, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("value", [np.array([0, 3, 3, 5], dtype=object), np.array(["0", "3", "3", "5"])])
def test_seq_qlen_numpy_non_numeric(gen, value):
    x = tnd(gen)
    with raises(errors.DTypeError, "actual_seq_qlen", "numeric dtype"):
        update(x.tensors(), value, "TND")


# --- meta tensors and devices -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_seq_qlen_on_meta(gen, backend):
    x = tnd(gen)
    offsets = torch.tensor(x.seq_offsets, device="meta")
    with raises(errors.DeviceError, "actual_seq_qlen", "meta"):
        update(x.tensors(), offsets, "TND", backend=backend)
    with raises(errors.DeviceError, "actual_seq_qlen", "meta"):  # all-meta inputs: still no values to check
        update([t.to("meta") for t in x.tensors()], offsets, "TND", backend=backend)


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("argument", _NAMES)
def test_one_input_on_meta(gen, layout, argument):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    args = x.tensors()
    index = _NAMES.index(argument)
    args[index] = args[index].to("meta")
    name = argument if index else "cur_attn_out"  # the first input sets the device; the next one disagrees
    with raises(errors.DeviceError, name, "meta"):
        update(args, x.seq_offsets, layout)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("layout", ["SBH", "TND"])
def test_all_inputs_on_meta_give_meta_outputs(gen, backend, layout):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    got = update([t.to("meta") for t in x.tensors()], x.seq_offsets, layout, backend=backend)
    assert [(t.device.type, t.shape, t.dtype) for t in got] == [
        ("meta", t.shape, t.dtype) for t in (x.prev_o, x.prev_m, x.prev_m)
    ]


@pytest.mark.parametrize(("index", "argument"), [(0, "outputs[0]"), (1, "outputs[1]"), (2, "lses[0]"), (3, "lses[1]")])
def test_merge_states_part_on_meta(gen, index, argument):
    o, lse = merge_parts(gen)
    parts = [*o, *lse]
    parts[index] = parts[index].to("meta")
    name = argument if index else "outputs[1]"  # outputs[0] sets the device
    with raises(errors.DeviceError, name, "meta"):
        merge_states(parts[:2], parts[2:], layout="BSND", lse_base="e")


@pytest.mark.parametrize("value", ["no", None, 1, 0.0])
def test_ascend_limits_not_a_bool(gen, value):
    x = tnd(gen)
    with raises(errors.DTypeError, "ascend_limits", repr(value)):
        update(x.tensors(), x.seq_offsets, "TND", ascend_limits=value)


# --- stats_to_lse / lse_to_stats --------------------------------------------------------------------------------------


def random_stats(gen: torch.Generator, shape=(2, 3, 5)):
    m = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).float()
    l = (1 + 30 * torch.rand(shape, generator=gen, dtype=torch.float64)).float()
    m[0, 0, :2], l[0, 0, :2] = float("-inf"), 0.0  # empty rows
    return m.unsqueeze(-1).expand(*shape, 8).contiguous(), l.unsqueeze(-1).expand(*shape, 8).contiguous()


@pytest.mark.parametrize("base", ["e", 2])
def test_stats_conversions_take_and_give_numpy(gen, base):
    m, l = random_stats(gen)
    lse = stats_to_lse(m.numpy(), l.numpy(), lse_base=base)
    assert isinstance(lse, np.ndarray)
    np.testing.assert_array_equal(lse, stats_to_lse(m, l, lse_base=base).numpy())
    back = lse_to_stats(lse, lse_base=base)
    want = lse_to_stats(torch.from_numpy(lse), lse_base=base)
    for g, w in zip(back, want, strict=True):
        assert isinstance(g, np.ndarray) and g.shape == (2, 3, 5, 8)
        np.testing.assert_array_equal(g, w.numpy())
    # Big-endian and negatively strided arrays are copied exactly (Note [NumPy arrays]).
    odd = stats_to_lse(m.numpy().astype(">f4"), np.flip(np.flip(l.numpy(), 0).copy(), 0), lse_base=base)
    np.testing.assert_array_equal(odd, lse)


@pytest.mark.parametrize(
    ("argument", "mutate", "error", "fragment"),
    [
        ("softmax_max", lambda m: m.numpy().astype(object), errors.DTypeError, "numeric dtype"),
        ("softmax_sum", lambda l: l.to("meta"), errors.DeviceError, "device meta"),
        ("softmax_max", lambda m: m[..., :0], errors.ShapeError, "lanes >= 1"),
        ("softmax_sum", lambda l: l[0, 0, 0, 0], errors.ShapeError, "lanes >= 1"),
        ("softmax_max", lambda m: m.to(torch.complex64), errors.DTypeError, "float32 or float64"),
        ("softmax_sum", lambda l: l.int(), errors.DTypeError, "float32 or float64"),
        ("softmax_max", lambda m: None, errors.DTypeError, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_stats_to_lse_bad_arguments(gen, argument, mutate, error, fragment):
    m, l = random_stats(gen)
    args = {"softmax_max": m, "softmax_sum": l}
    args[argument] = mutate(args[argument])
    with raises(error, argument, fragment):
        stats_to_lse(args["softmax_max"], args["softmax_sum"])


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"lanes": 0}, errors.ShapeError, "lanes"),
        ({"lanes": -2}, errors.ShapeError, "lanes"),
        ({"lanes": 2.5}, errors.DTypeError, "lanes"),
        ({"lanes": True}, errors.DTypeError, "lanes"),
        ({"lanes": None}, errors.DTypeError, "lanes"),
        ({"lse_base": None}, errors.LayoutError, "lse_base"),
    ],
)
def test_lse_to_stats_bad_arguments(gen, kwargs, error, fragment):
    lse = torch.randn(3, 5, generator=gen)
    with raises(error, fragment):
        lse_to_stats(lse, **kwargs)


@pytest.mark.parametrize(
    ("lse", "error", "fragment"),
    [
        (np.zeros((3, 5), dtype=object), errors.DTypeError, "numeric dtype"),
        (torch.zeros(3, 5, dtype=torch.int64), errors.DTypeError, "float32 or float64"),
        (torch.zeros(3, 5, dtype=torch.complex64), errors.DTypeError, "float32 or float64"),
        ([0.0, 1.0], errors.DTypeError, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_lse_to_stats_bad_lse(lse, error, fragment):
    with raises(error, "lse", fragment):
        lse_to_stats(lse)


def test_lse_to_stats_numpy_integer_lanes(gen):
    lse = torch.randn(3, 5, generator=gen)
    got = lse_to_stats(lse, lanes=np.int64(4))
    want = lse_to_stats(lse, lanes=4)
    assert got[0].shape == (3, 5, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- shard_sequence / unshard_sequence --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument", "fragment"),
    [
        ({"rank": 2, "world_size": 2}, errors.ShapeError, "rank", "[0, 2)"),
        ({"rank": -1, "world_size": 2}, errors.ShapeError, "rank", "[0, 2)"),
        ({"rank": 0, "world_size": 0}, errors.ShapeError, "world_size", ">= 1"),
        ({"rank": 0, "world_size": -3}, errors.ShapeError, "world_size", ">= 1"),
        ({"rank": 0, "world_size": 2.0}, errors.DTypeError, "world_size", "an int"),
        ({"rank": 0, "world_size": True}, errors.DTypeError, "world_size", "an int"),
        ({"rank": 1.0, "world_size": 2}, errors.DTypeError, "rank", "an int"),
        ({"rank": None, "world_size": 2}, errors.DTypeError, "rank", "an int"),
        ({"rank": 0, "world_size": 2, "dim": 3}, errors.ShapeError, "dim", "rank 3"),
        ({"rank": 0, "world_size": 2, "dim": 0.5}, errors.DTypeError, "dim", "an int"),
        ({"rank": 0, "world_size": 3}, errors.ShapeError, "x.shape[1]", "multiple of 6"),
        ({"rank": 0, "world_size": 2, "sharding": "ring"}, errors.LayoutError, "sharding", "'zigzag'"),
    ],
)
def test_shard_sequence_bad_arguments(kwargs, error, argument, fragment):
    with raises(error, argument, fragment):
        ringattn.shard_sequence(torch.randn(2, 8, 3), **kwargs)


def test_shard_sequence_not_a_tensor():
    with raises(errors.DTypeError, "x", "torch.Tensor"):
        ringattn.shard_sequence(np.zeros((2, 8, 3)), 0, 2)


@pytest.mark.parametrize(
    ("shards", "kwargs", "error", "argument"),
    [
        ([], {}, errors.ShapeError, "shards"),
        (None, {}, errors.DTypeError, "shards"),
        ([[1.0, 2.0]], {}, errors.DTypeError, "shards"),
        ([torch.randn(2, 4, 3), torch.randn(2, 2, 3)], {}, errors.ShapeError, "shards[1]"),
        ([torch.randn(2, 4, 3), torch.randn(2, 4, 3).double()], {}, errors.DTypeError, "shards[1]"),
        ([torch.randn(2, 4, 3), torch.randn(2, 4, 3, device="meta")], {}, errors.DeviceError, "shards[1]"),
        ([torch.randn(2, 3, 3)] * 2, {}, errors.ShapeError, "shards[0].shape[1]"),
        ([torch.randn(2, 4, 3)] * 2, {"dim": -4}, errors.ShapeError, "dim"),
        ([torch.randn(2, 4, 3)] * 2, {"sharding": None}, errors.LayoutError, "sharding"),
    ],
)
def test_unshard_sequence_bad_arguments(shards, kwargs, error, argument):
    with raises(error, argument):
        ringattn.unshard_sequence(shards, **kwargs)


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("length", "dim"), [(12, 1), (12, -2), (0, 1)])
def test_shard_unshard_round_trip(gen, sharding, world_size, length, dim):
    x = torch.randn(2, length, 3, generator=gen)
    shards = [ringattn.shard_sequence(x, r, world_size, sharding=sharding, dim=dim) for r in range(world_size)]
    assert all(s.shape[1] == length // world_size for s in shards)
    assert torch.equal(ringattn.unshard_sequence(shards, sharding=sharding, dim=dim), x)


# --- a device actual_seq_qlen: one host sync, a SeqLenError, a usable process (item 3) --------------------------------

BAD_OFFSETS = [([1, 3, 3, 5], "starting at 0"), ([0, 3, 3, 4], "ending at T = 5"), ([0, 4, 3, 5], "non-decreasing")]


def test_device_checks_only_while_capturing_or_compiling(monkeypatch):
    """The branch predicate of Note [checking actual_seq_qlen]."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _contract._device_checks_only(cuda) and not _contract._device_checks_only(cpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _contract._device_checks_only(cuda)
    assert not _contract._device_checks_only(cpu)  # a CPU tensor is checked on the host, capture or not
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _contract._device_checks_only(cuda) and _contract._device_checks_only(cpu)
    assert not _contract._values_on_host(cuda) and _contract._values_on_host(cpu)


@pytest.fixture
def device_double(monkeypatch):
    """CPU tensors take the device-tensor path (as a CUDA tensor would, outside capture and compile); records every
    host fetch of the validity flag."""
    fetches: list[torch.Tensor] = []
    real = _contract._fetch_flag

    def fetch(flag: torch.Tensor) -> bool:
        fetches.append(flag)
        return real(flag)

    monkeypatch.setattr(_contract, "_values_on_host", lambda device: False)
    monkeypatch.setattr(_contract, "_fetch_flag", fetch)
    return fetches


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_device_seq_qlen_checked_with_one_sync(gen, device_double, backend):
    x = tnd(gen)
    got = update(x.tensors(), torch.tensor(x.seq_offsets), "TND", backend=backend)
    assert len(device_double) == 1 and device_double[0].shape == () and device_double[0].dtype == torch.bool
    want = update(x.tensors(), x.seq_offsets, "TND", backend=backend)  # a list: host-checked, no fetch
    assert len(device_double) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("offsets", "fragment"), BAD_OFFSETS)
def test_bad_device_seq_qlen_raises_seqlen_error(gen, device_double, offsets, fragment):
    x = tnd(gen)
    with raises(errors.SeqLenError, "actual_seq_qlen", fragment):
        update(x.tensors(), torch.tensor(offsets), "TND")
    assert len(device_double) == 1


def test_capture_keeps_device_side_asserts(gen, monkeypatch, device_double):
    """Inside capture (or compile) no host sync: the checks are ``torch._assert_async`` (on CPU it raises at once, a
    RuntimeError, not a SeqLenError; on CUDA it fires at the next synchronisation)."""
    monkeypatch.setattr(_contract, "_device_checks_only", lambda device: True)
    x = tnd(gen)
    got = update(x.tensors(), torch.tensor(x.seq_offsets), "TND")
    assert len(got) == 3
    with pytest.raises(RuntimeError, match="actual_seq_qlen") as info:
        update(x.tensors(), torch.tensor([0, 4, 3, 5]), "TND")
    assert not isinstance(info.value, errors.SeqLenError)
    assert device_double == []  # no host fetch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("offsets", "fragment"), BAD_OFFSETS)
def test_bad_cuda_seq_qlen_raises_and_cuda_still_works(gen, offsets, fragment):
    x = tnd(gen).to(torch.device("cuda"))
    with raises(errors.SeqLenError, "actual_seq_qlen", fragment):
        update(x.tensors(), torch.tensor(offsets, device="cuda"), "TND")
    torch.cuda.synchronize()  # a device-side assert would surface here and poison every later call
    got = update(x.tensors(), torch.tensor(x.seq_offsets, device="cuda"), "TND")
    want = update([t.cpu() for t in x.tensors()], x.seq_offsets, "TND", backend="reference")
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4, equal_nan=True)


# --- the row-map cache is bounded in bytes (item 4) -------------------------------------------------------------------


def test_row_map_cache_is_bounded_in_bytes():
    """Note [row map cache]: an LRU within ROW_MAP_CACHE_BYTES; maps larger than the budget are not cached."""
    budget = _contract.ROW_MAP_CACHE_BYTES
    tokens = budget // 16 // 4  # four maps and their keys overflow the budget: three fit
    _contract.clear_row_map_cache()

    def row_map(cut: int, total: int = tokens, heads: int = 2):
        return _contract.per_batch_row_map(torch.tensor([0, cut, total]), total, heads)

    maps = {cut: row_map(cut) for cut in (1, 2, 3)}
    entries, nbytes = _contract.row_map_cache_info()
    assert entries == 3 and 3 * 16 * tokens < nbytes <= budget
    assert row_map(1)[0] is maps[1][0]  # a hit, and 1 is now the most recently used
    row_map(4)  # evicts the least recently used: 2
    entries, nbytes = _contract.row_map_cache_info()
    assert entries == 3 and nbytes <= budget
    assert row_map(1)[0] is maps[1][0] and row_map(3)[0] is maps[3][0]
    assert row_map(2)[0] is not maps[2][0]
    for cut in range(5, 40):  # many distinct packings: the bytes stay bounded
        row_map(cut)
        assert _contract.row_map_cache_info()[1] <= budget
    # Larger than the whole budget: built, correct, not cached, nothing evicted for it.
    before = _contract.row_map_cache_info()
    big = budget // 16 + 1
    base, step = row_map(big // 2, big, 3)
    want_base, want_step = _contract._row_map(torch.tensor([0, big // 2, big]), big, 3)
    assert torch.equal(base, want_base) and torch.equal(step, want_step)
    assert _contract.row_map_cache_info() == before
    _contract.clear_row_map_cache()
    assert _contract.row_map_cache_info() == (0, 0)


# --- destinations that are exactly an input stay allowed --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "bad", "error", "fragment"),
    [
        ("out", lambda o: o.double(), errors.DTypeError, "dtype torch.float32"),
        ("out", lambda o: o.to("meta"), errors.DeviceError, "device cpu"),
        ("out_lse", lambda s: s[:1], errors.ShapeError, "shape (2, 3, 5)"),
        ("out_lse", lambda s: s.numpy(), errors.DTypeError, "torch.Tensor"),
    ],
)
def test_merge_states_destination_mismatch(gen, argument, bad, error, fragment):
    o, lse = merge_parts(gen)
    like = torch.empty_like(o[0]) if argument == "out" else torch.empty_like(lse[0])
    with raises(error, argument, fragment):
        merge_states(o, lse, layout="BSND", lse_base="e", **{argument: bad(like)})


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("side", ["prev", "cur"])
def test_update_in_place_into_an_input(gen, backend, layout, side):
    """The aliasing rule lets ``out`` be exactly the inputs of one side; the result is the out-of-place one."""
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    want = update(x.tensors(), x.seq_offsets, layout, backend=backend)
    args = [t.clone() for t in x.tensors()]
    outs = tuple(args[:3] if side == "prev" else args[3:])
    got = update(args, x.seq_offsets, layout, backend=backend, out=outs)
    assert all(g is o for g, o in zip(got, outs, strict=True))
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("outputs", "lses"), [([], []), (torch.empty(0, 2, 3, 4), torch.empty(0, 3, 2)), ([], [torch.empty(3, 2)])]
)
def test_merge_states_without_parts(outputs, lses):
    with raises(errors.ShapeError, "outputs", "at least one part"):
        merge_states(outputs, lses, layout="TND", lse_layout="NT", lse_base="e")


# --- every input of ring_attention_update: wrong kinds of value -------------------------------------------------------


@pytest.mark.parametrize("layout", ["SBH", "TND"])
@pytest.mark.parametrize("argument", _NAMES)
@pytest.mark.parametrize(
    ("mutate", "error", "fragment"),
    [
        (lambda t: None, errors.DTypeError, "NoneType"),
        (lambda t: True, errors.DTypeError, "bool"),
        (lambda t: 3, errors.DTypeError, "int"),
        (lambda t: t.tolist(), errors.DTypeError, "list"),
        (lambda t: t.to(torch.int64), errors.DTypeError, "torch.int64"),
        (lambda t: t.to(torch.complex64), errors.DTypeError, "torch.complex64"),
        (lambda t: t > 0, errors.DTypeError, "torch.bool"),
        (lambda t: t.flatten()[0], errors.ShapeError, "rank 0"),
        (lambda t: t[0], errors.ShapeError, "rank"),
    ],
)
def test_update_input_of_the_wrong_kind(gen, layout, argument, mutate, error, fragment):
    x = sbh(gen) if layout == "SBH" else tnd(gen)
    args = x.tensors()
    index = _NAMES.index(argument)
    args[index] = mutate(args[index])
    with raises(error, argument, fragment):
        update(args, x.seq_offsets, layout)


@pytest.mark.triton
def test_merge_states_with_a_backend_that_cannot_run_the_device_names_the_backend(monkeypatch):
    """``backend="triton"`` on CPU tensors without TRITON_INTERPRET: a BackendError, not Triton's driver error."""
    triton_cuda = pytest.importorskip("ringattn.backends.triton_cuda")
    if triton_cuda.unavailable_reason() is not None:
        pytest.skip(f"triton backend: {triton_cuda.unavailable_reason()}")
    monkeypatch.setattr(triton_cuda, "_INTERPRETED", False)
    parts, lses = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3)
    with pytest.raises(ringattn.BackendError, match="backend: 'triton' cannot run on cpu"):
        ringattn.merge_states(parts, lses, layout="TND", lse_layout="TN", backend="triton", lse_base="e")
