"""The float64 oracle: the contract's formulas transcribed as plainly as possible.

Nothing here is shared with the production path (``backends/``): its job is to disagree when that path
is wrong. It is importable by users who want to check their own kernels.

Statistics convention (Ascend): ``max`` is the running maximum of the *scaled* scores of a row and
``sum`` the sum of ``exp(score - max)`` over the row's keys, natural exponent. Each statistics row has 8
entries ("lanes"). They hold the same number by MindSpore's contract, but the rule below also fixes what
happens when they differ (MindSpore's own example draws them independently), as the Atlas A2 kernel does:

* the statistics are merged **lane by lane** (every lane on its own, elementwise);
* output element ``d`` of a row (``0 <= d < D``) is weighted by **lane ``d % 8``** of that row.

A part that saw no keys for a row is **empty** there: ``max = -inf`` and ``sum = 0`` (per lane), or an LSE
of ``-inf`` (old FlashAttention wrote ``+inf``). An empty part's output is never read: whatever it holds
(NaN, inf, garbage) does not reach the merge, which equals the merge of the other parts. A row empty in
every part merges to the empty state (out 0, max ``-inf``, sum 0; LSE ``-inf``), never NaN. NaN in a
statistic, or in the output of a non-empty part, propagates. Log-sum-exp form: ``lse = max + ln(sum)``
(natural log).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "empty_part",
    "merge_states_reference",
    "merge_stats_reference",
    "ring_attention_update_reference",
    "spread_lanes",
]


def empty_part(softmax_max: torch.Tensor, softmax_sum: torch.Tensor) -> torch.Tensor:
    """Where a part saw no keys, elementwise (per lane): ``max == -inf`` and ``sum == 0``."""
    return (softmax_max == float("-inf")) & (softmax_sum == 0)


def spread_lanes(per_lane: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(..., lanes)`` -> ``(..., head_dim)``: output element ``d`` takes lane ``d % lanes`` (Atlas A2: each
    32-byte block of a row meets the 8-lane statistics with a block stride of 0)."""
    lanes = per_lane.shape[-1]
    return per_lane[..., torch.arange(head_dim, device=per_lane.device) % lanes]


