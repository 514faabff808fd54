"""Ring attention over torch.distributed: the public function, its autograd.Function and the ring loops.

The loops follow Note [ring schedule] (schedule.py); block math lives in blocks.py, transfers in
comm.py, input checks in checks.py. What a block IS (which rows meet which, and how they are computed) is the
layout plan's business (Note [layout plans]), so dense and packed batches run the same loops. Partial results
are merged by the row-merge backend of the device
(Note [row merge] in ``backends/__init__.py``), in LSE form and in place, into float32 accumulators
(float64 for float64 inputs), so nothing is rounded to 16 bits between steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _amp, backends
from ..errors import refuse_double_backward
from . import checks, ops
from .blocks import attend, attend_backward, band_pieces, compute_dtype, resolve_impl
from .comm import RingComm
from .schedule import active_steps, chunks_per_rank, step_blocks, window_step_blocks

_KV_TAG, _DKV_TAG = 0, 1

# Note [layout plans]
# -------------------
# ``ring_forward`` and ``ring_backward`` own the ring: transfers, their overlap with compute, the accumulators,
# the merges and the dk/dv hops. A layout plan (``RingConfig.plan``) owns the blocks, with three methods:
#
#   step_blocks(rank, step, world_size)  -> the blocks this rank computes at this step (step 0: one block whose
#                                           rows cover every local query, the forward's initialisation);
#   attend(q, k, v, block, cfg)          -> (o (B, Sq, N, D), lse (B, N, Sq), rows): the block's partial result
#                                           for the local query rows ``rows`` (an index of dim 1 of q);
#   attend_backward(do, q, k, v, out, lse, block, cfg, dq_acc, dk_acc, dv_acc)
#                                        -> adds the block's share of the gradients into the accumulators.
#
# Tensors are ``(B, S_local, N, D)`` views throughout. DensePlan cuts the local sequence into the chunks of
# Note [ring schedule]. PackedPlan (varlen.py) runs a packed ``(T_local, N, D)`` shard as B = 1 and applies the
# same chunk pairs to every document (Note [packed zigzag] in schedule.py); its blocks return every local row
# (rows ``slice(None)``), rows a block does not reach as empty results, which the merge leaves unchanged.


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Everything non-tensor a ring pass needs, so ``backward`` returns ``(dq, dk, dv, None)``."""

    scale: float
    impl: str  # resolved block kernel (Note [block kernels]): "flash" | "cudnn" | "efficient" | "torch"
    backend: str  # row-merge backend name for backends.for_device
    comm: Any  # RingComm, VirtualComm (virtual.py) or a test double with the same interface
    plan: Any  # layout plan (Note [layout plans]): DensePlan, or varlen.PackedPlan for packed batches


@dataclasses.dataclass(frozen=True)
class RingOptions:
    """``ring_attention``'s keyword options as the caller gave them; validated on every rank at once by
    ``checks.check_table`` (so they may hold anything until then)."""

    causal: Any = False
    softmax_scale: Any = None
    layout: Any = None
    sharding: Any = "zigzag"
    impl: Any = "auto"
    backend: Any = "auto"
    window: Any = None  # (left, right), flash-attn's convention (Note [windows] in schedule.py); None: unbounded


def _pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k and v in one flat buffer, so each step sends one message."""
    buf = torch.empty(k.numel() + v.numel(), dtype=k.dtype, device=k.device)
    k_view, v_view = _unpack_kv(buf, k.shape)
    k_view.copy_(k)
    v_view.copy_(v)
    return buf


def _unpack_kv(buf: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    n = math.prod(shape)
    return buf[:n].view(shape), buf[n:].view(shape)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, N, D)`` view as SDPA's ``(B, N, S, D)``, no copy."""
    return x.transpose(1, 2)


def _stats_rows(lse: torch.Tensor) -> torch.Tensor:
    """``(B, N, S)`` LSE as the ``(B, S, N, 1)`` stats view of Note [row merge], no copy."""
    return lse.permute(0, 2, 1).unsqueeze(-1)


