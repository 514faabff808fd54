r"""Closed-form backward of the row merge, and the autograd registrations of the ops in ``_ops.py``.

Derivation
----------
One row (a (token, head) pair), K parts with outputs ``o_k`` (D-vectors) and statistics ``(m_k, l_k)``. The
forward (Note [row merge]) is::

    M = max_k m_k,   a_k = l_k exp(m_k - M),   L = sum_k a_k,   w_k = a_k / L,   o = sum_k w_k o_k

with outputs ``o``, ``M``, ``L`` (stats form) or ``lse = (M + ln L) / s`` (LSE form; the parts are
``m_k = s x_k``, ``l_k = 1`` for caller-base LSEs ``x_k`` and ``s = lse_scale``, ``ln 2`` for base 2).

Lanes. The stats form has 8 statistics lanes per row, merged each on its own, and output element ``d`` reads the
weights of lane ``d % 8`` (Note [row merge]); the LSE form has one lane. Everything below holds per lane ``j``,
with ``o_k``, ``o`` and ``g`` restricted to the elements ``d % lanes == j``: lane j's statistics get the gradient of
those elements and of lane j of the merged statistics (output lane ``c`` holds merged lane ``c % lanes``, so
``g_m`` of lane j sums those output lanes).

Incoming gradients: ``g = dJ/do`` (a D-vector), ``g_m = dJ/dM`` and ``g_l = dJ/dL`` (or ``g_lse``). Write
``d_k = <g, o_k>`` and ``dbar = <g, o> = sum_k w_k d_k`` (recomputed from the parts, so the rounded output is not
needed).

1. ``do_k = w_k g``.
2. Holding ``M`` fixed, ``o`` depends on ``a_k`` through ``w``: ``do/da_k = (o_k - o) / L``, and ``dL/da_k = 1``.
   So ``dJ/da_k = (d_k - dbar) / L + g_l``.
3. ``M`` enters through every ``a_j`` (``da_j/dM = -a_j``) and directly:
   ``dJ/dM|total = g_m - sum_j a_j dJ/da_j = g_m - (sum_j w_j d_j - dbar) - L g_l = g_m - L g_l``.
4. ``M = max_k m_k`` is not differentiable at ties; the tied parts share it equally, ``t_k = [m_k == M] / #ties``.
   This is ``torch.maximum``'s rule and the central difference's (what ``gradcheck`` measures), and it is the
   only place ties matter: ``M + ln L`` itself is smooth and its derivative is ``w_k`` whatever ``t`` is.
5. With ``da_k/dl_k = exp(m_k - M)`` and ``da_k/dm_k = a_k``::

       dl_k = ((d_k - dbar) / L + g_l) * exp(m_k - M)
       dm_k = w_k (d_k - dbar) + a_k g_l + t_k (g_m - L g_l)

6. LSE form (substitute ``l_k = 1``, ``g_m = g_lse / s``, ``g_l = g_lse / (s L)``, then ``dx_k = s dm_k``; the
   ``t_k`` term vanishes)::

       dx_k = w_k (s (d_k - dbar) + g_lse)

Empty parts (``m_k = -inf`` and ``l_k = 0``, or an LSE of ``+-inf``) have ``w_k = a_k = exp(m_k - M) = 0``; their
output is not read (``d_k = 0`` whatever ``o_k`` holds, NaN included) and all their gradients are 0 (they take no
share of a tied maximum). A row with every part empty has ``M = -inf``: the forward shifts by 0 and sets ``w = 0``
(never NaN), and every gradient of its parts is 0. NaN in a statistic or in a non-empty part propagates.

Note [row merge backward]
-------------------------
``merge_rows_backward(grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, grad_parts_o, grad_parts_m,
grad_parts_l, *, row_map=None, lse_scale=1.0) -> None`` is the row-level gradient every backend implements next
to ``merge_rows`` (Note [row merge]), with the same views and the same two forms:

* ``parts_o``, ``parts_m``, ``parts_l``, ``row_map``, ``lse_scale``: exactly the forward's inputs (``parts_l`` None
  for the LSE form). Every lane of a statistic is read; the forward's merged statistics are *not* inputs (the
  kernel recomputes ``M``, ``L``, ``w_k`` from the K parts' lanes, cheaper than reading them).
* ``grad_o``: ``(P, Q, N, D)``, the dtype of the parts, any strides. ``grad_m``: ``(P, Q, N, lanes_out)``, the
  gradient of ``out_m`` (max or LSE, caller base), its lanes folded onto the merged lanes. ``grad_l``: the same
  for ``out_l`` (stats form) or None. All are real tensors (autograd materialises unused outputs' gradients as zeros).
* Writes ``grad_parts_o[k]`` ``(P, Q, N, D)`` in the parts' dtype, rounded once; ``grad_parts_m[k]`` and (stats
  form) ``grad_parts_l[k]`` ``(P, Q, N, lanes)`` in the statistics' dtype: each lane's gradient (Lanes, above).
  With ``row_map`` the statistics views are the raw per-batch ``(T, 1, N, lanes)`` tensors, as in the forward.
  Gradient outputs never alias inputs.
* Per row, in float32 (float64 for float64 parts): the formulas of steps 1, 5 and 6 above.

A fused kernel does it in one pass: per row, read the K parts' statistics, read ``g`` once and each ``o_k`` once
to form ``d_k`` (with ``g`` held in registers / a D-tile), then write each ``w_k g`` once and the 2K (or K)
statistic gradients. ``do_k = w_k g`` needs only the statistics, not the dots, so even when D spans several tiles
each tile of ``g`` and ``o_k`` is read once, adds to ``d_k`` and writes ``do_k`` at once: no pass re-reads ``g``.

The autograd layer
------------------
``register_autograd`` on each forward op saves only the inputs (no copies; the forward runs the same kernel with or
without ``requires_grad``) and calls ``ringattn::merge_backward``, itself a custom op, so ``torch.compile`` traces
the backward as one node too. Backends without ``merge_rows_backward`` yet fall back to the ``torch`` one.
"""

