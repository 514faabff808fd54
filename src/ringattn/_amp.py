"""Autocast: the attention entry points under ``torch.autocast`` compute as SDPA does there.

Note [autocast]
---------------
``F.scaled_dot_product_attention`` is on autocast's lower-precision list: under ``torch.autocast(device_type,
dtype)`` its floating inputs (float64 excepted) are cast to ``dtype``, and it computes and returns in ``dtype``. So
q, k and v may arrive in different dtypes: a transformers Llama under bfloat16 autocast hands attention q and k
in float32 (its rotary embedding computes in float32) and v in bfloat16. ringattn's attention entry points
(:func:`ringattn.ring_attention`, :func:`ringattn.ring_attention_varlen`, :func:`ringattn.simulate_ring_attention`,
:func:`ringattn.block_attention`) do the same at their top:

* :func:`cast_inputs` casts q, k, v to the autocast dtype of their device type, with ``Tensor.to``, which is
  differentiable: each input's gradient comes back in that input's own dtype;
* the rest of the call runs under :func:`autocast_off`, so the block kernels (the plain-torch kernel computes in
  float32 on purpose) and the merges are not cast a second time, and outputs come in the autocast dtype. Backward
  passes run under it too (a backward called inside an autocast region would otherwise cast their matmuls).

Outside autocast, q, k and v of different dtypes remain a DTypeError. The merges are not attention and keep the
dtypes they are given. Autocast is a per-thread state: ranks of the virtual ring run on worker threads with it off
and receive the already cast tensors. Every rank of a real ring must run under the same autocast (the ring's
all-gather of dtypes reports one that does not, on every rank).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts SDPA's inputs to on ``device_type`` in this thread, or None when off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device_type)


def _device_type(tensors: tuple[Any, ...]) -> str | None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return None


def cast_inputs(*tensors: Any) -> tuple[Any, ...]:
    """``tensors`` as SDPA's autocast entry casts them: floating tensors other than float64 to the autocast dtype of
    the first tensor's device type (a no-op outside autocast). Anything that is not a tensor passes unchanged, for
    the entry point's own validation to name."""
    device_type = _device_type(tensors)
    dtype = autocast_dtype(device_type) if device_type is not None else None
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_off(*tensors: Any) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for the device type of ``tensors`` (a no-op when it is already off)."""
    device_type = _device_type(tensors)
    if device_type is None or autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
