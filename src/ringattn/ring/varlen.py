"""Ring attention over packed variable-length batches: ``ring_attention_varlen`` and its layout plan.

A packed batch holds documents end to end, ``(T, N, D)`` with ``cu_seqlens = [0, L_0, L_0 + L_1, ..., T]``; no
token attends across a document boundary. Ranks hold per-document zigzag shards (Note [packed zigzag] in
``schedule.py``), and the ring is the dense ring's own loop (``ring_forward`` / ``ring_backward``) with a
:class:`PackedPlan` in place of the dense plan (Note [layout plans] in ``attention.py``).

Note [packed blocks]
--------------------
A :class:`~ringattn.ring.schedule.PackedBlock` is, per document, a prefix of local query rows against a prefix
of received key rows, unmasked or top-left causal. Two ways to compute it:

* CUDA FlashAttention-2 (``impl`` resolves to ``flash`` on CUDA, what ``auto`` picks for fp16/bf16 there):
  the query rows of all documents are gathered into one contiguous ``(total_q, N, D)`` buffer, the key/value
  rows into ``(total_k, Nkv, D)`` (GQA/MQA unrepeated), and ONE ``aten._flash_attention_forward`` /
  ``_flash_attention_backward`` call with int32 ``cu_seqlens_q`` / ``cu_seqlens_k`` on the device computes every
  document (FA2's varlen kernels). Contract: q/k/v/out/dout contiguous, cumulative lengths int32 contiguous on
  q's device, the LSE ``(N, total_q)`` float32 contiguous (the varlen kernels' own layout, unpadded). Results
  are scattered back to their rows (dq/dk/dv added in the accumulation dtype). ``tests/ring/cuda_doubles.py``
  holds a CPU double that asserts exactly this contract.
* Everywhere else (CPU; cuDNN / memory-efficient / plain-torch kernels on CUDA): per-document slices of the
  dense block kernels (``blocks.attend`` / ``blocks.attend_backward`` on views, no copies), one call per
  document and block, documents without work skipped.

Either way the block returns ALL local rows: rows it does not reach (other chunks, padding slots) are empty
results, output 0 and LSE -inf, which the ring's row merge leaves unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _amp
from . import blocks, checks, ops
from .attention import (
    RingConfig,
    RingOptions,
    _RingAttention,
    add_slice_gradients,
    attend_slices,
    local_merge_backend,
)
from .blocks import ATEN, KERNELS, band_pieces, compute_dtype, resolve_impl
from .comm import RingComm
from .schedule import PackedBlock, active_steps, packed_step_blocks, packed_window_step_blocks
from .sharding import document_lengths


def resolve_packed_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The block kernel of the packed ring: as :func:`blocks.resolve_impl`, except that ``auto`` / ``sdpa`` on CUDA
    prefer FlashAttention-2, whose varlen entry point runs every document of a block in one call."""
    if impl in ("auto", "sdpa") and blocks.device_type(device) == "cuda":
        if KERNELS["cuda", "flash"].unsupported(device, dtype, head_dim) is None:
            return "flash"
    return resolve_impl(impl, device, dtype, head_dim)


