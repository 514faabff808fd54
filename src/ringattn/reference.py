"""The float64 oracle: SPEC sections 3, 4 and 7 transcribed as plainly as possible.

Nothing here is shared with the production path (``backends/``): its job is to disagree when that path
is wrong. It is importable by users who want to check their own kernels.

Statistics convention (Ascend): ``max`` is the running maximum of the *scaled* scores of a row and
``sum`` the sum of ``exp(score - max)`` over the row's keys, natural exponent. A row that saw no keys is
``(out 0, max -inf, sum 0)``. Log-sum-exp form: ``lse = max + ln(sum)`` (natural log).
"""

from __future__ import annotations

import torch

__all__ = ["merge_stats_reference", "ring_attention_update_reference"]


def merge_stats_reference(
    prev_max: torch.Tensor, prev_sum: torch.Tensor, cur_max: torch.Tensor, cur_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge statistics elementwise in float64: ``(max, sum, prev_weight, cur_weight)``.

    The weights ``a / L`` and ``b / L`` are what the two partial outputs are multiplied by. Where both
    maxima are ``-inf`` (both parts empty) the result is the empty state (max ``-inf``, sum 0) with
    weights 0, not the NaN that ``exp(-inf - -inf)`` would give (SPEC section 7).
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

    Shapes as in SPEC section 2. ``softmax_layout=None`` reads TND statistics in the per-batch,
    head-major layout of SPEC section 4; ``"TND"`` reads them token-major.
    """
    new_max, new_sum, prev_w, cur_w = merge_stats_reference(
        prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum
    )
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
                p = prev_w[b, n, :, 0].unsqueeze(-1)  # (S, 1)
                c = cur_w[b, n, :, 0].unsqueeze(-1)
                out[:, b, cols] = prev_o[:, b, cols] * p + cur_o[:, b, cols] * c
        return out, new_max, new_sum

    tokens, heads, _ = prev_o.shape
    if softmax_layout is not None:  # token-major: stats[t, n] belongs to attention row (t, n)
        return prev_o * prev_w[..., :1] + cur_o * cur_w[..., :1], new_max, new_sum
    offsets = [int(v) for v in actual_seq_qlen]  # type: ignore[union-attr]
    prev_rows = prev_w.reshape(tokens * heads, prev_w.shape[-1])[:, 0]
    cur_rows = cur_w.reshape(tokens * heads, cur_w.shape[-1])[:, 0]
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        length = end - start
        for n in range(heads):
            first_row = start * heads + n * length  # batch i is an (N, S_i) block of rows
            rows = slice(first_row, first_row + length)
            p = prev_rows[rows].unsqueeze(-1)
            c = cur_rows[rows].unsqueeze(-1)
            out[start:end, n] = prev_o[start:end, n] * p + cur_o[start:end, n] * c
    return out, new_max, new_sum
