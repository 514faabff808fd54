"""The virtual ring: every rank of a ring attention in one process, through the code real ranks run.

Note [virtual ring]
-------------------
:func:`simulate_ring_attention` cuts full-sequence tensors into the shards of ``world_size`` ranks and runs
each rank's part of the ring (the same ``prepare`` checks, ``ring_forward`` and ``ring_backward`` as
:func:`ring_attention`) in a Python thread of its own, with a :class:`VirtualComm` in place of ``RingComm``:
``exchange`` hands the sent buffer to the next rank, which copies it into its receive buffer, exactly where a
real rank would receive it. So forward and backward see the real schedule, blocks, merges and messages.

Virtual rank r always runs on the same long-lived worker thread (kernels keep per-thread caches). Only one
virtual rank runs at a time. A rank holds the *baton* until it must wait for a message (or a
collective), then passes it to the next rank in ring order. That keeps runs deterministic (the virtual ring
gives bitwise the results of spawned gloo ranks with the same thread count), never launches two kernels at
once (numba's default threading layer aborts on concurrent calls; CUDA work lands on one stream in one
order), and turns a schedule that would deadlock real ranks into an error instead of a hang: a full round of
ranks that all wait is reported, with the CommTimeoutError real ranks raise when a peer stops taking part.
The time of a virtual ring is therefore the SUM of all ranks' work on one device, which is what
``ringattn bench ring --virtual W`` compares with single-device attention.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch

from .. import _amp
from ..errors import CommTimeoutError, ConfigError, ShapeError, expected, refuse_double_backward
from . import ops
from .attention import (
    RingOptions,
    _heads_first,
    prepare,
    ring_backward,
    ring_forward,
    sink_gradient,
)
from .comm import TRAFFIC, Pending
from .schedule import next_rank, packed_local_offsets
from .sharding import document_lengths, shard_packed, shard_sequence, unshard_packed, unshard_sequence
from .varlen import prepare_varlen


class _Aborted(Exception):
    """Raised in the other virtual ranks when one rank failed (the first failure is re-raised)."""


class _Message:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.received = False


class _Baton:
    """Shared state of one virtual ring run: whose turn it is, mailboxes, gathered rows, the first failure."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.turn = 0
        self.finished = [False] * world_size
        self.idle_passes = 0  # baton passes in a row by ranks that could not proceed
        self.mail: dict[tuple[int, int, int], deque[_Message]] = defaultdict(deque)  # (receiver, sender, tag)
        self.rows: dict[int, dict[int, list[int]]] = defaultdict(dict)  # all_gather round -> rank -> row
        self.failure: BaseException | None = None

    def wait_until(self, rank: int, ready: Callable[[], bool]) -> None:
        """Return once it is ``rank``'s turn and ``ready()`` holds (checked under the lock); pass the baton on
        while it does not. Raises ``_Aborted`` when another rank failed, CommTimeoutError on a deadlock (the error
        real ranks raise when a peer stops taking part, Note [bounded waits] in ``comm.py``)."""
        with self.cond:
            while True:
                if self.failure is not None:
                    raise _Aborted
                if self.turn == rank:
                    if ready():
                        self.idle_passes = 0
                        return
                    self.idle_passes += 1
                    if self.idle_passes > 2 * self.finished.count(False):
                        waiting = [r for r in range(self.world_size) if not self.finished[r]]
                        done = [r for r in range(self.world_size) if self.finished[r]]
                        raise CommTimeoutError(
                            f"virtual ring: rank {rank} of {self.world_size} waits for a message or collective no "
                            f"rank will send: ranks {waiting} all wait, ranks {done} have ended (a rank that stopped "
                            "taking part, or a deadlock of the ring schedule); detected at once, without a timeout"
                        )
                    self._pass(rank)
                    if self.turn == rank:  # every other rank has ended: nobody to wake this one, check again
                        continue
                self.cond.wait()

    def _pass(self, rank: int) -> None:
        for step in range(1, self.world_size + 1):
            candidate = (rank + step) % self.world_size
            if not self.finished[candidate]:
                self.turn = candidate
                break
        self.cond.notify_all()

    def finish(self, rank: int, failure: BaseException | None) -> None:
        with self.cond:
            self.finished[rank] = True
            if failure is not None and self.failure is None:
                self.failure = failure
            self.idle_passes = 0
            self._pass(rank)


