"""Public operations of ringattn."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _backward, _ops, backends  # noqa: F401  (_backward registers the autograd formulas)
from ._contract import OUT_NAMES, check_outputs, from_numpy, validate_update
from .errors import DTypeError, expected

__all__ = ["ring_attention_update"]

ArrayLike = torch.Tensor | np.ndarray

_INPUT_NAMES = (
    "prev_attn_out",
    "prev_softmax_max",
    "prev_softmax_sum",
    "cur_attn_out",
    "cur_softmax_max",
    "cur_softmax_sum",
)
# UpdateProblem.stats_order -> the statistics layout names of _ops.py
_STATS_LAYOUT = {"SBH": "BNS", "token_major": "TN", "per_batch": "per_batch"}


def _to_torch(name: str, value: Any, *, output: bool = False) -> Any:
    """NumPy arrays as tensors (Note [NumPy arrays] in _contract.py); anything else unchanged."""
    if isinstance(value, np.ndarray):
        return from_numpy(name, value, output=output)
    return value


def ring_attention_update(
    prev_attn_out: ArrayLike,
    prev_softmax_max: ArrayLike,
    prev_softmax_sum: ArrayLike,
    cur_attn_out: ArrayLike,
    cur_softmax_max: ArrayLike,
    cur_softmax_sum: ArrayLike,
    actual_seq_qlen: ArrayLike | list[int] | None = None,
    layout: str = "SBH",
    *,
    softmax_layout: str | None = None,
    ascend_limits: bool = True,
    out: tuple[ArrayLike, ArrayLike, ArrayLike] | None = None,
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Merge two partial FlashAttention results into the attention over the union of their keys.

    A drop-in for ``mindspore.ops.ring_attention_update``. For each (token, head) row and each of the 8
    statistics lanes c (elementwise), with ``M = max(prev_max, cur_max)``, ``a = prev_sum * exp(prev_max - M)``,
    ``b = cur_sum * exp(cur_max - M)`` and ``L = a + b``::

        softmax_max[c] = M[c];   softmax_sum[c] = L[c]
        attn_out[d]    = prev_attn_out[d] * (a / L)[d % 8] + cur_attn_out[d] * (b / L)[d % 8]   # float32, rounded once

    Output element d of a row takes the weights of lane ``d % 8``, as the Atlas A2 kernel does; with equal lanes
    (the contract: FlashAttention writes one value to all 8) every element takes the same weights.

    Shape letters: S sequence, B batch, N heads, D head size, H = N * D, T total tokens of a packed batch.

    Parameters
    ----------
    prev_attn_out, cur_attn_out : Tensor ``(S, B, H)`` (SBH) or ``(T, N, D)`` (TND)
        Partial outputs, each normalised over its own keys. float16, bfloat16, float32 or float64, the
        same dtype for both.
    prev_softmax_max, cur_softmax_max : Tensor ``(B, N, S, 8)`` (SBH) or ``(T, N, 8)`` (TND), float32
        Row maximum of the *scaled* scores (natural-exponent convention: the softmax is ``exp(s - max)``).
        The 8 lanes hold the same number by the contract; unequal lanes (as in MindSpore's own example) are
        merged lane by lane, and output element d takes lane ``d % 8``'s weights.
    prev_softmax_sum, cur_softmax_sum : same shape and dtype as the maxima
        ``sum(exp(s - max))`` over the row's keys. A row that saw no keys is ``(out 0, max -inf, sum 0)``.
        float64 statistics are accepted with float64 attention.
    actual_seq_qlen : int64 Tensor/array or list of ints, ``(batches + 1,)``; TND only (ignored for SBH)
        Cumulative query lengths ``[0, c1, ..., T]``, non-decreasing; zero-length batches allowed. Always
        validated, never a silent wrong answer: a bad one raises SeqLenError and leaves the process usable.
        Host values (list, NumPy, CPU tensor) are checked on the host at no device cost, then copied to the
        inputs' device asynchronously. A CUDA tensor is checked on the GPU and read back with one host sync
        per call (a round trip that also waits for the work already queued on the stream); pass a list or a
        CPU tensor to avoid it. Inside CUDA-graph capture and under ``torch.compile`` no sync is allowed: the
        checks run as device-side asserts, so a bad sequence fails at the next synchronisation and, on CUDA,
        leaves the CUDA context unusable. A meta tensor has no values to check and raises DeviceError.
    layout : ``"SBH"`` or ``"TND"``, case-insensitive
    softmax_layout : None or ``"TND"``, keyword-only
        TND statistics layout. None (default, as FlashAttention on Ascend produces them): per batch,
        head-major: batch i is an ``(N, S_i)`` block of rows starting at row ``c_i * N`` of the ``(T*N, 8)``
        view. ``"TND"``: token-major, row ``t * N + n``.
    ascend_limits : bool, keyword-only, default True
        Enforce the Ascend-only TND limits (D a multiple of 64; the unified-buffer size bound) so that code
        that runs here also runs on Ascend. False lifts those two and nothing else. Must be a bool.
    out : tuple ``(attn_out, softmax_max, softmax_sum)``, optional, keyword-only
        Destinations with the output shapes and dtypes. Each may be exactly the same view as an input
        (``out=(prev_attn_out, prev_softmax_max, prev_softmax_sum)`` accumulates in place); any other
        overlap (with an input, another output, or itself: expanded strides) raises AliasError. NumPy
        destinations must be writeable, with non-negative strides and native byte order (else AliasError or
        DTypeError). Not differentiable: combined with an input that requires grad (while grad mode is on) it
        raises AutogradError.
    backend : ``"auto"``, ``"reference"``, ``"torch"``, ``"cpu"`` or ``"triton"``, keyword-only
        ``auto`` takes the fused kernel of the inputs' device when available, else ``torch``. The backward
        runs that backend's row-level backward (``torch`` for ``reference``, and until a backend has one).

    Returns
    -------
    (attn_out, softmax_max, softmax_sum)
        ``attn_out`` with the shape and dtype of ``prev_attn_out``; ``softmax_max``, ``softmax_sum`` with
        the shape and dtype of ``prev_softmax_max``. New tensors unless ``out`` is given (then ``out``
        itself). NumPy inputs give NumPy outputs. Inputs are never modified (unless aliased by ``out``).
        NumPy inputs are viewed without a copy, except arrays with a negative stride or in non-native byte
        order, which are copied once (exactly); arrays of a non-numeric dtype raise DTypeError.

    Raises
    ------
    LayoutError (ValueError)
        ``layout`` or ``softmax_layout`` unknown.
    ShapeError (ValueError, RuntimeError)
        Ranks, the statistics' last dimension, or sizes disagree (the message names both arguments).
    DTypeError (TypeError, RuntimeError)
        Attention dtypes differ or are unsupported; statistics not float32; ``actual_seq_qlen`` not int64;
        a non-tensor argument or a NumPy array of a non-numeric dtype; ``ascend_limits`` not a bool.
    SeqLenError (ValueError, RuntimeError)
        TND without ``actual_seq_qlen``, or it does not rise from 0 to T.
    HardwareLimitError (ValueError, RuntimeError)
        TND beyond the Ascend limits while ``ascend_limits=True``.
    DeviceError, AliasError, BackendError (ValueError)
        Mixed devices or a meta ``actual_seq_qlen``; outputs overlapping inputs other than exactly, each
        other or themselves, or read-only; unknown or unavailable backend.

    Notes
    -----
    Deviations from the Ascend original: merging two empty rows gives the empty row
    ``(0, -inf, 0)`` instead of NaN; merging an empty row with x gives x, and an empty part's output (max
    ``-inf`` with sum 0, per lane) is never read, so NaN or garbage there cannot leak. NaN statistics and NaN
    in a non-empty part's output still give NaN, and ``+inf`` statistics follow IEEE arithmetic (NaN
    weights), as in the original.

    Differentiable (``torch.autograd``) with respect to all six inputs through a closed-form backward
    (``_backward.py``), and traceable by ``torch.compile(fullgraph=True)``: the merge is the custom op
    ``torch.ops.ringattn.ring_attention_update``. Gradients follow the lane rule: lane c of each input's
    statistics receives the gradient of the output elements d with ``d % 8 == c`` and of lane c of the output
    statistics. Where the two maxima are equal the max's gradient is split equally. An empty part's output gets
    gradient 0; empty rows get finite gradients, never NaN.
    """
    as_numpy = isinstance(prev_attn_out, np.ndarray)
    values = (prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max, cur_softmax_sum)
    tensors = [_to_torch(name, v) for name, v in zip(_INPUT_NAMES, values, strict=True)]
    problem = validate_update(
        *tensors, actual_seq_qlen, layout, softmax_layout=softmax_layout, ascend_limits=ascend_limits
    )
    backends.check_name(backend)  # before the custom op, so the error names the argument in eager and compile
    inputs = (problem.prev_o, problem.prev_m, problem.prev_l, problem.cur_o, problem.cur_m, problem.cur_l)
    options = (problem.seq_offsets, problem.layout, _STATS_LAYOUT[problem.stats_order], backend)
    if out is None:
        outs = _ops.update(inputs, options)
        return tuple(t.numpy() for t in outs) if as_numpy else outs  # type: ignore[return-value]
    if not isinstance(out, (tuple, list)):
        raise DTypeError(expected("out", "a tuple of three tensors", type(out).__name__))
    outs = [_to_torch(name, o, output=True) for name, o in zip(OUT_NAMES, out, strict=False)] + list(out[3:])
    if not torch.compiler.is_compiling():  # no data pointers to compare while tracing (see merge._check_out)
        outs = check_outputs(outs, problem, list(zip(_INPUT_NAMES, inputs, strict=True)))
    _ops.refuse_grad_with_out(zip(_INPUT_NAMES, inputs, strict=True))
    _ops.update(inputs, options, outs)
    return tuple(out)  # type: ignore[return-value]
