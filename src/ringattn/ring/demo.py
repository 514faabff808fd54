"""Demo: causal ring attention (zigzag) forward and backward on W local processes, checked and timed.

``run_demo`` spawns ``world_size`` CPU processes (gloo, ``file://`` rendezvous in a temporary directory,
one thread each), runs ring attention forward and backward on a long random sequence, gathers the
results, and compares output and gradients with single-process attention (PyTorch SDPA with
``single_process_threads(world_size)`` threads: one per rank, at most one per usable CPU core) against a float64
reference; it prints errors, times and the thread counts used.

Several machines (one process per CPU socket or GPU; NCCL when CUDA is available, else gloo)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ringattn.ring.demo --seq-len 16384

Under torchrun (``RANK``/``WORLD_SIZE`` set) the module joins the ``env://`` rendezvous instead of
spawning; rank 0 computes the single-process reference and prints the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .attention import ring_attention
from .sharding import gather_sequence, shard_sequence

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class DemoArgs:
    seq_len: int = 4096
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    seed: int = 0


def _inputs(args: DemoArgs, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Full q, k, v and upstream gradient ``(B, S, N, D)``, identical on every rank (one seed)."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    return tuple(torch.randn(shape, generator=gen).to(device, _DTYPES[args.dtype]) for _ in range(4))


def _ring_rank(rank: int, world: int, args: DemoArgs, device: torch.device) -> dict:
    """This rank's ring pass; on rank 0 also the gathered full results. Every rank must call it."""
    q, k, v, g = (shard_sequence(x, rank, world) for x in _inputs(args, device))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    warm = 4 * world  # a short pass first, so one-time costs (JIT loading, allocator) are not timed
    small = [x[:, :warm].detach().requires_grad_() for x in (q, k, v)]
    ring_attention(*small, causal=True, layout="BSND").backward(g[:, :warm])
    dist.barrier()
    start = time.perf_counter()
    out = ring_attention(q, k, v, causal=True, layout="BSND")
    dist.barrier()
    forward = time.perf_counter() - start
    out.backward(g)
    dist.barrier()
    total = time.perf_counter() - start
    full = [gather_sequence(x.detach()) for x in (out, q.grad, k.grad, v.grad)]
    return {"forward_s": forward, "total_s": total, "results": full if rank == 0 else None}


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def single_process_threads(world_size: int) -> int:
    """Threads the single-process baseline runs with against a ring of ``world_size`` one-thread ranks: one per rank,
    but never more than the cores there are (3 threads on 2 cores would time oversubscription, not attention)."""
    return max(1, min(world_size, usable_cpus()))


def seq_len_problem(seq_len: int, world: int) -> str | None:
    """Why causal zigzag ring attention cannot split ``seq_len`` tokens over ``world`` ranks (one line), or None."""
    if world < 1:
        return f"the world size must be at least 1, got {world}"
    if seq_len < 2 * world or seq_len % (2 * world):
        fit = max(2 * world, round(seq_len / (2 * world)) * 2 * world)
        return (
            f"--seq-len {seq_len} is not a multiple of 2 x world size = {2 * world} (zigzag sharding cuts the "
            f"sequence into 2W equal chunks); try --seq-len {fit}"
        )
    return None


def speed_sentence(ring_s: float, single_s: float, world: int) -> str:
    """``"ring (W=2) 0.34 s, single process 0.48 s: ring is 1.4x faster"`` (or slower)."""
    ratio = single_s / ring_s if ring_s > 0 else float("inf")
    verdict = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
    return f"ring (W={world}) {ring_s:.2f} s, single process {single_s:.2f} s: ring is {verdict}"


def check_line(check: dict) -> str:
    """``"PASS  <name>: error 1.2e-06 <= tolerance 3.0e-06"`` (``>`` and FAIL when it did not pass)."""
    verdict, relation = ("PASS", "<=") if check["passed"] else ("FAIL", ">")
    return f"  {verdict}  {check['name']}: error {check['error']:.1e} {relation} tolerance {check['limit']:.1e}"


# Note [demo tolerance]: the ring may be at most twice as far from the float64 reference as PyTorch's own
# single-process attention in the same dtype, plus 1e-5 absolute (where SDPA happens to be nearly exact). It
# computes the same softmax in blocks and merges them, so it rounds about as often as SDPA does.
_RING_FACTOR, _RING_ATOL = 2.0, 1e-5


