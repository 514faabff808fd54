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


def _gather_rows(stats: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Lane 0 of a stats view as ``(P, Q, N, 1)`` aligned with attention rows (Note [canonical rows])."""
    lane0 = stats[..., :1]
    if row_map is None:
        return lane0
    row_base, row_step = row_map
    tokens, _, heads, _ = stats.shape
    rows = row_base.unsqueeze(1) + torch.arange(heads, device=row_base.device) * row_step.unsqueeze(1)
    return lane0.reshape(tokens * heads, 1)[rows].unsqueeze(1)


def _scatter_rows(values: torch.Tensor, out: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write row values ``(P, Q, N, 1)`` to every lane of the stats view ``out``."""
    if row_map is None:
        out.copy_(values.expand_as(out))
        return
    row_base, row_step = row_map
    tokens, _, heads, lanes = out.shape
    rows = row_base.unsqueeze(1) + torch.arange(heads, device=row_base.device) * row_step.unsqueeze(1)
    flat = torch.empty((tokens * heads, lanes), dtype=out.dtype, device=out.device)
    flat[rows.reshape(-1)] = values.reshape(-1, 1).to(out.dtype).expand(-1, lanes)
    out.copy_(flat.view(tokens, 1, heads, lanes))


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
    compute = torch.float64 if out_o.dtype == torch.float64 else torch.float32
    stats_dtype = out_m.dtype
    if parts_l is None:  # LSE form: (max, sum) = (lse * scale, 1); +inf (old FlashAttention) means empty
        maxima = [_gather_rows(m, row_map).to(stats_dtype) * lse_scale for m in parts_m]
        maxima = [m.masked_fill(m == float("inf"), float("-inf")) for m in maxima]
        sums = [torch.ones_like(m) for m in maxima]
    else:
        maxima = [_gather_rows(m, row_map) for m in parts_m]
        sums = [_gather_rows(s, row_map) for s in parts_l]
    new_max = maxima[0]
    for m in maxima[1:]:
        new_max = torch.maximum(new_max, m)
    # All parts empty: shift by 0 instead of -inf so exp() gives 0, not NaN (SPEC section 7).
    all_empty = new_max == float("-inf")
    shift = new_max.masked_fill(all_empty, 0.0)
    scaled = [s * torch.exp(m - shift) for m, s in zip(maxima, sums)]
    new_sum = scaled[0]
    for s in scaled[1:]:
        new_sum = new_sum + s
    merged = None
    for o, s in zip(parts_o, scaled):
        weight = (s / new_sum).masked_fill_(all_empty, 0.0).to(compute)
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


def ring_attention_update(
    problem: UpdateProblem, out_o: torch.Tensor, out_m: torch.Tensor, out_l: torch.Tensor
) -> None:
    """Write the merged result of ``problem`` into ``out_o, out_m, out_l`` (they may alias inputs)."""
    row_map = problem.per_batch_row_map() if problem.stats_order == "per_batch" else None
    rows, stats = problem.attn_rows, problem.stats_rows
    merge_rows(
        [rows(problem.prev_o), rows(problem.cur_o)],
        [stats(problem.prev_m), stats(problem.cur_m)],
        [stats(problem.prev_l), stats(problem.cur_l)],
        rows(out_o),
        stats(out_m),
        stats(out_l),
        row_map=row_map,
    )
