"""Ring attention for Hugging Face transformers models: context parallelism in two added lines.

A working single-process training step becomes context parallel (the sequence sharded over the ranks of
``group``, every rank holding the whole batch) with::

    apply_ring_attention(model, group)                        # once, after building the model
    ...
    batch = shard_inputs(input_ids, labels, group=group)      # per step, instead of the plain inputs
    loss = model(**batch).loss
    loss.backward()                                           # gradients: summed over the group (hooks)
    optimizer.step()

The same script runs unchanged on one process (a ring of one). Every rank must pass the same full batch to
``shard_inputs`` (it checks, with one small collective).

Note [what the integration makes impossible]
--------------------------------------------
Each of these gives a plausible loss and wrong gradients when context parallelism is wired by hand; here each is
either done right by construction or raises:

* rotary embeddings fed LOCAL positions: ``shard_inputs`` returns GLOBAL position ids, and the attention function
  checks, on every call, that the position ids are this rank's zigzag shard of ``0 .. S-1`` (a model that makes
  its own ``arange`` positions, or packed position ids, raises);
* labels shifted inside each shard (the token after each cut is lost): ``shard_inputs`` shifts over the full
  sequence before sharding, and the model's loss function is wrapped to refuse ``labels`` without the
  ``shift_labels`` and ``num_items_in_batch`` that ``shard_inputs`` returns;
* the loss averaged per rank: ``num_items_in_batch`` is the global count of scored tokens, so each rank's loss is
  its share of the global mean and the shares sum to it;
* padding masks silently dropped (transformers builds no mask for an attention implementation it does not know):
  the integration registers its own mask function, which raises on any padding it receives; right padding is
  expressed by ``shard_inputs(attention_mask=...)`` instead (causal attention never lets a real token see a later
  pad token, and pad tokens are not scored);
* packed documents attending across documents: a packed row (position ids restarting at 0 at each document, as
  transformers' ``DataCollatorWithFlattening`` makes them, or ``cu_seqlens``) given to ``shard_inputs`` runs the
  varlen ring (:func:`ringattn.ring_attention_varlen`, per-document zigzag shards), so no token sees another
  document; restarting positions given straight to the model, and transformers' own ``cu_seq_lens_q/k``
  keywords, raise;
* gradients averaged over the context-parallel ranks (DDP over them halves every gradient at W = 2): each rank's
  parameter gradients are ALL-REDUCED WITH SUM over ``group`` by hooks, before accumulation, so that after
  ``backward`` every rank holds the gradient of the global loss; a DDP over the same ranks then averages W equal
  values and changes nothing;
* ``ring_attention``'s ``causal=False`` default: the integration always passes ``causal=True`` and refuses
  non-causal (encoder) attention modules;
* attention dropout, logit soft-capping, a KV cache holding earlier tokens, and any explicit mask raise: the ring
  computes causal attention, with the model's sliding windows (``sliding_window``: Mistral, Qwen2, Gemma 3's local
  layers, GPT-OSS; packed batches too, within each document) and attention sinks (``s_aux``, GPT-OSS) where it has
  them, and nothing else.

Note [torch.compile]
--------------------
``torch.compile(model, fullgraph=True)`` holds the whole model in one graph: the ring is the custom op
``ringattn::ring_attention`` (Note [ring under torch.compile] in ``ring/ops.py``), and the position check, which
reads the position ids' values, is the custom op ``ringattn::check_positions`` (registered as a side effect, so no
graph pass drops it; eager calls check directly, once per forward). Measured with ``torch._dynamo.explain`` (torch
2.13, transformers 5.25, a 2-layer Llama): 1 graph, 0 breaks (7 breaks when the attention function was
``torch.compiler.disable``d). The mask function breaks the graph only when a mask is passed (to refuse padding).

Composition with DDP / FSDP
---------------------------
With a ``DeviceMesh`` holding a ``cp`` dimension and data-parallel ones (torchtitan's ``dp x cp``), pass it as
``apply_ring_attention(model, mesh=mesh)`` and ``shard_inputs(..., mesh=mesh)`` and let FSDP2 (``fully_shard`` over
the flattened mesh, or HSDP) or DDP reduce over all of its ranks: ``num_items_in_batch`` counts every replica's
tokens and the integration scales the loss's gradient by the mesh size, so their average is the right sum, with no
arithmetic on the loss (Note [dp x cp gradients] in ``integrations/_mesh.py``, which also lists the compositions
refused). ``examples/fsdp2_cp.py`` trains that way.

With a process group, the default ``reduce_gradients=True`` sums the gradients over the context-parallel group when
each backward ends (Note [gradient sum over the group]). DDP and FSDP reduce the gradients themselves, so on top of
them pass ``reduce_gradients=False`` and give DDP / FSDP the flattened ``dp x cp`` group, multiplying the loss by the
cp size: they average over ``dp * cp`` ranks, and ``cp`` times that average is the sum over cp averaged over dp.
Left at True under DDP / FSDP, the first backward (or, under FSDP2, the first loss) raises ConfigError naming
``reduce_gradients``. Without data parallelism, ``reduce_gradients=False`` and :func:`all_reduce_gradients` after
``backward`` give the same gradients in one message per call.

``ringattn.gather_sequence`` (to collect full logits, say) is NOT differentiable: use it for evaluation only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.fx.node import has_side_effect

from ..errors import ConfigError, DTypeError, ShapeError, expected
from ..ring import ops as ring_ops
from ..ring import packed_shard_info, ring_attention, ring_attention_varlen, shard_packed, shard_sequence
from ..ring.comm import bounded_wait, group_rank_world
from . import _mesh

try:
    import transformers
    from transformers import PreTrainedModel
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ringattn.integrations.transformers needs Hugging Face transformers: pip install 'ringattn[transformers]'"
    ) from error

try:
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # transformers < 4.53: no mask interface, so no way to see (and refuse) padding masks
    AttentionMaskInterface = None  # type: ignore[assignment,misc]

__all__ = [
    "ATTN_IMPLEMENTATION",
    "IGNORE_INDEX",
    "CU_SEQLENS_KEY",
    "apply_ring_attention",
    "shard_inputs",
    "all_reduce_gradients",
    "ring_attention_forward",
    "ring_attention_mask",
]

ATTN_IMPLEMENTATION = "ringattn"
"""The name :func:`apply_ring_attention` registers the ring under (``AttentionInterface``,
``AttentionMaskInterface``) and sets as the model's ``attn_implementation``."""
# The model keyword that carries a packed batch's GLOBAL cu_seqlens from shard_inputs to the attention function.
CU_SEQLENS_KEY = "ringattn_cu_seqlens"
"""The model keyword (``str``) that carries a packed batch's GLOBAL ``cu_seqlens`` (int64 ``[0, ..., S]``) from
:func:`shard_inputs` to :func:`ring_attention_forward`."""
IGNORE_INDEX = -100
"""The label of tokens not scored (``int``, transformers' default): :func:`shard_inputs`'s ``ignore_index``."""
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
}


@dataclasses.dataclass
class _RingState:
    """What the attention function of a prepared model needs: the group, and the hooks to remove on re-apply."""

    group: Any
    handles: list = dataclasses.field(default_factory=list)
    checked_positions: Any = None  # weakref to the last position-id tensor found correct
    mesh: Any = None  # the DeviceMesh of apply_ring_attention(mesh=...), if any
    grad_scale: int = 1  # the loss's gradient is multiplied by it (Note [dp x cp gradients] in _mesh.py)
    reduce_gradients: bool = False  # the integration's own gradient hooks sum over the group
    model: Any = None  # weakref to the model, for the composition check at the first eager loss
    composition_checked: bool = False


# id(config) -> state. Configs are shared by every attention module of a model, and the attention function
# receives the module, so this finds the group without touching the config (configs are deep-copied on save).
_STATES: dict[int, _RingState] = {}


def _rank_world(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; a ring of one without a process group, except in a process launched as
    one of several ranks, which raises ConfigError as the ring does (Note [launched without a process group] in
    ``ring/comm.py``)."""
    return group_rank_world(group)


def _zigzag_positions(total: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(total, device=device).unsqueeze(0)
    return shard_sequence(positions, rank, world, dim=1)


def _check_positions(position_ids: Any, local: int, state: _RingState, cu_seqlens: torch.Tensor | None) -> None:
    if state.checked_positions is not None and state.checked_positions() is position_ids:
        return  # the same tensor as the previous layer's: checked once per forward
    rank, world = _rank_world(state.group)
    if not isinstance(position_ids, torch.Tensor):
        raise ConfigError(
            expected("position_ids", "the global position ids of shard_inputs(...) (model(**batch))", "None")
        )
    got = position_ids.detach().to("cpu")
    if cu_seqlens is not None:
        want = packed_shard_info(cu_seqlens, rank, world).position_ids.unsqueeze(0)
        what = f"the positions of this rank's slots of the packed batch (rank {rank} of {world})"
    elif world == 1:  # a ring of one holds the whole sequence in order: any length (model.generate's too)
        want = torch.arange(local, device=got.device).unsqueeze(0)
        what = f"the positions 0..{local - 1} of the whole sequence (a ring of one)"
    elif local % 2 == 0:
        want = _zigzag_positions(local * world, rank, world, got.device)
        what = f"this rank's zigzag shard of the global positions 0..{local * world - 1} (rank {rank} of {world})"
    else:
        want, what = None, "an even number of positions (a zigzag shard)"
    ok = want is not None and got.dim() == 2 and got.shape[-1] == want.shape[-1] == local
    if not ok or not bool((got == want).all()):
        raise ConfigError(
            expected(
                "position_ids",
                f"{what}: pass shard_inputs(...) to the model (local or restarting positions are wrong)",
                f"shape {tuple(got.shape)} starting {got.reshape(-1)[:4].tolist()}",
            )
        )
    state.checked_positions = weakref.ref(position_ids)


@torch.library.custom_op("ringattn::check_positions", mutates_args=())
def _check_positions_op(
    position_ids: torch.Tensor | None, local: int, group: str, cu_seqlens: torch.Tensor | None
) -> None:
    """:func:`_check_positions` as a node of a compiled graph (Note [torch.compile]): it reads the values when the
    graph runs. Registered as a side effect, so graph passes keep it although it returns nothing."""
    _check_positions(position_ids, local, _RingState(ring_ops.resolve_group(group)), cu_seqlens)


@_check_positions_op.register_fake
def _(position_ids, local, group, cu_seqlens) -> None:
    return None


has_side_effect(torch.ops.ringattn.check_positions.default)


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``): causal ring attention over the model's group.

    ``query (B, N, S_local, D)``, ``key, value (B, Nkv, S_local, D)`` (this rank's zigzag shard) -> ``(out (B,
    S_local, N, D), None)``. Registered by :func:`apply_ring_attention`; raises ConfigError for anything the ring
    cannot honour (Note [what the integration makes impossible]).
    """
    state = _STATES.get(id(getattr(module, "config", None)))
    if state is None:
        raise ConfigError(expected("model", "a model prepared by apply_ring_attention(model)", type(module).__name__))
    if dropout:
        raise ConfigError(
            expected(
                "attention dropout", "0 in training (ring attention has no dropout: set attention_dropout=0)", dropout
            )
        )
    if attention_mask is not None:
        raise ConfigError(
            expected(
                "attention_mask",
                "None (ring attention is causal only; pass right-padding masks to shard_inputs)",
                attention_mask,
            )
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ConfigError(expected(name, f"None (ring attention does not implement {what})", kwargs[name]))
    if not getattr(module, "is_causal", True):
        raise ConfigError(expected("module.is_causal", "True (the integration runs causal ring attention)", False))
    if key.shape[2] != query.shape[2]:
        raise ConfigError(
            expected(
                "key",
                f"{query.shape[2]} tokens, those of the query (no KV cache of earlier tokens: pass use_cache=False)",
                tuple(key.shape),
            )
        )
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            raise ConfigError(
                expected(
                    name, "None (give packed batches to shard_inputs: cu_seqlens or restarting position ids)", "a value"
                )
            )
    cu_seqlens = kwargs.get(CU_SEQLENS_KEY)
    if torch.compiler.is_compiling():
        position_ids = kwargs.get("position_ids")
        torch.ops.ringattn.check_positions(position_ids, query.shape[2], ring_ops.group_name(state.group), cu_seqlens)
    else:
        _check_positions(kwargs.get("position_ids"), query.shape[2], state, cu_seqlens)
    sinks = kwargs.get("s_aux")  # GPT-OSS's attention sinks: one logit per head (Note [attention sinks])
    window = _window(kwargs.get("sliding_window"))
    if cu_seqlens is None:
        out = ring_attention(query, key, value, causal=True, softmax_scale=scaling, group=state.group, layout="BNSD",
                             sinks=sinks, window=window)  # fmt: skip
        return out.transpose(1, 2), None
    # A packed row (B = 1): the varlen ring, documents never attending to each other.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = ring_attention_varlen(q, k, v, cu_seqlens, causal=True, softmax_scale=scaling, group=state.group, sinks=sinks,
                                window=window)  # fmt: skip
    return out.unsqueeze(0), None


def _window(sliding_window: Any) -> tuple[int, int] | None:
    """transformers' ``sliding_window`` (a query sees the keys ``q - sliding_window < k <= q``: its
    ``sliding_window_causal_mask``) as the ring's ``window`` (Note [windows] in ``ring/schedule.py``)."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ConfigError(expected("sliding_window", "None or an int >= 1", repr(sliding_window)))
    return (sliding_window - 1, 0)


def ring_attention_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """transformers mask function (``AttentionMaskInterface``): no mask (the ring applies the causal one).

    Raises ConfigError when the model receives a padding mask with any padding: pass it to
    :func:`shard_inputs` instead (right padding only).
    """
    if attention_mask is not None:
        _refuse_padding(attention_mask)
    return None


@torch.compiler.disable  # reads the mask's values: a graph break, only when a mask is passed at all
def _refuse_padding(attention_mask: torch.Tensor) -> None:
    if not bool(attention_mask.all()):
        raise ConfigError(
            expected(
                "attention_mask",
                "no padding in the model's inputs (pass the full mask to shard_inputs(attention_mask=...))",
                "a mask with padding",
            )
        )


def _guard_loss(loss_function: Any, state: _RingState) -> Any:
    """The model's loss, refusing what would be silently wrong on a shard (Note [what the integration ...]); its
    gradient scaled by ``state.grad_scale`` (Note [dp x cp gradients] in ``_mesh.py``)."""
    if getattr(loss_function, "_ringattn_guard", False):
        loss_function._ringattn_state = state
        return loss_function

    @functools.wraps(loss_function)
    def guarded(logits, labels, vocab_size, num_items_in_batch=None, shift_labels=None, **kwargs):
        if shift_labels is None:
            raise ConfigError(
                expected(
                    "labels",
                    "the batch of shard_inputs(input_ids, labels) (labels shifted over the full sequence)",
                    "labels without shift_labels (they would be shifted inside each shard)",
                )
            )
        if num_items_in_batch is None:
            raise ConfigError(
                expected(
                    "num_items_in_batch",
                    "the global count of scored tokens from shard_inputs (else each rank averages its own)",
                    "None",
                )
            )
        loss = loss_function(
            logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels, **kwargs
        )
        ring = guarded._ringattn_state
        if not torch.compiler.is_compiling() and not ring.composition_checked and ring.model() is not None:
            _mesh.check_composition(ring.model(), ring.mesh, ring.reduce_gradients)
            ring.composition_checked = True
        return _mesh.scale_gradient(loss, ring.grad_scale)

    guarded._ringattn_guard = True  # type: ignore[attr-defined]
    guarded._ringattn_state = state  # type: ignore[attr-defined]
    return guarded


# Bytes of gradients per all-reduce message (DDP's default bucket is 25 MB).
_BUCKET_BYTES = 32 << 20


class _GroupGradientSum:
    """Sums every backward's parameter gradients over ``group``, once the backward has finished.

    Note [gradient sum over the group]
    ----------------------------------
    Each rank's loss is its share of the global mean, so the gradient of the global loss is the SUM over the ranks of
    each rank's gradient. A hook on each parameter sets the gradient accumulated so far (``previous``, None at the
    first backward) aside and leaves ``.grad`` None, so that autograd stores in ``.grad`` exactly what THIS backward
    brings (``mine``); on the first hook it queues a callback that runs when the backward ends: it all-reduces every
    ``mine`` in a few flat messages (per device and dtype, up to ``_BUCKET_BYTES``) and makes ``.grad = previous +
    sum``, so gradient accumulation over several backwards stays exact. A parameter with no gradient on a rank sends
    zeros and a flag (the flags travel in the same message), so every rank runs the same collectives, and it gets
    ``.grad = sum`` only if some rank had a gradient for it: a parameter no rank used keeps ``None``, as in one
    process.

    One bit pattern per replica: the all-reduce hands every rank the same ``sum`` (ring and tree all-reduces end
    with every rank holding the reduced buffer of one reduction), and ``previous`` is the same on every rank (it
    was made by the same rule, or is None), so ``previous + sum`` is one IEEE addition of the same operands on
    every rank: bitwise equal gradients, hence bitwise equal parameters after any number of optimizer steps. The
    earlier ``.grad.add_(sum - mine)`` on ``previous + mine`` rounded differently on each rank (issue 22: 25,356 of
    90,432 gradient elements differed after two micro-batches, 23,795 parameters after 20 steps).

    One all-reduce per parameter, inside the backward (the previous design, exact too), made the W=2 step on gloo
    (2 cores) 1.17-1.24x the single-process step: each of the 21 all-reduces waited for the slower rank; one message
    after the backward, 1.10-1.11x, of which the sum is ~3% (``examples/transformers_ring.py --bench``, see
    benchmarks/RESULTS.md).

    DDP or FSDP on top would read the gradients before this callback runs, and write theirs after it: that
    combination is refused, not silently wrong. A second callback, queued behind every callback of the backward,
    checks that nothing replaced or rewrote a gradient after the sum and raises ConfigError naming
    ``reduce_gradients`` if something did (compose with ``reduce_gradients=False`` instead: module docstring).
    """

    def __init__(self, params: list[torch.nn.Parameter], group: Any) -> None:
        self.params = params
        self.group = group
        self.buckets = self._buckets()
        # index -> the gradient accumulated before this backward (None: none), for parameters this backward reached
        self.previous: dict[int, torch.Tensor | None] = {}
        self.queued = False

    def hook(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        param = self.params[index]
        if index not in self.previous:  # a second call in the same backward (reentrant checkpointing) keeps it
            self.previous[index] = param.grad
            param.grad = None  # autograd now stores this backward's gradient alone in .grad
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.sum)
        return grad

    def sum(self) -> None:
        self.queued = False
        previous, self.previous = self.previous, {}
        written = []
        for bucket in self.buckets:
            sizes = [self.params[i].numel() for i in bucket]
            like = self.params[bucket[0]]
            flat = torch.zeros(sum(sizes) + len(bucket), dtype=like.dtype, device=like.device)
            offsets = [0, *itertools.accumulate(sizes)]
            for j, i in enumerate(bucket):
                if i in previous and self.params[i].grad is not None:
                    flat[offsets[j] : offsets[j + 1]].copy_(self.params[i].grad.reshape(-1))  # mine
                    flat[offsets[-1] + j] = 1  # this rank has a gradient for parameter i
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            bounded_wait(work, "reduce_gradients' all-reduce of the gradients", group=self.group, host_reads=False)
            for j, i in enumerate(bucket):
                param, total = self.params[i], flat[offsets[j] : offsets[j + 1]].view_as(self.params[i])
                before = previous[i] if i in previous else param.grad  # untouched when this backward missed it
                if flat[offsets[-1] + j] == 0:  # no rank had a gradient for it
                    if i in previous:
                        param.grad = before
                    continue
                if before is not None:
                    param.grad = before.add_(total)  # previous + sum: the same operands on every rank
                elif param.grad is not None:
                    param.grad.copy_(total)  # reuses this backward's buffer
                else:
                    param.grad = total.clone()
                written.append((param, param.grad, param.grad._version))
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._untouched, written))

    def _buckets(self) -> list[list[int]]:
        """Parameter indices grouped by (device, dtype), in messages of at most ``_BUCKET_BYTES``."""
        groups: dict[tuple, list[list[int]]] = {}
        filled: dict[tuple, int] = {}  # bytes in each group's last bucket
        for i, param in enumerate(self.params):
            key, size = (param.device, param.dtype), param.numel() * param.element_size()
            buckets = groups.setdefault(key, [[]])
            if buckets[-1] and filled[key] + size > _BUCKET_BYTES:
                buckets.append([])
                filled[key] = 0
            buckets[-1].append(i)
            filled[key] = filled.get(key, 0) + size
        return [bucket for buckets in groups.values() for bucket in buckets]

    @staticmethod
    def _untouched(written: list) -> None:
        for param, grad, version in written:
            if param.grad is not grad or grad._version != version:
                raise ConfigError(
                    expected(
                        "reduce_gradients",
                        "False when DDP or FSDP also reduces the gradients (they rewrote the sum over the "
                        "context-parallel group): give them the flattened dp x cp group and scale the loss by the cp "
                        "size instead",
                        True,
                    )
                )


def _check_capabilities() -> None:
    from transformers.loss import loss_utils

    if AttentionMaskInterface is None:
        raise ConfigError(expected("transformers", "4.53 or newer (AttentionMaskInterface)", transformers.__version__))
    if "shift_labels" not in inspect.signature(loss_utils.ForCausalLMLoss).parameters:
        raise ConfigError(
            expected("transformers", "a version whose ForCausalLMLoss takes shift_labels", transformers.__version__)
        )


def apply_ring_attention(
    model: PreTrainedModel, group: Any = None, *, mesh: Any = None, reduce_gradients: bool | None = None
) -> PreTrainedModel:
    """Make ``model``'s attention causal ring attention over ``group`` (context parallelism); returns ``model``.

    Registers ringattn's attention and mask functions with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` under the name ``"ringattn"`` and switches the model to it; wraps the model's loss
    function so that only batches from :func:`shard_inputs` are scored; and, with ``reduce_gradients``, installs
    hooks that SUM every backward's parameter gradients over ``group`` when the backward ends (Note [gradient sum
    over the group]), so each rank ends ``backward`` with the gradient of the global loss (gradient accumulation
    over several backwards included). Calling it again replaces the previous hooks.

    Parameters
    ----------
    model : transformers ``PreTrainedModel`` (not yet wrapped in DDP / ``torch.compile``; ``fully_shard`` may come
        before or after)
        A causal decoder whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2, ...).
    group : ProcessGroup, optional
        The context-parallel ranks (default: the default group; without an initialised process group, a ring of
        one: plain attention, unless the process was launched as one of several ranks: ``WORLD_SIZE`` > 1 raises).
    mesh : DeviceMesh, optional
        Instead of ``group``: a 1-D mesh (its ranks are the ring, as ``group``), or a mesh with a dimension named
        ``cp`` (the ring) and data-parallel dimensions, reduced by FSDP2 (``fully_shard`` over the flattened mesh,
        or HSDP) or DDP over all of its ranks: the integration then scales the loss's gradient by the mesh size so
        that their average is the right sum (Note [dp x cp gradients] in ``integrations/_mesh.py``; pass the same
        mesh to :func:`shard_inputs`).
    reduce_gradients : bool, optional
        Install the gradient hooks (default: True for ``group`` or a 1-D mesh, False for a ``dp x cp`` mesh). Pass
        False when DDP / FSDP reduce the gradients: with ``mesh`` the loss's gradient is scaled for them; with
        ``group`` they reduce over the flattened ``dp x cp`` group, the loss scaled by the cp size (module
        docstring). Left True there, ``backward`` (DDP) or the first loss (FSDP2) raises.

    Raises
    ------
    ConfigError (ValueError, RuntimeError)
        ``model`` is not a transformers model, or its attention does not go through ``AttentionInterface``;
        transformers is too old (needs ``AttentionMaskInterface``, 4.53+); ``mesh`` not a 1-D or ``cp`` mesh, or
        given with ``group``; ``reduce_gradients=True`` with a ``dp x cp`` mesh or under FSDP2; FSDP2 reducing over
        other ranks than the mesh's (Note [dp x cp gradients]). Unsupported features (attention
        dropout in training, sliding windows, soft-capping, padding masks reaching the model, KV caches) raise
        when the model runs. Also: no process group in a process launched with ``WORLD_SIZE`` > 1 (torchrun without
        ``init_process_group``; Note [launched without a process group] in ``ring/comm.py``).
    CommTimeoutError (RuntimeError)
        From ``backward``: a rank of the group did not join the gradient sum within the communication timeout
        (``RINGATTN_COMM_TIMEOUT``, default 600 s; Note [bounded waits] in ``ring/comm.py``).
    """
    _check_capabilities()
    if not isinstance(model, PreTrainedModel):
        raise ConfigError(
            expected(
                "model",
                "a transformers PreTrainedModel (apply before wrapping in DDP/FSDP/compile)",
                type(model).__name__,
            )
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ConfigError(
            expected(
                "model",
                "a model whose attention goes through transformers' AttentionInterface",
                f"{type(model).__name__} (_supports_attention_backend is False)",
            )
        )
    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ring_attention_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    configs = {id(model.config): model.config}
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None:
            configs[id(config)] = config
    old = _STATES.get(id(model.config))
    if old is not None:
        for handle in old.handles:
            handle.remove()
    group, mesh, reduce_gradients, grad_scale = _mesh_composition(group, mesh, reduce_gradients)
    _, world = _rank_world(group)
    _mesh.check_composition(model, mesh, reduce_gradients and world > 1)
    state = _RingState(group, mesh=mesh, grad_scale=grad_scale, reduce_gradients=reduce_gradients and world > 1,
                       model=weakref.ref(model))  # fmt: skip
    for key, config in configs.items():
        _STATES[key] = state
        weakref.finalize(config, _STATES.pop, key, None)
    model.loss_function = _guard_loss(model.loss_function, state)
    if reduce_gradients and world > 1:
        params = [param for param in model.parameters() if param.requires_grad]
        summed = _GroupGradientSum(params, group)
        for index, param in enumerate(params):
            state.handles.append(param.register_hook(functools.partial(summed.hook, index)))
    return model


def _mesh_composition(group: Any, mesh: Any, reduce_gradients: bool | None) -> tuple[Any, Any, bool, int]:
    """``(cp group, mesh, reduce_gradients, loss-gradient scale)`` of ``apply_ring_attention``'s arguments."""
    if _mesh.is_mesh(group) and mesh is None:  # a mesh given as the group
        group, mesh = None, group
    if mesh is None:
        return group, None, True if reduce_gradients is None else reduce_gradients, 1
    _mesh.check_mesh(mesh, group)
    if reduce_gradients is None:
        reduce_gradients = mesh.ndim == 1
    elif reduce_gradients and mesh.ndim > 1:
        raise ConfigError(
            expected(
                "reduce_gradients",
                "None or False with a dp x cp mesh (FSDP / DDP over the mesh reduce the gradients: Note [dp x cp "
                "gradients] in integrations/_mesh.py)",
                True,
            )
        )
    return ring_ops.process_group(mesh, "mesh"), mesh, reduce_gradients, 1 if reduce_gradients else mesh.size()


def all_reduce_gradients(model: torch.nn.Module, group: Any = None) -> None:
    """Sum every parameter's ``.grad`` over ``group`` in one all-reduce (for ``reduce_gradients=False``).

    Call after ``backward`` on every rank of the group. The sum (not the average) is the gradient of the global
    loss: each rank's loss is its share of the global mean (``num_items_in_batch`` of :func:`shard_inputs`).
    """
    _, world = _rank_world(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _int_matrix(name: str, value: Any, like: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DTypeError(expected(name, "a torch.Tensor", type(value).__name__))
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise DTypeError(expected(name, "an integer (or bool) tensor", value.dtype))
    if value.dim() != 2 or (like is not None and value.shape != like.shape):
        want = f"shape {tuple(like.shape)} (that of input_ids)" if like is not None else "shape (B, S)"
        raise ShapeError(expected(name, want, tuple(value.shape)))
    return value


def _packed_cu_seqlens(position_ids: Any, cu_seqlens: Any, batch: int, seq: int) -> torch.Tensor | None:
    """The documents of a packed batch as int64 CPU ``cu_seqlens``, or None for one sequence per row.

    Packing is told by ``cu_seqlens`` (``[0, ..., S]``) or by ``position_ids`` that restart at 0 at each document
    (transformers' ``DataCollatorWithFlattening``); when both are given they must agree.
    """
    cu = None
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, (list, tuple)):
            cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1:
            raise DTypeError(expected("cu_seqlens", "None or a 1-D int64 tensor [0, ..., S]", cu_seqlens))
        cu = cu_seqlens.detach().to("cpu")
        values = cu.tolist()
        if (
            not values
            or values[0] != 0
            or values[-1] != seq
            or any(b < a for a, b in zip(values[:-1], values[1:], strict=True))
        ):
            raise ConfigError(expected("cu_seqlens", f"a non-decreasing sequence from 0 to S = {seq}", values[:6]))
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != seq:
            raise ShapeError(expected("position_ids", f"None or a tensor (B, {seq})", position_ids))
        pos = position_ids.detach().to("cpu", torch.int64)
        if bool((pos == torch.arange(seq)).all()):
            found = None
        else:
            starts = (pos[0] == 0).nonzero().squeeze(1).tolist()
            found = torch.tensor([*starts, seq], dtype=torch.int64)
            packed = pos.shape[0] == 1 and starts[:1] == [0]
            if packed:  # positions 0, 1, ... within each document
                within = torch.arange(seq) - torch.repeat_interleave(found[:-1], torch.diff(found))
                packed = bool((pos[0] == within).all())
            if not packed:
                raise ConfigError(
                    expected(
                        "position_ids",
                        "0..S-1 in every row, or one packed row whose positions restart at 0 at each document",
                        f"shape {tuple(pos.shape)}, other positions",
                    )
                )
        if cu is not None and (found if found is not None else torch.tensor([0, seq])).tolist() != cu.tolist():
            raise ConfigError(expected("position_ids", "the documents of cu_seqlens", "other documents"))
        cu = found if cu is None else cu
    if cu is not None and cu.tolist() == [0, seq]:
        return None  # one document: the dense ring
    if cu is not None and batch != 1:
        raise ShapeError(expected("input_ids", "one row (B = 1) for a packed batch", f"B = {batch}"))
    return cu


def _right_padding_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.to(torch.int64)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ConfigError(expected("attention_mask", "values 0 and 1", "other values"))
    lengths = mask.sum(-1)
    want = (torch.arange(mask.shape[-1], device=mask.device) < lengths.unsqueeze(-1)).to(torch.int64)
    if not bool((mask == want).all()):
        raise ConfigError(
            expected(
                "attention_mask",
                "right padding only (1...1 0...0 per row: causal attention then never lets a real token see a pad)",
                "left padding or holes",
            )
        )
    return lengths


def _collective_device(group: Any, fallback: torch.device) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def _check_same_batch(group: Any, tensors: list[torch.Tensor | None]) -> None:
    """One small all_gather: every rank must hold the same full batch (a sampler per rank would be wrong)."""
    fingerprint = []
    for t in tensors:
        if t is None:
            fingerprint += [-1, -1]
            continue
        flat = t.reshape(-1).to(torch.int64)
        weights = torch.arange(flat.numel(), device=flat.device) % 1_000_003 + 1
        fingerprint += [flat.numel(), int((flat * weights).sum())]
    device = _collective_device(group, tensors[0].device)
    mine = torch.tensor(fingerprint, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    bounded_wait(dist.all_gather(every, mine, group=group, async_op=True), "shard_inputs' batch check", group=group)
    if any(not torch.equal(mine, other) for other in every):
        raise ConfigError(
            expected(
                "input_ids",
                "the same full batch on every rank of the group (shard_inputs cuts it)",
                "different batches",
            )
        )


def shard_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    group: Any = None,
    mesh: Any = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: Any = None,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """This rank's share of a full causal-LM batch, as keyword arguments for the model: ``model(**batch)``.

    Every rank of ``group`` passes the same full batch. The sequence is padded at the end to a multiple of 2W
    (W = ranks in ``group``) and cut zigzag (rank r holds chunks r and 2W-1-r of 2W, as ring attention expects);
    a packed row is cut the same way per document (:func:`ringattn.shard_packed`).

    Parameters
    ----------
    input_ids : integer Tensor ``(B, S)``
        The full token ids.
    labels : integer Tensor ``(B, S)``, optional
        Unshifted labels, as transformers takes them (``ignore_index`` marks tokens not scored); shifted here over
        the FULL sequence before sharding, so the token after each cut keeps its target.
    group : ProcessGroup, optional
        The context-parallel ranks (default group; without an initialised process group, a ring of one, unless
        ``WORLD_SIZE`` > 1 says this process is one of several ranks: ConfigError).
    mesh : DeviceMesh, optional
        Instead of ``group``: the mesh of :func:`apply_ring_attention`. Every rank of its ``cp`` dimension passes the
        same full batch; each data-parallel replica its own, and ``num_items_in_batch`` counts the scored tokens of
        all of them (Note [dp x cp gradients] in ``integrations/_mesh.py``).
    attention_mask : Tensor ``(B, S)`` of 0/1, optional
        Right padding only (``1...1 0...0`` per row); padded tokens are not scored. Left padding or holes raise.
    position_ids, cu_seqlens : optional
        Describe a packed batch: one row (B = 1) of documents end to end, with ``position_ids`` ``(1, S)`` that
        restart at 0 at each document and/or ``cu_seqlens`` ``[0, ..., S]`` (int64; both must agree). Every
        document is then cut into 2W chunks (padded per document) and the model runs the varlen ring: no token
        attends to another document. ``0..S-1`` / ``[0, S]`` mean one sequence per row.
    pad_token_id : int
        Id of the tokens padding S to a multiple of 2W. They come after every real token, so causal attention never
        lets a real token see them, and they are not scored.
    ignore_index : int
        Label of tokens not scored (transformers' -100).

    Returns
    -------
    dict with
        ``input_ids`` ``(B, S_local)``; ``position_ids`` ``(B, S_local)``, the GLOBAL positions of those tokens
        (positions within their document for a packed row); ``use_cache`` False; for a packed row
        ``ringattn_cu_seqlens`` (the global ``cu_seqlens``, for the attention function); and with ``labels``:
        ``labels`` and ``shift_labels`` ``(B, S_local)`` (the same tensor: labels already shifted),
        ``num_items_in_batch`` (0-dim int64 tensor, the number of scored tokens of
        the FULL batch: each rank's loss is its share of the global mean, and the ranks' losses sum to it).
        ``S_local = S_padded / W`` (packed: the slots of :func:`ringattn.packed_shard_info`; gather logits with
        ``ringattn.gather_packed(logits[0], cu_seqlens, dim=0)``).

    Raises
    ------
    DTypeError, ShapeError
        Tensors of the wrong dtype or shape.
    ConfigError (ValueError, RuntimeError)
        Left padding; position ids that are neither ``0..S-1`` nor a packed row; ``cu_seqlens`` not rising from 0 to
        S or disagreeing with the position ids; a mask with a packed row; ranks holding different batches.
    ShapeError
        Also: a packed batch of more than one row.
    """
    ids = _int_matrix("input_ids", input_ids, None)
    batch, seq = ids.shape
    if labels is not None:
        labels = _int_matrix("labels", labels, ids)
    if attention_mask is not None:
        attention_mask = _int_matrix("attention_mask", attention_mask, ids)
    cu = _packed_cu_seqlens(position_ids, cu_seqlens, batch, seq)
    if cu is not None and attention_mask is not None:
        raise ConfigError(expected("attention_mask", "None for a packed batch (documents end to end)", "a mask"))
    if _mesh.is_mesh(group) and mesh is None:
        group, mesh = None, group
    if mesh is not None:
        _mesh.check_mesh(mesh, group)
        group = ring_ops.process_group(mesh, "mesh")
    rank, world = _rank_world(group)
    if world > 1:
        _check_same_batch(group, [ids, labels, attention_mask, cu])
    if cu is not None:
        info = packed_shard_info(cu, rank, world)
        padding = (info.token_index < 0).to(ids.device).unsqueeze(0)

        def cut(x: torch.Tensor, fill: int) -> torch.Tensor:
            return shard_packed(x, cu, rank, world, dim=1).masked_fill(padding, fill)

        positions = info.position_ids.to(ids.device).unsqueeze(0)
    else:
        padded = -(-seq // (2 * world)) * (2 * world)
        pad = padded - seq

        def cut(x: torch.Tensor, fill: int) -> torch.Tensor:
            if pad:
                x = torch.cat([x, x.new_full((batch, pad), fill)], dim=1)
            return shard_sequence(x, rank, world, dim=1)

        positions = _zigzag_positions(padded, rank, world, ids.device).expand(batch, -1)
    out: dict[str, Any] = {"input_ids": cut(ids, pad_token_id), "position_ids": positions, "use_cache": False}
    if cu is not None:
        out[CU_SEQLENS_KEY] = cu
    if labels is not None:
        # Shifted over the whole (packed) row, as the single-process loss does: a document's last token is scored
        # against the next document's first unless its label is ignore_index.
        shifted = labels.new_full((batch, seq), ignore_index)
        shifted[:, :-1] = labels[:, 1:]
        if attention_mask is not None:
            lengths = _right_padding_lengths(attention_mask)
            # Token t predicts t+1 only when t+1 is real (right padding: then t is real too).
            scored = torch.arange(seq, device=ids.device) + 1 < lengths.unsqueeze(-1)
            shifted = shifted.masked_fill(~scored, ignore_index)
        local = cut(shifted, ignore_index)
        count = (shifted != ignore_index).sum().to(torch.int64)
        if mesh is not None and _mesh.data_parallel_dims(mesh):  # every replica's tokens (Note [dp x cp gradients])
            count = _mesh.count_over_replicas(count, mesh, _collective_device(group, ids.device))
        out.update(labels=local, shift_labels=local, num_items_in_batch=count)
    elif attention_mask is not None:
        _right_padding_lengths(attention_mask)
    return out
