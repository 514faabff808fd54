"""``ringattn demo``: the MindSpore page's example, a realistic-size merge, ring attention, then packed documents
through a virtual ring, each checked.

Every check compares a result with a float64 reference against a stated tolerance and prints PASS or FAIL;
the command exits with status 1 when any check fails (2 for arguments it cannot run).

Tolerances: the merge checks use the contract's per-dtype bound on ``|got - want| / (1 + |want|)`` (float32
1e-4, float16 1e-3, bfloat16 5e-3: one rounding to the output dtype, as the Ascend original's own tests
allow); the ring checks allow twice the error of PyTorch's single-process attention in the same dtype plus
1e-5 (Note [demo tolerance] in ``ring/demo.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import backends
from ._contract import validate_update
from .api import ring_attention_update
from .reference import ring_attention_update_reference

# Per-dtype bound on max |got - want| / (1 + |want|) against float64 (atol = rtol, one rounding to the dtype).
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}
DEFAULT_SEQ_LEN = 4096


def _check(name: str, error: float, limit: float) -> dict:
    return {"name": name, "error": error, "limit": limit, "passed": bool(error <= limit)}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / (1 + want.abs())).max())


def _say(check: dict) -> None:
    from .ring.demo import check_line

    print(check_line(check), flush=True)


def mindspore_example() -> list[dict]:
    """The example of the MindSpore page, unchanged but for the import (NumPy in, NumPy out); its check."""
    np.random.seed(123)  # noqa: NPY002 - the page's own (legacy) generator, to reproduce its example
    S, B, H, N = 4, 6, 16, 8
    prev_attn_out = np.random.uniform(-1.0, 1.0, size=(S, B, H)).astype(np.float32)  # noqa: NPY002
    prev_softmax_max = np.random.uniform(-1.0, 1.0, size=(B, N, S, 8)).astype(np.float32)  # noqa: NPY002
    prev_softmax_sum = np.random.uniform(-1.0, 1.0, size=(B, N, S, 8)).astype(np.float32)  # noqa: NPY002
    cur_attn_out = np.random.uniform(-1.0, 1.0, size=(S, B, H)).astype(np.float32)  # noqa: NPY002
    cur_softmax_max = np.random.uniform(-1.0, 1.0, size=(B, N, S, 8)).astype(np.float32)  # noqa: NPY002
    cur_softmax_sum = np.random.uniform(-1.0, 1.0, size=(B, N, S, 8)).astype(np.float32)  # noqa: NPY002
    inputs = [prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max, cur_softmax_sum]
    out = ring_attention_update(*inputs)
    print(f"MindSpore example: attn_out shape {out[0].shape} (the page prints (4, 6, 16))")
    # The page draws its 8 lanes independently (the contract says they are equal): every lane is merged on its own
    # and output element d takes lane d % 8's weights, as on Atlas A2, so all three outputs are compared whole.
    want = ring_attention_update_reference(*(torch.from_numpy(x) for x in inputs))
    error = max(_relative_error(torch.from_numpy(g), w) for g, w in zip(out, want, strict=True))
    check = _check("MindSpore example (float32) vs float64", error, TOL[torch.float32])
    _say(check)
    return [check]


def _median_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def naive_eager_update(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l):
    """The formula as MindSpeed / ring-flash-attention write it in eager PyTorch (the speed baseline)."""
    seq, batch, hidden = prev_o.shape
    heads = prev_m.shape[1]
    new_max = torch.maximum(prev_m, cur_m)
    a = prev_l * torch.exp(prev_m - new_max)
    b = cur_l * torch.exp(cur_m - new_max)
    new_sum = a + b
    p = (a / new_sum)[..., 0].permute(2, 0, 1).repeat_interleave(hidden // heads, dim=-1)
    c = (b / new_sum)[..., 0].permute(2, 0, 1).repeat_interleave(hidden // heads, dim=-1)
    out = (prev_o.float() * p + cur_o.float() * c).to(prev_o.dtype)
    return out, new_max, new_sum


def realistic_merge(
    seq: int = 4096, heads: int = 32, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16
) -> list[dict]:
    """A 4096-token, 32-head bfloat16 merge: checked, then timed against the naive eager formula."""
    gen = torch.Generator().manual_seed(0)
    shape, stats_shape = (seq, 1, heads * head_dim), (1, heads, seq, 1)
    attn = [(torch.rand(shape, generator=gen) * 2 - 1).to(dtype) for _ in range(2)]
    maxima = [(torch.randn(stats_shape, generator=gen) * 4).expand(1, heads, seq, 8).contiguous() for _ in range(2)]
    sums = [(1 + 63 * torch.rand(stats_shape, generator=gen)).expand(1, heads, seq, 8).contiguous() for _ in range(2)]
    args = (attn[0], maxima[0], sums[0], attn[1], maxima[1], sums[1])
    name = f"merge SBH S={seq} B=1 N={heads} D={head_dim} {str(dtype).removeprefix('torch.')}"
    backend = backends.select("auto", validate_update(*args, None, "SBH"))
    out = tuple(torch.empty_like(t) for t in (attn[0], maxima[0], maxima[0]))
    if backend.NAME == "auto":
        # Note [cold start] in backends/_warm.py: auto would answer with torch until numba has compiled the fused
        # kernel in the background; the demo times the fused kernel, so it compiles it now, on this thread.
        print(f"{name}: compiling the fused CPU kernel (numba; once per machine, then loaded from its cache) ...")
        start = time.perf_counter()
        ring_attention_update(*args, out=out, backend="cpu")
        print(f"  ready in {time.perf_counter() - start:.1f} s")
    ring_attention_update(*args, out=out)
    want = ring_attention_update_reference(*args)
    checks = [_check(f"{name} vs float64", _relative_error(out[0], want[0]), TOL[dtype])]
    ours = _median_seconds(lambda: ring_attention_update(*args, out=out))
    ran = backends.ran(backend)
    naive = _median_seconds(lambda: naive_eager_update(*args))
    ratio = naive / ours
    speed = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
    print(
        f"{name}: backend {ran!r} {ours * 1e3:.1f} ms, naive eager formula {naive * 1e3:.1f} ms: "
        f"ringattn is {speed} (into preallocated outputs, median of 7)"
    )
    _say(checks[0])
    return checks


def ring_seq_len(world_size: int, seq_len: int | None) -> tuple[int | None, str | None]:
    """The ring part's sequence length and, when it cannot run, why (one line).

    Without ``seq_len``, the default 4096 rounded to the nearest multiple of ``2 * world_size`` (zigzag sharding
    cuts the sequence into 2W equal chunks); an explicit ``seq_len`` is used as given, or refused."""
    from .ring.demo import seq_len_problem

    if seq_len is None:
        if world_size < 1:
            return None, seq_len_problem(DEFAULT_SEQ_LEN, world_size)
        chunk = 2 * world_size
        seq_len = max(chunk, round(DEFAULT_SEQ_LEN / chunk) * chunk)
    return seq_len, seq_len_problem(seq_len, world_size)


def packed_documents(world_size: int, seed: int = 0) -> list[dict]:
    """Packed documents of random lengths through a virtual ring of ``world_size`` ranks (every rank in this
    process, ``simulate_ring_attention(cu_seqlens=...)``), causal within each document, against float64 attention
    of each document alone; output and gradients checked as the ring's (Note [demo tolerance] in ring/demo.py)."""
    from .ring import simulate_ring_attention
    from .ring.demo import _RING_ATOL, _RING_FACTOR

    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(6, generator=gen) * 700).long() + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    t, n, d = int(cu[-1]), 8, 64
    q, k, v, g = (torch.randn(t, n, d, generator=gen) for _ in range(4))
    print(f"packed documents: {len(lengths)} documents of lengths {lengths.tolist()} (T={t}, N={n}, D={d}, float32), "
          f"causal within each, virtual ring of {world_size} ranks", flush=True)  # fmt: skip

    def per_document(dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            doc = (x[a:b].transpose(0, 1) for x in leaves)
            outs.append(F.scaled_dot_product_attention(*doc, is_causal=True).transpose(0, 1))
        out = torch.cat(outs)
        return [out.detach(), *torch.autograd.grad(out, leaves, g.to(dtype))]

    want, single = per_document(torch.float64), per_document(torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = simulate_ring_attention(*leaves, world_size=world_size, cu_seqlens=cu)
    ring = [out.detach(), *torch.autograd.grad(out, leaves, g)]
    checks = []
    for name, r, s1, w in zip(("out", "dq", "dk", "dv"), ring, single, want, strict=True):
        limit = _RING_FACTOR * float((s1.double() - w).abs().max()) + _RING_ATOL
        checks.append(_check(f"packed documents {name}", float((r.double() - w).abs().max()), limit))
        _say(checks[-1])
    return checks


def main(world_size: int = 2, ring: bool = True, seq_len: int | None = None) -> int:
    """Run every part; print a verdict per check; 0 when all pass, 1 when one fails, 2 when the ring part cannot
    run with these arguments."""
    length, problem = ring_seq_len(world_size, seq_len)
    if ring and problem is not None:
        print(f"ringattn demo: {problem}")
        return 2
    torch.manual_seed(0)
    checks = mindspore_example() + realistic_merge()
    if ring:
        try:
            from .ring.demo import run_demo
        except ImportError as exc:  # the ring package is optional in partial installs
            print(f"ring attention demo skipped: {exc}")
        else:
            checks += run_demo(world_size=world_size, seq_len=length)["checks"]
            checks += packed_documents(world_size)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        print(f"FAIL: {len(failed)} of {len(checks)} checks failed: {', '.join(c['name'] for c in failed)}")
        return 1
    print(f"PASS: all {len(checks)} checks passed")
    return 0
