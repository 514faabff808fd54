"""The ring entry points under torch.compile (Note [ring under torch.compile] in ``ring/ops.py``).

Checked: Dynamo traces a function calling each entry point with no graph break; ``fullgraph=True`` under
``aot_eager`` gives bitwise the eager outputs and q/k/v gradients (the same kernels run: the op's body is the eager
code) for random upstream gradients, and both are within the float64 reference's tolerance of ``test_ring.py``
(float32 1e-4); ``inductor`` on one small case within 1e-5 of eager (it fuses the pointwise ops around the ring,
which reorders float32 rounding: measured 3e-7); the eager op path equals the direct eager path bitwise; the fake
impls give the eager outputs' shapes, dtypes and strides; invalid options raise the eager errors through the op,
on every rank of a spawned gloo ring; W = 2 gloo under ``fullgraph=True``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ring_spawn import reference, run_ranks

import ringattn
from ringattn.errors import (
    AutogradError,
    CommTimeoutError,
    ConfigError,
    DeviceError,
    DTypeError,
    LayoutError,
    ShapeError,
)
from ringattn.ring import ops, shard_sequence
from ringattn.ring.attention import RingOptions

TOL32 = 1e-4  # float32 against the float64 reference (test_ring.py: SPEC section 6)


@pytest.fixture
def through_op(monkeypatch):
    """Eager calls through the custom op instead of the direct path."""
    monkeypatch.setattr(ops, "DIRECT_EAGER", False)


@dataclasses.dataclass(frozen=True)
class Case:
    causal: bool = True
    layout: str = "BSND"
    heads: int = 4
    kv_heads: int = 2
    batch: int = 2
    seq: int = 16
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    impl: str = "auto"
    packed: tuple[int, ...] = ()  # document lengths of a packed batch (ring_attention_varlen)
    virtual: int = 0  # simulate_ring_attention of this many virtual ranks (on the whole sequence)
    sinks: bool = False  # attention sinks, one learned logit per head (a 4th differentiable input)
    window: tuple[int, int] | None = None

    def inputs(self, seed: int, requires_grad: bool = True, whole: bool = False):
        """q, k, v of a ring of one (packed: its slots, 2 ceil(L / 2) per document), or the whole packed batch."""
        gen = torch.Generator().manual_seed(seed)
        if self.packed:
            whole = whole or self.virtual
            t = sum(self.packed) if whole else sum(-(-n // 2) * 2 for n in self.packed)
            shapes = [(t, self.heads, 8), (t, self.kv_heads, 8), (t, self.kv_heads, 8)]
        elif self.layout == "BNSD":
            shapes = [(self.batch, h, self.seq, 8) for h in (self.heads, self.kv_heads, self.kv_heads)]
        else:
            shapes = [(self.batch, self.seq, h, 8) for h in (self.heads, self.kv_heads, self.kv_heads)]
        if self.sinks:
            shapes.append((self.heads,))
        return [torch.randn(s, generator=gen, dtype=self.dtype).requires_grad_(requires_grad) for s in shapes]

    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, *itertools.accumulate(self.packed)])

    def call(self, q, k, v, sinks=None, **kw):
        """The entry point, then a pointwise op (so the graph holds more than the ring)."""
        kw = {**kw, "sinks": sinks, "window": self.window}
        if self.virtual:
            out, lse = ringattn.simulate_ring_attention(
                q * 2, k, v, world_size=self.virtual, causal=self.causal, softmax_scale=self.scale, impl=self.impl,
                return_lse=True, **kw,
                **({"cu_seqlens": self.cu_seqlens()} if self.packed else {"layout": self.layout}),
            )  # fmt: skip
        elif self.packed:
            out, lse = ringattn.ring_attention_varlen(
                q * 2, k, v, self.cu_seqlens(), causal=self.causal, softmax_scale=self.scale, impl=self.impl,
                return_lse=True, **kw,
            )  # fmt: skip
        else:
            out, lse = ringattn.ring_attention(
                q * 2, k, v, layout=self.layout, causal=self.causal, softmax_scale=self.scale, impl=self.impl,
                return_lse=True, **kw,
            )  # fmt: skip
        return out.sin(), lse


CASES = [
    Case(),
    Case(causal=False, layout="BNSD", heads=3, kv_heads=3, scale=0.3),
    Case(impl="torch", heads=2, kv_heads=1, batch=1),
    Case(dtype=torch.float64, heads=2, kv_heads=2),
    Case(packed=(4, 8, 2)),
    Case(packed=(6, 1, 5), causal=False, heads=2, kv_heads=1),
    Case(virtual=2, layout="BNSD"),
    Case(virtual=3, packed=(5, 9, 2), heads=2, kv_heads=1),
    Case(sinks=True, window=(3, 0)),
    Case(packed=(4, 8, 2), sinks=True, window=(2, 0)),
    Case(virtual=2, sinks=True, layout="BNSD", window=(5, 1), causal=False),
]


def _run(fn, case: Case, seed: int):
    inputs = case.inputs(seed)
    out, lse = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    return (out, lse, *torch.autograd.grad(out, inputs, g))


def _float64_reference(case: Case, seed: int):
    """out (before sin), q/k/v gradients of ``sin(attention(2q, k, v))`` in float64, layouts of the inputs."""
    q, k, v = (x.detach().to(torch.float64) for x in case.inputs(seed)[:3])
    bsnd = case.layout == "BNSD"
    q, k, v = ((x.transpose(1, 2) if bsnd else x) for x in (q, k, v))
    scale = case.scale if case.scale is not None else q.shape[-1] ** -0.5
    q2 = (2 * q).detach().requires_grad_()
    out, _, *_ = reference(q2, k, v, torch.zeros_like(q2), causal=case.causal, scale=scale)
    return out.transpose(1, 2) if bsnd else out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fullgraph_aot_eager_equals_eager_with_no_graph_break(case):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(case.call)(*case.inputs(0))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    want = _run(case.call, case, 1)
    got = _run(torch.compile(case.call, backend="aot_eager", fullgraph=True), case, 1)
    assert len(got) == len(want) == 5 + case.sinks
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want, strict=False):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    if not (case.packed or case.sinks or case.window):  # the compiled output is attention (the eager ring's own
        # float64 references: test_ring.py; test_sinks.py and test_windows.py for sinks and windows)
        out = torch.asin(got[0].detach().to(torch.float64).clamp(-1, 1))
        ref = _float64_reference(case, 1)
        ok = ref.abs() < 1.4  # asin inverts sin only where |x| < pi/2
        tol = 1e-12 if case.dtype == torch.float64 else TOL32
        torch.testing.assert_close(out[ok], ref[ok], rtol=tol, atol=tol)


def test_fullgraph_inductor_equals_eager():
    case = Case(packed=(4, 8, 2))
    torch._dynamo.reset()
    want = _run(case.call, case, 2)
    got = _run(torch.compile(case.call, backend="inductor", fullgraph=True), case, 2)
    assert len(got) == len(want) == 5
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[6], CASES[7], *CASES[8:]], ids=str)
def test_eager_op_path_equals_direct_path(case, monkeypatch):
    want = _run(case.call, case, 3)
    monkeypatch.setattr(ops, "DIRECT_EAGER", False)
    got = _run(case.call, case, 3)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w) and g.stride() == w.stride()
    assert not got[1].requires_grad  # the LSE is not differentiable


def test_op_path_under_autocast_casts_like_sdpa(through_op):
    """Note [autocast]: q, k float32 and v bfloat16 under bf16 autocast compute in bf16, gradients in each dtype."""
    case = Case()
    q, k, v = case.inputs(4)
    v = v.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ringattn.ring_attention(q, k, v, layout="BSND", causal=True)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]
    ops.DIRECT_EAGER = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ringattn.ring_attention(q, k, v, layout="BSND", causal=True)
    assert torch.equal(out, want)


def test_double_backward_through_the_op_raises(through_op):
    q, k, v = Case().inputs(5)
    out = ringattn.ring_attention(q, k, v, layout="BSND", causal=True)
    with pytest.raises(AutogradError, match="^create_graph: expected False"):
        torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)


def test_double_backward_under_compile_raises():
    """Compiled, the backward is traced once (grad mode off), so AOTAutograd's own refusal speaks instead of
    AutogradError: the second backward raises, nothing is silently missing its second-order terms."""
    torch._dynamo.reset()
    case = Case()
    q, k, v = case.inputs(6)
    out, _ = torch.compile(case.call, backend="aot_eager", fullgraph=True)(q, k, v)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.backward(torch.randn_like(dq))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fake_impls_match_eager_outputs(case):
    """Shapes, dtypes and strides of both ops' fake impls (what torch.compile traces) against their eager outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, *sinks = (x.detach() for x in case.inputs(7))
    sinks = sinks[0] if sinks else None
    cu = case.cu_seqlens() if case.packed else None
    layout = "TND" if case.packed else case.layout
    options = RingOptions(case.causal, case.scale, layout, "zigzag", case.impl, "auto", case.window)
    invalid, values = ops.encode_options(options)
    if case.virtual:
        fwd, bwd = torch.ops.ringattn.simulate_ring_attention, torch.ops.ringattn.simulate_ring_attention_backward
    else:
        fwd, bwd = torch.ops.ringattn.ring_attention, torch.ops.ringattn.ring_attention_backward
    ring = case.virtual or ""  # the virtual ring's world size, or the default group's name
    real = fwd(q, k, v, cu, sinks, ring, None, True, invalid, *values)
    dout = torch.randn_like(real[0])
    real_grads = bwd(dout, q, k, v, *real, cu, sinks, ring, None, *values)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fdout = (mode.from_tensor(x) for x in (q, k, v, dout))
        fcu, fsinks = (mode.from_tensor(x) if x is not None else None for x in (cu, sinks))
        fake = fwd(fq, fk, fv, fcu, fsinks, ring, None, True, invalid, *values)
        fake_grads = bwd(fdout, fq, fk, fv, *fake, fcu, fsinks, ring, None, *values)
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")  # dsinks: empty without sinks
    for name, f, r in zip(names, [*fake, *fake_grads], [*real, *real_grads], strict=True):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), name


