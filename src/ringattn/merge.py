"""The general merge of partial attention results in log-sum-exp form, and conversions from/to Ascend statistics.

Every producer other than Ascend reports a partial result as an output plus the log-sum-exp (LSE) of its scaled
scores per (token, head) row. They differ in the *layout* of both tensors and, dangerously, in the *log base*:

==========================================  ====================  ===========  ======  ===========================
producer                                     output (``layout``)   LSE          base    ``lse_layout``
==========================================  ====================  ===========  ======  ===========================
flash-attn ``flash_attn_func``               (B, S, N, D) BSND      (B, N, S)    e       BNS
flash-attn ``flash_attn_varlen_func``        (T, N, D) TND          (N, T)       e       NT
PyTorch SDPA flash / cuDNN (``_scaled_...``) (B, N, S, D) BNSD      (B, N, S)    e       BNS
xformers ``memory_efficient_attention_partial`` (B, S, N, D) BSND   (B, N, S)    e       BNS
vLLM ``merge_attn_states`` inputs            (T, N, D) TND          (N, T)       e       NT
FlashInfer (``merge_state``, ragged prefill)  (T, N, D) TND          (T, N)       **2**   TN
Megatron / TransformerEngine ``sbhd``        (S, B, H) SBH          (B, N, S)    e       BNS
==========================================  ====================  ===========  ======  ===========================

Letters: B batch, S sequence, N heads, D head size, H = N * D, T total tokens of a packed batch. Strides are free
in every layout (a BNSD tensor that is a transposed BSND buffer, as SDPA returns, is read without a copy).
A base-2 LSE read as natural (or the reverse) gives *wrong weights without any error*: the merge is only right
when ``lse_base`` names the base the producer used. To merge parts from producers of different bases, convert
first: ``lse_e = lse_2 * math.log(2)``; ``lse_2 = lse_e / math.log(2)``.

"Empty" rows: a part that saw no keys for a row has LSE ``-inf`` (output ignored). Old FlashAttention versions
wrote ``+inf`` for such rows; ``+inf`` is read as empty too. A row empty in every part merges to output 0 and
LSE ``-inf``, never NaN. NaN propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _backward, _ops  # noqa: F401  (_backward registers the autograd formulas)
from ._contract import ATTN_DTYPES, check_destinations, check_like, from_numpy
from .errors import BackendError, DeviceError, DTypeError, LayoutError, ShapeError, expected

__all__ = ["merge_states", "stats_to_lse", "lse_to_stats"]

_LSE_LAYOUTS = {"BSND": ("BNS",), "BNSD": ("BNS",), "SBH": ("BNS",), "TND": ("NT", "TN")}
_LETTERS = {"BSND": "(B, S, N, D)", "BNSD": "(B, N, S, D)", "SBH": "(S, B, H)", "TND": "(T, N, D)"}
_LSE_LETTERS = {"BNS": "(B, N, S)", "NT": "(N, T)", "TN": "(T, N)"}
_ROW_BACKENDS = ("auto", "torch", "cpu", "triton")


def lse_scale(lse_base: Any, name: str = "lse_base") -> float:
    """``ln(base)``: multiplying a base-``base`` LSE by it gives the natural-log LSE."""
    if isinstance(lse_base, str) and lse_base.lower() == "e":
        return 1.0
    if lse_base in (2, "2") and not isinstance(lse_base, bool):
        return _ops.LN2
    raise LayoutError(
        expected(
            name,
            "'e' (flash-attn, SDPA, xformers, vLLM, ringattn) or 2 (FlashInfer): the log base the producer used, "
            "stated by the caller",
            repr(lse_base),
        )
    )


def _parts(name: str, value: Any, rank: int) -> list[torch.Tensor]:
    """A sequence of K tensors, or one tensor stacking them along dim 0, as a list of K tensors (views)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != rank + 1:
            raise ShapeError(expected(name, f"K parts stacked along dim 0 (rank {rank + 1})", tuple(value.shape)))
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
        raise DTypeError(expected(name, "a sequence of tensors or one stacked tensor", type(value).__name__))
    return list(value)


