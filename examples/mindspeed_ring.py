"""MindSpeed's ring attention (context parallelism on Ascend), ported to PyTorch with ringattn's Ascend-style API.

MindSpeed's ring loop (``mindspeed/core/context_parallel/ring_context_parallel.py``) calls, per step, a FlashAttention
that returns ``(out, softmax_max, softmax_sum)`` in Ascend layouts, sends its key/value block to the next rank, and
folds the step's partial result into the running one with ``npu_ring_attention_update``. The port replaces only
the two NPU calls::

    torch_npu.npu_fusion_attention(...)      ->  ringattn.block_attention(..., stats="ascend")
    torch_npu.npu_ring_attention_update(...) ->  ringattn.ops.ring_attention_update(...)

Causal attention uses MindSpeed's load-balanced ("zigzag") sharding: the sequence (each document, for TND) is cut
into 2W chunks and rank r holds chunks r and 2W-1-r. At step i the key/value block comes from rank
``src = (r - i) mod W``, and only three cases occur (MindSpeed's ``causal_out_update`` branches):

* ``i == 0``: the local block, causal (top-left within the local [chunk r, chunk 2W-1-r] concatenation is exactly
  the global causal mask on these four chunk pairs);
* ``src < r``: every local query attends to the first half of the received block (chunk src), unmasked;
* ``src > r``: the second half of the local queries (chunk 2W-1-r) attends to all of the received block, unmasked.

This is the forward pass, as MindSpeed's ``AttentionWithCp.forward``; MindSpeed writes its backward ring by hand
with ``npu_fusion_attention_grad``. To train, use :func:`ringattn.ring_attention` (forward and backward ring).

Run on two processes (gloo, CPU): ``torchrun --nproc-per-node 2 examples/mindspeed_ring.py``. Each rank checks its
result against single-device attention over the whole sequence (SBH and TND) and prints the largest difference.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn import ops

# -- communication: MindSpeed's send_recv_kv ----------------------------------------------------------------------


def send_recv_kv(send_kv: torch.Tensor, recv_kv: torch.Tensor, group=None) -> list:
    """Post the send of ``send_kv`` to the next rank and the receive of ``recv_kv`` from the previous one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    ops_ = [dist.P2POp(dist.isend, send_kv, nxt, group), dist.P2POp(dist.irecv, recv_kv, prv, group)]
    return dist.batch_isend_irecv(ops_)


def ring_steps(k: torch.Tensor, v: torch.Tensor, group=None):
    """MindSpeed's step loop: yields ``(i, src, k_i, v_i)``, the key/value block of rank ``src = (r - i) mod W`` at
    step i, with the transfer of the next block posted before the caller computes on this one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_kv = torch.stack([k, v])  # one message per step: [2, ...]
    cur_kv, recv_kv, requests = send_kv, None, []
    for i in range(world):
        if requests:
            for req in requests:
                req.wait()
            cur_kv = recv_kv
        if i < world - 1:
            recv_kv = torch.empty_like(send_kv)
            requests = send_recv_kv(cur_kv, recv_kv, group)
        yield i, (rank - i) % world, cur_kv[0], cur_kv[1]


# -- SBH: q (S_local, B, H), statistics (B, N, S_local, 8) ----------------------------------------------------------


def causal_out_update_sbh(prev: tuple, cur: tuple, half: int) -> tuple:
    """Fold ``cur`` (the second half of the local queries) into rows ``[half:]`` of ``prev``."""
    out, m, s = prev
    new = ops.ring_attention_update(out[half:], m[:, :, half:], s[:, :, half:], *cur, layout="SBH")
    return (
        torch.cat([out[:half], new[0]]),
        torch.cat([m[:, :, :half], new[1]], dim=2),
        torch.cat([s[:, :, :half], new[2]], dim=2),
    )


def ring_attention_sbh(q, k, v, head_num: int, *, causal: bool, group=None) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys/values; ``(S_local, B, H)`` tensors."""
    rank = dist.get_rank(group)
    half = q.shape[0] // 2
    state = None
    for i, src, cur_k, cur_v in ring_steps(k, v, group):
        kw = {"layout": "SBH", "head_num": head_num, "stats": "ascend"}
        if not causal:
            cur = ringattn.block_attention(q, cur_k, cur_v, **kw)
            state = cur if state is None else ops.ring_attention_update(*state, *cur, layout="SBH")
        elif i == 0:
            state = ringattn.block_attention(q, cur_k, cur_v, causal=True, **kw)
        elif src < rank:  # all local queries x the sender's first chunk
            cur = ringattn.block_attention(q, cur_k[:half], cur_v[:half], **kw)
            state = ops.ring_attention_update(*state, *cur, layout="SBH")
        else:  # the local second chunk x all of the sender's keys
            cur = ringattn.block_attention(q[half:], cur_k, cur_v, **kw)
            state = causal_out_update_sbh(state, cur, half)
    return state[0]


# -- TND: packed documents, q (T_local, N, D), token-major statistics (T_local, N, 8) -------------------------------