class PackedPlan:
    """Layout plan of packed ``(1, T_local, N, D)`` shards (Note [layout plans], Note [packed blocks])."""

    def __init__(
        self,
        lengths: list[int],
        causal: bool,
        impl: str,
        device: torch.device,
        world_size: int = 1,
        window: tuple[int, int] | None = None,
    ) -> None:
        self.lengths, self.causal, self.window = lengths, causal, window
        # FA2's varlen call takes one window for every document; a window's bands differ per document: per document.
        self.varlen = impl == "flash" and blocks.device_type(device) == "cuda" and window is None
        self._blocks: dict[tuple[int, int, int], tuple[PackedBlock, ...]] = {}
        self._indices: dict[int, tuple] = {}
        self.steps = active_steps(world_size, lambda r, s: self.step_blocks(r, s, world_size))

    def initialises(self, rank: int, world_size: int) -> bool:
        return True  # step 0's one block returns every local row

    def step_blocks(self, rank: int, step: int, world_size: int) -> tuple[PackedBlock, ...]:
        key = (rank, step, world_size)
        if key not in self._blocks:
            if self.window is None:
                blocks = packed_step_blocks(self.lengths, rank, step, world_size, causal=self.causal)
            else:
                blocks = packed_window_step_blocks(self.lengths, rank, step, world_size, causal=self.causal,
                                                   window=self.window)  # fmt: skip
            if step == 0 and not blocks:  # no real local token: still one (empty) block to initialise the output
                blocks = (PackedBlock(self.causal, (), (), (), ()),)
            self._blocks[key] = blocks
        return self._blocks[key]

    # --- forward ---------------------------------------------------------------------------------------------

    def attend(self, q, k, v, block: PackedBlock, cfg: RingConfig) -> tuple[torch.Tensor, torch.Tensor, slice]:
        _, t, n, _ = q.shape
        o = q.new_zeros((1, t, n, v.shape[-1]))
        lse = torch.full((1, n, t), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
        if block.q_len and self.varlen:
            q_idx, k_idx, cu_q, cu_k, max_q, max_k = self._varlen_indices(block, q.device)
            o_g, lse_g = ATEN["flash_varlen"](
                q[0].index_select(0, q_idx),
                k[0].index_select(0, k_idx),
                v[0].index_select(0, k_idx),
                cu_q, cu_k, max_q, max_k, 0.0, block.causal, False, scale=cfg.scale,
            )[:2]  # fmt: skip
            o[0].index_copy_(0, q_idx, o_g)
            lse[0].index_copy_(1, q_idx, lse_g.to(lse.dtype))
            return o, lse, slice(None)
        for qs, ks, causal, band in _document_pieces(block):
            o[:, qs], lse[:, :, qs] = attend_slices(q, k, v, qs, ks, causal, cfg, band)
        return o, lse, slice(None)

    # --- backward --------------------------------------------------------------------------------------------

    def attend_backward(self, do, q, k, v, out, lse, block: PackedBlock, cfg: RingConfig, dq_acc, dk_acc, dv_acc):
        if not block.q_len:
            return
        if self.varlen:
            q_idx, k_idx, cu_q, cu_k, max_q, max_k = self._varlen_indices(block, q.device)
            no_rng = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout: never read
            rows = [x[0].index_select(0, q_idx) for x in (do, q)]
            kv = [x[0].index_select(0, k_idx) for x in (k, v)]
            out_g = out[0].index_select(0, q_idx)
            lse_g = lse[0].index_select(1, q_idx).to(torch.float32).contiguous()
            dq, dk, dv = ATEN["flash_varlen_backward"](
                *rows, *kv, out_g, lse_g, cu_q, cu_k, max_q, max_k, 0.0, block.causal, no_rng, no_rng, scale=cfg.scale
            )
            dq_acc[0].index_add_(0, q_idx, dq.to(dq_acc.dtype))
            dk_acc[0].index_add_(0, k_idx, dk.to(dk_acc.dtype))
            dv_acc[0].index_add_(0, k_idx, dv.to(dv_acc.dtype))
            return
        for qs, ks, causal, band in _document_pieces(block):
            add_slice_gradients(do, q, k, v, out, lse, qs, ks, causal, cfg, dq_acc, dk_acc, dv_acc, band)

    def _varlen_indices(self, block: PackedBlock, device: torch.device) -> tuple:
        """Rows to gather and the FA2 varlen arguments of ``block`` on ``device``, made once per block."""
        key = id(block)
        if key not in self._indices:
            q_idx, cu_q = _gather_index(block.q_start, block.q_len)
            k_idx, cu_k = _gather_index(block.k_start, block.k_len)
            tensors = [torch.from_numpy(x).to(device) for x in (q_idx, k_idx, cu_q, cu_k)]
            self._indices[key] = (*tensors, max(block.q_len), max(block.k_len))
        return self._indices[key]


def _document_pieces(block: PackedBlock):
    """``(query rows, key rows, causal, band)`` of every kernel call of ``block``: one per document, or under a window
    the row tiles of each document's band (``band_pieces``, Note [windows] in ``schedule.py``)."""
    bands = block.bands or (None,) * len(block.q_start)
    for q0, nq, k0, nk, band in zip(block.q_start, block.q_len, block.k_start, block.k_len, bands, strict=True):
        if band is None:
            yield slice(q0, q0 + nq), slice(k0, k0 + nk), block.causal, None
            continue
        for rows, keys, tile in band_pieces(nq, nk, band):
            yield slice(q0 + rows.start, q0 + rows.stop), slice(k0 + keys.start, k0 + keys.stop), False, tile


def _gather_index(starts: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row index ``[s_0, ..., s_0 + l_0 - 1, s_1, ...]`` (int64) and its cumulative lengths (int32, FA2's)."""
    lens = np.asarray(lengths, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)])
    index = np.arange(cu[-1], dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - cu[:-1], lens)
    return index, cu.astype(np.int32)


def prepare_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens: Any,
    options: RingOptions,
    comm: Any,
    *,
    needs_grad: bool | None = None,
    sinks: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RingConfig]:
    """``attention.prepare`` for packed shards: validate on every rank (one all-gather, cu_seqlens included) and
    return ``(1, T_local, N, D)`` views and the :class:`RingConfig` with its :class:`PackedPlan`."""
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, sinks)
        )
    merge = local_merge_backend(q, options.backend)
    row = checks.encode(
        q, k, v, options, needs_grad=needs_grad, merge=merge, sinks=sinks, cu_seqlens=cu_seqlens,
        world_size=comm.world_size,
    )  # fmt: skip
    table = comm.all_gather_ints(row)
    checks.check_table(table, options)
    lengths = document_lengths(cu_seqlens)
    scale = options.softmax_scale if options.softmax_scale is not None else q.shape[-1] ** -0.5
    impl = resolve_packed_impl(options.impl, q.device, q.dtype, q.shape[-1])
    plan = PackedPlan(lengths, bool(options.causal), impl, q.device, comm.world_size, checks.window_of(options.window))
    cfg = RingConfig(float(scale), impl, checks.agreed_merge_backend(table), comm, plan)
    return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), cfg


