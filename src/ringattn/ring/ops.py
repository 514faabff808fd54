"""The ring entry points as ``torch.library`` custom ops: ``torch.ops.ringattn.ring_attention`` and its backward.

Note [ring under torch.compile]
-------------------------------
:func:`ringattn.ring_attention` and :func:`ringattn.ring_attention_varlen` reach the ring through one custom op,
``ringattn::ring_attention`` (dense, or packed when ``cu_seqlens`` is given), whose autograd calls the custom op
``ringattn::ring_attention_backward`` (:func:`ringattn.simulate_ring_attention`: the same with
``ringattn::simulate_ring_attention``, below). Under ``torch.compile`` Dynamo traces the entry point's few lines
(autocast cast, ``needs_grad``, the option encoding) and records one node per call; AOTAutograd records one backward
node; the fake impls (plain allocations of the outputs' shapes, dtypes and strides) stand for them while tracing, and
the bodies run the ring eagerly when the graph runs (Python communication, numba kernels and host reads are fine there:
the check table's all_gather, ``cu_seqlens.tolist()``). So ``torch.compile(fullgraph=True)`` holds a model that
calls ring attention, under ``aot_eager`` and ``inductor``.

What travels through the schema, all primitives:

* the process group as its name (``group.group_name``, what PyTorch's functional collectives carry), resolved in
  the body; ``""`` is the default group (or a ring of one without a process group); ``timeout`` in seconds (the
  virtual ring's op takes ``world_size`` in the group's place, and ignores ``timeout``);
* the tensors q, k, v, ``cu_seqlens`` and ``sinks`` (None when absent); the backward op returns ``dsinks`` as a
  4th output, empty without sinks (op outputs cannot be None);
* ``needs_grad``, computed by the entry point (grad mode and ``requires_grad`` of q, k, v, sinks: only the caller's
  frame knows them; inside the op autograd is below the dispatcher). It is compared across ranks by the check table;
* every field of :class:`~ringattn.ring.attention.RingOptions`, typed by :data:`OPTION_SCHEMA` (adding an option is
  one line there). The check table must see invalid options on every rank (the module docstring of
  ``checks.py``): a value its schema type cannot hold (``causal="yes"``) travels as the type's
  placeholder plus its ``repr`` in the string argument ``invalid``, and the body rebuilds an object whose ``repr``
  is the original, so every rank raises the same error, naming it.

The backward op validates nothing and gathers nothing: the forward checked this call on every rank. It runs
``prepare`` over a comm whose all_gather returns its own row W times (the configuration of a checked call,
whatever options the plans grow) and then ``ring_backward``.

Direct eager calls: the op boundary (the autograd wrapper of ``torch.library``, the redispatch, the Dynamo-disable
wrapper around the body, and the backward's second ``prepare``) measured 0.23-0.65 ms per forward + backward of a
small call (W = 1, S = 256: 10-16% of it) on the shared 2-core VM, and within the noise of a W = 2 gloo training
step of ``examples/transformers_ring.py`` (2 layers, S = 2048: 490-750 ms a step). As in Note [direct eager calls]
in ``_ops.py``, an eager call with plain tensors, no torch-function or dispatch mode and no functorch transform runs
the same code without it (``run_ring`` / ``run_ring_varlen`` and the ``_RingAttention`` autograd.Function;
``_VirtualRing`` for the virtual ring), so eager behaviour and speed are those of the ring before the ops (the
dispatch to it: 2 us a call). Tensors on devices other than CPU and CUDA always take that path (on ``meta`` the op
would run its fake impl; the checks name the device instead). Tests run both paths (``tests/ring/test_compile.py``).

The virtual ring (``simulate_ring_attention``) is the op ``ringattn::simulate_ring_attention`` with the world size
in place of the group; its backward op rebuilds each virtual rank's shards and configuration from the call's
tensors (``virtual.rebuild_per_rank``).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import _amp, _ops
from ..errors import ConfigError, expected, refuse_double_backward
from .blocks import compute_dtype

# RingOptions field -> schema type and the placeholder that stands in the typed slot for a value it cannot hold.
OPTION_SCHEMA: dict[str, tuple[str, Any]] = {
    "causal": ("bool", False),
    "softmax_scale": ("float?", None),
    "layout": ("str", ""),
    "sharding": ("str", ""),
    "impl": ("str", ""),
    "backend": ("str", ""),
    "window": ("int[]?", None),
}
_OPTIONS = ", ".join(f"{kind} {name}" for name, (kind, _) in OPTION_SCHEMA.items())
_INVALID_SEP = "\x1f"  # between the ``name=repr`` items of ``invalid``


def _fits(kind: str, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` can travel in a slot of schema type ``kind``, and as what."""
    if kind.endswith("?"):
        if value is None:
            return True, None
        kind = kind[:-1]
    if kind == "bool":
        if type(value) is bool or (type(value) is int and value in (0, 1)):  # causal=0 / 1, as the checks take it
            return True, bool(value)
        return False, None
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if kind == "int":
        return type(value) is int, value
    if kind == "int[]":
        ok = isinstance(value, (tuple, list)) and all(type(x) is int for x in value)
        return ok, list(value) if ok else None
    if kind == "str":
        return isinstance(value, str), value
    raise AssertionError(f"no encoding for schema type {kind!r}")  # a new type in OPTION_SCHEMA