def test_opcheck_of_the_forward_op():
    """torch.library.opcheck: schema, fake impl, autograd registration and AOT dispatch of ringattn::ring_attention."""
    q, k, v, sinks = (x.detach().requires_grad_() for x in Case(sinks=True).inputs(8))
    invalid, values = ops.encode_options(RingOptions(True, None, "BSND", "zigzag", "auto", "auto", (4, 0)))
    args = (q, k, v, None, sinks, "", 30.0, True, invalid, *values)
    torch.library.opcheck(torch.ops.ringattn.ring_attention.default, args)


def test_every_ring_option_has_a_schema_type():
    assert list(ops.OPTION_SCHEMA) == [f.name for f in dataclasses.fields(RingOptions)]


@pytest.mark.parametrize(
    ("kwargs", "error", "name", "got"),
    [
        ({"causal": "yes"}, ConfigError, "causal", "'yes'"),
        ({"layout": None}, LayoutError, "layout", "None"),
        ({"layout": 4}, LayoutError, "layout", "4"),
        ({"softmax_scale": "big"}, ConfigError, "softmax_scale", "'big'"),
        ({"softmax_scale": float("inf")}, ConfigError, "softmax_scale", "inf"),
        ({"impl": ["torch"]}, Exception, "impl", "['torch']"),
        ({"group": 42}, ConfigError, "group", "int"),
        ({"window": (2, "x")}, ConfigError, "window", "(2, 'x')"),
        ({"window": (2, -5)}, ConfigError, "window", "(2, -5)"),
    ],
)
@pytest.mark.parametrize("compiled", [False, True])
def test_invalid_options_raise_the_eager_errors_through_the_op(kwargs, error, name, got, compiled, through_op):
    q, k, v = Case().inputs(9)
    kw = {"layout": "BSND", "causal": True, **kwargs}

    def fn(q, k, v):
        return ringattn.ring_attention(q, k, v, **kw)

    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager")
    with pytest.raises(error) as info:
        fn(q, k, v)
    assert str(info.value).startswith(f"{name}: expected"), str(info.value)
    assert got in str(info.value)


