"""What real training loops hand the attention entry points: autocast, double backward, deterministic mode.

* Autocast (Note [autocast] in ``_amp.py``): under ``torch.autocast("cpu", bfloat16)`` every entry point takes q, k
  in float32 and v in bfloat16 (what a transformers Llama hands attention there), computes and returns bfloat16,
  and returns each input's gradient in that input's dtype; its error against float32 attention is no worse than 2x
  bfloat16 SDPA's own under the same autocast (+ 1e-3 absolute: one bfloat16 ulp at the outputs' magnitude, since
  SDPA's error can be near zero on an element where ours is not). Outside autocast, mixed dtypes are a DTypeError.
* Double backward (``create_graph=True``): ``block_attention`` is differentiable to second order (gradgradcheck in
  float64; a float32 gradient penalty against float64 autograd, 1e-4 relative: float32 over 12 keys); every other
  entry point raises AutogradError naming ``create_graph`` (never a graph silently missing its second-order terms).
* One merge backend per ring (Note [one merge backend per ring] in ``ring/checks.py``): the agreement rule, ranks
  that disagree falling back to torch together, and ``auto`` never switching under deterministic algorithms.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import ringattn
from ringattn import backends
from ringattn.errors import AutogradError, DTypeError
from ringattn.ring import attention, checks

B, S, N, NKV, D = 1, 16, 4, 2, 16


def _qkv(seed: int, s: int = S):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, s, N, D, generator=gen)
    k, v = (torch.randn(B, s, NKV, D, generator=gen) for _ in range(2))
    return q, k, v


def _sdpa(q, k, v):
    """SDPA on ``(B, S, N, D)`` tensors, causal, GQA."""
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def _math_attention(q, k, v):
    """Causal GQA attention of ``(B, S, N, D)`` tensors in plain differentiable ops (any order of derivatives)."""
    groups = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    s = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(s, -1), v)


def _packed(fn):
    """``fn`` as a BSND function over one packed document of S tokens (``ring_attention_varlen`` at W = 1)."""
    cu = torch.tensor([0, S])

    def call(q, k, v):
        return fn(q[0], k[0], v[0], cu).unsqueeze(0)

    return call


ENTRY_POINTS = {
    "block_attention": lambda q, k, v: ringattn.block_attention(q, k, v, layout="BSND", causal=True)[0],
    "ring_attention": lambda q, k, v: ringattn.ring_attention(q, k, v, layout="BSND", causal=True),
    "ring_attention_varlen": _packed(lambda q, k, v, cu: ringattn.ring_attention_varlen(q, k, v, cu)),
    "simulate_ring_attention": lambda q, k, v: ringattn.simulate_ring_attention(
        q, k, v, world_size=2, layout="BSND", causal=True
    ),
    "simulate_packed": _packed(
        lambda q, k, v, cu: ringattn.simulate_ring_attention(q, k, v, world_size=2, cu_seqlens=cu)
    ),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_autocast_like_sdpa(entry) -> None:
    q32, k32, v32 = _qkv(1)
    g = torch.randn(B, S, N, D, generator=torch.Generator().manual_seed(2))
    want_out = _sdpa(*(x.double() for x in (q32, k32, v32)))
    leaves_ref = [x.double().requires_grad_() for x in (q32, k32, v32)]
    want = [want_out, *torch.autograd.grad(_sdpa(*leaves_ref), leaves_ref, g.double())]

    def run(fn):
        q, k = (x.clone().requires_grad_() for x in (q32, k32))
        v = v32.bfloat16().requires_grad_()  # transformers under bf16 autocast: q, k float32, v bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, v)
        out.backward(g.to(out.dtype))
        return out, q.grad, k.grad, v.grad

    sdpa = run(_sdpa)
    ours = run(ENTRY_POINTS[entry])
    assert ours[0].dtype == torch.bfloat16, f"{entry}: output {ours[0].dtype} under bf16 autocast"
    assert [x.dtype for x in ours[1:]] == [torch.float32, torch.float32, torch.bfloat16], "gradients' dtypes"
    for name, mine, base, exp in zip(("out", "dq", "dk", "dv"), ours, sdpa, want, strict=True):
        err, base_err = _rel(mine, exp), _rel(base, exp)
        assert err <= 2 * base_err + 1e-3, f"{entry} {name}: {err:.2e} vs bf16 SDPA {base_err:.2e}"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mixed_dtypes_outside_autocast_are_an_error(entry) -> None:
    q, k, v = _qkv(3)
    with pytest.raises(DTypeError, match=r"\bv\b.*expected"):
        ENTRY_POINTS[entry](q, k, v.bfloat16())


def test_autocast_off_in_the_body_keeps_the_torch_kernel_in_float32() -> None:
    """The plain-torch block kernel computes in float32 on purpose: autocast must not cast its matmuls (a float32
    call under autocast for another device type is left alone, and one for CPU is cast once, at the top)."""
    q, k, v = (x.double() for x in _qkv(4))
    want = _sdpa(q, k, v)
    q, k, v = (x.float() for x in (q, k, v))
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        out = ringattn.simulate_ring_attention(q, k, v, world_size=2, layout="BSND", causal=True, impl="torch")
    assert out.dtype == torch.float32 and _rel(out, want) < 1e-5


# --- double backward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BSND", "TND"])
def test_block_attention_gradgradcheck(layout) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = {"layout": layout, "causal": True}
    if layout == "TND":
        q, k, v = (x.detach()[0].requires_grad_() for x in (q, k, v))
        kw.update(actual_seq_qlen=[0, 2, 5], actual_seq_kvlen=[0, 2, 5])
    assert torch.autograd.gradgradcheck(lambda *x: ringattn.block_attention(*x, **kw), (q, k, v))


def test_block_attention_gradient_penalty_on_the_fused_kernel() -> None:
    """float32 (the fused CPU kernel forward): d/dx of |d out / d q . g|^2 against float64 autograd."""
    q, k, v = _qkv(6, s=12)
    g = torch.randn(B, 12, N, D, generator=torch.Generator().manual_seed(7))

    def penalty_grads(q, k, v, fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (dq,) = torch.autograd.grad(fn(*leaves), leaves[0], g.to(q.dtype), create_graph=True)
        return torch.autograd.grad(dq.pow(2).sum(), leaves)

    ours = penalty_grads(q, k, v, lambda *x: ringattn.block_attention(*x, layout="BSND", causal=True)[0])
    want = penalty_grads(*(x.double() for x in (q, k, v)), _math_attention)
    for name, mine, exp in zip(("q", "k", "v"), ours, want, strict=True):
        assert _rel(mine, exp) < 1e-4, f"penalty d{name}: {_rel(mine, exp):.2e}"


def _merge_two(q, k, v):
    parts = [ringattn.block_attention(q, k[:, a:b], v[:, a:b], layout="BSND") for a, b in ((0, 7), (7, S))]
    return ringattn.merge_states([o for o, _ in parts], [lse for _, lse in parts], layout="BSND", lse_base="e")[0]


FIRST_ORDER_ONLY = {**{k: v for k, v in ENTRY_POINTS.items() if k != "block_attention"}, "merge_states": _merge_two}


@pytest.mark.parametrize("entry", sorted(FIRST_ORDER_ONLY))
def test_double_backward_is_a_named_error(entry) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(8))
    out = FIRST_ORDER_ONLY[entry](q, k, v)
    with pytest.raises(AutogradError, match="create_graph: expected False"):
        torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)
    # first-order gradients are unaffected
    (dq,) = torch.autograd.grad(FIRST_ORDER_ONLY[entry](q, k, v), q, torch.randn_like(out))
    assert torch.isfinite(dq).all()


def test_ring_attention_update_double_backward_is_a_named_error() -> None:
    gen = torch.Generator().manual_seed(9)
    prev_o, cur_o = (torch.randn(4, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    stats = [torch.randn(2, 2, 4, 8, generator=gen).requires_grad_() for _ in range(4)]
    for s in stats[1::2]:
        s.data.abs_().add_(0.5)  # sums > 0
    out = ringattn.ring_attention_update(prev_o, stats[0], stats[1], cur_o, stats[2], stats[3])[0]
    with pytest.raises(AutogradError, match="create_graph"):
        torch.autograd.grad(out, prev_o, torch.randn_like(out), create_graph=True)


# --- one merge backend per ring ------------------------------------------------------------------------------


def _row(merge: str | None) -> list[int]:
    q = torch.randn(1, 4, 2, 8)
    return checks.encode(q, q, q, attention.RingOptions(layout="BSND"), needs_grad=False, merge=merge)


@pytest.mark.parametrize(
    ("reported", "agreed"),
    [(["cpu", "cpu"], "cpu"), (["cpu", "torch"], "torch"), (["torch", "cpu", "cpu"], "torch"), (["cpu", None], "torch"),
     (["triton"] * 3, "triton")],
)  # fmt: skip
def test_the_ring_runs_the_merge_backend_every_rank_has(reported, agreed) -> None:
    assert checks.agreed_merge_backend([_row(m) for m in reported]) == agreed


class _TableComm:
    """A rank whose all-gather answers with its own row and another rank's, which reported ``other``."""

    rank, world_size = 0, 2

    def __init__(self, other: str) -> None:
        self.other = other

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        theirs = list(values)
        theirs[3 * checks._FIELDS + checks._MERGE_AT] = backends.BACKEND_NAMES.index(self.other)
        return [list(values), theirs]