class VirtualComm:
    """``RingComm``'s interface for one virtual rank (Note [virtual ring])."""

    def __init__(self, baton: _Baton, rank: int) -> None:
        self.baton, self.rank, self.world_size = baton, rank, baton.world_size
        self._gathers = 0

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        baton, round_ = self.baton, self._gathers
        self._gathers += 1
        with baton.cond:
            baton.rows[round_][self.rank] = list(values)
        baton.wait_until(self.rank, lambda: len(baton.rows[round_]) == self.world_size)
        return [baton.rows[round_][r] for r in range(self.world_size)]

    def exchange(
        self,
        send: torch.Tensor | None,
        recv: torch.Tensor | None,
        *,
        tag: int = 0,
        send_to: int | None = None,
        recv_from: int | None = None,
    ) -> Pending:
        """``RingComm.exchange``: messages are kept per (receiver, sender, tag), as P2P transports match them."""
        to = next_rank(self.rank, self.world_size) if send_to is None else send_to
        source = (self.rank - 1) % self.world_size if recv_from is None else recv_from
        TRAFFIC.record(send)
        message = _Message(send) if send is not None else None
        if message is not None:
            with self.baton.cond:
                self.baton.mail[to, self.rank, tag].append(message)
        return _VirtualPending(self, recv, source, tag, message)


class _VirtualPending(Pending):
    """One posted exchange of a virtual rank: ``wait`` receives into ``recv``, then waits until the message
    this rank sent has been received (as a completed real send would)."""

    def __init__(
        self, comm: VirtualComm, recv: torch.Tensor | None, source: int, tag: int, sent: _Message | None
    ) -> None:
        super().__init__([], (recv,))
        self._comm, self._recv, self._source, self._tag, self._sent = comm, recv, source, tag, sent

    def wait(self) -> None:
        baton, rank = self._comm.baton, self._comm.rank
        if self._recv is not None:
            box = baton.mail[rank, self._source, self._tag]
            baton.wait_until(rank, lambda: len(box) > 0)
            message = box.popleft()
            self._recv.copy_(message.tensor)
            message.received = True
        if self._sent is not None:
            sent = self._sent
            baton.wait_until(rank, lambda: sent.received)


class _Worker:
    """One long-lived thread that runs virtual rank ``r`` of every virtual ring. Threads are reused across calls
    because kernels keep per-thread state: PyTorch's cuDNN attention caches its execution plans per thread, and
    a fresh thread per call rebuilt them every time (2.6 s of host time per forward+backward on an H100 at
    W = 8, against 0.1 s of kernels)."""

    def __init__(self, rank: int) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"ringattn-virtual-rank-{rank}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            task = self.tasks.get()
            task()


_WORKERS: list[_Worker] = []
_ONE_RING_AT_A_TIME = threading.Lock()


def run_virtual_ranks(world_size: int, fn: Callable[[VirtualComm], Any]) -> list[Any]:
    """``[fn(comm_0), ..., fn(comm_{W-1})]``, rank r on worker thread r, under one baton; the first exception of
    any rank is raised here (after every rank has ended). One virtual ring runs at a time per process."""
    baton = _Baton(world_size)
    results: list[Any] = [None] * world_size
    grad_mode = torch.is_grad_enabled()
    done = threading.Semaphore(0)

    def task(rank: int) -> None:
        failure = None
        try:
            baton.wait_until(rank, lambda: True)
            with torch.set_grad_enabled(grad_mode):
                results[rank] = fn(VirtualComm(baton, rank))
        except _Aborted:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            failure = exc
        baton.finish(rank, failure)
        done.release()

    with _ONE_RING_AT_A_TIME:
        while len(_WORKERS) < world_size:
            _WORKERS.append(_Worker(len(_WORKERS)))
        for rank in range(world_size):
            _WORKERS[rank].tasks.put(lambda r=rank: task(r))
        for _ in range(world_size):
            done.acquire()
    if baton.failure is not None:
        raise baton.failure
    return results