def merge_stats_reference(
    prev_max: torch.Tensor, prev_sum: torch.Tensor, cur_max: torch.Tensor, cur_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge statistics elementwise (every lane on its own) in float64: ``(max, sum, prev_weight, cur_weight)``.

    The weights ``a / L`` and ``b / L`` are what the two partial outputs are multiplied by. Where both
    parts are empty (both maxima ``-inf``) the result is the empty state (max ``-inf``, sum 0) with
    weights 0, not the NaN that ``exp(-inf - -inf)`` would give.
    """
    pm, ps, cm, cs = (x.to(torch.float64) for x in (prev_max, prev_sum, cur_max, cur_sum))
    new_max = torch.maximum(pm, cm)
    both_empty = new_max == float("-inf")
    shift = torch.where(both_empty, torch.zeros_like(new_max), new_max)
    a = ps * torch.exp(pm - shift)
    b = cs * torch.exp(cm - shift)
    new_sum = a + b
    prev_weight = torch.where(both_empty, torch.zeros_like(a), a / new_sum)
    cur_weight = torch.where(both_empty, torch.zeros_like(b), b / new_sum)
    return new_max, new_sum, prev_weight, cur_weight


def _weighted(o: torch.Tensor, weight: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``o * weight`` per element, 0 where the part is empty: a select, so the empty part's ``o`` is never read."""
    return torch.where(empty, torch.zeros_like(o), o * weight)


def _merge_rows(prev_o, cur_o, prev_w, cur_w, prev_empty, cur_empty):
    """Rows ``(R, D)`` of outputs and ``(R, lanes)`` of weights / empty flags: the lane rule, two parts."""
    head_dim = prev_o.shape[-1]
    return _weighted(prev_o, spread_lanes(prev_w, head_dim), spread_lanes(prev_empty, head_dim)) + _weighted(
        cur_o, spread_lanes(cur_w, head_dim), spread_lanes(cur_empty, head_dim)
    )


def ring_attention_update_reference(
    prev_attn_out: torch.Tensor,
    prev_softmax_max: torch.Tensor,
    prev_softmax_sum: torch.Tensor,
    cur_attn_out: torch.Tensor,
    cur_softmax_max: torch.Tensor,
    cur_softmax_sum: torch.Tensor,
    actual_seq_qlen: torch.Tensor | list[int] | None = None,
    layout: str = "SBH",
    softmax_layout: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ring_attention_update`` in float64, on already valid inputs; returns float64 tensors.

    Shapes: SBH outputs ``(S, B, H)`` with statistics ``(B, N, S, 8)``; TND outputs ``(T, N, D)`` with
    statistics ``(T, N, 8)``. ``softmax_layout=None`` reads TND statistics in the per-batch, head-major layout
    (batch ``i`` of tokens ``[c_i, c_{i+1})`` is an ``(N, S_i, 8)`` block at row ``c_i * N``); ``"TND"`` reads
    them token-major. Statistics merge lane by lane; output element ``d`` uses lane ``d % 8`` (module
    docstring), and an empty part's output is not read.
    """
    new_max, new_sum, prev_w, cur_w = merge_stats_reference(
        prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum
    )
    prev_e = empty_part(prev_softmax_max, prev_softmax_sum)
    cur_e = empty_part(cur_softmax_max, cur_softmax_sum)
    prev_o = prev_attn_out.to(torch.float64)
    cur_o = cur_attn_out.to(torch.float64)
    out = torch.empty_like(prev_o)
    if layout.upper() == "SBH":
        seq, batch, hidden = prev_o.shape
        heads = prev_softmax_max.shape[1]
        head_dim = hidden // heads if heads else 0
        for b in range(batch):
            for n in range(heads):
                cols = slice(n * head_dim, (n + 1) * head_dim)
                stats = (prev_w[b, n], cur_w[b, n], prev_e[b, n], cur_e[b, n])  # (S, 8) each
                out[:, b, cols] = _merge_rows(prev_o[:, b, cols], cur_o[:, b, cols], *stats)
        return out, new_max, new_sum

    tokens, heads, _ = prev_o.shape
    if softmax_layout is not None:  # token-major: stats[t, n] belongs to attention row (t, n)
        return _merge_rows(prev_o, cur_o, prev_w, cur_w, prev_e, cur_e), new_max, new_sum
    offsets = [int(v) for v in actual_seq_qlen]  # type: ignore[union-attr]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(tokens * heads, x.shape[-1])

    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        length = end - start
        for n in range(heads):
            first_row = start * heads + n * length  # batch i is an (N, S_i) block of rows
            sel = slice(first_row, first_row + length)
            stats = (rows(prev_w)[sel], rows(cur_w)[sel], rows(prev_e)[sel], rows(cur_e)[sel])
            out[start:end, n] = _merge_rows(prev_o[start:end, n], cur_o[start:end, n], *stats)
    return out, new_max, new_sum


def merge_states_reference(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp merge of K parts in float64: ``(out, lse)``.

    ``outputs[k]``: ``(..., D)``; ``lses[k]``: ``(...)``, natural log, one LSE per row (no lanes). A part whose
    LSE is ``-inf`` or ``+inf`` (old FlashAttention's empty rows) is empty there: its output is not read and its
    weight is 0. Per row: ``lse = log(sum_k exp(lse_k))`` over the non-empty parts and
    ``out = sum_k exp(lse_k - lse) * o_k``; a row empty in every part gives ``(0, -inf)``.
    """
    x = torch.stack([t.to(torch.float64) for t in lses])
    empty = x.isinf() & (x.isnan().logical_not())
    x = x.masked_fill(empty, float("-inf"))
    total = torch.logsumexp(x, 0)
    all_empty = total == float("-inf")
    weights = torch.exp(x - total.masked_fill(all_empty, 0.0)).masked_fill(all_empty, 0.0)
    out = torch.zeros_like(outputs[0], dtype=torch.float64)
    for o, w, e in zip(outputs, weights, empty, strict=True):
        out = out + _weighted(o.to(torch.float64), w.unsqueeze(-1), e.unsqueeze(-1))
    return out, total