@pytest.mark.parametrize(("other", "agreed"), [("torch", "torch"), ("cpu", "cpu")])
def test_prepare_takes_the_agreed_backend(monkeypatch, other, agreed) -> None:
    monkeypatch.setattr(attention, "local_merge_backend", lambda q, backend: "cpu")
    q = torch.randn(1, 4, 2, 8)
    *_, cfg = attention.prepare(q, q, q, attention.RingOptions(layout="BSND"), _TableComm(other))
    assert cfg.backend == agreed


def test_local_merge_backend_answers_without_raising() -> None:
    q = torch.randn(1, 4, 2, 8)
    assert attention.local_merge_backend(q, "torch") == "torch"
    assert attention.local_merge_backend(q, "bogus") is None  # the check table names it on every rank
    assert attention.local_merge_backend("not a tensor", "auto") is None
    assert attention.local_merge_backend(q, "auto") in ("cpu", "torch")


def test_auto_never_switches_under_deterministic_algorithms(monkeypatch) -> None:
    """Deterministic mode: ``auto`` on CPU is the fused module itself (compiled on first use), never the
    background-compiling AutoBackend that answers with torch meanwhile."""
    if backends.load("cpu").unavailable_reason() is not None:
        pytest.skip("the cpu backend needs numba")
    monkeypatch.delenv("RINGATTN_AUTO_CPU", raising=False)
    assert isinstance(backends.for_device(torch.device("cpu"), "auto"), backends.AutoBackend)
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.for_device(torch.device("cpu"), "auto") is backends.load("cpu")
    finally:
        torch.use_deterministic_algorithms(False)