def _expected_lse_shape(o: torch.Tensor, layout: str, lse_layout: str, heads: int) -> tuple[int, ...]:
    if layout == "BSND":
        batch, seq = o.shape[0], o.shape[1]
    elif layout == "BNSD":
        batch, seq = o.shape[0], o.shape[2]
    elif layout == "SBH":
        seq, batch = o.shape[0], o.shape[1]
    else:
        return (heads, o.shape[0]) if lse_layout == "NT" else (o.shape[0], heads)
    return (batch, heads, seq)


def _validate(outputs: Any, lses: Any, layout: Any, lse_layout: Any, backend: Any):
    if not isinstance(layout, str) or layout.upper() not in _LSE_LAYOUTS:
        raise LayoutError(expected("layout", "one of 'BSND', 'BNSD', 'SBH', 'TND'", repr(layout)))
    layout = layout.upper()
    choices = _LSE_LAYOUTS[layout]
    if lse_layout is None and len(choices) == 1:
        lse_layout = choices[0]
    if not isinstance(lse_layout, str) or lse_layout.upper() not in choices:
        raise LayoutError(
            expected("lse_layout", " or ".join(map(repr, choices)) + f" for layout {layout!r}", repr(lse_layout))
        )
    lse_layout = lse_layout.upper()
    if backend not in _ROW_BACKENDS:
        raise BackendError(expected("backend", ", ".join(map(repr, _ROW_BACKENDS)), repr(backend)))
    parts_o = _parts("outputs", outputs, _ops.LAYOUT_RANKS[layout])
    parts_lse = _parts("lses", lses, _ops.STATS_RANKS[lse_layout])
    if not parts_o:
        raise ShapeError(expected("outputs", "at least one part", "none"))
    if len(parts_o) != len(parts_lse):
        raise ShapeError(expected("lses", f"one LSE per output ({len(parts_o)})", len(parts_lse)))
    first, first_lse = parts_o[0], parts_lse[0]
    for k, o in enumerate(parts_o):
        if o.dim() != _ops.LAYOUT_RANKS[layout]:
            raise ShapeError(expected(f"outputs[{k}]", f"{_LETTERS[layout]} for layout {layout!r}", tuple(o.shape)))
        if o.shape != first.shape:
            raise ShapeError(
                expected(f"outputs[{k}]", f"shape {tuple(first.shape)} (that of outputs[0])", tuple(o.shape))
            )
        if o.dtype not in ATTN_DTYPES or o.dtype != first.dtype:
            raise DTypeError(expected(f"outputs[{k}]", "float16, bfloat16, float32 or float64, one dtype", o.dtype))
    if first_lse.dim() != _ops.STATS_RANKS[lse_layout]:
        raise ShapeError(
            expected("lses[0]", f"{_LSE_LETTERS[lse_layout]} for lse_layout {lse_layout!r}", tuple(first_lse.shape))
        )
    heads = _ops.num_heads(first, first_lse, layout)
    if layout == "SBH" and (heads == 0 and first.shape[2] or heads and first.shape[2] % heads):
        raise ShapeError(expected("outputs", f"H divisible by N = {heads} (N from lses)", f"H = {first.shape[2]}"))
    want = _expected_lse_shape(first, layout, lse_layout, heads)
    stats_dtypes = (torch.float32, torch.float64) if first.dtype == torch.float64 else (torch.float32,)
    for k, s in enumerate(parts_lse):
        if tuple(s.shape) != want:
            raise ShapeError(
                expected(
                    f"lses[{k}]",
                    f"{_LSE_LETTERS[lse_layout]} = {want} for outputs {tuple(first.shape)}",
                    tuple(s.shape),
                )
            )
        if s.dtype not in stats_dtypes or s.dtype != first_lse.dtype:
            raise DTypeError(
                expected(f"lses[{k}]", "float32 (float64 allowed with float64 outputs), one dtype", s.dtype)
            )
    for name, t in _named_parts(parts_o, parts_lse):
        if t.device != first.device:
            raise DeviceError(expected(name, f"device {first.device} (that of outputs[0])", f"device {t.device}"))
    return parts_o, parts_lse, layout, lse_layout


