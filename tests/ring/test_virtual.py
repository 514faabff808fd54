"""``simulate_ring_attention``: every rank of a ring in one process, against float64 single-device attention.

Output, LSE and dq, dk, dv for a random upstream gradient, for W = 1..8, causal zigzag and contiguous,
non-causal, MHA/GQA/MQA, odd chunk lengths and head sizes, BSND and BNSD, float64, float32 and bfloat16; on
CPU always and on CUDA when there is a GPU. Tolerances (atol = rtol, against float64 attention of the same
rounded inputs): float64 1e-12; float32 1e-4 (``docs/contract.md``, "Numerics"); bfloat16 3e-2 (each block rounds its
output and gradients to bfloat16 once, 2^-8 relative, and gradients sum S terms); float16 1e-2. On top, the
ring's error must stay within 2x the error of a ring of one (plus tol / 10): no growth with W. One exception,
measured and inherent: the fused half-precision kernels return each step's dq/dk/dv share rounded to the half
dtype, and the W shares of a row are summed (in float32), so gradients carry up to W independent roundings where
a ring of one has one: their bound is ``2 * sqrt(W)`` times the ring of one's error plus tol / 3 (one bfloat16
ulp at the gradients' magnitude of ~2, the size of one extra rounding); the absolute tolerance does not grow.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ring_spawn import reference, run_ranks

import ringattn
from ringattn.errors import BackendError, ConfigError, LayoutError, ShapeError
from ringattn.ring import ring_attention, shard_sequence

TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@dataclasses.dataclass(frozen=True)
class Case:
    world: int
    dtype: torch.dtype = torch.float32
    causal: bool = True
    sharding: str = "zigzag"
    chunk: int = 3  # tokens per sharding chunk: S = chunk * (2W zigzag | W contiguous)
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layout: str = "BSND"
    impl: str = "auto"

    @property
    def seq_len(self) -> int:
        return self.chunk * self.world * (2 if self.sharding == "zigzag" else 1)


def inputs(case: Case, seed: int, device: str = "cpu"):
    """Full-sequence ``q, k, v, g`` in BSND (rounded to the case's dtype) from one seed."""
    gen = torch.Generator().manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(case.batch, case.seq_len, heads, case.head_dim, generator=gen).to(case.dtype)

    q, k, v, g = randn(case.heads), randn(case.kv_heads), randn(case.kv_heads), randn(case.heads)
    return [x.to(device) for x in (q, k, v, g)]


def simulate(case: Case, q, k, v, g, world: int | None = None):
    """``out, lse, dq, dk, dv`` (BSND, lse (B, N, S)) of the virtual ring for the full-sequence inputs."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    args = [x.transpose(1, 2) if case.layout == "BNSD" else x for x in leaves]
    out, lse = ringattn.simulate_ring_attention(
        *args,
        world_size=world or case.world,
        causal=case.causal,
        sharding=case.sharding,
        layout=case.layout,
        impl=case.impl,
        return_lse=True,
    )
    if case.layout == "BNSD":
        out = out.transpose(1, 2)
    grads = torch.autograd.grad(out, leaves, g)
    return [out.detach(), lse, *grads]


def check_against_float64(case: Case, seed: int, device: str = "cpu") -> None:
    q, k, v, g = inputs(case, seed, device)
    want = reference(*(x.cpu() for x in (q, k, v, g)), causal=case.causal, scale=case.head_dim**-0.5)
    got = simulate(case, q, k, v, g)
    solo = simulate(case, q, k, v, g, world=1)
    tol = TOL[case.dtype]
    for name, x, one, e in zip(("out", "lse", "dq", "dk", "dv"), got, solo, want, strict=True):
        assert x.shape == e.shape, f"{case} {name}: shape {tuple(x.shape)} vs {tuple(e.shape)}"
        torch.testing.assert_close(x.double().cpu(), e, atol=tol, rtol=tol, msg=lambda m, n=name: f"{case} {n}: {m}")
        ring_err = (x.double().cpu() - e).abs().max().item()
        one_err = (one.double().cpu() - e).abs().max().item()
        half_grad = name in ("dq", "dk", "dv") and case.dtype in (torch.float16, torch.bfloat16)
        bound = 2 * math.sqrt(case.world) * one_err + tol / 3 if half_grad else 2 * one_err + tol / 10
        assert ring_err <= bound, f"{case} {name}: ring error {ring_err} vs one rank {one_err}"


GRID = [
    Case(1, torch.float64, heads=2, kv_heads=1),
    Case(2, torch.float32, heads=3, kv_heads=1, head_dim=13),  # MQA, odd N and D
    Case(3, torch.bfloat16, heads=6, kv_heads=2, chunk=5),  # GQA, odd chunks
    Case(4, torch.float64, sharding="contiguous", heads=4, kv_heads=4, layout="BNSD"),
    Case(5, torch.float32, causal=False, heads=4, kv_heads=2, batch=2),
    Case(6, torch.bfloat16, causal=True, heads=4, kv_heads=1, chunk=2),
    Case(7, torch.float64, causal=True, heads=2, kv_heads=2, chunk=1),  # one-token chunks
    Case(8, torch.float32, causal=True, heads=4, kv_heads=2, chunk=2, impl="torch"),
    Case(8, torch.bfloat16, causal=False, sharding="contiguous", heads=2, kv_heads=1, chunk=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"W{c.world}-{c.dtype}-{'causal' if c.causal else 'full'}")
def test_virtual_ring_matches_float64_attention(case: Case, device: str) -> None:
    check_against_float64(case, seed=100 + case.world, device=device)


@settings(max_examples=12, deadline=None)
@given(
    world=st.integers(1, 8),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    causal=st.booleans(),
    sharding=st.sampled_from(["zigzag", "contiguous"]),
    chunk=st.integers(1, 4),
    groups=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    head_dim=st.sampled_from([8, 13, 32]),
    seed=st.integers(0, 2**16),
)
def test_virtual_ring_property(world, dtype, causal, sharding, chunk, groups, head_dim, seed) -> None:
    case = Case(world, dtype, causal, sharding, chunk, heads=groups[0], kv_heads=groups[1], head_dim=head_dim)
    check_against_float64(case, seed)


def test_empty_local_sequences() -> None:
    """A sequence of 0 tokens is W empty shards: empty outputs and gradients, no kernel call on 0 rows."""
    case = Case(3, torch.float32, chunk=0)
    q, k, v, g = inputs(case, seed=1)
    out, lse, dq, dk, dv = simulate(case, q, k, v, g)
    assert out.shape == q.shape and lse.shape == (1, 4, 0) and dk.shape == k.shape


def _real_ring_rank(rank: int, world: int, case: Case, path: str) -> None:
    torch.set_num_threads(1)
    q, k, v, g = (shard_sequence(x, rank, world, sharding=case.sharding) for x in inputs(case, seed=5))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*leaves, causal=case.causal, sharding=case.sharding, return_lse=True, layout="BSND")
    grads = torch.autograd.grad(out, leaves, g)
    torch.save([out.detach(), lse, *grads], f"{path}/rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_virtual_ring_is_bitwise_the_gloo_ring(dtype, tmp_path) -> None:
    case = Case(3, dtype, causal=True, heads=4, kv_heads=2, chunk=4)
    run_ranks(_real_ring_rank, case.world, tmp_path, case=case, path=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = simulate(case, *inputs(case, seed=5))
    finally:
        torch.set_num_threads(threads)
    dims = (1, 2, 1, 1, 1)
    for rank in range(case.world):
        real = torch.load(tmp_path / f"rank{rank}.pt")
        for name, x, d, r in zip(("out", "lse", "dq", "dk", "dv"), got, dims, real, strict=True):
            mine = shard_sequence(x, rank, case.world, dim=d)
            assert torch.equal(mine, r), f"rank {rank} {name}: max diff {(mine.double() - r.double()).abs().max()}"


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"world_size": 0}, ConfigError, "world_size"),
        ({"world_size": 2.0}, ConfigError, "world_size"),
        ({"world_size": 5}, ShapeError, "q.shape[1]"),
        ({"world_size": 2, "sharding": "zig"}, LayoutError, "sharding"),
        ({"world_size": 2, "impl": "fast"}, BackendError, "impl"),
        ({"world_size": 2, "softmax_scale": float("nan")}, ConfigError, "softmax_scale"),
        ({"world_size": 2, "causal": "yes"}, ConfigError, "causal"),
        ({"world_size": 2, "layout": None}, LayoutError, "layout: expected 'BSND' for (B, S_local, N, D) tensors"),
    ],
)
def test_errors_name_the_argument(kwargs, error, named) -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(error) as info:
        ringattn.simulate_ring_attention(q, q, q, **{"layout": "BSND", **kwargs})
    assert named in str(info.value)


@pytest.mark.triton
def test_triton_merge_takes_a_half_block_into_a_float32_accumulator() -> None:
    """The ring merges each block's bfloat16 output into its float32 accumulator as it is
    (``MIXED_PART_DTYPES``): bitwise the merge of the widened output (Triton under the interpreter on CPU)."""
    triton_cuda = pytest.importorskip("ringattn.backends.triton_cuda")
    if triton_cuda.unavailable_reason() is not None:
        pytest.skip(f"triton backend: {triton_cuda.unavailable_reason()}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    acc, o = (torch.randn(2, 5, 3, 16, generator=gen) for _ in range(2))
    lses = [torch.randn(2, 5, 3, 1, generator=gen) for _ in range(2)]
    lses[1][0, 0] = float("-inf")  # an empty row of the block
    acc, o, lses = acc.to(device), o.bfloat16().to(device), [x.to(device) for x in lses]
    results = []
    for part in (o, o.float()):
        out, out_lse = acc.clone(), lses[0].clone()
        triton_cuda.merge_rows([out, part], [out_lse, lses[1]], None, out, out_lse, None)
        results.append((out, out_lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("entry", ["ring_attention", "simulate_ring_attention", "ring_attention_varlen"])
def test_ring_entry_points_are_one_graph_under_torch_compile(entry) -> None:
    """Note [ring under torch.compile] in ops.py: a function calling any entry point is one graph (a custom op per
    call), and ``fullgraph=True`` gives the eager output and gradients."""
    gen = torch.Generator().manual_seed(4)
    if entry == "ring_attention_varlen":
        q = torch.randn(12, 2, 8, generator=gen)
        cu = torch.tensor([0, 4, 12])  # even lengths: a ring of one holds them without padding slots

        def call(x):
            return ringattn.ring_attention_varlen(x, x, x, cu)
    else:
        q = torch.randn(1, 12, 2, 8, generator=gen)
        kw = {"world_size": 3} if entry == "simulate_ring_attention" else {}

        def call(x):
            return getattr(ringattn, entry)(x, x, x, causal=True, layout="BSND", **kw)

    def fn(x):
        return call(x * 2).sin()

    g = torch.randn_like(q)
    explained = torch._dynamo.explain(fn)(q)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        x = q.clone().requires_grad_()
        out = f(x)
        results.append((out, torch.autograd.grad(out, x, g)[0]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)