def encode_options(options: Any) -> tuple[str, list[Any]]:
    """``(invalid, values)``: the typed slots of ``options`` (a RingOptions) and the reprs of what does not fit."""
    invalid, values = [], []
    for field in dataclasses.fields(options):
        if field.name not in OPTION_SCHEMA:
            raise AssertionError(f"RingOptions.{field.name} has no schema type: add it to ring/ops.py OPTION_SCHEMA")
        kind, placeholder = OPTION_SCHEMA[field.name]
        ok, value = _fits(kind, getattr(options, field.name))
        values.append(value if ok else placeholder)
        if not ok:
            invalid.append(f"{field.name}={getattr(options, field.name)!r}")
    return _INVALID_SEP.join(invalid), values


class _Given:
    """An option value that did not fit its schema type, as the check table meets it: fits no choice, and its
    ``repr`` is the caller's original, which the error message quotes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def decode_options(invalid: str, values: Any) -> Any:
    from .attention import RingOptions

    given = {
        name: tuple(value) if kind == "int[]?" and value is not None else value  # int[] arrives as a list
        for (name, (kind, _)), value in zip(OPTION_SCHEMA.items(), values, strict=True)
    }
    for item in invalid.split(_INVALID_SEP) if invalid else ():
        name, _, text = item.partition("=")
        given[name] = _Given(text)
    return RingOptions(**given)


# --- the process group ------------------------------------------------------------------------------------------


_GROUP_WANTED = "None, a torch.distributed ProcessGroup, a 1-D DeviceMesh or a DeviceMesh with a dimension named 'cp'"


def process_group(group: Any, name: str = "group") -> Any:
    """The ring's process group for ``group`` as the entry points take it: None (the default group), a ProcessGroup,
    or a DeviceMesh: 1-D (its group), or of several dimensions, one named ``cp`` (the context-parallel ranks, as
    torchtitan names them: ``mesh["cp"]``). ConfigError naming ``name`` otherwise."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim == 1:
            return group.get_group()
        if "cp" in (group.mesh_dim_names or ()):
            return group.get_group("cp")
        dims = f"dimensions {group.mesh_dim_names}" if group.mesh_dim_names else f"{group.ndim} unnamed dimensions"
        raise ConfigError(expected(name, f"{_GROUP_WANTED} (or pass mesh['<your cp dimension>'])", f"a mesh of {dims}"))
    raise ConfigError(expected(name, _GROUP_WANTED, type(group).__name__))