class DensePlan:
    """The layout plan of dense ``(B, S_local, N, D)`` shards (Note [layout plans]): each block of
    :func:`step_blocks` (or :func:`window_step_blocks` under a window, Note [windows] in ``schedule.py``) is a pair of
    chunk slices, computed by one call of the block kernel."""

    def __init__(
        self, causal: bool, sharding: str, local_len: int, world_size: int = 1, window: tuple[int, int] | None = None
    ) -> None:
        self.causal, self.sharding = causal, sharding
        self.window = window if window is not None and tuple(window) != (-1, -1) else None
        self.chunk = local_len // chunks_per_rank(causal or self.window is not None, sharding)
        self._cache: dict[tuple[int, int, int], tuple] = {}
        self.steps = active_steps(world_size, lambda r, s: self.step_blocks(r, s, world_size))

    def step_blocks(self, rank: int, step: int, world_size: int) -> tuple:
        if self.window is None:
            return step_blocks(rank, step, world_size, causal=self.causal, sharding=self.sharding)
        key = (rank, step, world_size)
        if key not in self._cache:
            self._cache[key] = window_step_blocks(rank, step, world_size, causal=self.causal, sharding=self.sharding,
                                                  chunk=self.chunk, window=self.window)  # fmt: skip
        return self._cache[key]

    def initialises(self, rank: int, world_size: int) -> bool:
        """Whether step 0's first block covers every local query row (then it initialises the accumulators)."""
        blocks = self.step_blocks(rank, 0, world_size)
        return blocks == step_blocks(rank, 0, world_size, causal=self.causal, sharding=self.sharding)

    def _pieces(self, block: Any) -> list[tuple[slice, slice, tuple[int, int] | None]]:
        """``(query rows, key rows, band)`` of the kernel calls that compute ``block``: one for a plain block, the row
        tiles of :func:`~ringattn.ring.blocks.band_pieces` for a band (Note [windows])."""
        c = self.chunk
        q0, k0 = block.q_lo * c, block.k_lo * c
        if block.band is None:
            return [(slice(q0, block.q_hi * c), slice(k0, block.k_hi * c), None)]
        return [(slice(q0 + r.start, q0 + r.stop), slice(k0 + k.start, k0 + k.stop), band)
                for r, k, band in band_pieces(c, c, block.band)]  # fmt: skip

    def attend(self, q, k, v, block, cfg: RingConfig) -> tuple[torch.Tensor, torch.Tensor, slice]:
        pieces = self._pieces(block)
        results = [attend_slices(q, k, v, qs, ks, block.causal, cfg, band) for qs, ks, band in pieces]
        rows = slice(pieces[0][0].start, pieces[-1][0].stop)  # the tiles cover consecutive rows
        if len(results) == 1:
            return (*results[0], rows)
        return torch.cat([o for o, _ in results], dim=1), torch.cat([lse for _, lse in results], dim=2), rows

    def attend_backward(self, do, q, k, v, out, lse, block, cfg: RingConfig, dq_acc, dk_acc, dv_acc) -> None:
        for qs, ks, band in self._pieces(block):
            add_slice_gradients(do, q, k, v, out, lse, qs, ks, block.causal, cfg, dq_acc, dk_acc, dv_acc, band)


