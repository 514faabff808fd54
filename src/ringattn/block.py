"""Block attention with its softmax statistics: the producer half of every merge.

:func:`block_attention` computes attention of a block of queries over a block of keys/values and returns the
partial result in the forms the merges take: an LSE for :func:`ringattn.merge_states`, or Ascend
``(out, softmax_max, softmax_sum)`` for :func:`ringattn.ring_attention_update`. It runs the same fused block
kernels as :func:`ringattn.ring_attention` (``ring/blocks.py``: PyTorch's flash kernels on CPU and CUDA).

Note [gradient of the LSE output]
---------------------------------
The fused flash backward kernels take ``dout`` only: they compute ``delta = rowsum(dout * out)`` themselves and
have no input for a gradient flowing into the LSE. But a partial result is only useful merged, and the merge's
output depends on the LSE, so that gradient is never zero here. For scores ``s_ij`` with ``P = softmax(s)``::

    d lse_i / d s_ij = P_ij,    d out_i / d s_ij = P_ij (v_j - out_i)
    => dS_ij = P_ij (dout_i . v_j - rowsum(dout_i * out_i) + dlse_i)

which is the kernels' own formula with ``delta_i`` replaced by ``delta_i - dlse_i``. One kernel call gives it
when every head vector gains one extra component (padded to the kernel's head-size alignment): ``q``, ``k`` and
``v`` get 0 (scores, LSE and ``dout . v`` are unchanged), ``out`` gets ``-1`` and ``dout`` gets ``dlse_i``, so
the kernel's ``rowsum(dout' * out') = delta_i - dlse_i``. The first D components of its ``dq``, ``dk``, ``dv``
are the exact gradients. ``dlse`` enters the kernel in the input dtype (rounded once to 16 bits for float16 /
bfloat16 inputs, as ``dout`` is). The extra copies are O(S * D), the kernel O(S^2 * D).

Note [causal blocks]
--------------------
``causal`` here is top-left within each batch (query i sees keys j <= i) whatever Sq and Sk, but the fused kernels
agree on that only for square blocks: CUDA FlashAttention-2 aligns its causal mask bottom-right when Sq != Sk
(measured on an H100: outputs off by up to 4.7 on random inputs), the CPU flash and cuDNN kernels top-left. So a
causal block is cut into square pieces (:func:`_square_parts`): with Sq <= Sk, the square of the first Sq keys
(the other keys are seen by no query); with Sq > Sk, the square of the first Sk rows plus the remaining rows
against every key, unmasked. The pieces cover disjoint query rows, so no merge is needed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from . import _amp
from ._contract import check_offset_values
from .errors import BackendError, DeviceError, DTypeError, LayoutError, SeqLenError, ShapeError, expected
from .merge import lse_to_stats
from .ring import blocks
from .ring.blocks import IMPLS, attend, attend_backward, band_pieces, compute_dtype, resolve_impl
from .ring.checks import window_of
from .ring.schedule import band_of

__all__ = ["block_attention"]

LAYOUTS = ("BSND", "BNSD", "SBH", "TND")
STATS = ("lse", "ascend")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RANKS = {"BSND": 4, "BNSD": 4, "SBH": 3, "TND": 3}
_LETTERS = {"BSND": "(B, S, N, D)", "BNSD": "(B, N, S, D)", "SBH": "(S, B, H)", "TND": "(T, N, D)"}


@dataclasses.dataclass(frozen=True)
class _BlockConfig:
    """Everything non-tensor a block pass needs, so ``backward`` returns ``(dq, dk, dv, None)``."""

    layout: str
    heads: int  # N (query heads)
    kv_heads: int  # Nkv
    causal: bool
    scale: float
    impl: str  # resolved: "sdpa" | "torch"
    q_offsets: tuple[int, ...] | None  # TND: cumulative query lengths [0, ..., T]
    kv_offsets: tuple[int, ...] | None  # TND: cumulative key/value lengths [0, ..., T_kv]
    window: tuple[int, int] | None = None  # (left, right), top-left aligned in each batch (Note [windows])


def _heads_first(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """``x`` of a dense layout as a ``(B, N, S, D)`` view (a reshape copy only for SBH strides that need one)."""
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BNSD":
        return x
    s, b, h = x.shape  # SBH
    return x.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)


def _pieces(x: torch.Tensor, cfg: _BlockConfig, heads: int, offsets: tuple[int, ...] | None) -> list[torch.Tensor]:
    """``x`` as ``(1 or B, N, S, D)`` views, one per batch of a TND problem, one in all for dense layouts."""
    if cfg.layout != "TND":
        return [_heads_first(x, cfg.layout, heads)]
    assert offsets is not None
    return [x[a:b].permute(1, 0, 2).unsqueeze(0) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _canonical_lse_shape(q: torch.Tensor, cfg: _BlockConfig) -> tuple[int, ...]:
    """``(B, N, S)`` for dense layouts, ``(N, T)`` for TND."""
    if cfg.layout == "TND":
        return (cfg.heads, q.shape[0])
    o = _heads_first(q, cfg.layout, cfg.heads)
    return tuple(o.shape[:3])


def _lse_pieces(lse: torch.Tensor, cfg: _BlockConfig) -> list[torch.Tensor]:
    if cfg.layout != "TND":
        return [lse]
    assert cfg.q_offsets is not None
    offs = cfg.q_offsets
    return [lse[:, a:b].unsqueeze(0) for a, b in zip(offs[:-1], offs[1:], strict=True)]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _BlockConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out in q's layout and dtype, lse (B, N, S) or (N, T))``; lse float32 (float64 for float64 inputs)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_canonical_lse_shape(q, cfg), dtype=compute_dtype(q.dtype), device=q.device)
    pieces = zip(
        _pieces(q, cfg, cfg.heads, cfg.q_offsets),
        _pieces(k, cfg, cfg.kv_heads, cfg.kv_offsets),
        _pieces(v, cfg, cfg.kv_heads, cfg.kv_offsets),
        _pieces(out, cfg, cfg.heads, cfg.q_offsets),
        _lse_pieces(lse, cfg),
        strict=True,
    )
    for q_b, k_b, v_b, out_b, lse_b in pieces:
        if q_b.shape[2] == 0:
            continue
        parts = _parts(q_b.shape[2], k_b.shape[2], cfg)
        if cfg.window is not None or k_b.shape[2] == 0:  # rows no part reaches: the empty partial result (0, -inf)
            out_b.zero_()
            lse_b.fill_(float("-inf"))
        for rows, keys, causal, band in parts:
            o, l = attend(q_b[:, :, rows], k_b[:, :, keys], v_b[:, :, keys], causal=causal, scale=cfg.scale,
                          impl=cfg.impl, band=band)  # fmt: skip
            out_b[:, :, rows].copy_(o)
            lse_b[:, :, rows].copy_(l)
    return out, lse


def _parts(sq: int, sk: int, cfg: _BlockConfig) -> list[tuple[slice, slice, bool, tuple[int, int] | None]]:
    """``(query rows, keys, causal, band)`` of the kernel calls of one ``sq x sk`` batch: Note [causal blocks], or
    under a window the tiles of its band (``band_pieces``; rows that see no key are in none)."""
    if sk == 0:
        return []
    if cfg.window is None:
        return [(rows, keys, causal, None) for rows, keys, causal in _square_parts(sq, sk, cfg.causal)]
    band = band_of(sq, sk, cfg.window, cfg.causal)
    return [] if band is None else [(rows, keys, False, b) for rows, keys, b in band_pieces(sq, sk, band)]


def _square_parts(sq: int, sk: int, causal: bool) -> list[tuple[slice, slice, bool]]:
    """``(query rows, keys, causal)`` blocks that give top-left causal attention with causal masks on SQUARE
    blocks only (Note [causal blocks])."""
    if not causal:
        return [(slice(0, sq), slice(0, sk), False)]
    if sq <= sk:  # row i sees keys 0..i: the keys past Sq are seen by no row
        return [(slice(0, sq), slice(0, sq), True)]
    return [(slice(0, sk), slice(0, sk), True), (slice(sk, sq), slice(0, sk), False)]  # rows >= Sk see every key


def _pad_last(x: torch.Tensor, pad: int, value: torch.Tensor | float | None = None) -> torch.Tensor:
    """``x`` with ``pad`` more components on the last axis: ``value`` (a scalar, or per-row) first, then zeros."""
    extra = x.new_zeros(x.shape[:-1] + (pad,))
    if value is not None:
        extra[..., 0] = value
    return torch.cat([x, extra], dim=-1)


def _piece_backward(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cfg: _BlockConfig,
    causal: bool,
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one ``(B, N, S, D)`` block; with ``dlse``, Note [gradient of the LSE output]."""
    kw = {"causal": causal, "scale": cfg.scale, "band": band}
    if dlse is None:
        return attend_backward(do, q, k, v, out, lse, impl=cfg.impl, **kw)
    d = q.shape[-1]
    impl, pad = cfg.impl, 1
    if impl != "torch" and blocks.device_type(q.device) == "cuda":
        # CUDA kernels take head sizes whose bytes are a multiple of 16; past a kernel's largest head size the
        # next kernel of the automatic order that takes D + pad runs (plain torch when none does).
        pad = max(1, 16 // q.element_size())
        if blocks.KERNELS["cuda", impl].unsupported(q.device, q.dtype, d + pad) is not None:
            impl = resolve_impl("auto", q.device, q.dtype, d + pad)
    dq, dk, dv = attend_backward(
        _pad_last(do, pad, dlse.to(do.dtype)),
        _pad_last(q, pad),
        _pad_last(k, pad),
        _pad_last(v, pad),
        _pad_last(out, pad, -1.0),
        lse,
        impl=impl,
        **kw,
    )
    return dq[..., :d], dk[..., :d], dv[..., :d]


def _backward(
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cfg: _BlockConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = compute_dtype(q.dtype)
    if dout is None:
        dout = torch.zeros_like(out)
    dq = torch.zeros(q.shape, dtype=c, device=q.device)
    dk = torch.zeros(k.shape, dtype=c, device=k.device)
    dv = torch.zeros(v.shape, dtype=c, device=v.device)
    dlse_pieces = _lse_pieces(dlse, cfg) if dlse is not None else None
    pieces = zip(
        _pieces(dout, cfg, cfg.heads, cfg.q_offsets),
        _pieces(q, cfg, cfg.heads, cfg.q_offsets),
        _pieces(k, cfg, cfg.kv_heads, cfg.kv_offsets),
        _pieces(v, cfg, cfg.kv_heads, cfg.kv_offsets),
        _pieces(out, cfg, cfg.heads, cfg.q_offsets),
        _lse_pieces(lse, cfg),
        _pieces(dq, cfg, cfg.heads, cfg.q_offsets),
        _pieces(dk, cfg, cfg.kv_heads, cfg.kv_offsets),
        _pieces(dv, cfg, cfg.kv_heads, cfg.kv_offsets),
        strict=True,
    )
    for i, (do_b, q_b, k_b, v_b, out_b, lse_b, dq_b, dk_b, dv_b) in enumerate(pieces):
        if q_b.shape[2] == 0 or k_b.shape[2] == 0:  # empty rows or no keys: gradient 0
            continue
        dlse_b = dlse_pieces[i] if dlse_pieces is not None else None
        for rows, keys, causal, band in _parts(q_b.shape[2], k_b.shape[2], cfg):
            g_q, g_k, g_v = _piece_backward(
                do_b[:, :, rows],
                dlse_b[:, :, rows] if dlse_b is not None else None,
                q_b[:, :, rows],
                k_b[:, :, keys],
                v_b[:, :, keys],
                out_b[:, :, rows],
                lse_b[:, :, rows],
                cfg,
                causal,
                band,
            )
            dq_b[:, :, rows] += g_q
            dk_b[:, :, keys] += g_k
            dv_b[:, :, keys] += g_v
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _BlockConfig) -> Any:
        out, lse = _forward(q, k, v, cfg)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no augmented call for it
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> Any:
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: Note [double backward of block attention]
            return (*_differentiable_backward(dout, dlse, q, k, v, ctx.cfg), None)
        with _amp.autocast_off(q):
            dq, dk, dv = _backward(dout, dlse, q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None


# Note [double backward of block attention]
# -----------------------------------------
# The fused kernels' backward is not differentiable. Under ``create_graph=True`` (gradient penalties, Hessian-vector
# products) the backward instead recomputes the block's forward with the plain-torch kernel, whose operations
# autograd records, and differentiates it with ``create_graph=True``: the first-order gradients are those of the
# same formula (within the tolerances of the fused kernels), and every higher order is exact autograd. It costs one
# more forward in plain torch, paid only by a double backward.


def _differentiable_backward(dout, dlse, q, k, v, cfg: _BlockConfig) -> tuple[torch.Tensor | None, ...]:
    with _amp.autocast_off(q):
        out, lse = _forward(q, k, v, dataclasses.replace(cfg, impl="torch"))
        pairs = [(o, g) for o, g in ((out, dout), (lse, dlse)) if g is not None]
        inputs = [x for x in (q, k, v) if x.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=True, allow_unused=True
            )
        )
    return tuple(next(grads) if x.requires_grad else None for x in (q, k, v))


def _offsets(name: str, value: Any, total: int) -> tuple[int, ...]:
    """Cumulative lengths ``[0, c1, ..., total]`` (list, tuple, NumPy array or int64 tensor) as host ints."""
    if value is None:
        raise SeqLenError(expected(name, "cumulative lengths [0, ..., T] for layout 'TND'", "None"))
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise DTypeError(expected(name, "dtype int64", value.dtype))
        if value.dim() != 1:
            raise SeqLenError(expected(name, "a 1-D tensor", f"shape {tuple(value.shape)}"))
        values = value.tolist()
    elif hasattr(value, "tolist") and hasattr(value, "dtype"):  # NumPy
        if str(value.dtype) != "int64" or getattr(value, "ndim", 1) != 1:
            raise DTypeError(expected(name, "a 1-D int64 array", value))
        values = value.tolist()
    elif isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        values = list(value)
    else:
        raise DTypeError(expected(name, "an int64 tensor, array or a list of ints", type(value).__name__))
    if len(values) < 2:
        raise SeqLenError(expected(name, "a sequence [0, ..., T] of at least two values", values))
    check_offset_values(values, total, name)
    return tuple(values)


def _option(name: str, value: Any, allowed: tuple[str, ...], error: type[Exception] = LayoutError) -> str:
    upper = value.upper() if isinstance(value, str) else value
    if upper not in tuple(a.upper() for a in allowed):
        raise error(expected(name, f"one of {', '.join(map(repr, allowed))}", repr(value)))
    return allowed[[a.upper() for a in allowed].index(upper)]


def _validate(
    q: Any,
    k: Any,
    v: Any,
    layout: Any,
    causal: Any,
    softmax_scale: Any,
    stats: Any,
    head_num: Any,
    actual_seq_qlen: Any,
    actual_seq_kvlen: Any,
    softmax_layout: Any,
    impl: Any,
    window: Any = None,
) -> tuple[_BlockConfig, str]:
    layout = _option("layout", layout, LAYOUTS)
    stats = _option("stats", stats, STATS)
    impl = _option("impl", impl, IMPLS, BackendError)
    if softmax_layout is not None:
        _option("softmax_layout", softmax_layout, ("TND",))
        if layout != "TND" or stats != "ascend":
            raise LayoutError(
                expected("softmax_layout", "None unless layout='TND' and stats='ascend'", repr(softmax_layout))
            )
    if not isinstance(causal, bool):
        raise DTypeError(expected("causal", "a bool", repr(causal)))
    named = (("q", q), ("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise DTypeError(expected(name, "a torch.Tensor", type(t).__name__))
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise DTypeError(expected(name, "float16, bfloat16, float32 or float64, the dtype of q", t.dtype))
        if t.device != q.device:
            raise DeviceError(expected(name, f"device {q.device} (that of q)", f"device {t.device}"))
        if t.dim() != _RANKS[layout]:
            raise ShapeError(expected(name, f"{_LETTERS[layout]} for layout {layout!r}", tuple(t.shape)))
    if k.shape != v.shape:
        raise ShapeError(expected("v", f"the shape of k {tuple(k.shape)}", tuple(v.shape)))
    if layout == "SBH":
        if not isinstance(head_num, int) or isinstance(head_num, bool) or head_num < 1 or q.shape[2] % head_num:
            raise ShapeError(
                expected("head_num", f"a positive int dividing H = {q.shape[2]} for layout 'SBH'", head_num)
            )
        heads, head_dim = head_num, q.shape[2] // head_num
        if k.shape[2] % head_dim:
            raise ShapeError(expected("k", f"H_kv a multiple of D = {head_dim} (H / head_num)", tuple(k.shape)))
        kv_heads = k.shape[2] // head_dim
        batch_q, batch_k, dims = q.shape[1], k.shape[1], (head_dim, head_dim)
    else:
        n_axis = 1 if layout == "BNSD" else 2 if layout == "BSND" else 1
        heads, kv_heads = q.shape[n_axis], k.shape[n_axis]
        dims = (q.shape[-1], k.shape[-1])
        batch_q, batch_k = (q.shape[0], k.shape[0]) if layout != "TND" else (1, 1)
        head_dim = q.shape[-1]
        if head_num is not None and head_num != heads:
            raise ShapeError(expected("head_num", f"None or N = {heads} (read from q)", head_num))
    if dims[0] != dims[1]:
        raise ShapeError(expected("k", f"head size D = {dims[0]} (that of q)", dims[1]))
    if batch_q != batch_k:
        raise ShapeError(expected("k", f"batch size B = {batch_q} (that of q)", batch_k))
    if kv_heads == 0 or heads % kv_heads:
        raise ShapeError(expected("k", f"a number of heads dividing N = {heads} (GQA/MQA)", kv_heads))
    q_offsets = kv_offsets = None
    if layout == "TND":
        q_offsets = _offsets("actual_seq_qlen", actual_seq_qlen, q.shape[0])
        kv_offsets = _offsets("actual_seq_kvlen", actual_seq_kvlen, k.shape[0])
        if len(kv_offsets) != len(q_offsets):
            raise SeqLenError(
                expected("actual_seq_kvlen", f"{len(q_offsets) - 1} batches (those of actual_seq_qlen)", kv_offsets)
            )
    elif actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise SeqLenError(expected("actual_seq_qlen", f"None for layout {layout!r} (TND only)", "a value"))
    if softmax_scale is None:
        scale = head_dim**-0.5 if head_dim else 1.0
    elif (
        isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool) and math.isfinite(softmax_scale)
    ):
        scale = float(softmax_scale)
    else:
        raise DTypeError(expected("softmax_scale", "None or a finite float", repr(softmax_scale)))
    resolved = resolve_impl(impl, q.device, q.dtype, head_dim)
    cfg = _BlockConfig(layout, heads, kv_heads, causal, scale, resolved, q_offsets, kv_offsets, window_of(window))
    return cfg, stats


def _per_batch_rows(lse_nt: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """``(N, T)`` LSE in the per-batch head-major order of Ascend TND statistics, as a ``(T, N)`` tensor."""
    n, t = lse_nt.shape
    rows = [lse_nt[:, a:b].reshape(-1) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return torch.cat(rows).view(t, n) if rows else lse_nt.new_empty((t, n))


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    /,
    *,
    layout: str,
    causal: bool = False,
    softmax_scale: float | None = None,
    stats: str = "lse",
    head_num: int | None = None,
    actual_seq_qlen: Any = None,
    actual_seq_kvlen: Any = None,
    softmax_layout: str | None = None,
    impl: str = "auto",
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Attention of a block of queries over a block of keys/values, with the statistics that let it be merged.

    The partial result of one step of ring attention, FlashAttention-style: merging the results of disjoint key
    blocks (:func:`ringattn.merge_states` with ``stats="lse"``, :func:`ringattn.ring_attention_update` with
    ``stats="ascend"``) gives attention over their union. Differentiable in q, k and v through every output,
    statistics included, to any order (a double backward, ``create_graph=True``, differentiates a plain-torch
    recomputation: Note [double backward of block attention]); forward and backward run the fused block kernels ring
    attention uses. Under ``torch.autocast``, q, k, v are cast as SDPA casts them and outputs come in the autocast
    dtype (Note [autocast] in ``_amp.py``).

    Shape letters: B batch, S sequence (Sq queries, Sk keys), N query heads, Nkv key/value heads (N % Nkv == 0:
    GQA/MQA), D head size, H = N * D, T total tokens of a packed batch.

    Parameters
    ----------
    q : Tensor in ``layout``: ``(B, Sq, N, D)`` BSND, ``(B, N, Sq, D)`` BNSD, ``(Sq, B, H)`` SBH, ``(Tq, N, D)`` TND
        float16, bfloat16, float32 or float64; any strides; CPU or CUDA.
    k, v : Tensors like q with Sk (or Tkv) tokens and Nkv heads, same shape as each other, same dtype and device.
    layout : ``"BSND"``, ``"BNSD"``, ``"SBH"`` or ``"TND"`` (case-insensitive); required
    causal : bool
        Top-left causal mask within each batch: query i sees keys j <= i (MindSpeed's diagonal block, SDPA's
        ``is_causal``). With Sq > Sk the rows i >= Sk see every key.
    softmax_scale : float, optional
        Multiplies the scores; default ``1 / sqrt(D)``.
    stats : ``"lse"`` (default) or ``"ascend"``
        Which statistics to return (see Returns).
    head_num : int
        N, required for SBH (H alone does not tell it; Ascend's ``head_num``); optional elsewhere, checked.
    actual_seq_qlen, actual_seq_kvlen : int64 tensor, NumPy array or list of ints; TND only, required there
        Cumulative lengths ``[0, c1, ..., T]`` of the query and key/value batches (as
        :func:`ringattn.ring_attention_update` takes them: leading 0 included), the same number of batches.
        Batch i's queries attend only to batch i's keys. Zero-length batches are allowed.
    softmax_layout : None or ``"TND"``; TND with ``stats="ascend"`` only
        None (default): the statistics in Ascend FlashAttention's per-batch, head-major order (batch i is an
        ``(N, S_i)`` block of rows from row ``c_i * N`` of the ``(T*N, 8)`` view), the default of
        ``ring_attention_update``. ``"TND"``: token-major (row ``t * N + n``), for ``ring_attention_update(...,
        softmax_layout="TND")``; rows can then be selected with plain indexing on dim 0.
    impl : ``"auto"``, ``"sdpa"`` or ``"torch"``
        Block kernels, as in :func:`ringattn.ring_attention`: fused flash kernels, or plain torch (float64 runs
        on ``torch`` under ``auto``).
    window : (left, right), optional
        A sliding window, flash-attn's ``window_size``, top-left aligned within each batch: query i sees keys
        ``i - left .. i + right`` (-1: unbounded; ``causal`` caps ``right`` at 0). Rows that see no key are empty
        (0, -inf). Computed by row tiles of the band (Note [windows] in ``ring/schedule.py``).

    Returns
    -------
    ``stats="lse"``: ``(out, lse)``
        ``out`` in q's layout and dtype (v's head size). ``lse`` is the natural-log log-sum-exp of the scaled
        scores of each row: ``(B, N, Sq)`` for BSND, BNSD, SBH (``lse_layout="BNS"``); ``(N, Tq)`` for TND
        (``merge_states(..., layout="TND", lse_layout="NT")``). float32 (float64 for float64 inputs).
    ``stats="ascend"``: ``(out, softmax_max, softmax_sum)``
        ``softmax_max``, ``softmax_sum``: ``(B, N, Sq, 8)`` (dense layouts) or ``(Tq, N, 8)`` (TND), 8 equal
        lanes, float32 (float64 for float64 inputs). They are ``lse_to_stats(lse)``: ``max = lse`` and
        ``sum = 1``, an exact representation (the merge depends on ``max + ln(sum)`` only), not the row maximum
        an Ascend kernel reports.

    Empty rows (a batch with no keys): ``out = 0``, ``lse = -inf`` (Ascend: ``max = -inf``, ``sum = 0``), the
    identity of every merge; their gradients are 0.

    Raises
    ------
    LayoutError (ValueError)
        Unknown ``layout``, ``stats`` or ``softmax_layout``.
    ShapeError (ValueError, RuntimeError)
        Ranks or sizes disagree; ``head_num`` missing (SBH) or wrong; Nkv not dividing N.
    DTypeError (TypeError, RuntimeError)
        Dtypes differ or are unsupported; offsets not integers; ``softmax_scale`` not a float.
    SeqLenError (ValueError, RuntimeError)
        TND offsets missing, not rising from 0 to T, or with different batch counts; offsets given for a dense
        layout.
    DeviceError, BackendError (ValueError)
        Inputs on different devices; ``impl`` unknown or not available for these inputs.
    """
    q, k, v = _amp.cast_inputs(q, k, v)  # Note [autocast] in _amp.py
    cfg, stats = _validate(
        q,
        k,
        v,
        layout,
        causal,
        softmax_scale,
        stats,
        head_num,
        actual_seq_qlen,
        actual_seq_kvlen,
        softmax_layout,
        impl,
        window,
    )
    with _amp.autocast_off(q):
        out, lse = _BlockAttention.apply(q, k, v, cfg)
    if stats == "lse":
        return out, lse
    if cfg.layout != "TND":
        return (out, *lse_to_stats(lse))
    assert cfg.q_offsets is not None
    rows = lse.transpose(0, 1) if softmax_layout is not None else _per_batch_rows(lse, cfg.q_offsets)
    return (out, *lse_to_stats(rows))