def group_name(group: Any) -> str:
    """The name the ops carry for ``group`` (see :func:`process_group`): ``""`` for the default group, else
    ``group_name`` of the process group."""
    group = process_group(group)
    return "" if group is None else group.group_name


def resolve_group(name: str) -> Any:
    """The process group of :func:`group_name` (None: the default group)."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


class _CheckedComm:
    """A comm of a call the forward already checked on every rank: its all_gather returns this rank's row for
    every rank (no message); everything else (``exchange``, ``rank``, ``world_size``, ...) is the real comm's."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.comm, name)

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values) for _ in range(self.comm.world_size)]


def _comm(name: str, timeout: float | None) -> Any:
    from .comm import RingComm

    return RingComm(resolve_group(name), timeout=timeout)


# --- ringattn::ring_attention ------------------------------------------------------------------------------------

_LIB = torch.library.Library("ringattn", "FRAGMENT")  # noqa: TOR901 - the schema is built from OPTION_SCHEMA


def _forward(q, k, v, cu_seqlens, sinks, group, timeout, needs_grad, invalid, *values):
    from .attention import _heads_first, prepare, ring_forward
    from .varlen import prepare_varlen

    options = decode_options(invalid, values)
    comm = _comm(group, timeout)
    with _amp.autocast_off(q, k, v):
        if cu_seqlens is None:
            q4, k4, v4, cfg = prepare(q, k, v, options, comm, needs_grad=needs_grad, sinks=sinks)
        else:
            q4, k4, v4, cfg = prepare_varlen(q, k, v, cu_seqlens, options, comm, needs_grad=needs_grad, sinks=sinks)
        out, lse = ring_forward(q4, k4, v4, cfg, sinks)
    if cu_seqlens is not None:
        return out[0], lse[0]
    return (_heads_first(out) if options.layout == "BNSD" else out), lse


def _forward_fake(q, k, v, cu_seqlens, sinks, group, timeout, needs_grad, invalid, *values):
    options = decode_options(invalid, values)
    c = compute_dtype(q.dtype)
    if cu_seqlens is not None and q.dim() == 3:  # (T, N, D) -> out (T, N, D), lse (N, T)
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=c)
    if q.dim() != 4:  # invalid: the body raises on every rank when the graph runs
        return q.new_empty(q.shape), q.new_empty((0,), dtype=c)
    if options.layout == "BNSD":
        b, n, s, d = q.shape
        return q.new_empty((b, s, n, d)).transpose(1, 2), q.new_empty((b, n, s), dtype=c)
    b, s, n, d = q.shape
    return q.new_empty(q.shape), q.new_empty((b, n, s), dtype=c)


def _no_sinks_gradient(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,))  # the 4th output of a backward op without sinks (op outputs may not be None)


def _backward_op(dout, q, k, v, out, lse, cu_seqlens, sinks, group, timeout, *values):
    from .attention import _heads_first, prepare, ring_backward, sink_gradient
    from .varlen import prepare_varlen

    # The backward merges nothing: "torch" spares prepare the probe merge of backend="auto" (its result is unused).
    options = dataclasses.replace(decode_options("", values), backend="torch")
    comm = _CheckedComm(_comm(group, timeout))
    with _amp.autocast_off(q, k, v):
        if cu_seqlens is None:
            q4, k4, v4, cfg = prepare(q, k, v, options, comm, needs_grad=True, sinks=sinks)
            if options.layout == "BNSD":
                dout, out = _heads_first(dout), _heads_first(out)
            lse4 = lse
        else:
            q4, k4, v4, cfg = prepare_varlen(q, k, v, cu_seqlens, options, comm, needs_grad=True, sinks=sinks)
            dout, out, lse4 = dout.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0)
        grads = ring_backward(dout, q4, k4, v4, out, lse4, cfg)
        dsinks = sink_gradient(dout, out, lse4, sinks) if sinks is not None else _no_sinks_gradient(q)
    if cu_seqlens is not None:
        grads = tuple(g[0] for g in grads)
    elif options.layout == "BNSD":
        grads = tuple(_heads_first(g) for g in grads)
    dq, dk, dv = grads
    if dv.untyped_storage().data_ptr() == dk.untyped_storage().data_ptr():
        dv = dv.clone()  # dk and dv are views of one buffer (ring_backward's last hop); op outputs may not alias
    return dq, dk, dv, dsinks