@dataclasses.dataclass(frozen=True)
class _Plan:
    world_size: int
    options: RingOptions
    seq_dim: int  # of the caller's layout
    cu_seqlens: torch.Tensor | None = None  # a packed batch (T, N, D): per-document zigzag shards

    def prepare(self, q, k, v, comm, needs_grad: bool, sinks=None):
        """One rank's ``prepare`` (dense) or ``prepare_varlen`` (packed): ``(B, S_local, N, D)`` views and config."""
        if self.cu_seqlens is None:
            return prepare(q, k, v, self.options, comm, needs_grad=needs_grad, sinks=sinks)
        return prepare_varlen(q, k, v, self.cu_seqlens, self.options, comm, needs_grad=needs_grad, sinks=sinks)


def _sharding(plan: _Plan) -> str:
    """The cut of the sequence: a ring of one holds it whole and in order, whatever the sharding (any length)."""
    return plan.options.sharding if plan.world_size > 1 else "contiguous"


def _shards(x: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    if plan.cu_seqlens is not None:
        return [shard_packed(x, plan.cu_seqlens, r, plan.world_size) for r in range(plan.world_size)]
    return [
        shard_sequence(x, r, plan.world_size, sharding=_sharding(plan), dim=plan.seq_dim)
        for r in range(plan.world_size)
    ]


def _unshard(shards: list[torch.Tensor], plan: _Plan, dim: int) -> torch.Tensor:
    """The full sequence from the ring's ``(B, S_local, ...)`` results (packed: ``B = 1``, dropped here)."""
    if plan.cu_seqlens is not None:
        return unshard_packed(shards, plan.cu_seqlens, dim=dim).squeeze(0)
    return unshard_sequence(shards, sharding=_sharding(plan), dim=dim)


def virtual_forward(q, k, v, sinks: Any, plan: _Plan, needs_grad: bool) -> tuple:
    """Every virtual rank's forward: ``(out, lse, per_rank)``, out in the caller's layout, ``per_rank`` the
    ``((q_r, k_r, v_r, out_r, lse_r), cfg)`` of each rank that its backward needs."""
    shards = list(zip(*(_shards(x, plan) for x in (q, k, v)), strict=True))

    def rank_forward(comm: VirtualComm):
        q_r, k_r, v_r, cfg = plan.prepare(*shards[comm.rank], comm, needs_grad, sinks)
        out, lse = ring_forward(q_r, k_r, v_r, cfg, sinks)
        return (q_r, k_r, v_r, out, lse), cfg

    per_rank = run_virtual_ranks(plan.world_size, rank_forward)
    out = _unshard([saved[3] for saved, _ in per_rank], plan, dim=1)  # (B, S, N, D); packed (T, N, D)
    lse = _unshard([saved[4] for saved, _ in per_rank], plan, dim=2)  # (B, N, S); packed (N, T)
    if plan.options.layout == "BNSD":
        out = _heads_first(out)
    return out, lse, per_rank


def virtual_backward(dout: torch.Tensor, per_rank: list, plan: _Plan, sinks: Any) -> tuple:
    """``(dq, dk, dv, dsinks)`` of the whole sequence (the caller's layout; dsinks None without sinks) from
    :func:`virtual_forward`'s ``per_rank``."""
    douts = _shards(dout, plan)

    def rank_backward(comm: VirtualComm):
        (q_r, k_r, v_r, out, lse), cfg = per_rank[comm.rank]
        do_r = _heads_first(douts[comm.rank]) if plan.options.layout == "BNSD" else douts[comm.rank]
        do_r = do_r.unsqueeze(0) if plan.cu_seqlens is not None else do_r
        grads = ring_backward(do_r, q_r, k_r, v_r, out, lse, dataclasses.replace(cfg, comm=comm))
        return (*grads, sink_gradient(do_r, out, lse, sinks) if sinks is not None else None)

    grads = run_virtual_ranks(plan.world_size, rank_backward)
    full = [_unshard([g[i] for g in grads], plan, dim=1) for i in range(3)]  # (B, S, N, D) or (T, N, D) each
    if plan.options.layout == "BNSD":
        full = [_heads_first(g) for g in full]
    dsinks = torch.stack([g[3] for g in grads]).sum(0) if sinks is not None else None  # every rank's rows
    return (*full, dsinks)


class _CheckedRank:
    """Virtual rank ``rank`` of a call the forward checked: its all_gather returns its own row for every rank."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values) for _ in range(self.world_size)]


def rebuild_per_rank(q, k, v, out, lse, sinks: Any, plan: _Plan) -> list:
    """:func:`virtual_forward`'s ``per_rank`` from the call's inputs and outputs (the op's backward saves only
    tensors): each rank's shards, and its configuration as ``prepare`` makes it, without the forward's checks."""
    plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, backend="torch"))  # no probe merge
    per_rank = []
    for rank, inputs in enumerate(zip(*(_shards(x, plan) for x in (q, k, v)), strict=True)):
        q_r, k_r, v_r, cfg = plan.prepare(*inputs, _CheckedRank(rank, plan.world_size), True, sinks)
        if plan.cu_seqlens is not None:
            out_r = shard_packed(out, plan.cu_seqlens, rank, plan.world_size).unsqueeze(0)
            lse_r = shard_packed(lse, plan.cu_seqlens, rank, plan.world_size, dim=1).unsqueeze(0)
        else:
            out_r = _shards(out, plan)[rank]
            out_r = _heads_first(out_r) if plan.options.layout == "BNSD" else out_r
            lse_r = shard_sequence(lse, rank, plan.world_size, sharding=_sharding(plan), dim=2)
        per_rank.append(((q_r, k_r, v_r, out_r, lse_r), cfg))
    return per_rank


class _VirtualRing(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Any, plan: _Plan, needs_grad: bool
    ) -> Any:
        out, lse, ctx.per_rank = virtual_forward(q, k, v, sinks, plan, needs_grad)
        ctx.plan = plan
        ctx.save_for_backward(sinks)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: Any) -> Any:
        refuse_double_backward("simulate_ring_attention")
        (sinks,) = ctx.saved_tensors
        return (*virtual_backward(dout, ctx.per_rank, ctx.plan, sinks), None, None)


def simulate_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    /,
    *,
    world_size: int,
    causal: bool | None = None,
    softmax_scale: float | None = None,
    layout: str | None = None,
    sharding: str = "zigzag",
    return_lse: bool = False,
    impl: str = "auto",
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ring attention of ``world_size`` virtual ranks in this process, on FULL-sequence tensors.

    Cuts q, k, v into the shards of ``world_size`` ranks (``sharding``), runs every rank's part of
    :func:`ringattn.ring_attention` on them with real message buffers passed between the virtual ranks
    (Note [virtual ring] in ``ring/virtual.py``), and puts the output back in sequence order. The result is
    what ``world_size`` real ranks compute, on one device: for debugging context parallelism on a laptop,
    testing, and measuring the cost of the decomposition on one GPU. Differentiable in q, k and v.

    Parameters
    ----------
    q, k, v : Tensor ``(B, S, N, D)`` / ``(B, S, Nkv, D)`` (layout ``"BSND"``) or ``(B, N, S, D)`` (``"BNSD"``)
        The whole sequence; as :func:`ringattn.ring_attention` takes them otherwise. ``S`` must be a multiple
        of ``2 * world_size`` (zigzag, ``world_size > 1``) or ``world_size`` (contiguous, or a ring of one). Under
        ``torch.autocast`` q, k, v are cast as SDPA casts them (Note [autocast] in ``_amp.py``). First-order
        gradients only (a double backward raises AutogradError).
    world_size : int
        Number of virtual ranks, >= 1.
    causal : bool, optional
        As in the function simulated; default (None) its default: False for :func:`ringattn.ring_attention`, True
        for :func:`ringattn.ring_attention_varlen` (with ``cu_seqlens``).
    layout : {"BSND", "BNSD"}
        Required for dense inputs, as in :func:`ringattn.ring_attention`; not used with ``cu_seqlens``.
    softmax_scale, sharding, impl, backend
        As in :func:`ringattn.ring_attention`.
    return_lse : bool
        Also return the log-sum-exp ``(B, N, S)`` (natural log, float32; float64 for float64 inputs).
    sinks : Tensor ``(N,)``, optional
        Attention sinks, as in :func:`ringattn.ring_attention`; the gradient is the total over every virtual rank.
    window : (left, right), optional
        A sliding window, as in :func:`ringattn.ring_attention` (packed: within each document).
    cu_seqlens : Tensor, optional
        A PACKED batch: q, k, v are ``(T, N, D)`` / ``(T, Nkv, D)``, documents end to end with cumulative lengths
        ``cu_seqlens`` (int64 ``[0, ..., T]``), and every rank runs :func:`ringattn.ring_attention_varlen` on its
        :func:`ringattn.shard_packed` shard (``layout`` and ``sharding`` do not apply; any T works). The output is
        ``(T, N, D)`` in packed order, the LSE ``(N, T)``.

    Returns
    -------
    out : Tensor, the shape and layout of q, in sequence order (and ``lse`` with ``return_lse=True``).

    Raises
    ------
    ConfigError
        ``world_size`` is not an int >= 1.
    ShapeError
        The sequence length does not divide into the shards.
    The errors of :func:`ringattn.ring_attention` for invalid inputs or options.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(expected("world_size", "an int >= 1", repr(world_size)))
    if cu_seqlens is not None:
        options = RingOptions(True if causal is None else causal, softmax_scale, "TND", "zigzag", impl, backend, window)
    else:
        options = RingOptions(False if causal is None else causal, softmax_scale, layout, sharding, impl, backend,
                              window)  # fmt: skip

    def direct() -> Any:
        q_, k_, v_ = _amp.cast_inputs(q, k, v)  # Note [autocast] in _amp.py
        with _amp.autocast_off(q_, k_, v_):
            plan = checked_plan(q_, k_, v_, world_size, options, cu_seqlens, sinks)
            needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q_, k_, v_, sinks))
            out, lse = _VirtualRing.apply(q_, k_, v_, sinks, plan, needs_grad)
        return (out, lse) if return_lse else out

    # The op ringattn::simulate_ring_attention, or the direct eager call (Note [ring under torch.compile] in ops.py)
    return ops.call(q, k, v, cu_seqlens, None, options, return_lse, direct, sinks=sinks, world_size=world_size)


def checked_plan(q, k, v, world_size: int, options: RingOptions, cu_seqlens: Any, sinks: Any) -> _Plan:
    """The whole call's checks, raising here (one process): as a ring of one, then whether the sequence cuts into
    ``world_size`` shards; every virtual rank checks its shard again through the all-gather, as real ranks do."""
    if cu_seqlens is not None:
        return _checked_packed_plan(q, k, v, cu_seqlens, world_size, options, sinks)
    prepare(q, k, v, options, _SoloComm(), needs_grad=False, sinks=sinks)  # sharding needs valid tensors
    seq_dim = 1 if options.layout == "BSND" else 2
    sharding = options.sharding
    chunks = 2 * world_size if sharding == "zigzag" and world_size > 1 else world_size
    for name, x in (("q", q), ("k", k)):
        if x.shape[seq_dim] % chunks:
            raise ShapeError(
                expected(
                    f"{name}.shape[{seq_dim}]",
                    f"a sequence length divisible by {chunks} ({sharding} sharding over {world_size} ranks)",
                    x.shape[seq_dim],
                )
            )
    return _Plan(world_size, options, seq_dim)


def _checked_packed_plan(q, k, v, cu_seqlens, world_size: int, options: RingOptions, sinks: Any) -> _Plan:
    # The whole batch checked as a ring of one holding it all (cu_seqlens must end at T; its W = 1 slot count is
    # not asked of q), then every virtual rank checks its shard through the all-gather, as real ranks do.
    if isinstance(q, torch.Tensor) and q.dim() >= 1:
        for name, x in (("k", k), ("v", v)):
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != q.shape[0]:
                raise ShapeError(expected(f"{name}.shape[0]", f"{q.shape[0]} tokens like q (packed batch)", x.shape[0]))
        document_lengths(cu_seqlens, total=q.shape[0], total_name="q.shape[0]")
    slots = packed_local_offsets(document_lengths(cu_seqlens), 1)[-1]
    # Stand-ins of the W = 1 shards for the checks, which read shapes, dtypes and devices only (zero strides: no copy).
    solo = [
        x.new_zeros(()).as_strided((slots, *x.shape[1:]), (0,) * x.dim())
        if isinstance(x, torch.Tensor) and x.dim() >= 1
        else x
        for x in (q, k, v)
    ]
    prepare_varlen(*solo, cu_seqlens, options, _SoloComm(), needs_grad=False, sinks=sinks)
    return _Plan(world_size, options, 0, cu_seqlens)


class _SoloComm:
    """A ring of one for the whole-call checks."""

    rank, world_size = 0, 1

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values)]