_DETERMINISTIC_SCRIPT = textwrap.dedent(
    """
    import hashlib, torch, ringattn
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 60, 4, 16, requires_grad=True) for _ in range(3))
    digest = hashlib.sha256()
    for step in range(3):
        out = ringattn.simulate_ring_attention(q, k, v, world_size=3, layout="BSND", causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        for t in (out, *grads):
            digest.update(t.detach().numpy().tobytes())
    print(digest.hexdigest())
    """
)


@pytest.mark.timeout(300)
def test_two_runs_under_deterministic_mode_are_bitwise_equal() -> None:
    """The same script twice, with ``auto``'s default background policy: one bit pattern."""
    env = {k: v for k, v in os.environ.items() if k != "RINGATTN_AUTO_CPU"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", _DETERMINISTIC_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
            check=True,
        ).stdout.strip()  # fmt: skip
        for _ in range(2)
    ]
    assert len(runs[0]) == 64 and runs[0] == runs[1]


# --- the CUDA code path, through CPU doubles of its kernels (tests/ring/cuda_doubles.py) ----------------------------


@pytest.mark.parametrize("impl", ["cudnn", "flash", "efficient"])
def test_cuda_kernels_under_autocast_with_strided_views(monkeypatch, impl) -> None:
    """The CUDA kernels' contracts (asserted by the doubles) hold for what a bf16 training loop hands the ring: q, k in
    float32 and v in bfloat16 under autocast, head dims of non-unit stride; the result within bf16's tolerance of
    ``test_virtual.py`` (3e-2) of float64 attention, in bfloat16, gradients in each input's dtype."""
    import cuda_doubles
    from test_strides import as_view

    cuda_doubles.install(monkeypatch)
    q32, k32, v32 = _qkv(10)
    g = torch.randn(B, S, N, D, generator=torch.Generator().manual_seed(11))
    leaves = [as_view(x, "d_outermost").requires_grad_() for x in (q32, k32, v32.bfloat16())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ringattn.simulate_ring_attention(*leaves, world_size=2, layout="BSND", causal=True, impl=impl)
    grads = torch.autograd.grad(out, leaves, as_view(g.bfloat16(), "d_outermost"))
    assert out.dtype == torch.bfloat16 and [x.dtype for x in grads] == [torch.float32, torch.float32, torch.bfloat16]
    ref = [x.double().requires_grad_() for x in (q32, k32, v32.bfloat16().float())]
    want = _math_attention(*ref)
    expect = [want.detach(), *torch.autograd.grad(want, ref, g.bfloat16().double())]
    for name, x, e in zip(("out", "dq", "dk", "dv"), (out, *grads), expect, strict=True):
        torch.testing.assert_close(x.double(), e, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{impl} {n}: {m}")