def _report(args: DemoArgs, world: int, ring: dict, device: torch.device, say) -> dict:
    """Single-process attention and a float64 reference; errors of both, times of both, a PASS/FAIL per output
    (Note [demo tolerance]) in ``report["checks"]``."""
    q, k, v, g = _inputs(args, device)
    single_threads = torch.get_num_threads()  # what SDPA below runs with
    say(f"single process: SDPA causal forward+backward, {single_threads} thread{'s' * (single_threads != 1)} "
        f"({usable_cpus()} CPU cores usable)")  # fmt: skip
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    start = time.perf_counter()
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True).transpose(1, 2)
    out.backward(g)
    single_s = time.perf_counter() - start
    single = [out.detach(), q.grad, k.grad, v.grad]
    say("float64 reference")
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q64, k64, v64)), is_causal=True)
    out64 = out64.transpose(1, 2)
    out64.backward(g.double())
    ref = [out64.detach(), q64.grad, k64.grad, v64.grad]
    names = ("out", "dq", "dk", "dv")
    errors = {
        who: {n: (x.double() - r).abs().max().item() for n, x, r in zip(names, xs, ref, strict=True)}
        for who, xs in (("ring", ring["results"]), ("single", single))
    }
    checks = []
    for n in names:
        limit = _RING_FACTOR * errors["single"][n] + _RING_ATOL
        error = errors["ring"][n]
        checks.append({"name": f"ring attention {n}", "error": error, "limit": limit, "passed": error <= limit})
    report = {
        "world_size": world,
        **dataclasses.asdict(args),
        "ring_forward_s": ring["forward_s"],
        "ring_total_s": ring["total_s"],
        "single_total_s": single_s,
        "single_threads": single_threads,
        "max_abs_error_vs_float64": errors,
        "checks": checks,
    }
    say("max |error| vs float64      " + "  ".join(f"{n:>8}" for n in names))
    for who, label in (("ring", f"ring (W={world})"), ("single", "single process")):
        say(f"  {label:<26}" + "  ".join(f"{errors[who][n]:8.1e}" for n in names))
    say(f"  {'tolerance (2x single+1e-5)':<26}" + "  ".join(f"{c['limit']:8.1e}" for c in checks))
    for c in checks:
        say(check_line(c))
    say("forward+backward: " + speed_sentence(ring["total_s"], single_s, world))
    return report


def _spawned_rank(rank: int, world: int, rendezvous: str, args: DemoArgs, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        if rank == 0:
            print(f"[rank 0] ring attention forward+backward on {world} ranks ...", flush=True)
        result = _ring_rank(rank, world, args, torch.device("cpu"))
        if rank == 0:
            torch.save(result, result_path)
    finally:
        dist.destroy_process_group()


def run_demo(
    world_size: int = 2,
    seq_len: int = 4096,
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "float32",
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Spawn ``world_size`` gloo processes, run causal zigzag ring attention forward+backward, check, time.

    ``seq_len`` must be a multiple of ``2 * world_size``. Returns the report printed: times in seconds
    (``ring_total_s``, ``single_total_s``: forward+backward) and ``max_abs_error_vs_float64`` of the ring
    and of single-process SDPA for out, dq, dk, dv.
    """
    problem = seq_len_problem(seq_len, world_size)
    if problem is not None:
        raise ValueError(problem)
    args = DemoArgs(seq_len, batch, heads, head_dim, dtype, seed)

    def say(text: str) -> None:
        if verbose:
            print(text, flush=True)

    say(f"ring attention demo: W={world_size}, B={batch}, S={seq_len}, N={heads}, D={head_dim}, {dtype}, causal")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "ring.pt")
        say(f"spawning {world_size} processes (gloo, 1 thread each)")
        mp.spawn(_spawned_rank, args=(world_size, f"file://{tmp}/rendezvous", args, result_path), nprocs=world_size)
        ring = torch.load(result_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(single_process_threads(world_size))
    try:
        return _report(args, world_size, ring, torch.device("cpu"), say)
    finally:
        torch.set_num_threads(threads)


def _torchrun_main(args: DemoArgs) -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    problem = seq_len_problem(args.seq_len, world)
    if problem is not None:
        dist.destroy_process_group()
        print(f"ringattn demo: {problem}", file=sys.stderr)
        return 2
    passed = True
    try:
        ring = _ring_rank(rank, world, args, device)
        if rank == 0:
            report = _report(args, world, ring, device, lambda text: print(text, flush=True))
            passed = all(c["passed"] for c in report["checks"])
    finally:
        dist.destroy_process_group()
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m ringattn.ring.demo`` (every option's help states its default once)."""
    from ..cli import DefaultsFormatter

    parser = argparse.ArgumentParser(
        prog="python -m ringattn.ring.demo", description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter
    )
    parser.add_argument("--world-size", type=int, default=2, help="local processes (ignored under torchrun)")
    parser.add_argument("--seq-len", type=int, default=DemoArgs.seq_len, help="full sequence length S (multiple of 2W)")
    parser.add_argument("--batch", type=int, default=DemoArgs.batch, help="batch size B")
    parser.add_argument("--heads", type=int, default=DemoArgs.heads, help="heads N")
    parser.add_argument("--head-dim", type=int, default=DemoArgs.head_dim, help="head size D")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=DemoArgs.dtype, help="q, k, v dtype")
    parser.add_argument("--seed", type=int, default=DemoArgs.seed, help="input seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m ringattn.ring.demo`` (spawned local ranks) or the same under torchrun; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = DemoArgs(ns.seq_len, ns.batch, ns.heads, ns.head_dim, ns.dtype, ns.seed)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_main(args)
    problem = seq_len_problem(args.seq_len, ns.world_size)
    if problem is not None:
        parser.error(problem)
    report = run_demo(ns.world_size, **dataclasses.asdict(args))
    return 0 if all(c["passed"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