def _backward_fake(dout, q, k, v, out, lse, cu_seqlens, sinks, group, timeout, *values):
    """dq, dk, dv in the inputs' shapes and dtypes, contiguous in the ring's ``(B, S, N, D)`` order (heads first
    for ``BNSD``), as ``ring_backward`` makes them."""
    options = decode_options("", values)
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else _no_sinks_gradient(q)
    if cu_seqlens is None and options.layout == "BNSD" and q.dim() == 4:
        grads = tuple(x.new_empty((x.shape[0], x.shape[2], x.shape[1], x.shape[3])).transpose(1, 2) for x in (q, k, v))
        return (*grads, dsinks)
    return (*(x.new_empty(x.shape) for x in (q, k, v)), dsinks)


# --- ringattn::simulate_ring_attention (the virtual ring, Note [virtual ring] in virtual.py) ------------------------


def _virtual_forward(q, k, v, cu_seqlens, sinks, world_size, timeout, needs_grad, invalid, *values):
    from . import virtual

    options = decode_options(invalid, values)
    with _amp.autocast_off(q, k, v):
        plan = virtual.checked_plan(q, k, v, world_size, options, cu_seqlens, sinks)
        out, lse, _ = virtual.virtual_forward(q, k, v, sinks, plan, needs_grad)
    return out, lse


def _virtual_forward_fake(q, k, v, cu_seqlens, sinks, world_size, timeout, needs_grad, invalid, *values):
    return _forward_fake(
        q, k, v, cu_seqlens, sinks, "", None, needs_grad, invalid, *values
    )  # the shapes of one rank's call


def _virtual_backward(dout, q, k, v, out, lse, cu_seqlens, sinks, world_size, timeout, *values):
    from . import virtual

    options = decode_options("", values)
    seq_dim = 0 if cu_seqlens is not None else (1 if options.layout == "BSND" else 2)
    plan = virtual._Plan(world_size, options, seq_dim, cu_seqlens)
    with _amp.autocast_off(q, k, v):
        per_rank = virtual.rebuild_per_rank(q, k, v, out, lse, sinks, plan)
        dq, dk, dv, dsinks = virtual.virtual_backward(dout, per_rank, plan, sinks)
    return dq, dk, dv, dsinks if dsinks is not None else _no_sinks_gradient(q)


def _virtual_backward_fake(dout, q, k, v, out, lse, cu_seqlens, sinks, world_size, timeout, *values):
    return _backward_fake(dout, q, k, v, out, lse, cu_seqlens, sinks, "", None, *values)