def test_inputs_that_are_not_tensors_take_the_eager_checks(through_op):
    q, k, v = Case().inputs(10)
    with pytest.raises(DTypeError, match="^v"):
        ringattn.ring_attention(q, k, [1.0], layout="BSND")
    with pytest.raises(DTypeError, match="^cu_seqlens"):
        ringattn.ring_attention_varlen(q[0], k[0], v[0], [0, 16])
    meta_cu = torch.tensor([0, 16], device="meta")  # the op would run its fake impl on meta: the direct path checks
    with pytest.raises(DeviceError, match="^cu_seqlens: expected a CPU or CUDA tensor"):
        ringattn.ring_attention_varlen(q[0], k[0], v[0], meta_cu)


def test_virtual_ring_errors_through_the_op(through_op):
    q, k, v = Case().inputs(16)
    with pytest.raises(ConfigError, match="^world_size"):
        ringattn.simulate_ring_attention(q, k, v, world_size=0, layout="BSND")
    with pytest.raises(LayoutError, match="^layout"):
        ringattn.simulate_ring_attention(q, k, v, world_size=2, layout=None)
    with pytest.raises(ShapeError, match=r"^q.shape\[1\]"):  # 16 tokens do not cut into 2 x 3 zigzag chunks
        ringattn.simulate_ring_attention(q, k, v, world_size=3, layout="BSND")


