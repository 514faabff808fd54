"""``ringattn demo``: the MindSpore page's example, a realistic-size merge, then ring attention.

Every part checks its result against a float64 reference and prints the error next to the time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import backends
from ._contract import validate_update
from .api import ring_attention_update
from .reference import ring_attention_update_reference


def mindspore_example() -> None:
    """The example of the MindSpore page, unchanged but for the import (NumPy in, NumPy out)."""
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
    # The page draws its 8 lanes independently (the contract says they are equal) and allows negative
    # sums; attn_out and lane 0 of the statistics are what every backend defines, so those are compared.
    want = ring_attention_update_reference(*(torch.from_numpy(x) for x in inputs))
    pairs = [(out[0], want[0]), (out[1][..., 0], want[1][..., 0]), (out[2][..., 0], want[2][..., 0])]
    err = max(float(np.max(np.abs(g - w.numpy()) / (1 + np.abs(w.numpy())))) for g, w in pairs)
    print(f"  vs float64 reference: max relative error {err:.2e}")


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


def realistic_merge(seq: int = 4096, heads: int = 32, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16) -> None:
    gen = torch.Generator().manual_seed(0)
    shape, stats_shape = (seq, 1, heads * head_dim), (1, heads, seq, 1)
    attn = [(torch.rand(shape, generator=gen) * 2 - 1).to(dtype) for _ in range(2)]
    maxima = [(torch.randn(stats_shape, generator=gen) * 4).expand(1, heads, seq, 8).contiguous() for _ in range(2)]
    sums = [(1 + 63 * torch.rand(stats_shape, generator=gen)).expand(1, heads, seq, 8).contiguous() for _ in range(2)]
    args = (attn[0], maxima[0], sums[0], attn[1], maxima[1], sums[1])
    backend = backends.select("auto", validate_update(*args, None, "SBH")).NAME
    out = tuple(torch.empty_like(t) for t in (attn[0], maxima[0], maxima[0]))
    ours = _median_seconds(lambda: ring_attention_update(*args, out=out))
    naive = _median_seconds(lambda: naive_eager_update(*args))
    want = ring_attention_update_reference(*args)
    err = (out[0].double() - want[0]).abs().max().item()
    print(
        f"Merge SBH S={seq} B=1 N={heads} D={head_dim} {str(dtype).removeprefix('torch.')}: backend {backend!r}, "
        f"{ours * 1e3:.2f} ms (out=), naive eager formula {naive * 1e3:.2f} ms ({naive / ours:.1f}x); "
        f"max abs error vs float64 {err:.2e}"
    )


def main(world_size: int = 2, ring: bool = True) -> int:
    torch.manual_seed(0)
    mindspore_example()
    realistic_merge()
    if ring:
        try:
            from .ring.demo import run_demo
        except ImportError as exc:  # the ring package is optional in partial installs
            print(f"ring attention demo skipped: {exc}")
            return 0
        run_demo(world_size=world_size)
    return 0