def attend_slices(
    q, k, v, qs: slice, ks: slice, causal: bool, cfg: RingConfig, band: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention of query rows ``qs`` over key rows ``ks`` of ``(B, S, N, D)`` views: ``(o (B, Sq, N, D),
    lse (B, N, Sq))``, by the block kernel ``cfg.impl``; the unit every plan computes with. ``band``: Note
    [windows] in ``schedule.py`` (every row must see a key)."""
    o, lse = attend(
        _heads_first(q[:, qs]),
        _heads_first(k[:, ks]),
        _heads_first(v[:, ks]),
        causal=causal,
        scale=cfg.scale,
        impl=cfg.impl,
        band=band,
    )
    return _heads_first(o), lse


def add_slice_gradients(do, q, k, v, out, lse, qs: slice, ks: slice, causal: bool, cfg: RingConfig, dq_acc, dk_acc,
                        dv_acc, band: tuple[int, int] | None = None) -> None:  # fmt: skip
    """Add the gradients of the block ``(qs, ks)`` (given the FINAL ``out`` and ``lse``) into the accumulators."""
    dq, dk, dv = attend_backward(
        _heads_first(do[:, qs]),
        _heads_first(q[:, qs]),
        _heads_first(k[:, ks]),
        _heads_first(v[:, ks]),
        _heads_first(out[:, qs]),
        lse[:, :, qs],
        causal=causal,
        scale=cfg.scale,
        impl=cfg.impl,
        band=band,
    )
    dq_acc[:, qs] += _heads_first(dq)
    dk_acc[:, ks] += _heads_first(dk)
    dv_acc[:, ks] += _heads_first(dv)


class Rotation:
    """How key/value blocks reach the ranks that compute on them, and their dk/dv partials get back (a strategy of
    the ring loops). The relay of Note [ring schedule] when the plan takes every step; direct sends between the ranks
    that need a block when it skips some (Note [windows] in ``schedule.py``)."""

    def __init__(self, plan: Any, comm: Any) -> None:
        self.rank, self.world = comm.rank, comm.world_size
        self.comm, self.plan = comm, plan
        self.steps: list[int] = list(plan.steps)
        self.direct = self.steps != list(range(self.world))
        self._pending: Any = None
        self._incoming: torch.Tensor | None = None
        self._total: torch.Tensor | None = None

    def needs(self, rank: int, step: int) -> bool:
        return bool(self.plan.step_blocks(rank, step, self.world))

    def post_kv(self, own: torch.Tensor, held: torch.Tensor, recv: torch.Tensor, step: int) -> Any:
        """Post the transfer into ``recv`` of the block this rank holds at ``step``; ``held`` is the current one."""
        if not self.direct:  # relay: pass the held block on to the next rank
            return self.comm.exchange(held, recv, tag=_KV_TAG)
        to, source = (self.rank + step) % self.world, (self.rank - step) % self.world
        send = own if self.needs(to, step) else None
        return self.comm.exchange(send, recv if self.needs(self.rank, step) else None, tag=_KV_TAG, send_to=to,
                                  recv_from=source)  # fmt: skip

    def return_partial(self, step: int, dkv: torch.Tensor) -> None:
        """Hand on ``dkv``, this rank's dk/dv partial for the block it holds at ``step``."""
        if self.world == 1:
            self._total = dkv
            return
        if self._pending is not None:  # the previous exchange: relay, this block's partial so far; direct, ours
            self._pending.wait()
            if self.direct:
                self._total += self._incoming
            else:
                dkv += self._incoming
        if self.direct and step == 0:
            self._total, self._pending = dkv, None
            return
        if self.direct:
            to, source = (self.rank - step) % self.world, (self.rank + step) % self.world
            self._incoming = torch.empty_like(dkv) if self.needs(source, step) else None
            send = dkv if self.needs(self.rank, step) else None
            self._pending = self.comm.exchange(send, self._incoming, tag=_DKV_TAG, send_to=to, recv_from=source)
            if self._incoming is None:
                self._incoming = torch.zeros_like(dkv)
            return
        self._incoming = torch.empty_like(dkv)
        self._pending = self.comm.exchange(dkv, self._incoming, tag=_DKV_TAG)

    def finish(self) -> torch.Tensor:
        """This rank's own block's dk/dv, every rank's share summed (relay: after one extra hop)."""
        if self._pending is not None:
            self._pending.wait()
            if self.direct:
                self._total += self._incoming
            else:
                self._total = self._incoming
        assert self._total is not None
        return self._total


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: RingConfig, sinks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ring pass on ``(B, S_local, N, D)`` tensors -> ``(out (B, S, N, D), lse (B, N, S))``.

    ``out`` has q's dtype; ``lse`` (natural log) has the accumulation dtype (float32, float64 for float64). With
    ``sinks`` (``(N,)``), both include them (Note [attention sinks]).
    """
    comm, world, plan = cfg.comm, cfg.comm.world_size, cfg.plan
    rotation = Rotation(plan, comm)
    c = compute_dtype(q.dtype)
    merge = backends.for_device(q.device, cfg.backend)
    # A backend that reads each part in its own dtype merges the block's output as it is; others get it widened.
    widen = not getattr(merge, "MIXED_PART_DTYPES", False)
    # Step 0's first block covers every local query (schedule invariant) and initialises the accumulators, except
    # under a window whose step 0 has several blocks: then they start empty (0, -inf) and every block merges.
    initialise = plan.initialises(comm.rank, world)
    acc_o = torch.empty(q.shape, dtype=c, device=q.device) if initialise else torch.zeros(q.shape, dtype=c,
                                                                                          device=q.device)  # fmt: skip
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    acc_lse = (torch.empty(lse_shape, dtype=c, device=q.device) if initialise
               else torch.full(lse_shape, float("-inf"), dtype=c, device=q.device))  # fmt: skip
    steps = rotation.steps
    kv_own = kv = _pack_kv(k, v) if len(steps) > 1 else None
    k_blk, v_blk = k, v
    for i, step in enumerate(steps):
        after = steps[i + 1] if i + 1 < len(steps) else None
        if after is not None:  # post the next block's transfer before computing on this one
            kv_next = torch.empty_like(kv_own)
            pending = rotation.post_kv(kv_own, kv, kv_next, after)
        for block in plan.step_blocks(comm.rank, step, world):
            o_rows, lse, qs = plan.attend(q, k_blk, v_blk, block, cfg)
            if step == 0 and initialise:
                acc_o.copy_(o_rows)
                acc_lse.copy_(lse)
                initialise = False
                continue
            acc_rows = acc_o[:, qs]
            o_rows = o_rows.to(c) if widen else o_rows
            lse_rows, acc_lse_rows = _stats_rows(lse), _stats_rows(acc_lse[:, :, qs])
            merge.merge_rows([acc_rows, o_rows], [acc_lse_rows, lse_rows], None, acc_rows, acc_lse_rows, None)
        if after is not None:
            pending.wait()
            kv = kv_next
            k_blk, v_blk = _unpack_kv(kv, k.shape)
    if sinks is not None:
        merge_sinks(merge, acc_o, acc_lse, sinks)
    return acc_o.to(q.dtype), acc_lse


# Note [attention sinks]
# ----------------------
# A sink (GPT-OSS's ``s_aux``) is one more logit per head in every row's softmax, carrying no value: with ``sink_n``
# the row's LSE becomes ``lse' = logaddexp(lse, sink_n)`` and its output ``out * exp(lse - lse')``. That is a merge
# with a part whose LSE is ``sink_n`` and whose output is 0, so the ring's last merge adds it to the float32
# accumulators through the row-merge backend (:func:`merge_sinks`, the zero part a stride-0 view). Backward: with
# the FINAL ``out'`` and ``lse'``, every block's ``P = exp(s - lse')`` and ``delta = rowsum(dout * out')`` are those
# of the softmax over keys and sink, so ``ring_backward`` is exact for q, k, v unchanged, and the sink's own gradient
# is the score gradient of a key whose value is 0: ``d sink_n = -sum over rows of exp(sink_n - lse') * delta``
# (:func:`sink_gradient`). Each rank returns its own rows' share, like the gradient of any parameter of a
# context-parallel model: the gradient sum over the group (``reduce_gradients`` of the transformers integration,
# DDP, FSDP) adds the ranks' shares; the virtual ring returns the total.


def merge_sinks(merge: Any, acc_o: torch.Tensor, acc_lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """Add the sink logits ``(N,)`` to the accumulators ``acc_o (B, S, N, D)``, ``acc_lse (B, N, S)`` in place."""
    b, s, n, _ = acc_o.shape
    no_value = acc_o.new_zeros(()).expand(acc_o.shape)
    sink_rows = sinks.detach().to(acc_lse.dtype).view(1, 1, n, 1).expand(b, s, n, 1)
    lse_rows = _stats_rows(acc_lse)
    merge.merge_rows([acc_o, no_value], [lse_rows, sink_rows], None, acc_o, lse_rows, None)


def sink_gradient(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """This rank's share of the sinks' gradient (Note [attention sinks]): ``dout, out (B, S, N, D)`` final, ``lse
    (B, N, S)`` final (sinks included)."""
    c = lse.dtype
    delta = (dout.to(c) * out.to(c)).sum(-1).transpose(1, 2)  # (B, N, S)
    p_sink = torch.exp(sinks.detach().to(c).view(1, -1, 1) - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def ring_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cfg: RingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward ring pass (Note [ring schedule]): ``(dq, dk, dv)`` in the dtypes of q, k, v.

    dq accumulates here; each block's dk/dv partial (accumulation dtype) gets back to its owner as the
    :class:`Rotation` says: travelling with the block and one extra hop (relay), or straight back (direct).
    """
    comm, world, plan = cfg.comm, cfg.comm.world_size, cfg.plan
    rotation = Rotation(plan, comm)
    c = compute_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=c, device=q.device)
    steps = rotation.steps
    kv_own = kv = _pack_kv(k, v) if len(steps) > 1 else None
    k_blk, v_blk = k, v
    for i, step in enumerate(steps):
        after = steps[i + 1] if i + 1 < len(steps) else None
        if after is not None:
            kv_next = torch.empty_like(kv_own)
            pending_kv = rotation.post_kv(kv_own, kv, kv_next, after)
        dkv = torch.zeros(2 * k.numel(), dtype=c, device=k.device)
        dk_blk, dv_blk = _unpack_kv(dkv, k.shape)
        for block in plan.step_blocks(comm.rank, step, world):
            plan.attend_backward(do, q, k_blk, v_blk, out, lse, block, cfg, dq_acc, dk_blk, dv_blk)
        rotation.return_partial(step, dkv)
        if after is not None:
            pending_kv.wait()
            kv = kv_next
            k_blk, v_blk = _unpack_kv(kv, k.shape)
    dk, dv = _unpack_kv(rotation.finish(), k.shape)
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, cfg: RingConfig
    ) -> Any:
        out, lse = ring_forward(q, k, v, cfg, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: Any) -> Any:
        refuse_double_backward("ring attention")
        q, k, v, out, lse, sinks = ctx.saved_tensors
        with _amp.autocast_off(q):
            dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.cfg)
            dsinks = sink_gradient(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None


def prepare(
    q: Any, k: Any, v: Any, options: RingOptions, comm: Any, *, needs_grad: bool | None = None, sinks: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RingConfig]:
    """Validate one rank's call on every rank (one all-gather) and return its ``(B, S_local, N, D)`` views and
    :class:`RingConfig`. ``needs_grad`` (default: grad mode on and an input requiring grad) is compared across
    ranks: a rank that skipped the backward would leave the others blocked in it."""
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, sinks)
        )
    merge = local_merge_backend(q, options.backend)
    row = checks.encode(q, k, v, options, needs_grad=needs_grad, merge=merge, sinks=sinks)
    table = comm.all_gather_ints(row)
    checks.check_table(table, options)
    if options.layout == "BNSD":
        q, k, v = (_heads_first(x) for x in (q, k, v))
    scale = options.softmax_scale if options.softmax_scale is not None else q.shape[-1] ** -0.5
    impl = resolve_impl(options.impl, q.device, q.dtype, q.shape[-1])
    # A ring of one holds the whole sequence in order, whatever the sharding: no chunks (any length, odd included).
    sharding = options.sharding if comm.world_size > 1 else "contiguous"
    window = checks.window_of(options.window)
    plan = DensePlan(bool(options.causal), sharding, q.shape[1], comm.world_size, window)
    backend = checks.agreed_merge_backend(table)
    cfg = RingConfig(float(scale), impl, backend, comm, plan)  # the plan holds causal and the sharding
    return q, k, v, cfg


