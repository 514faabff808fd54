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
    """Every lane of a stats view as ``(P, Q, N, lanes)`` aligned with attention rows (Note [canonical rows])."""
    if row_map is None:
        return stats
    tokens, _, heads, lanes = stats.shape
    return stats.reshape(tokens * heads, lanes)[_logical_rows(row_map, heads)].unsqueeze(1)


def _write_rows(lanes: torch.Tensor, out: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write ``lanes`` ``(P, Q, N, lanes)``, in attention-row order, to the stats view ``out``."""
    if row_map is None:
        out.copy_(lanes)
        return
    tokens, _, heads, width = out.shape
    flat = torch.empty((tokens * heads, width), dtype=out.dtype, device=out.device)
    flat[_logical_rows(row_map, heads).reshape(-1)] = lanes.reshape(-1, width).to(out.dtype)
    out.copy_(flat.view(tokens, 1, heads, width))


def _lane_index(width: int, lanes: int, device: torch.device) -> torch.Tensor:
    """Which of ``lanes`` lanes each of ``width`` positions reads: position ``d`` reads lane ``d % lanes``."""
    return torch.arange(width, device=device) % lanes


def _spread(per_lane: torch.Tensor, width: int) -> torch.Tensor:
    """``(..., lanes)`` -> ``(..., width)``, position ``d`` taking lane ``d % lanes`` (a broadcast for one lane)."""
    lanes = per_lane.shape[-1]
    if lanes == 1 or width == lanes:
        return per_lane
    return per_lane[..., _lane_index(width, lanes, per_lane.device)]


def _fold(values: torch.Tensor, lanes: int) -> torch.Tensor:
    """``(..., width)`` -> ``(..., lanes)``: lane ``j`` sums the positions ``d`` with ``d % lanes == j`` (the
    adjoint of :func:`_spread`)."""
    width = values.shape[-1]
    if width == lanes:
        return values
    out = values.new_zeros((*values.shape[:-1], lanes))
    return out.index_add_(values.dim() - 1, _lane_index(width, lanes, values.device), values)


def _part_stats(parts_m, parts_l, row_map, compute, lse_scale):
    """Per part: ``(m_k, l_k, empty_k)``, ``(P, Q, N, lanes)`` each in attention-row order. LSE form (``parts_l``
    None): ``(lse * scale, 1)`` from lane 0 (one LSE per row); ``-inf`` and ``+inf`` (old FlashAttention) are
    empty. Stats form: every lane; empty where ``m == -inf`` and ``l == 0``."""
    if parts_l is None:
        maxima = [_gather_rows(m[..., :1], row_map).to(compute) * lse_scale for m in parts_m]
        empty = [m.isinf() for m in maxima]
        maxima = [m.masked_fill(e, float("-inf")) for m, e in zip(maxima, empty, strict=True)]
        return maxima, [torch.ones_like(m) for m in maxima], empty
    maxima = [_gather_rows(m, row_map).to(compute) for m in parts_m]
    sums = [_gather_rows(s, row_map).to(compute) for s in parts_l]
    empty = [(m == float("-inf")) & (s == 0) for m, s in zip(maxima, sums, strict=True)]
    return maxima, sums, empty


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
    """Note [row merge] in ``backends/__init__.py``, as torch operations, lane by lane."""
    # The whole row, statistics included, in the compute dtype: float64 outputs get float64 weights even
    # from float32 statistics.
    compute = torch.float64 if out_o.dtype == torch.float64 else torch.float32
    maxima, sums, empty = _part_stats(parts_m, parts_l, row_map, compute, lse_scale)
    new_max = maxima[0]
    for m in maxima[1:]:
        new_max = torch.maximum(new_max, m)
    # All parts empty: shift by 0 instead of -inf so exp() gives 0, not NaN.
    all_empty = new_max == float("-inf")
    shift = new_max.masked_fill(all_empty, 0.0)
    scaled = [s * torch.exp(m - shift) for m, s in zip(maxima, sums, strict=True)]
    new_sum = scaled[0]
    for s in scaled[1:]:
        new_sum = new_sum + s
    dim = out_o.shape[-1]
    merged = None
    for o, s, e in zip(parts_o, scaled, empty, strict=True):
        weight = (s / new_sum).masked_fill_(all_empty, 0.0)
        # An empty part's output is not read: a select of -0.0, the identity of +, so the sum is bitwise the
        # merge of the other parts.
        term = torch.where(_spread(e, dim), -0.0, o.to(compute) * _spread(weight, dim))
        merged = term if merged is None else merged + term
    assert merged is not None
    merged = merged.masked_fill_(_spread(all_empty, dim), 0.0)  # a row empty in every part: +0, not -0
    # Everything is computed before the first write, so outputs may alias any input.
    out_o.copy_(merged)
    lanes_out = out_m.shape[-1]
    if out_l is None:
        lse = (new_max + torch.log(new_sum)) / lse_scale
        _write_rows(_out_lanes(lse.masked_fill(all_empty, float("-inf")), lanes_out), out_m, row_map)
    else:
        _write_rows(_out_lanes(new_max, lanes_out), out_m, row_map)
        _write_rows(_out_lanes(new_sum, lanes_out), out_l, row_map)


def _lane0(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per row ``(..., 1)`` in lane 0 of ``like``'s lanes, 0 in the others (the LSE form reads lane 0)."""
    if like.shape[-1] == 1:
        return values
    out = values.new_zeros((*values.shape[:-1], like.shape[-1]))
    out[..., :1] = values
    return out


def _out_lanes(per_lane: torch.Tensor, lanes_out: int) -> torch.Tensor:
    """Merged lanes ``(..., lanes)`` as ``lanes_out`` output lanes: output lane ``c`` holds lane ``c % lanes``."""
    return _spread(per_lane, lanes_out).expand(*per_lane.shape[:-1], lanes_out)


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
    """Note [row merge backward] in ``_backward.py``, as vectorised torch operations, lane by lane."""
    compute = torch.float64 if parts_o[0].dtype == torch.float64 else torch.float32
    maxima, sums, empty = _part_stats(parts_m, parts_l, row_map, compute, lse_scale)
    lanes = maxima[0].shape[-1]
    new_max = maxima[0]
    for m in maxima[1:]:
        new_max = torch.maximum(new_max, m)
    all_empty = new_max == float("-inf")
    shift = new_max.masked_fill(all_empty, 0.0)
    decay = [torch.exp(m - shift) for m in maxima]  # exp(m_k - M): 0 for empty parts
    scaled = decay if parts_l is None else [s * e for s, e in zip(sums, decay, strict=True)]  # a_k
    new_sum = scaled[0]
    for a in scaled[1:]:
        new_sum = new_sum + a
    inv_sum = torch.where(all_empty, torch.zeros_like(new_sum), 1.0 / new_sum)  # all empty: weights 0, not NaN
    weights = [a * inv_sum for a in scaled]
    g = grad_o.to(compute)
    dim = g.shape[-1]
    # d_k = <g, o_k> per lane (over the elements d with d % lanes == j); an empty part's o_k is not read.
    dots = [
        _fold(torch.where(_spread(e, dim), 0.0, g * o.to(compute)), lanes) for o, e in zip(parts_o, empty, strict=True)
    ]
    mean_dot = weights[0] * dots[0]  # <g, o> recomputed from the parts
    for w, d in zip(weights[1:], dots[1:], strict=True):
        mean_dot = mean_dot + w * d
    # Output lane c holds merged lane c % lanes, so lane j's gradient sums those output lanes.
    g_m = _fold(_gather_rows(grad_m, row_map).to(compute), lanes)
    for w, e, dst in zip(weights, empty, grad_parts_o, strict=True):
        dst.copy_(torch.where(_spread(e, dim), 0.0, g * _spread(w, dim)))
    if parts_l is None:
        for w, d, e, dst in zip(weights, dots, empty, grad_parts_m, strict=True):
            _write_rows(_lane0(torch.where(e, 0.0, w * (lse_scale * (d - mean_dot) + g_m)), dst), dst, row_map)
        return
    assert grad_l is not None and grad_parts_l is not None
    g_l = _fold(_gather_rows(grad_l, row_map).to(compute), lanes)
    # The max is shared equally by tied parts (torch.maximum's rule and the central difference's); empty parts
    # take no share (their gradient is 0).
    ties = [((m == new_max) & ~e).to(compute) for m, e in zip(maxima, empty, strict=True)]
    tie_count = ties[0]
    for t in ties[1:]:
        tie_count = tie_count + t
    tie_count = tie_count.clamp_min(1.0)
    max_grad = g_m - new_sum * g_l
    for k in range(len(parts_o)):
        dl = ((dots[k] - mean_dot) * inv_sum + g_l) * decay[k]
        dm = weights[k] * (dots[k] - mean_dot) + scaled[k] * g_l + ties[k] / tie_count * max_grad
        _write_rows(torch.where(empty[k], 0.0, dl), grad_parts_l[k], row_map)
        _write_rows(torch.where(empty[k], 0.0, dm), grad_parts_m[k], row_map)
