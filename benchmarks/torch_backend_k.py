"""``merge_states`` with K parts on the portable ``torch`` backend against the naive eager formula, forward and
backward, interleaved in one process (``ringattn bench`` times K = 2 only).

    PYTHONPATH=src python benchmarks/torch_backend_k.py [--parts 2,4] [--dtype float32,bfloat16] [--repeats 5]

Shape: T=16384, N=16, D=128, vLLM's layout (outputs ``(T, N, D)``, natural-log LSEs ``(N, T)``). The naive formula
is vLLM's PyTorch reference generalised to K parts (max-shifted weights, float32 products, one cast back); backward:
``torch.autograd.grad`` of both outputs (random upstream gradients) through each. Median of ``--repeats`` calls
after one warm-up; ratio = naive time / torch backend time (higher: the backend is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ringattn


def naive(outputs, lses):
    compute = torch.promote_types(outputs[0].dtype, torch.float32)
    lse = torch.stack([x.to(compute) for x in lses])
    top = lse.amax(0)
    w = torch.exp(lse - top)
    total = w.sum(0)
    scale = (w / total).transpose(1, 2).unsqueeze(-1)  # (K, N, T) -> (K, T, N, 1)
    out = outputs[0].to(compute) * scale[0]
    for o, s in zip(outputs[1:], scale[1:], strict=True):
        out = out + o.to(compute) * s
    return out.to(outputs[0].dtype), (top + torch.log(total)).to(lses[0].dtype)


def ours(outputs, lses):
    return ringattn.merge_states(outputs, lses, layout="TND", lse_layout="NT", lse_base="e", backend="torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="2,4")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':34} {'torch backend':>14} {'naive':>10} {'naive/torch':>12}")
    for dtype in [getattr(torch, d) for d in args.dtype.split(",")]:
        for k in [int(x) for x in args.parts.split(",")]:
            outputs = [(torch.rand(16384, 16, 128, generator=gen) * 2 - 1).to(dtype) for _ in range(k)]
            lses = [4 * torch.randn(16, 16384, generator=gen) + 2 for _ in range(k)]
            up = (torch.randn(16384, 16, 128, generator=gen).to(dtype), torch.randn(16, 16384, generator=gen))
            for direction in ("forward", "backward"):
                times: dict[str, list[float]] = {"torch": [], "naive": []}
                for rep in range(args.repeats + 1):
                    for name, fn in (("torch", ours), ("naive", naive)):
                        if direction == "forward":
                            start = time.perf_counter()
                            fn(outputs, lses)
                        else:
                            leaves = [t.detach().requires_grad_() for t in (*outputs, *lses)]
                            got = fn(leaves[:k], leaves[k:])
                            start = time.perf_counter()
                            torch.autograd.grad(got, leaves, up)
                        if rep:
                            times[name].append(time.perf_counter() - start)
                a, b = (statistics.median(times[n]) * 1e3 for n in ("torch", "naive"))
                case = f"merge_states K={k} {str(dtype)[6:]} {direction}"
                print(f"{case:34} {a:11.1f} ms {b:7.1f} ms {b / a:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