def local_merge_backend(q: Any, backend: Any) -> str | None:
    """The row-merge backend this rank could run the ring's merges with now (Note [one merge backend per ring] in
    ``checks.py``), None when the inputs or ``backend`` are invalid (the check table then raises on every rank).

    For ``auto`` on CPU, one merge of a single row in the ring's argument types answers (and queues the fused
    kernel's compile when it is not ready); nothing here raises, since an error on one rank alone would leave the
    others blocked in the all-gather."""
    try:
        if backend not in checks.MERGE_BACKENDS or not isinstance(q, torch.Tensor) or not q.is_floating_point():
            return None
        merge = backends.for_device(q.device, backend)
        if not isinstance(merge, backends.AutoBackend):
            return merge.NAME
        c = compute_dtype(q.dtype)
        acc_o, part_o = (torch.zeros((1, 1, 1, 1), dtype=c, device=q.device) for _ in range(2))
        acc_lse, part_lse = (torch.zeros((1, 1, 1, 1), dtype=c, device=q.device) for _ in range(2))
        merge.merge_rows([acc_o, part_o], [acc_lse, part_lse], None, acc_o, acc_lse, None)
        return backends.ran(merge)
    except Exception:  # noqa: BLE001 - reported as "unknown": the ring then runs the portable backend
        return None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    /,
    *,
    layout: str | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    sharding: str = "zigzag",
    return_lse: bool = False,
    impl: str = "auto",
    backend: str = "auto",
    sinks: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    timeout: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries over the keys/values of every rank of ``group``.

    Every rank of ``group`` calls this with its local shard; the result is what single-device attention
    over the whole sequence gives for this rank's query tokens. Differentiable in q, k and v (first order: a
    double backward raises AutogradError). To run every rank of a ring in one process (debugging, tests, one
    GPU), see :func:`ringattn.simulate_ring_attention`.

    Parameters
    ----------
    q : Tensor ``(B, S_local, N, D)`` (layout ``"BSND"``) or ``(B, N, S_local, D)`` (``"BNSD"``)
        float16, bfloat16, float32 or float64; any strides; CPU (gloo) or CUDA (NCCL). ``S_local`` may be 0 (on
        every rank alike: shards have the same length on every rank).
    k, v : Tensor, like q but with ``Nkv`` heads, ``N % Nkv == 0`` (GQA/MQA; they travel unrepeated)
        Same dtype and device as q (under ``torch.autocast``: any floating dtypes, as SDPA takes them there), same
        shape as each other. Non-causal: any ``S_local`` (may differ from q's). Causal: the same ``S_local`` as q.
    layout : {"BSND", "BNSD"}, required
        How q, k, v are laid out: ``"BSND"`` (flash-attn's and transformers' order) or ``"BNSD"``
        (``F.scaled_dot_product_attention``'s). Never guessed: the shapes of one are valid shapes of the other.
    causal : bool
        Mask key positions after the query position, in GLOBAL sequence order as set by ``sharding``.
    softmax_scale : float, optional
        Multiplies the scores; default ``1 / sqrt(D)``. Must be the same on every rank.
    group : ProcessGroup or DeviceMesh, optional
        The ring (default: the default group). Without an initialised process group the call is a ring of one and
        computes plain attention, unless the environment says this process is one of several ranks (``WORLD_SIZE``
        > 1, as torchrun sets it): then ConfigError (Note [launched without a process group] in ``ring/comm.py``).
        A DeviceMesh: 1-D, or with a dimension named ``"cp"`` (the ring is then ``mesh["cp"]``, as in torchtitan's
        ``dp x cp`` meshes).
    sharding : {"zigzag", "contiguous"}
        How the global sequence was cut (matters only when causal). ``"zigzag"``: the sequence is cut
        into ``2W`` chunks and rank r holds chunks ``r`` and ``2W-1-r`` concatenated (:func:`shard_sequence`);
        balanced, ``S_local`` must be even when ``W > 1``. ``"contiguous"``: rank r holds the r-th of W chunks.
    return_lse : bool
        Also return the log-sum-exp (not differentiable).
    impl : {"auto", "sdpa", "cudnn", "flash", "efficient", "torch"}
        Block kernel (Note [block kernels] in ``ring/blocks.py``): ``"auto"`` picks the fastest fused kernel
        that runs the call (cuDNN, then FlashAttention-2, then memory-efficient on CUDA; PyTorch's flash
        kernel on CPU) and plain torch for float64; ``"sdpa"`` the same among fused kernels only.
    backend : str
        Row-merge backend of ``ringattn.backends.for_device`` (``"auto"``: the device's fused one once every
        rank has it ready, the same on every rank and step: Note [one merge backend per ring] in ``checks.py``).
    sinks : Tensor ``(N,)``, optional
        Attention sinks (GPT-OSS): one learned logit per query head added to every row's softmax, with no value
        (Note [attention sinks]); floating, q's device, the same on every rank. Differentiable: each rank's gradient
        is its own rows' share (the gradient sum over the group adds them, as for every parameter).
    window : (left, right), optional
        A sliding window in flash-attn's convention (``window_size``): the query at global position i sees the keys
        ``i - left .. i + right`` (-1: unbounded on that side; with ``causal``, ``right`` is at most 0). Blocks
        outside every window are not computed and ring steps no rank needs are not taken (Note [windows] in
        ``schedule.py``). ``None`` or ``(-1, -1)``: no window. The same on every rank.
    timeout : float or timedelta, optional
        Seconds any wait for another rank may last before CommTimeoutError (Note [bounded waits] in
        ``ring/comm.py``); default ``RINGATTN_COMM_TIMEOUT`` from the environment, else 600.

    Returns
    -------
    out : Tensor, shape and layout of q, q's dtype (the autocast dtype under ``torch.autocast``, Note [autocast]
        in ``_amp.py``), contiguous in BSND order
    lse : Tensor ``(B, N, S_local)``, natural log of the sum of ``exp(scaled score)`` over all keys
        each query sees (``-inf`` for a query that sees none); float32 (float64 for float64 inputs). Only
        with ``return_lse=True``.

    Raises
    ------
    ShapeError, DTypeError, DeviceError, LayoutError, BackendError, ConfigError
        On every rank of the group, when any rank's inputs or options are invalid (``layout`` not given
        included) or ranks disagree on shapes, dtypes, device types, options, ``softmax_scale`` or on whether a
        backward will run (checked with one small all_gather before any transfer).
    AutogradError
        A double backward (``create_graph=True`` through the ring).
    CommTimeoutError
        On every rank still taking part, when another rank stops taking part (Note [bounded waits]).
    """
    options = RingOptions(causal, softmax_scale, layout, sharding, impl, backend, window)

    # The op ringattn::ring_attention, or this direct eager call (Note [ring under torch.compile] in ops.py)
    def direct() -> Any:
        comm = RingComm(ops.process_group(group), timeout=timeout)
        return run_ring(q, k, v, comm, options, return_lse=return_lse, sinks=sinks)

    return ops.call(q, k, v, None, group, options, return_lse, direct, sinks=sinks, timeout=timeout)


def run_ring(
    q: Any, k: Any, v: Any, comm: Any, options: RingOptions, *, return_lse: bool = False, sinks: Any = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention` over ``comm`` (a ``RingComm``, or a test double of its interface)."""
    q, k, v = _amp.cast_inputs(q, k, v)
    with _amp.autocast_off(q, k, v):
        q4, k4, v4, cfg = prepare(q, k, v, options, comm, sinks=sinks)
        out, lse = _RingAttention.apply(q4, k4, v4, sinks, cfg)
    if options.layout == "BNSD":
        out = _heads_first(out)
    return (out, lse) if return_lse else out