def _cumulative(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def ring_attention_tnd(q, k, v, local_lengths: list[int], *, causal: bool, group=None) -> torch.Tensor:
    """As :func:`ring_attention_sbh` for packed documents: document j holds ``local_lengths[j]`` local tokens
    (its two zigzag chunks when causal). Statistics are token-major (``softmax_layout="TND"``), so the rows of a
    half can be picked with plain indexing, as MindSpeed's ``tnd_out_update`` does."""
    rank = dist.get_rank(group)
    cu = _cumulative(local_lengths)
    halves = [n // 2 for n in local_lengths]
    cu_half = _cumulative(halves)
    first = torch.cat([torch.arange(a, a + h) for a, h in zip(cu[:-1], halves, strict=True)])
    second = torch.cat([torch.arange(a + h, a + 2 * h) for a, h in zip(cu[:-1], halves, strict=True)])
    tnd = {"layout": "TND", "stats": "ascend", "softmax_layout": "TND"}
    upd = {"layout": "TND", "softmax_layout": "TND"}
    state = None
    for i, src, cur_k, cur_v in ring_steps(k, v, group):
        if not causal or i == 0:
            cur = ringattn.block_attention(
                q, cur_k, cur_v, causal=causal and i == 0, actual_seq_qlen=cu, actual_seq_kvlen=cu, **tnd
            )
            state = cur if state is None else ops.ring_attention_update(*state, *cur, actual_seq_qlen=cu, **upd)
        elif src < rank:  # all local queries x the first chunk of each of the sender's documents
            cur = ringattn.block_attention(
                q, cur_k[first], cur_v[first], actual_seq_qlen=cu, actual_seq_kvlen=cu_half, **tnd
            )
            state = ops.ring_attention_update(*state, *cur, actual_seq_qlen=cu, **upd)
        else:  # the second chunk of each local document x all of the sender's keys of that document
            cur = ringattn.block_attention(q[second], cur_k, cur_v, actual_seq_qlen=cu_half, actual_seq_kvlen=cu, **tnd)
            prev = tuple(x[second] for x in state)
            new = ops.ring_attention_update(*prev, *cur, actual_seq_qlen=cu_half, **upd)
            state = tuple(x.index_copy(0, second, n) for x, n in zip(state, new, strict=True))
    return state[0]


# -- sharding and the single-device check ---------------------------------------------------------------------------


def zigzag(x: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Chunks ``rank`` and ``2W-1-rank`` of ``2W`` along ``dim`` (MindSpeed's load-balanced cut)."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def check_sbh(rank: int, world: int, *, causal: bool, chunk: int = 4, batch: int = 2, heads: int = 4, kv_heads: int = 2,
              head_dim: int = 16, seed: int = 0) -> float:  # fmt: skip
    """Run the SBH ring on this rank's shard; return the largest difference from single-device SDPA.

    The sequence is ``2 * world * chunk`` tokens (zigzag needs a multiple of 2W)."""
    seq = 2 * world * chunk
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads * head_dim, generator=gen)
    k = torch.randn(seq, batch, kv_heads * head_dim, generator=gen)
    v = torch.randn(seq, batch, kv_heads * head_dim, generator=gen)
    shard = (lambda x: zigzag(x, rank, world)) if causal else (lambda x: x.chunk(world)[rank])
    got = ring_attention_sbh(*(shard(x) for x in (q, k, v)), heads, causal=causal)

    def bnsd(x, n):
        return x.view(seq, batch, n, head_dim).permute(1, 2, 0, 3)

    want = F.scaled_dot_product_attention(bnsd(q, heads), bnsd(k, kv_heads), bnsd(v, kv_heads), is_causal=causal,
                                          enable_gqa=True)  # fmt: skip
    want = want.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
    return (got - shard(want)).abs().max().item()


def check_tnd(rank: int, world: int, *, causal: bool, chunks=(2, 6, 4), heads: int = 4, kv_heads: int = 2,
              head_dim: int = 64, seed: int = 1) -> float:  # fmt: skip
    """Run the TND ring on packed documents (each cut per document); largest difference from per-document SDPA.

    Document j has ``2 * world * chunks[j]`` tokens."""
    lengths = [2 * world * c for c in chunks]
    gen = torch.Generator().manual_seed(seed)
    docs = [
        [torch.randn(n, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads)] for n in lengths
    ]  # q, k, v per document
    shard = (lambda x: zigzag(x, rank, world)) if causal else (lambda x: x.chunk(world)[rank])
    local = [[shard(x) for x in doc] for doc in docs]
    q, k, v = (torch.cat([d[i] for d in local]) for i in range(3))
    got = ring_attention_tnd(q, k, v, [d[0].shape[0] for d in local], causal=causal)
    want = []
    for dq, dk, dv in docs:
        o = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (dq, dk, dv)), is_causal=causal,
                                           enable_gqa=True)  # fmt: skip
        want.append(shard(o.transpose(0, 1)))
    return (got - torch.cat(want)).abs().max().item()


# Tolerance of the verdict: max abs difference from single-device SDPA in float32 (values of order 1; a healthy run
# measures about 1e-6; tests/integrations/test_mindspeed_example.py uses the same bound).
TOL = 1e-5


def main() -> int:
    """Every check on this rank, a PASS/FAIL line each and a verdict; returns the exit status (1 when one failed)."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    failed = []
    try:
        for causal in (False, True):
            for name, check in (("SBH", check_sbh), ("TND", check_tnd)):
                err = check(rank, world, causal=causal)
                passed = err < TOL  # NaN fails
                if not passed:
                    failed.append(f"{name} causal={causal}")
                print(f"rank {rank}/{world} {'PASS' if passed else 'FAIL'} {name} causal={causal}: max |ring - single "
                      f"device| = {err:.2e} {'<' if passed else '>='} {TOL:.0e}")  # fmt: skip
    finally:
        dist.destroy_process_group()
    if failed:
        print(f"rank {rank}/{world} FAIL: {len(failed)} of 4 checks failed: {', '.join(failed)}")
        return 1
    print(f"rank {rank}/{world} PASS: all 4 checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
