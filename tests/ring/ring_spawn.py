"""Spawning gloo ranks from pytest, and the float64 reference every rank checks its shard against."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server that has imported these once, instead of each importing torch (seconds on
# a loaded 2-core machine; sympy comes in lazily with the first backward). The server has used no
# threads, so forking it is safe, unlike forking pytest itself.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.fx.experimental.symbolic_shapes",
    "torch.testing",
    "pytest",
    "ringattn.ring",
]
# Seconds a collective may block before gloo raises; a broken schedule fails instead of hanging.
PG_TIMEOUT_S = 30


def _worker(rank: int, fn: Callable[..., None], world_size: int, rendezvous: str, kw: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, **kw)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], world_size: int, tmp_path: Path, *, deadline_s: float = 120, **kw: Any) -> None:
    """Run ``fn(rank, world_size, **kw)`` on ``world_size`` spawned gloo ranks; exceptions propagate.

    ``fn`` must be a module-level function (it is pickled). Rendezvous is a ``file://`` in ``tmp_path``.
    Ranks still running after ``deadline_s`` are terminated and the call fails.
    """
    mp.set_forkserver_preload(_PRELOAD)
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.start_processes(
        _worker, args=(fn, world_size, rendezvous, kw), nprocs=world_size, join=False, start_method="forkserver"
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for process in ctx.processes:
                process.terminate()
            raise TimeoutError(f"ranks still running after {deadline_s} s")


class SoloComm:
    """A ring of one (RingComm interface) for single-process runs inside an initialised group."""

    rank, world_size = 0, 1

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values)]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, causal: bool, scale: float):
    """Float64 attention over full ``(B, S, N, D)`` tensors: ``out, lse (B, N, S), dq, dk, dv`` for upstream g."""
    q, k, v = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kr, vr = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    s = torch.einsum("bqnd,bknd->bnqk", q, kr) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bnqk,bknd->bqnd", torch.softmax(s, dim=-1), vr)
    out.backward(g.to(torch.float64))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad
