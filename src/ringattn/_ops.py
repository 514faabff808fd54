"""torch.library custom ops behind the public merges : ``torch.ops.ringattn.*``.

Forward ops (autograd for them is registered in ``_backward.py``):

``ringattn::ring_attention_update(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout,
backend) -> (o, m, l)``
    The Ascend stats-form merge of two parts (``docs/contract.md``). Runs ``backends.select(backend, problem)``.
``ringattn::merge_states(parts_o, parts_lse, layout, lse_layout, lse_scale, backend) -> (o, lse)``
    The LSE-form merge of K parts. Runs ``merge_rows`` of ``backends.for_device(device, backend)``.
``ringattn::ring_attention_update_out`` / ``ringattn::merge_states_out``
    The same, writing into caller-given outputs (``mutates_args`` names them). No autograd: the public functions
    refuse ``out=`` when an input requires grad, as torch does.

The ops take the tensors in the *caller's* layout plus the layout names, and build the row views of Note [canonical
rows] themselves, so their outputs have the caller's shapes (fake impls are plain allocations) and a traced graph
holds one node per merge, with no transposes around it. Arguments are already validated (``_contract``,
``merge.py``); the ops never re-validate.

Why one implementation for all devices instead of ``register_kernel("cpu")`` / ``("cuda")``: the device -> kernel
table, its fallbacks and the user's ``backend=`` choice already live in ``ringattn.backends`` (a string argument of
the op); duplicating that table in torch.library registrations would let the two disagree, and could not honour
``backend=``. The op body is opaque to torch.compile either way (the fake impl is what gets traced).

Layout names (the ``layout`` / ``stats_layout`` arguments):

=========  =====================  ============  ============================================================
layout     output shape           rows (P, Q)   row view ``(P, Q, N, D)``
=========  =====================  ============  ============================================================
BSND       (B, S, N, D)           (B, S)        itself
BNSD       (B, N, S, D)           (B, S)        ``transpose(1, 2)``
SBH        (S, B, H), H = N * D   (S, B)        ``unflatten(2, (N, D))``
TND        (T, N, D)              (T, 1)        ``unsqueeze(1)``
=========  =====================  ============  ============================================================

Statistics (``stats_layout``) ``BNS`` (B, N, S), ``NT`` (N, T), ``TN`` (T, N), and ``per_batch`` ((T, N) holding
``docs/contract.md``'s per-batch, head-major rows; located through ``seq_offsets``). A trailing axis of lanes (Ascend's
8) is recognised by rank; LSE tensors have none. Statistics are viewed as ``(P, Q, N, lanes)`` without copying.
"""

from __future__ import annotations

import math

import torch

from . import backends
from ._alloc import empty_fast
from ._contract import UpdateProblem, per_batch_row_map
from .errors import AutogradError, expected

LAYOUT_RANKS = {"BSND": 4, "BNSD": 4, "SBH": 3, "TND": 3}
STATS_RANKS = {"BNS": 3, "NT": 2, "TN": 2, "per_batch": 2}
LN2 = math.log(2.0)


def num_heads(o: torch.Tensor, stats: torch.Tensor, layout: str) -> int:
    """N of a merge: read from the output for BSND/BNSD/TND, from the statistics (dim 1) for SBH."""
    if layout == "SBH":
        return stats.shape[1]
    return o.shape[1] if layout == "BNSD" else o.shape[-2]


