"""Where the time of a virtual ring goes on one GPU: CUDA kernel time by category for one forward+backward.

    python3 benchmarks/ring_profile.py [--seq-len 32768] [--world-size 8] [--impl auto] [--no-causal]

Categories: attention kernels (cuDNN / FlashAttention / memory-efficient), the row merge (Triton), and the rest
(copies, casts, zero-fills, GQA repeats and sums, accumulations). Prints totals, then the top kernels.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ringattn

ATTENTION = ("flash", "fmha", "cudnn", "sdpa", "attention", "cutlass", "sm90", "sm80")


def category(name: str) -> str:
    low = name.lower()
    if "merge" in low:
        return "merge (triton)"
    if any(word in low for word in ATTENTION):
        return "attention"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    ns = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, ns.seq_len, ns.heads, ns.head_dim)
    kv_shape = (1, ns.seq_len, ns.kv_heads, ns.head_dim)
    q, g = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    k, v = (
        torch.randn(kv_shape, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(2)
    )
    q.requires_grad_()

    def ring() -> None:
        out = ringattn.simulate_ring_attention(
            q, k, v, world_size=ns.world_size, causal=ns.causal, impl=ns.impl, layout="BSND"
        )
        torch.autograd.grad(out, (q, k, v), g)

    def single() -> None:
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=ns.causal, enable_gqa=True
        ).transpose(1, 2)
        torch.autograd.grad(out, (q, k, v), g)

    for label, fn in (("single SDPA", single), (f"virtual ring W={ns.world_size} ({ns.impl})", ring)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        by_kernel: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            if event.device_time_total > 0 and event.device_type.name == "CUDA":
                by_kernel[event.key] += event.device_time_total / 1e3
        totals: dict[str, float] = defaultdict(float)
        for name, ms in by_kernel.items():
            totals[category(name)] += ms
        total = sum(totals.values())
        print(f"\n== {label}: {total:.2f} ms of CUDA kernel time " + ", ".join(
            f"{c} {ms:.2f} ms ({100 * ms / total:.0f}%)" for c, ms in sorted(totals.items(), key=lambda x: -x[1])
        ))  # fmt: skip
        for name, ms in sorted(by_kernel.items(), key=lambda x: -x[1])[:14]:
            print(f"  {ms:9.3f} ms  {category(name):<15} {name[:110]}")


if __name__ == "__main__":
    main()