def _named_parts(parts_o: list[torch.Tensor], parts_lse: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Every input part with the name errors give it: ``outputs[k]``, ``lses[k]``."""
    named = [(f"outputs[{k}]", o) for k, o in enumerate(parts_o)]
    return named + [(f"lses[{k}]", s) for k, s in enumerate(parts_lse)]


def _check_out(name: str, t: Any, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(expected(name, "a torch.Tensor", type(t).__name__))
    check_like(name, t, like)
    return t


def merge_states(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
    /,
    *,
    layout: str,
    lse_layout: str | None = None,
    lse_base: str | int | None = None,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge K >= 1 partial attention results, computed over disjoint key sets, into the result over their union.

    Per (token, head) row, with natural-log LSEs ``x_k = lse_k * ln(lse_base)``::

        X = log(sum_k exp(x_k)),   o = sum_k exp(x_k - X) * o_k,   merged LSE = X / ln(lse_base)

    computed in float32 (float64 for float64 outputs) and rounded once, in one pass: each part is read once and
    the outputs written once. Two parts: ``merge_states((o_a, o_b), (lse_a, lse_b), layout=...)``.

    Parameters
    ----------
    outputs : sequence of K Tensors, or one Tensor stacking them along dim 0
        Partial outputs, each normalised over its own keys, in ``layout``: ``(B, S, N, D)`` BSND, ``(B, N, S, D)``
        BNSD, ``(S, B, H)`` SBH (H = N * D), ``(T, N, D)`` TND. float16, bfloat16, float32 or float64, one dtype,
        any strides, one device.
    lses : sequence of K Tensors, or one stacked Tensor
        Log-sum-exp of each part's scaled scores, in ``lse_layout``, logarithm in ``lse_base``. float32 (float64
        allowed with float64 outputs). ``-inf`` (or ``+inf``, old FlashAttention) marks a row empty in that part.
    layout : ``"BSND"``, ``"BNSD"``, ``"SBH"`` or ``"TND"`` (case-insensitive); required
        The module docstring lists which producer gives which.
    lse_layout : ``"BNS"`` ``(B, N, S)``, ``"NT"`` ``(N, T)`` or ``"TN"`` ``(T, N)``
        BNS goes with BSND, BNSD and SBH and is the default for them. TND takes NT (flash-attn varlen, vLLM) or
        TN (FlashInfer) and must name it: with ``T == N`` the shapes cannot tell them apart.
    lse_base : ``"e"`` or ``2``; required
        Log base of every LSE in and out. FlashInfer uses 2; flash-attn, SDPA, xformers, vLLM and ringattn's own
        producers use e. Never guessed: a base-2 LSE read as natural gives wrong weights and no error.
    out, out_lse : Tensor, optional
        Destinations shaped like ``outputs[0]`` / ``lses[0]`` (same dtype and device). Each may be exactly the same
        view as an input part (in-place accumulation); any other overlap (with an input, the other destination, or
        itself: expanded strides such as ``torch.empty(1, 1, 1, D).expand(B, S, N, D)``) raises AliasError. Not
        differentiable: with an input that requires grad (grad mode on) they raise AutogradError.
    backend : ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``
        Which ``merge_rows`` runs (Note [row merge]). ``auto``: the device's fused kernel when installed, else
        ``torch``; float64 always runs on ``torch``.

    Returns
    -------
    (o, lse)
        ``o`` shaped and typed like ``outputs[0]``; ``lse`` like ``lses[0]``, base ``lse_base``. ``(out, out_lse)``
        when given. Rows empty in every part give ``o = 0``, ``lse = -inf``.

    Raises
    ------
    LayoutError (ValueError)
        Unknown ``layout``, ``lse_layout`` (or missing for TND), or ``lse_base`` unknown or not given.
    ShapeError (ValueError, RuntimeError)
        Ranks or sizes disagree, no parts, or K outputs with a different number of LSEs.
    DTypeError (TypeError, RuntimeError)
        Outputs of mixed or unsupported dtypes; LSEs not float32.
    DeviceError, AliasError, BackendError (ValueError)
        Mixed devices; destinations overlapping inputs other than exactly, each other or themselves; unknown
        backend.

    Notes
    -----
    Differentiable with respect to every output and LSE (closed-form backward, ``_backward.py``) and traceable by
    ``torch.compile(fullgraph=True)``: the merge is the custom op ``torch.ops.ringattn.merge_states``.
    Empty parts and empty rows get gradient 0, never NaN.
    """
    scale = lse_scale(lse_base)
    parts_o, parts_lse, layout, lse_layout = _validate(outputs, lses, layout, lse_layout, backend)
    if out is None and out_lse is None:
        return _ops.merge(parts_o, parts_lse, (layout, lse_layout, scale, backend))
    named_inputs = _named_parts(parts_o, parts_lse)
    given = [("out", _check_out("out", out, parts_o[0]))] if out is not None else []
    if out_lse is not None:
        given.append(("out_lse", _check_out("out_lse", out_lse, parts_lse[0])))
    if not torch.compiler.is_compiling():
        # No data pointers while tracing; the compiled graph is functionalised, so it reads the inputs as they
        # were before the call whatever the overlap.
        check_destinations(given, named_inputs)
    out = parts_o[0].new_empty(parts_o[0].shape) if out is None else out
    out_lse = parts_lse[0].new_empty(parts_lse[0].shape) if out_lse is None else out_lse
    _ops.refuse_grad_with_out(named_inputs)
    _ops.merge(parts_o, parts_lse, (layout, lse_layout, scale, backend), (out, out_lse))
    return out, out_lse


def stats_to_lse(
    softmax_max: torch.Tensor | np.ndarray, softmax_sum: torch.Tensor | np.ndarray, /, *, lse_base: str | int = "e"
) -> torch.Tensor | np.ndarray:
    """Ascend statistics ``(max, sum)`` to a log-sum-exp: ``lse = (max + ln(sum)) / ln(lse_base)``.

    Parameters
    ----------
    softmax_max, softmax_sum : Tensor or NumPy array ``(..., lanes)``, lanes >= 1, same shape, float32 (or float64)
        Row max of the scaled scores and ``sum(exp(s - max))`` (natural exponent), 8 equal lanes; lane 0 is read.
        ``(B, N, S, 8)`` gives the ``(B, N, S)`` BNS LSE; token-major ``(T, N, 8)`` gives ``(T, N)`` TN. (Per-batch
        TND statistics keep their per-batch row order: the result is not a token-major TN LSE.) Both on one device.
    lse_base : ``"e"`` (default) or ``2``
        Base of the returned LSE.

    Returns
    -------
    Tensor ``(...)`` (the lane axis dropped), dtype of ``softmax_max``; a NumPy array when ``softmax_max`` is one.
    Empty rows (``max = -inf`` or ``sum = 0``) give ``-inf``. Differentiable; empty rows get gradient 0, not NaN.

    Raises
    ------
    DTypeError (TypeError)   not a tensor or array, or not float32/float64 of one dtype
    ShapeError (ValueError)  shapes differ, or no lane axis (0-d, or lanes = 0)
    DeviceError (ValueError) the two on different devices
    LayoutError (ValueError) ``lse_base`` not ``"e"`` or 2
    """
    scale = lse_scale(lse_base)
    as_numpy = isinstance(softmax_max, np.ndarray)
    m, l = _stats_pair(_from_numpy("softmax_max", softmax_max), _from_numpy("softmax_sum", softmax_sum))
    empty = (m == float("-inf")) | (l == 0)
    lse = m + torch.log(torch.where(empty, torch.ones_like(l), l))  # log(1) keeps the gradient finite on empty rows
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse) / scale
    return lse.numpy() if as_numpy else lse


