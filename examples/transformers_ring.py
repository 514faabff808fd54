"""Context-parallel training of a Hugging Face Llama with ringattn: a single-process step plus two lines.

Run: ``torchrun --nproc-per-node 2 examples/transformers_ring.py`` (gloo on CPU; NCCL when CUDA is present). Every
rank builds the same random model (nothing downloaded) and the same batch; rank 0 first runs the unchanged
single-process step as the reference, then every rank runs the context-parallel step on its shard of the sequence,
and rank 0 reports the loss, the largest relative L2 error over the parameter gradients, and (``--bench``) the
median step time of both (single process: all of the machine's threads; ring: the threads split over the ranks).
``--dtype bfloat16`` also reports bf16 SDPA's own error against float32, the yardstick for the ring's.

Verdict: ``PASS`` when the gradient error is within the tolerance (float32: ``F32_TOL``; bfloat16: twice bf16 SDPA's
own error plus 1e-5, as Note [demo tolerance] in ``src/ringattn/ring/demo.py``), else ``FAIL``; every rank exits
with status 1 on FAIL, so torchrun fails too.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import ringattn.backends
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs
from ringattn.ring.demo import usable_cpus

# float32 tolerance on the worst parameter-gradient relative L2 error (tests/integrations/test_transformers.py's; a
# healthy run measures about 1e-6).
F32_TOL = 1e-5


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def step(model, batch) -> torch.Tensor:
    """The user's training step (without the optimizer): forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after warm-up calls that let the fused CPU merge kernels load (``backend="auto"``
    loads, or on a new machine compiles, them on a background thread at first use): the steady state, not the load."""
    ringattn.backends.settle_compiles(fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.float() for p in model.parameters()]


def worst_rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True))


def main(argv: list[str] | None = None) -> float:
    """Run the comparison; returns rank 0's worst parameter-gradient relative L2 error (other ranks: 0)."""
    return run(argv)[0]


def run(argv: list[str] | None = None) -> tuple[float, bool]:
    """Run the comparison and print rank 0's verdict; returns ``(error, passed)``: rank 0's worst parameter-gradient
    relative L2 error (other ranks: 0) and the verdict, the same on every rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bench", action="store_true", help="also time the steps (median of --repeats)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="CPU threads of the single process "
                        "(default: the usable cores); the ring splits them over its ranks")  # fmt: skip
    args = parser.parse_args(argv)

    owned = not dist.is_initialized()  # under torchrun; tests call main() inside their own process group
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = args.threads
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = input_ids.clone()

    reference = build(args)  # float32
    model = copy.deepcopy(reference).to(dtype)

    if rank == 0:  # the single-process step, with the whole machine
        torch.set_num_threads(threads)
        plain = {"input_ids": input_ids, "labels": labels}
        want_loss = step(reference, plain)
        want = grads(reference)
        limit = F32_TOL
        if dtype != torch.float32:
            sdpa_low = copy.deepcopy(reference).to(dtype)
            step(sdpa_low, plain)
            sdpa_err = worst_rel(grads(sdpa_low), want)
            print(f"{args.dtype} SDPA vs float32: worst parameter-gradient rel. L2 {sdpa_err:.2e}")
            limit = 2 * sdpa_err + 1e-5
        if args.bench:
            single = timed(lambda: step(reference, plain), args.repeats)
    dist.barrier()
    torch.set_num_threads(max(1, threads // world))

    apply_ring_attention(model)  # added line 1
    batch = shard_inputs(input_ids, labels)  # added line 2
    loss = step(model, batch)
    dist.all_reduce(loss)  # for logging only: the ranks' losses are shares of the global mean
    if args.bench:
        ring = timed(lambda: step(model, batch), args.repeats)
    err, passed = 0.0, True
    if rank == 0:
        err = worst_rel(grads(model), want)
        passed = err <= limit  # NaN fails
        print(f"W={world} {args.dtype}: loss {loss.item():.6f} (single process {want_loss.item():.6f}); "
              f"worst parameter-gradient rel. L2 {err:.2e}")  # fmt: skip
        if args.bench:
            per_rank = max(1, threads // world)
            speed = single / ring
            words = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
            print(f"step: single process {single * 1e3:.0f} ms ({threads} threads), ring W={world} "
                  f"{ring * 1e3:.0f} ms ({per_rank} thread(s) per rank): the ring is {words}")  # fmt: skip
        verdict = "PASS" if passed else "FAIL"
        print(f"{verdict}: worst parameter-gradient rel. L2 {err:.2e} {'<=' if passed else '>'} tolerance {limit:.1e}")
    agreed = torch.tensor([int(passed)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # rank 0's verdict, on every rank
    if owned:
        dist.destroy_process_group()
    return err, bool(agreed.item())


if __name__ == "__main__":
    sys.exit(0 if run()[1] else 1)
