"""The portable torch backend as it was before Note [torch merge passes] (``backends/torch_eager.py``): lanes by
index gathers, one pass per part and step. Kept here, not in the package, as what ``test_torch_eager.py`` compares
the shipped backend with (bitwise for K = 2's statistics, within the stated roundings otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringattn.backends.torch_eager import _fold, _gather_rows, _lane0, _out_lanes, _spread, _write_rows


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


def _merge_rows_gather(
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
    """Note [row merge] by index gathers, lane by lane: the general case (a row width that is not a multiple of
    unequal lanes), and what :func:`merge_rows` is tested against."""
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


def _merge_rows_backward_gather(
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
    """Note [row merge backward] by index gathers, lane by lane: the general case (a row width that is not a
    multiple of unequal lanes), and what :func:`merge_rows_backward` is tested against."""
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