_LIB.define(
    "ring_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? sinks, str group, float? timeout, "
    f"bool needs_grad, str invalid, {_OPTIONS}) -> (Tensor, Tensor)"
)
_LIB.define(
    "ring_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, "
    f"Tensor? sinks, str group, float? timeout, {_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "simulate_ring_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? sinks, int world_size, "
    f"float? timeout, bool needs_grad, str invalid, {_OPTIONS}) -> (Tensor, Tensor)"
)
_LIB.define(
    "simulate_ring_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    f"Tensor? cu_seqlens, Tensor? sinks, int world_size, float? timeout, {_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
for _name, _impl, _fake in (
    ("ring_attention", _forward, _forward_fake),
    ("ring_attention_backward", _backward_op, _backward_fake),
    ("simulate_ring_attention", _virtual_forward, _virtual_forward_fake),
    ("simulate_ring_attention_backward", _virtual_backward, _virtual_backward_fake),
):
    torch.library.impl(f"ringattn::{_name}", "CompositeExplicitAutograd", lib=_LIB)(_impl)
    torch.library.register_fake(f"ringattn::{_name}", _fake, lib=_LIB)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, sinks, ring, timeout, _needs_grad, _invalid, *values = inputs  # ring: group or world_size
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sinks)
    ctx.args = (ring, timeout, *values)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(backward_op: Any, what: str) -> Callable:
    def backward(ctx, dout, _dlse):
        refuse_double_backward(what)
        q, k, v, out, lse, cu_seqlens, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = backward_op(dout, q, k, v, out, lse, cu_seqlens, sinks, *ctx.args)
        return (dq, dk, dv, None, dsinks if sinks is not None else None, *([None] * (4 + len(OPTION_SCHEMA))))

    return backward


torch.library.register_autograd(
    "ringattn::ring_attention",
    _autograd_backward(torch.ops.ringattn.ring_attention_backward, "ring attention"),
    setup_context=_setup_context,
    lib=_LIB,
)
torch.library.register_autograd(
    "ringattn::simulate_ring_attention",
    _autograd_backward(torch.ops.ringattn.simulate_ring_attention_backward, "simulate_ring_attention"),
    setup_context=_setup_context,
    lib=_LIB,
)


# --- the entry points' common body --------------------------------------------------------------------------------


def _eager_only(fn: Callable) -> Callable:
    """``fn`` as a graph break when Dynamo traces it (for calls that cannot enter the op: they only raise)."""
    if "torch._dynamo" in sys.modules and torch.compiler.is_compiling():
        return torch.compiler.disable(fn)
    return fn


def direct_call_ok(tensors: tuple[Any, ...]) -> bool:
    """Whether an eager call may skip the op boundary (Note [ring under torch.compile], direct eager calls)."""
    if torch.compiler.is_compiling() or _ops._modes_active():
        return False
    return all(type(t) is torch.Tensor for t in tensors)


def _seconds(timeout: Any) -> float | None | bool:
    """``timeout`` (seconds or a timedelta) as the op's ``float?``; False for a value that is neither (the direct path's
    RingComm names it)."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        return float(timeout)
    return False


# Tests set this to False to run eager calls through the op. Tensors on other devices than CPU and CUDA (meta
# included, which would run the fake impl) always take the direct path, whose checks name the device.
DIRECT_EAGER = True


def call(q, k, v, cu_seqlens, group, options, return_lse: bool, direct: Callable, *, sinks: Any = None,
         timeout: Any = None, world_size: int | None = None) -> Any:  # fmt: skip
    """One entry point call: ``direct()`` (the eager code) when the op boundary would do nothing, else the op:
    ``ringattn::ring_attention`` over ``group``, or ``ringattn::simulate_ring_attention`` of ``world_size`` virtual
    ranks."""
    tensors = (q, k, v, *(t for t in (cu_seqlens, sinks) if t is not None))
    seconds = _seconds(timeout)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or seconds is False:
        return _eager_only(direct)()  # invalid inputs: the check table raises on every rank
    if direct_call_ok(tensors) and (DIRECT_EAGER or any(t.device.type not in ("cpu", "cuda") for t in tensors)):
        return direct()
    q, k, v = _amp.cast_inputs(q, k, v)  # Note [autocast] in _amp.py
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks) if t is not None)
    invalid, values = encode_options(options)
    if world_size is not None:
        op, ring = torch.ops.ringattn.simulate_ring_attention, world_size
    else:
        op, ring = torch.ops.ringattn.ring_attention, group_name(group)
    out, lse = op(q, k, v, cu_seqlens, sinks, ring, seconds, needs_grad, invalid, *values)
    return (out, lse) if return_lse else out