# --- spawned gloo ranks -----------------------------------------------------------------------------------------


def _ranks(rank: int, world: int) -> None:
    torch.manual_seed(0)
    group = dist.new_group([0, 1])
    for kw in ({}, {"group": group}, {"group": dist.group.WORLD}):
        for case in (CASES[0], Case(causal=True, layout="BNSD", heads=3, kv_heads=1)):
            q, k, v = case.inputs(11)  # the full sequence: every rank checks its shard against float64
            g = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
            dim = 2 if case.layout == "BNSD" else 1
            shards = [shard_sequence(x.detach(), rank, world, dim=dim).requires_grad_() for x in (q, k, v)]
            gs = shard_sequence(g, rank, world, dim=dim)

            def fn(q, k, v, case=case, kw=kw):
                return ringattn.ring_attention(q, k, v, layout=case.layout, causal=case.causal, **kw)

            torch._dynamo.reset()
            results = []
            for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
                out = f(*shards)
                results.append((out, *torch.autograd.grad(out, shards, gs)))
            for got, want in zip(*results, strict=True):
                assert torch.equal(got, want)
            bsnd = [(x.transpose(1, 2) if dim == 2 else x) for x in (q, k, v, g)]
            ref = reference(*bsnd, causal=case.causal, scale=8**-0.5)
            for got, want in zip([results[1][0], *results[1][1:]], [ref[0], *ref[2:]], strict=True):
                want = shard_sequence(want.transpose(1, 2) if dim == 2 else want, rank, world, dim=dim)
                torch.testing.assert_close(got.to(torch.float64), want, rtol=TOL32, atol=TOL32)
    # packed, compiled
    case = Case(packed=(4, 8, 2))
    cu = torch.tensor([0, 4, 12, 14])
    full = case.inputs(13, whole=True)
    shards = [ringattn.shard_packed(x.detach(), cu, rank, world).requires_grad_() for x in full]

    def packed(q, k, v):
        return ringattn.ring_attention_varlen(q, k, v, cu, causal=True).sin()

    torch._dynamo.reset()
    results = []
    for f in (packed, torch.compile(packed, backend="aot_eager", fullgraph=True)):
        out = f(*shards)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(14))
        results.append((out, *torch.autograd.grad(out, shards, g)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    # an option only rank 1 gets wrong, and ranks disagreeing on needs_grad: every rank raises, through the op
    ops.DIRECT_EAGER = False
    q, k, v = (x.detach() for x in CASES[0].inputs(15))
    with pytest.raises(ConfigError, match="^causal"):
        ringattn.ring_attention(q, k, v, layout="BSND", causal="yes" if rank == 1 else True)
    with pytest.raises(ConfigError):
        ringattn.ring_attention(q.requires_grad_(rank == 0), k, v, layout="BSND", causal=True)

    def traced(q):
        return ringattn.ring_attention(q, k, v, layout="BSND", causal=rank == 0)

    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    with pytest.raises(ConfigError, match="^causal"):  # ranks that traced different options
        compiled(q.detach())


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_fullgraph_compile_on_two_gloo_ranks(tmp_path):
    run_ranks(_ranks, 2, tmp_path, deadline_s=140)


def _stalled_peer(rank: int, world: int, flags: str) -> None:
    """Rank 1 never calls the compiled ring: rank 0 raises CommTimeoutError after the ``timeout=`` it gave, which
    travelled through the op's schema."""
    ops.DIRECT_EAGER = False
    q = torch.randn(1, 8, 2, 8)

    def fn(x):
        return ringattn.ring_attention(x, x, x, layout="BSND", causal=True, backend="torch", timeout=2.0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    if rank == 1:
        end = time.monotonic() + 60
        while not (Path(flags) / "0").exists() and time.monotonic() < end:  # alive until rank 0 has raised
            time.sleep(0.05)
        os._exit(0)
    start = time.monotonic()
    try:
        with pytest.raises(CommTimeoutError, match=r"2 s, set by the timeout= argument"):
            compiled(q)
    finally:
        (Path(flags) / "0").touch()
    assert time.monotonic() - start < 2 + 8, "raised after the timeout= bound, not the process group's"
    os._exit(0)  # the group cannot be used again (Note [bounded waits] in ring/comm.py)


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_timeout_travels_through_the_compiled_op(tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    run_ranks(_stalled_peer, 2, tmp_path, deadline_s=80, flags=str(flags))
    assert (flags / "0").exists()