def lse_to_stats(
    lse: torch.Tensor | np.ndarray, /, *, lse_base: str | int = "e", lanes: int = 8
) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
    """A log-sum-exp to Ascend statistics: ``max = lse * ln(lse_base)``, ``sum = 1``, each replicated to ``lanes``.

    ``(max, 1)`` is exact: ``max + ln(1)`` is the natural LSE, and the merge only depends on that sum of the two.

    Parameters
    ----------
    lse : Tensor or NumPy array ``(...)``, float32 (or float64)
        Log-sum-exp in ``lse_base``; ``(B, N, S)`` gives ``(B, N, S, 8)`` SBH statistics, ``(T, N)`` token-major TND
        statistics (``softmax_layout="TND"`` in ``ring_attention_update``).
    lse_base : ``"e"`` (default) or ``2``
    lanes : int >= 1, default 8

    Returns
    -------
    (softmax_max, softmax_sum) : Tensors ``(..., lanes)``, dtype of ``lse``, contiguous (no expanded strides, so
    they can be ``out=`` destinations); NumPy arrays when ``lse`` is one. Empty rows (``lse = -inf``, or ``+inf``
    from old FlashAttention) give the empty state ``(-inf, 0)``. NaN gives ``(NaN, 1)``. Differentiable.

    Raises
    ------
    DTypeError (TypeError)   ``lse`` not a float32/float64 tensor or array; ``lanes`` not an int
    ShapeError (ValueError)  ``lanes`` < 1
    LayoutError (ValueError) ``lse_base`` not ``"e"`` or 2
    """
    scale = lse_scale(lse_base)
    if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)):
        raise DTypeError(expected("lanes", "an int", repr(lanes)))
    if lanes < 1:
        raise ShapeError(expected("lanes", "at least 1", int(lanes)))
    as_numpy = isinstance(lse, np.ndarray)
    lse = _from_numpy("lse", lse)
    if not isinstance(lse, torch.Tensor):
        raise DTypeError(expected("lse", "a torch.Tensor or numpy.ndarray", type(lse).__name__))
    if lse.dtype not in (torch.float32, torch.float64):
        raise DTypeError(expected("lse", "float32 or float64", lse.dtype))
    empty = lse.isinf()
    m = torch.where(empty, torch.full_like(lse, float("-inf")), lse * scale)
    l = (~empty).to(lse.dtype)
    shape = (*lse.shape, int(lanes))
    stats = m.unsqueeze(-1).expand(shape).contiguous(), l.unsqueeze(-1).expand(shape).contiguous()
    return (stats[0].numpy(), stats[1].numpy()) if as_numpy else stats


def _from_numpy(name: str, value: Any) -> Any:
    return from_numpy(name, value) if isinstance(value, np.ndarray) else value


def _stats_pair(softmax_max: Any, softmax_sum: Any) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(expected(name, "a torch.Tensor or numpy.ndarray", type(t).__name__))
        if t.dtype not in (torch.float32, torch.float64) or t.dtype != softmax_max.dtype:
            raise DTypeError(expected(name, "float32 or float64, the dtype of softmax_max", t.dtype))
        if t.dim() < 1 or t.shape != softmax_max.shape or t.shape[-1] < 1:
            raise ShapeError(expected(name, "(..., lanes), lanes >= 1, the shape of softmax_max", tuple(t.shape)))
    if softmax_sum.device != softmax_max.device:
        want = f"device {softmax_max.device} (that of softmax_max)"
        raise DeviceError(expected("softmax_sum", want, f"device {softmax_sum.device}"))
    return softmax_max[..., 0], softmax_sum[..., 0]