from __future__ import annotations

import torch

from . import _ops
from ._alloc import empty_fast
from .backends import torch_eager
from .errors import refuse_double_backward


def _run_backward(
    grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, seq_offsets, layout, stats_layout, lse_scale, backend
) -> list[torch.Tensor]:
    # Fresh gradients without page-fault storms on CPU (Note [fresh outputs] in _alloc.py): the backward's outputs
    # are as large as the forward's inputs, and a new 64 MiB tensor costs more to fault in than to compute.
    grads_o, grads_m, grads_l = (
        [empty_fast(t.shape, t.dtype, t.device) for t in ts] for ts in (parts_o, parts_m, parts_l)
    )
    if parts_o[0].numel() == 0 and parts_m[0].numel() == 0:
        return grads_o + grads_m + grads_l
    heads = _ops.num_heads(parts_o[0], parts_m[0], layout)
    module = _ops.row_backend(parts_o[0].device, backend, parts_o[0].dtype)
    kernel = getattr(module, "merge_rows_backward", torch_eager.merge_rows_backward)

    def attn(ts):
        return [_ops.attn_rows(t, layout, heads) for t in ts]

    def stats(ts):
        return [_ops.stats_rows(t, layout, stats_layout) for t in ts]

    form_l = bool(parts_l)  # stats form (ring_attention_update) or LSE form (merge_states)
    kernel(
        _ops.attn_rows(grad_o, layout, heads),
        _ops.stats_rows(grad_m, layout, stats_layout),
        _ops.stats_rows(grad_l, layout, stats_layout) if form_l else None,
        attn(parts_o),
        stats(parts_m),
        stats(parts_l) if form_l else None,
        attn(grads_o),
        stats(grads_m),
        stats(grads_l) if form_l else None,
        row_map=_ops.row_map(seq_offsets, parts_o[0], stats_layout, heads),
        lse_scale=lse_scale,
    )
    return grads_o + grads_m + grads_l


@torch.library.custom_op("ringattn::merge_backward", mutates_args=())
def merge_backward(
    grad_o: torch.Tensor,
    grad_m: torch.Tensor,
    grad_l: torch.Tensor | None,
    parts_o: list[torch.Tensor],
    parts_m: list[torch.Tensor],
    parts_l: list[torch.Tensor],
    seq_offsets: torch.Tensor | None,
    layout: str,
    stats_layout: str,
    lse_scale: float,
    backend: str,
) -> list[torch.Tensor]:
    """Gradients ``[d parts_o..., d parts_m..., d parts_l...]`` (``parts_l`` empty: LSE form), caller layouts."""
    return _run_backward(
        grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, seq_offsets, layout, stats_layout, lse_scale, backend
    )


@merge_backward.register_fake
def _(grad_o, grad_m, grad_l, parts_o, parts_m, parts_l, seq_offsets, layout, stats_layout, lse_scale, backend):
    return [t.new_empty(t.shape) for t in (*parts_o, *parts_m, *parts_l)]


# --- autograd of ringattn::ring_attention_update ----------------------------------------------------------------------


def _update_setup_context(ctx, inputs, output) -> None:
    *tensors, seq_offsets, layout, stats_layout, backend = inputs
    ctx.save_for_backward(*tensors, seq_offsets)
    ctx.options = (layout, stats_layout, backend)


def _update_backward(ctx, grad_o, grad_m, grad_l):
    refuse_double_backward("ring_attention_update")
    prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets = ctx.saved_tensors
    layout, stats_layout, backend = ctx.options
    d_prev_o, d_cur_o, d_prev_m, d_cur_m, d_prev_l, d_cur_l = merge_backward(
        grad_o,
        grad_m,
        grad_l,
        [prev_o, cur_o],
        [prev_m, cur_m],
        [prev_l, cur_l],
        seq_offsets,
        layout,
        stats_layout,
        1.0,
        backend,
    )
    return d_prev_o, d_prev_m, d_prev_l, d_cur_o, d_cur_m, d_cur_l, None, None, None, None


_ops.ring_attention_update.register_autograd(_update_backward, setup_context=_update_setup_context)


# --- autograd of ringattn::merge_states -------------------------------------------------------------------------------


def _merge_setup_context(ctx, inputs, output) -> None:
    parts_o, parts_lse, layout, lse_layout, lse_scale, backend = inputs
    ctx.save_for_backward(*parts_o, *parts_lse)
    ctx.options = (len(parts_o), layout, lse_layout, lse_scale, backend)


def _merge_backward(ctx, grad_o, grad_lse):
    refuse_double_backward("merge_states")
    parts, layout, lse_layout, lse_scale, backend = ctx.options
    saved = list(ctx.saved_tensors)
    grads = merge_backward(
        grad_o, grad_lse, None, saved[:parts], saved[parts:], [], None, layout, lse_layout, lse_scale, backend
    )
    return grads[:parts], grads[parts:], None, None, None, None


_ops.merge_states.register_autograd(_merge_backward, setup_context=_merge_setup_context)
