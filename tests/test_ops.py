"""The torch.library custom ops: ``opcheck`` (schema, fake impls, autograd registration) and
``torch.compile(fullgraph=True)`` through the public functions, forward and backward.

Compilation uses ``backend="aot_eager"``: it runs dynamo and AOTAutograd (the parts that can graph-break or trip
over the fake impls) without inductor's C++ code generation, which takes minutes on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ringattn
from inputs import TOL, make_update_inputs
from ringattn.merge import merge_states

OPS = torch.ops.ringattn


def sbh_inputs(dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    s, b, n, d = 3, 2, 2, 4

    def stats():
        m = torch.randn(b, n, s, 1, generator=gen).expand(b, n, s, 8).contiguous()
        l = (torch.rand(b, n, s, 1, generator=gen) + 0.5).expand(b, n, s, 8).contiguous()
        return m.to(torch.float32 if dtype != torch.float64 else dtype), l.to(
            m.dtype if dtype != torch.float64 else dtype
        )

    prev_m, prev_l = stats()
    cur_m, cur_l = stats()
    prev_m[0, 0, 0], prev_l[0, 0, 0] = float("-inf"), 0.0
    ts = [
        torch.randn(s, b, n * d, generator=gen).to(dtype),
        prev_m,
        prev_l,
        torch.randn(s, b, n * d, generator=gen).to(dtype),
        cur_m,
        cur_l,
    ]
    return [t.requires_grad_(requires_grad) for t in ts]


def lse_inputs(k=3, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    o = [torch.randn(5, 2, 4, generator=gen, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(k)]
    lse = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(k)]
    lse[0][0, 0] = float("-inf")
    return o, [t.requires_grad_(requires_grad) for t in lse]


def test_opcheck_ring_attention_update():
    ins = sbh_inputs(torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.ring_attention_update, (*ins, None, "SBH", "BNS", "auto"))
    offsets = torch.tensor([0, 1, 3])
    tnd = [torch.randn(3, 2, 4), torch.rand(3, 2, 8), torch.rand(3, 2, 8)]  # no grad: keeps opcheck quick
    torch.library.opcheck(OPS.ring_attention_update, (*tnd, *tnd, offsets, "TND", "per_batch", "torch"))
    plain = sbh_inputs()
    outs = [torch.empty_like(plain[0]), torch.empty_like(plain[1]), torch.empty_like(plain[1])]
    torch.library.opcheck(OPS.ring_attention_update_out, (*plain, None, "SBH", "BNS", "auto", *outs))


def test_opcheck_merge_states_and_backward():
    o, lse = lse_inputs(requires_grad=True)
    torch.library.opcheck(OPS.merge_states, (o, lse, "TND", "NT", 1.0, "auto"))
    plain_o, plain_lse = lse_inputs()
    out, out_lse = torch.empty_like(plain_o[0]), torch.empty_like(plain_lse[0])
    torch.library.opcheck(OPS.merge_states_out, (plain_o, plain_lse, "TND", "NT", 0.5, "auto", out, out_lse))
    g_o, g_lse = torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.library.opcheck(
        OPS.merge_backward, (g_o, g_lse, None, plain_o, plain_lse, [], None, "TND", "NT", 1.0, "auto")
    )


def _grads(fn, inputs):
    outs = fn(*inputs)
    loss = sum((t.masked_fill(torch.isinf(t), 0) * (i + 1)).sum() for i, t in enumerate(outs))
    return [t.detach() for t in outs], torch.autograd.grad(loss, inputs)


def test_compile_ring_attention_update_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    ins = sbh_inputs(requires_grad=True)
    compiled = torch.compile(ringattn.ring_attention_update, fullgraph=True, backend="aot_eager")
    want_outs, want_grads = _grads(ringattn.ring_attention_update, ins)
    got_outs, got_grads = _grads(compiled, ins)
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compile_merge_states_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    o, lse = lse_inputs(k=4, requires_grad=True)

    def fn(*x):
        return merge_states(x[:4], x[4:], layout="TND", lse_layout="NT", lse_base=2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want_outs, want_grads = _grads(fn, [*o, *lse])
    got_outs, got_grads = _grads(compiled, [*o, *lse])
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compile_out_variant_fullgraph():
    torch._dynamo.reset()
    o, lse = lse_inputs()

    def fn(a, b, c, la, lb, lc):
        return merge_states((a, b, c), (la, lb, lc), layout="TND", lse_layout="NT", out=a, out_lse=la, lse_base="e")

    want = merge_states(o, lse, layout="TND", lse_layout="NT", lse_base="e")
    copies = [t.clone() for t in (*o, *lse)]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*copies)
    torch.testing.assert_close(copies[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(copies[3], want[1], atol=0, rtol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_compile_ring_attention_update_tnd_fullgraph(as_tensor):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    tnd = [
        torch.randn(3, 2, 64, generator=gen),
        torch.randn(3, 2, 8, generator=gen),
        torch.rand(3, 2, 8, generator=gen),
    ]
    cur = [t + 0.5 for t in tnd]
    offsets = torch.tensor([0, 1, 3]) if as_tensor else [0, 1, 3]

    def fn(*x):
        return ringattn.ring_attention_update(*x, offsets, "TND")

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*tnd, *cur)
    want = fn(*tnd, *cur)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --- Direct eager calls (Note [direct eager calls] in _ops.py) --------------------------------------------------------
#
# The public functions call the custom op's body directly when no dispatcher machinery would act. Every test below
# runs both paths: "direct" (the real decision, checked to be True) and "op" (direct_call_ok forced False).

PATHS = ("direct", "op")
UPDATE_CASES = {
    "SBH": dict(layout="SBH", seq=5, batch=3, heads=3, head_dim=4),
    "TND-per-batch": dict(layout="TND", seq_lens=[3, 0, 4, 1], heads=3, head_dim=64),
    "TND-token-major": dict(layout="TND", seq_lens=[2, 0, 5], heads=2, head_dim=64, softmax_layout="TND"),
}
MERGE_CASES = {"TND": ("TND", "NT"), "BNSD": ("BNSD", "BNS")}


@contextlib.contextmanager
def call_path(monkeypatch, which):
    """Run the public functions on ``which`` path; yields the list of decisions taken (one per op call)."""
    real = ringattn._ops.direct_call_ok
    taken = []

    def decide(tensors):
        ok = real(tensors) if which == "direct" else False
        taken.append(ok)
        return ok

    monkeypatch.setattr(ringattn._ops, "direct_call_ok", decide)
    try:
        yield taken
    finally:
        monkeypatch.setattr(ringattn._ops, "direct_call_ok", real)


def update_inputs(case, dtype, seed):
    kw = dict(UPDATE_CASES[case])
    return make_update_inputs(kw.pop("layout"), dtype, torch.Generator().manual_seed(seed), **kw)


def update_outs(ins, out_mode):
    """``out=`` for ``ins`` (clones of an UpdateInputs' tensors): None, NaN-filled buffers, or the prev inputs."""
    if out_mode == "fresh":
        return None
    if out_mode == "inplace":
        return (ins[0], ins[1], ins[2])
    return tuple(torch.full_like(t, float("nan")) for t in (ins[0], ins[1], ins[1]))


def call_update(x, out_mode, **kw):
    ins = [t.clone() for t in x.tensors()]
    out = update_outs(ins, out_mode)
    got = ringattn.ring_attention_update(*ins, x.seq_offsets, x.layout, softmax_layout=x.softmax_layout, out=out, **kw)
    if out is not None:
        assert all(g is o for g, o in zip(got, out, strict=True))
    return got


def merge_inputs(case, dtype, seed, k=3):
    """K parts in ``case``'s layout (BNSD as a permuted BSND buffer, as SDPA returns), ~20% empty LSE rows."""
    layout, lse_layout = MERGE_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    b, s, n, d = (1, 7, 3, 5) if layout == "TND" else (2, 6, 3, 5)
    o = torch.randn(k, b, s, n, d, generator=gen).to(dtype)
    lse = torch.randn(k, b, s, n, generator=gen) * 3
    lse[torch.rand(k, b, s, n, generator=gen) < 0.2] = float("-inf")
    if layout == "TND":
        parts_o = [o[i, 0] for i in range(k)]
        parts_lse = [lse[i, 0].t() for i in range(k)]
    else:
        parts_o = [o[i].permute(0, 2, 1, 3) for i in range(k)]
        parts_lse = [lse[i].permute(0, 2, 1) for i in range(k)]
    return parts_o, parts_lse, layout, lse_layout


def call_merge(parts, out_mode, **kw):
    parts_o, parts_lse, layout, lse_layout = parts
    parts_o, parts_lse = [t.clone() for t in parts_o], [t.clone() for t in parts_lse]
    if out_mode == "inplace":
        kw.update(out=parts_o[0], out_lse=parts_lse[0])
    elif out_mode == "buffers":
        kw.update(out=torch.full_like(parts_o[0], float("nan")), out_lse=torch.full_like(parts_lse[0], float("nan")))
    got = merge_states(parts_o, parts_lse, layout=layout, lse_layout=lse_layout, lse_base="e", **kw)
    if out_mode != "fresh":
        assert got[0] is kw["out"] and got[1] is kw["out_lse"]
    return got


def assert_bitwise(got, want):
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def bitwise_equal_on_both_paths(monkeypatch, call):
    """``call()`` on the direct path and on the op path (checking each was taken); asserts bitwise equality and
    returns the direct path's outputs."""
    with call_path(monkeypatch, "direct") as taken:
        direct = call()
    assert taken == [True]
    with call_path(monkeypatch, "op") as taken:
        op = call()
    assert taken == [False]
    assert_bitwise(direct, op)
    return direct


@pytest.mark.parametrize("out_mode", ["fresh", "buffers", "inplace"])
@pytest.mark.parametrize("case", list(UPDATE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_direct_and_op_paths_are_bitwise_equal(monkeypatch, dtype, case, out_mode):
    x = update_inputs(case, dtype, seed=zlib.crc32(f"{case} {out_mode} {dtype}".encode()))
    direct = bitwise_equal_on_both_paths(monkeypatch, lambda: call_update(x, out_mode))
    # Both paths agree with the float64 reference, so they are not merely equally wrong.
    want = call_update(x, "fresh", backend="reference")
    tol = TOL[dtype]
    for g, w in zip(direct, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("out_mode", ["fresh", "buffers", "inplace"])
@pytest.mark.parametrize("case", list(MERGE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_direct_and_op_paths_are_bitwise_equal(monkeypatch, dtype, case, out_mode):
    k = 3 if dtype == torch.float32 else 2  # the (dtype, K) kernels tests/backends compiles anyway
    parts = merge_inputs(case, dtype, seed=zlib.crc32(f"{case} {out_mode} {dtype}".encode()), k=k)
    direct = bitwise_equal_on_both_paths(monkeypatch, lambda: call_merge(parts, out_mode))
    assert direct[0].dtype == dtype and direct[1].dtype == torch.float32
    # The merged LSE is logsumexp over the parts (float32 both ways).
    torch.testing.assert_close(direct[1], torch.logsumexp(torch.stack(parts[1]), 0), rtol=1e-5, atol=1e-5)


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class RecordingDispatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def ringattn_ops(self):
        return [name for name in self.ops if name.startswith("ringattn::")]


def test_direct_call_ok_decisions():
    gen = torch.Generator().manual_seed(7)
    plain = [torch.randn(3, 4, generator=gen), torch.rand(2, generator=gen), torch.empty(0)]
    assert ringattn._ops.direct_call_ok(plain)
    assert ringattn._ops.direct_call_ok([])

    leaf = torch.randn(3, generator=gen, requires_grad=True)
    assert not ringattn._ops.direct_call_ok([*plain, leaf])
    with torch.no_grad():
        assert ringattn._ops.direct_call_ok([*plain, leaf])
    with torch.inference_mode():
        assert ringattn._ops.direct_call_ok([*plain, leaf])
    assert not ringattn._ops.direct_call_ok([*plain, leaf * 2])  # a non-leaf with a graph

    param = torch.nn.Parameter(torch.randn(3, generator=gen))
    assert not ringattn._ops.direct_call_ok([*plain, param])
    with torch.no_grad():
        assert not ringattn._ops.direct_call_ok([param])  # a subclass: its own dispatch may act
    assert not ringattn._ops.direct_call_ok([*plain, torch.empty(3, device="meta")])

    with PassThroughDispatch():
        assert not ringattn._ops.direct_call_ok(plain)
    with PassThroughFunction():
        assert not ringattn._ops.direct_call_ok(plain)
    assert ringattn._ops.direct_call_ok(plain)  # the modes are gone again
    assert torch.vmap(lambda t: torch.tensor(ringattn._ops.direct_call_ok([t])))(plain[0]).tolist() == [False] * 3


def test_vmap_takes_the_op_path():
    """Under ``torch.vmap`` the inputs are plain-typed wrappers without storage: the kernel must not see them."""
    x = update_inputs("SBH", torch.float32, seed=12)
    want = call_update(x, "fresh")
    stacked = [torch.stack([t, t]) for t in x.tensors()]
    got = torch.vmap(lambda *ts: ringattn.ring_attention_update(*ts, None, "SBH"))(*stacked)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, torch.stack([w, w]), rtol=0, atol=0)


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize(
    ("op", "case"), [("ring_attention_update", c) for c in UPDATE_CASES] + [("merge_states", c) for c in MERGE_CASES]
)
def test_dispatch_mode_sees_the_op(op, case, with_out):
    out_mode = "buffers" if with_out else "fresh"
    if op == "ring_attention_update":
        x = update_inputs(case, torch.float32, seed=11)
        call = functools.partial(call_update, x, out_mode)
    else:
        call = functools.partial(call_merge, merge_inputs(case, torch.float32, seed=12), out_mode)
    want = call()
    recorder = RecordingDispatch()
    with recorder:
        got = call()
    assert recorder.ringattn_ops() == [f"ringattn::{op}_out" if with_out else f"ringattn::{op}"]
    assert_bitwise(got, want)


@pytest.mark.parametrize("out_mode", ["buffers", "inplace"])
@pytest.mark.parametrize("path", PATHS)
def test_out_bumps_version_counters(monkeypatch, path, out_mode):
    x = update_inputs("TND-per-batch", torch.float32, seed=13)
    ins = [t.clone() for t in x.tensors()]
    outs = update_outs(ins, out_mode)
    before = [t._version for t in outs]
    with call_path(monkeypatch, path) as taken:
        ringattn.ring_attention_update(*ins, x.seq_offsets, "TND", out=outs)
    assert taken == [path == "direct"]
    assert all(t._version > v for t, v in zip(outs, before, strict=True)), [t._version for t in outs]

    parts_o, parts_lse, layout, lse_layout = merge_inputs("TND", torch.float32, seed=14)
    if out_mode == "inplace":
        out, out_lse = parts_o[0], parts_lse[0]
    else:
        out, out_lse = torch.empty_like(parts_o[0]), torch.empty_like(parts_lse[0])
    before = [out._version, out_lse._version]
    with call_path(monkeypatch, path) as taken:
        merge_states(parts_o, parts_lse, layout=layout, lse_layout=lse_layout, out=out, out_lse=out_lse, lse_base="e")
    assert taken == [path == "direct"]
    assert out._version > before[0] and out_lse._version > before[1]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_autograd_notices_update_overwriting_a_saved_tensor(monkeypatch, path, index):
    x = update_inputs("SBH", torch.float32, seed=15)
    outs = list(update_outs(x.tensors(), "buffers"))
    buf = torch.randn(outs[index].shape)
    outs[index] = buf
    w = torch.randn(buf.shape, requires_grad=True)
    loss = (w * buf).sum()  # saves buf for w's gradient
    with call_path(monkeypatch, path) as taken:
        ringattn.ring_attention_update(*x.tensors(), out=tuple(outs))
    assert taken == [path == "direct"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("which", ["out", "out_lse"])
@pytest.mark.parametrize("path", PATHS)
def test_autograd_notices_merge_overwriting_a_saved_tensor(monkeypatch, path, which):
    parts_o, parts_lse, layout, lse_layout = merge_inputs("TND", torch.float32, seed=16)
    outs = {"out": torch.empty_like(parts_o[0]), "out_lse": torch.empty_like(parts_lse[0])}
    buf = torch.randn(outs[which].shape)
    outs[which] = buf
    w = torch.randn(buf.shape, requires_grad=True)
    loss = (w * buf).sum()
    with call_path(monkeypatch, path) as taken:
        merge_states(parts_o, parts_lse, layout=layout, lse_layout=lse_layout, lse_base="e", **outs)
    assert taken == [path == "direct"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
