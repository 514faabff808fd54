"""Portable backend: the merge as vectorised torch operations; runs on every device.

It is the fallback for devices without a fused kernel and the implementation every fused backend is
compared with. Arithmetic is float32 (float64 for float64 inputs), rounded once to the output dtype.
See Note [canonical rows] in ``_contract.py`` and Note [row merge] in ``backends/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._contract import UpdateProblem

NAME = "torch"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(problem: UpdateProblem) -> str | None:
    return None


def _logical_rows(row_map: tuple[torch.Tensor, torch.Tensor], heads: int) -> torch.Tensor:
    """``(T, N)`` logical statistics row of each attention row under the per-batch map (Note [canonical rows])."""
    row_base, row_step = row_map
    return row_base.unsqueeze(1) + torch.arange(heads, device=row_base.device) * row_step.unsqueeze(1)


def _gather_rows(stats: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Lane 0 of a stats view as ``(P, Q, N, 1)`` aligned with attention rows (Note [canonical rows])."""
    lane0 = stats[..., :1]
    if row_map is None:
        return lane0
    tokens, _, heads, _ = stats.shape
    return lane0.reshape(tokens * heads, 1)[_logical_rows(row_map, heads)].unsqueeze(1)


def _write_rows(lanes: torch.Tensor, out: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write ``lanes`` ``(P, Q, N, lanes)``, in attention-row order, to the stats view ``out``."""
    if row_map is None:
        out.copy_(lanes)
        return
    tokens, _, heads, width = out.shape
    flat = torch.empty((tokens * heads, width), dtype=out.dtype, device=out.device)
    flat[_logical_rows(row_map, heads).reshape(-1)] = lanes.reshape(-1, width).to(out.dtype)
    out.copy_(flat.view(tokens, 1, heads, width))


def _scatter_rows(values: torch.Tensor, out: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write row values ``(P, Q, N, 1)`` to every lane of the stats view ``out``."""
    _write_rows(values.expand(*values.shape[:-1], out.shape[-1]), out, row_map)


def merge_rows(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Note [row merge] in ``backends/__init__.py``, as torch operations (all lanes read as lane 0)."""
    # The whole row, statistics included, in the compute dtype: float64 outputs get float64 weights even
    # from float32 statistics.
    compute = torch.float64 if out_o.dtype == torch.float64 else torch.float32
    if parts_l is None:  # LSE form: (max, sum) = (lse * scale, 1); +inf (old FlashAttention) means empty
        maxima = [_gather_rows(m, row_map).to(compute) * lse_scale for m in parts_m]
        maxima = [m.masked_fill(m == float("inf"), float("-inf")) for m in maxima]
        sums = [torch.ones_like(m) for m in maxima]
    else:
        maxima = [_gather_rows(m, row_map).to(compute) for m in parts_m]
        sums = [_gather_rows(s, row_map).to(compute) for s in parts_l]
    new_max = maxima[0]
    for m in maxima[1:]:
        new_max = torch.maximum(new_max, m)
    # All parts empty: shift by 0 instead of -inf so exp() gives 0, not NaN (SPEC section 7).
    all_empty = new_max == float("-inf")
    shift = new_max.masked_fill(all_empty, 0.0)
    scaled = [s * torch.exp(m - shift) for m, s in zip(maxima, sums, strict=True)]
    new_sum = scaled[0]
    for s in scaled[1:]:
        new_sum = new_sum + s
    merged = None
    for o, s in zip(parts_o, scaled, strict=True):
        weight = (s / new_sum).masked_fill_(all_empty, 0.0)
        term = o.to(compute) * weight
        merged = term if merged is None else merged + term
    # Everything is computed before the first write, so outputs may alias any input.
    assert merged is not None
    out_o.copy_(merged)
    if out_l is None:
        lse = (new_max + torch.log(new_sum)) / lse_scale
        _scatter_rows(lse.masked_fill(all_empty, float("-inf")), out_m, row_map)
    else:
        _scatter_rows(new_max, out_m, row_map)
        _scatter_rows(new_sum, out_l, row_map)


def _scatter_lane0(values: torch.Tensor, out: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write row values ``(P, Q, N, 1)`` to lane 0 of the stats view ``out`` and 0 to its other lanes."""
    full = torch.zeros(values.shape[:-1] + (out.shape[-1],), dtype=out.dtype, device=out.device)
    full[..., :1] = values
    _write_rows(full, out, row_map)


def merge_rows_backward(
    grad_o: torch.Tensor,
    grad_m: torch.Tensor,
    grad_l: torch.Tensor | None,
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    grad_parts_o: Sequence[torch.Tensor],
    grad_parts_m: Sequence[torch.Tensor],
    grad_parts_l: Sequence[torch.Tensor] | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Note [row merge backward] in ``_backward.py``, as vectorised torch operations."""
    compute = torch.float64 if parts_o[0].dtype == torch.float64 else torch.float32

    def rows(stats: torch.Tensor) -> torch.Tensor:  # lane 0 as (P, Q, N, 1) in the compute dtype
        return _gather_rows(stats, row_map).to(compute)

    if parts_l is None:  # LSE form, natural log; +inf (old FlashAttention) means empty, as in the forward
        maxima = [rows(m) * lse_scale for m in parts_m]
        maxima = [m.masked_fill(m == float("inf"), float("-inf")) for m in maxima]
    else:
        maxima = [rows(m) for m in parts_m]
    new_max = maxima[0]
    for m in maxima[1:]:
        new_max = torch.maximum(new_max, m)
    all_empty = new_max == float("-inf")
    shift = new_max.masked_fill(all_empty, 0.0)
    decay = [torch.exp(m - shift) for m in maxima]  # exp(m_k - M): 0 for empty parts
    scaled = decay if parts_l is None else [rows(s) * e for s, e in zip(parts_l, decay, strict=True)]  # a_k
    new_sum = scaled[0]
    for a in scaled[1:]:
        new_sum = new_sum + a
    inv_sum = torch.where(all_empty, torch.zeros_like(new_sum), 1.0 / new_sum)  # all empty: weights 0, not NaN
    weights = [a * inv_sum for a in scaled]
    g = grad_o.to(compute)
    dots = [(g * o.to(compute)).sum(-1, keepdim=True) for o in parts_o]  # <g, o_k>
    mean_dot = weights[0] * dots[0]  # <g, o> recomputed from the parts
    for w, d in zip(weights[1:], dots[1:], strict=True):
        mean_dot = mean_dot + w * d
    # Every output lane holds the same statistic, so its gradient is the sum over lanes.
    g_m = _gather_rows(grad_m.sum(-1, keepdim=True), row_map).to(compute)
    for w, dst in zip(weights, grad_parts_o, strict=True):
        dst.copy_(g * w)
    if parts_l is None:
        for w, d, dst in zip(weights, dots, grad_parts_m, strict=True):
            _scatter_lane0(w * (lse_scale * (d - mean_dot) + g_m), dst, row_map)
        return
    assert grad_l is not None and grad_parts_l is not None
    g_l = _gather_rows(grad_l.sum(-1, keepdim=True), row_map).to(compute)
    # The max is shared equally by tied parts (torch.maximum's rule and the central difference's).
    ties = [(m == new_max).to(compute) for m in maxima]
    tie_count = ties[0]
    for t in ties[1:]:
        tie_count = tie_count + t
    max_grad = g_m - new_sum * g_l
    for k in range(len(parts_o)):
        _scatter_lane0(((dots[k] - mean_dot) * inv_sum + g_l) * decay[k], grad_parts_l[k], row_map)
        dm = weights[k] * (dots[k] - mean_dot) + scaled[k] * g_l + ties[k] / tie_count * max_grad
        _scatter_lane0(dm, grad_parts_m[k], row_map)