def ring_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    /,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    backend: str = "auto",
    sinks: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    timeout: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a packed batch of documents, sequence-parallel over the ranks of ``group``.

    The GLOBAL packed batch holds documents end to end: document i is tokens ``[cu_seqlens[i], cu_seqlens[i+1])``.
    No token attends to another document; within a document attention is causal (``causal=True``) or full. Every
    rank passes its shard of the batch (:func:`ringattn.shard_packed`): every document is cut into ``2W`` chunks
    of ``ceil(L / 2W)`` slots and rank r holds chunks r and ``2W-1-r`` of every document (the per-document zigzag
    of TransformerEngine's THD layout, balanced whatever the lengths). Slots past a document's end are padding:
    they attend to nothing (output 0, LSE ``-inf``) and nothing attends to them (zero gradients). A ring of one
    (no process group) uses the same layout with ``W = 1`` (a document of odd length gets one padding slot).
    Differentiable in q, k and v (first order: a double backward raises AutogradError). Under ``torch.autocast``, q,
    k, v are cast as SDPA casts them (Note [autocast] in ``_amp.py``). For every rank in one process, see
    :func:`ringattn.simulate_ring_attention`.

    Parameters
    ----------
    q : Tensor ``(T_local, N, D)``
        This rank's query slots; float16, bfloat16, float32 or float64; any strides; CPU (gloo) or CUDA (NCCL).
        ``T_local = sum_i 2 ceil(L_i / 2W)`` (the last entry of ``packed_shard_info(...).cu_seqlens``).
    k, v : Tensor ``(T_local, Nkv, D)``
        Key/value slots of the same tokens, ``N % Nkv == 0`` (GQA/MQA; they travel unrepeated); q's dtype/device.
    cu_seqlens : Tensor ``(documents + 1,)``, int64
        Cumulative document lengths of the GLOBAL batch, ``[0, ..., T]``, non-decreasing (empty documents are
        allowed); on the CPU or on q's device; the same on every rank.
    causal : bool
        Causal attention within each document, by position in the document.
    softmax_scale : float, optional
        Multiplies the scores; default ``1 / sqrt(D)``. Must be the same on every rank.
    group : ProcessGroup or DeviceMesh, optional
        The ring (default: the default group; without an initialised process group, a ring of one); a DeviceMesh as
        in :func:`ringattn.ring_attention` (1-D, or its ``"cp"`` dimension).
    return_lse : bool
        Also return the log-sum-exp (not differentiable).
    impl : {"auto", "sdpa", "cudnn", "flash", "efficient", "torch"}
        Block kernel, as in :func:`ringattn.ring_attention`, except that ``auto`` on CUDA prefers FlashAttention-2
        (fp16/bf16), whose varlen entry point computes all documents of a block in one call; other kernels run
        per document (Note [packed blocks] in ``ring/varlen.py``).
    backend : str
        Row-merge backend of ``ringattn.backends.for_device`` (``"auto"``: the device's fused one).
    sinks : Tensor ``(N,)``, optional
        Attention sinks, as in :func:`ringattn.ring_attention` (a padding slot's LSE is then the sink: its output
        stays 0 and its gradients 0).
    window : (left, right), optional
        A sliding window within each document, by position in the document, as in :func:`ringattn.ring_attention`.
    timeout : float or timedelta, optional
        Seconds any wait for another rank may last, as in :func:`ringattn.ring_attention`.

    Returns
    -------
    out : Tensor ``(T_local, N, D)``, q's dtype, contiguous; 0 on padding slots.
    lse : Tensor ``(N, T_local)`` (heads first, like FlashAttention's varlen LSE), natural log of the sum of
        ``exp(scaled score)`` over the keys each query sees; ``-inf`` on padding slots and for queries that see no
        key; float32 (float64 for float64 inputs). Only with ``return_lse=True``.

    Raises
    ------
    ShapeError, DTypeError, DeviceError, SeqLenError, LayoutError, BackendError, ConfigError
        On every rank of the group, when any rank's inputs, ``cu_seqlens`` or options are invalid (``cu_seqlens``:
        not an int64 tensor, not 1-D, not starting at 0, decreasing, a total that does not give ``T_local`` slots
        per rank, on another device) or ranks disagree (shapes, dtypes, devices, options, ``cu_seqlens`` values,
        whether a backward will run); checked with one small all_gather before any transfer.
    """
    options = RingOptions(causal, softmax_scale, "TND", "zigzag", impl, backend, window)

    # The op ringattn::ring_attention, or this direct eager call (Note [ring under torch.compile] in ops.py)
    def direct() -> Any:
        comm = RingComm(ops.process_group(group), timeout=timeout)
        return run_ring_varlen(q, k, v, cu_seqlens, comm, options, return_lse=return_lse, sinks=sinks)

    return ops.call(q, k, v, cu_seqlens, group, options, return_lse, direct, sinks=sinks, timeout=timeout)


def run_ring_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens: Any,
    comm: Any,
    options: RingOptions,
    *,
    return_lse: bool = False,
    sinks: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention_varlen` over ``comm`` (a ``RingComm``, or a test double of its interface)."""
    q, k, v = _amp.cast_inputs(q, k, v)  # Note [autocast] in _amp.py
    with _amp.autocast_off(q, k, v):
        q4, k4, v4, cfg = prepare_varlen(q, k, v, cu_seqlens, options, comm, sinks=sinks)
        out, lse = _RingAttention.apply(q4, k4, v4, sinks, cfg)
    return (out[0], lse[0]) if return_lse else out[0]