def attn_rows(o: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """View an output-shaped tensor as ``(P, Q, N, D)`` rows, without copying (table in the module docstring)."""
    if layout == "BSND":
        return o
    if layout == "BNSD":
        return o.transpose(1, 2)
    if layout == "SBH":
        return o.unflatten(2, (heads, o.shape[2] // heads))
    return o.unsqueeze(1)


def stats_rows(s: torch.Tensor, layout: str, stats_layout: str) -> torch.Tensor:
    """View a statistics tensor as ``(P, Q, N, lanes)`` rows aligned with :func:`attn_rows`, without copying.

    For ``per_batch`` the view is the raw ``(T, 1, N, lanes)`` tensor; rows are then located through the row map.
    """
    if s.dim() == STATS_RANKS[stats_layout]:
        s = s.unsqueeze(-1)  # an LSE tensor: one lane
    if stats_layout == "BNS":
        return s.permute(2, 0, 1, 3) if layout == "SBH" else s.transpose(1, 2)
    if stats_layout == "NT":
        return s.transpose(0, 1).unsqueeze(1)
    return s.unsqueeze(1)


def row_map(seq_offsets: torch.Tensor | None, o: torch.Tensor, stats_layout: str, heads: int):
    if stats_layout != "per_batch":
        return None
    assert seq_offsets is not None, "the per_batch statistics layout needs seq_offsets"
    return per_batch_row_map(seq_offsets, o.shape[0], heads)


def row_backend(device: torch.device, backend: str, dtype: torch.dtype):
    """The backend module whose ``merge_rows`` / ``merge_rows_backward`` runs a row-level merge.

    ``auto`` keeps float64 (exact checks, gradcheck) on the portable ``torch`` backend, which every backend is
    compared with; ``reference`` has no row-level kernels, so it maps to ``torch`` as well.
    """
    if backend == "reference" or (backend == "auto" and dtype == torch.float64):
        return backends.load("torch")
    return backends.for_device(device, backend)


# --- Direct eager calls -----------------------------------------------------------------------------------------------

# Note [direct eager calls]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# Going through ``torch.ops.ringattn.*`` costs about 0.25 ms of Python per call on CPU (the autograd and
# ADInplaceOrView wrappers of ``torch.library``, two redispatches, the dynamo-disable wrapper): 4-10% of a
# 100-250 MB merge and most of a small one. When none of that machinery would act, the public functions call the
# op's body directly instead: not tracing (``torch.compiler.is_compiling()``), no torch-function or dispatch mode
# on the stack (``FlopCounterMode``, fake or functional tensors), no functorch transform (``vmap``), every tensor
# a plain ``torch.Tensor`` on a CPU or CUDA device, and no gradient to record (grad mode off, or no input
# requiring grad). The one effect of the wrappers that remains is the version counter bump of ``out=`` tensors
# (what ADInplaceOrView does), so autograd still notices a tensor it saved being overwritten:
# ``increment_version`` does it. Everything else (validation, backends, kernels) is the same code either way;
# tests run both paths (tests/test_ops.py).

_DIRECT_DEVICES = ("cpu", "cuda")


def _modes_active() -> bool:
    """A torch-function mode, a dispatch mode or a functorch transform (``vmap``, ``grad``: their wrapper tensors
    are plain ``torch.Tensor`` objects without storage) is active."""
    function_mode = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
    transforms = getattr(torch._C, "_are_functorch_transforms_active", None)
    if function_mode is None or dispatch_depth is None or transforms is None:  # private hooks gone: take the op
        return True
    return bool(function_mode()) or dispatch_depth() > 0 or bool(transforms())


def direct_call_ok(tensors) -> bool:
    """Whether the op's body may run without the dispatcher (Note [direct eager calls])."""
    if torch.compiler.is_compiling() or _modes_active():
        return False
    grad = torch.is_grad_enabled()
    return all(
        type(t) is torch.Tensor and t.device.type in _DIRECT_DEVICES and not (grad and t.requires_grad) for t in tensors
    )


# --- ring_attention_update: stats form, two parts --------------------------------------------------------------------

_STATS_ORDER = {"BNS": "SBH", "TN": "token_major", "per_batch": "per_batch"}


def _update_into(
    prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend, out_o, out_m, out_l
) -> None:
    if prev_o.numel() == 0 and prev_m.numel() == 0:
        return
    heads = prev_m.shape[1]
    problem = UpdateProblem(
        layout=layout,
        stats_order=_STATS_ORDER[stats_layout],
        prev_o=prev_o,
        prev_m=prev_m,
        prev_l=prev_l,
        cur_o=cur_o,
        cur_m=cur_m,
        cur_l=cur_l,
        seq_offsets=seq_offsets,
        num_heads=heads,
        head_dim=(prev_o.shape[2] // heads if heads else 0) if layout == "SBH" else prev_o.shape[2],
    )
    backends.ring_attention_update(backends.select(backend, problem), problem, out_o, out_m, out_l)


def _update_fresh(
    prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Fresh outputs without page-fault storms on CPU (Note [fresh outputs] in _alloc.py).
    outs = tuple(empty_fast(t.shape, t.dtype, t.device) for t in (prev_o, prev_m, prev_m))
    _update_into(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend, *outs)
    return outs


@torch.library.custom_op("ringattn::ring_attention_update", mutates_args=())
def ring_attention_update(
    prev_o: torch.Tensor,
    prev_m: torch.Tensor,
    prev_l: torch.Tensor,
    cur_o: torch.Tensor,
    cur_m: torch.Tensor,
    cur_l: torch.Tensor,
    seq_offsets: torch.Tensor | None,
    layout: str,
    stats_layout: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _update_fresh(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend)


@ring_attention_update.register_fake
def _(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend):
    return prev_o.new_empty(prev_o.shape), prev_m.new_empty(prev_m.shape), prev_m.new_empty(prev_m.shape)


@torch.library.custom_op("ringattn::ring_attention_update_out", mutates_args=("out_o", "out_m", "out_l"))
def ring_attention_update_out(
    prev_o: torch.Tensor,
    prev_m: torch.Tensor,
    prev_l: torch.Tensor,
    cur_o: torch.Tensor,
    cur_m: torch.Tensor,
    cur_l: torch.Tensor,
    seq_offsets: torch.Tensor | None,
    layout: str,
    stats_layout: str,
    backend: str,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor,
) -> None:
    _update_into(
        prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend, out_o, out_m, out_l
    )


@ring_attention_update_out.register_fake
def _(prev_o, prev_m, prev_l, cur_o, cur_m, cur_l, seq_offsets, layout, stats_layout, backend, out_o, out_m, out_l):
    return None


def update(inputs, options, outs=None):
    """``ring_attention_update(*inputs, *options)``, or its ``_out`` variant into ``outs``; through the custom op or
    directly (Note [direct eager calls]). Returns the outputs."""
    tensors = [*inputs, *(outs or ()), *([options[0]] if options[0] is not None else [])]
    if not direct_call_ok(tensors):
        if outs is None:
            return torch.ops.ringattn.ring_attention_update(*inputs, *options)
        torch.ops.ringattn.ring_attention_update_out(*inputs, *options, *outs)
        return tuple(outs)
    if outs is None:
        return _update_fresh(*inputs, *options)
    _update_into(*inputs, *options, *outs)
    torch.autograd.graph.increment_version(outs)
    return tuple(outs)


# --- merge_states: LSE form, K parts ----------------------------------------------------------------------------------


def _merge_states_into(parts_o, parts_lse, layout, lse_layout, lse_scale, backend, out, out_lse) -> None:
    if out.numel() == 0 and out_lse.numel() == 0:
        return
    heads = num_heads(parts_o[0], parts_lse[0], layout)
    rows = [attn_rows(o, layout, heads) for o in parts_o]
    stats = [stats_rows(s, layout, lse_layout) for s in parts_lse]
    row_backend(out.device, backend, out.dtype).merge_rows(
        rows,
        stats,
        None,
        attn_rows(out, layout, heads),
        stats_rows(out_lse, layout, lse_layout),
        None,
        lse_scale=lse_scale,
    )


def _merge_states_fresh(
    parts_o, parts_lse, layout, lse_layout, lse_scale, backend
) -> tuple[torch.Tensor, torch.Tensor]:
    out, out_lse = (empty_fast(t.shape, t.dtype, t.device) for t in (parts_o[0], parts_lse[0]))
    _merge_states_into(parts_o, parts_lse, layout, lse_layout, lse_scale, backend, out, out_lse)
    return out, out_lse


@torch.library.custom_op("ringattn::merge_states", mutates_args=())
def merge_states(
    parts_o: list[torch.Tensor],
    parts_lse: list[torch.Tensor],
    layout: str,
    lse_layout: str,
    lse_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _merge_states_fresh(parts_o, parts_lse, layout, lse_layout, lse_scale, backend)


@merge_states.register_fake
def _(parts_o, parts_lse, layout, lse_layout, lse_scale, backend):
    return parts_o[0].new_empty(parts_o[0].shape), parts_lse[0].new_empty(parts_lse[0].shape)


@torch.library.custom_op("ringattn::merge_states_out", mutates_args=("out", "out_lse"))
def merge_states_out(
    parts_o: list[torch.Tensor],
    parts_lse: list[torch.Tensor],
    layout: str,
    lse_layout: str,
    lse_scale: float,
    backend: str,
    out: torch.Tensor,
    out_lse: torch.Tensor,
) -> None:
    _merge_states_into(parts_o, parts_lse, layout, lse_layout, lse_scale, backend, out, out_lse)


@merge_states_out.register_fake
def _(parts_o, parts_lse, layout, lse_layout, lse_scale, backend, out, out_lse):
    return None


def merge(parts_o, parts_lse, options, outs=None):
    """``merge_states(parts_o, parts_lse, *options)``, or its ``_out`` variant into ``outs = (out, out_lse)``;
    through the custom op or directly (Note [direct eager calls]). Returns the outputs."""
    if not direct_call_ok([*parts_o, *parts_lse, *(outs or ())]):
        if outs is None:
            return torch.ops.ringattn.merge_states(parts_o, parts_lse, *options)
        torch.ops.ringattn.merge_states_out(parts_o, parts_lse, *options, *outs)
        return tuple(outs)
    if outs is None:
        return _merge_states_fresh(parts_o, parts_lse, *options)
    _merge_states_into(parts_o, parts_lse, *options, *outs)
    torch.autograd.graph.increment_version(outs)
    return tuple(outs)


def refuse_grad_with_out(named_inputs) -> None:
    """``out=`` variants are not differentiable: raise instead of silently dropping gradients (as torch does)."""
    if not torch.is_grad_enabled():
        return
    for name, t in named_inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise AutogradError(
                expected(
                    "out", "None when an input requires grad (out= is not differentiable)", f"{name} requiring grad"
                )
            )
