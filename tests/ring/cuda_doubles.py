"""CPU doubles of the CUDA attention kernels ``ring/blocks.py`` calls (Note [block kernels]).

Each double takes the ATen op's arguments, asserts the preconditions the real kernel relies on without
checking them (the LSE read as one contiguous buffer, unit stride along D, dtypes, head sizes, the
kernel's own LSE shape) and computes with the plain-torch block. :func:`install` puts them in
``blocks.ATEN`` and makes CPU tensors take the CUDA code path, so CI runs that path without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from ringattn.ring import blocks

HALF = (torch.float16, torch.bfloat16)


def _rows(kernel: str, *tensors: torch.Tensor, dtypes=HALF, max_head_dim: int | None = None, gqa=False) -> None:
    q = tensors[0]
    for x in tensors:
        assert x.dim() == 4, f"{kernel}: 4-D (B, N, S, D) tensors, got {tuple(x.shape)}"
        assert x.stride(-1) == 1, f"{kernel}: unit stride along D, got strides {x.stride()}"
        assert x.transpose(1, 2).is_contiguous(), f"{kernel}: (B, S, N, D) memory order, got strides {x.stride()}"
        assert x.dtype == q.dtype, f"{kernel}: one dtype, got {x.dtype} and {q.dtype}"
    assert q.dtype in dtypes, f"{kernel}: dtype {q.dtype} not in {dtypes}"
    d = q.shape[-1]
    assert (d * q.element_size()) % 16 == 0, f"{kernel}: head size {d} not a multiple of 16 bytes"
    assert max_head_dim is None or d <= max_head_dim, f"{kernel}: head size {d} over {max_head_dim}"
    if gqa:  # key/value heads divide q's, and k, v (tensors 1, 2) agree
        assert q.shape[1] % tensors[1].shape[1] == 0 and tensors[1].shape == tensors[2].shape, f"{kernel}: GQA heads"
    else:
        assert q.shape[1] == tensors[1].shape[1], f"{kernel}: key/value heads must be repeated to q's"


def _lse(kernel: str, lse: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert lse.dtype == torch.float32, f"{kernel}: float32 LSE, got {lse.dtype}"
    assert tuple(lse.shape) == shape, f"{kernel}: LSE shape {shape}, got {tuple(lse.shape)}"
    # The real kernels index the LSE as a dense buffer whatever its strides say (issue 11).
    assert lse.is_contiguous(), f"{kernel}: contiguous LSE, got strides {lse.stride()}"


def _forward(q, k, v, causal, scale):
    o, lse = blocks.attend(q, k, v, causal=causal, scale=scale, impl="torch")
    return o.transpose(1, 2).contiguous().transpose(1, 2), lse.float().contiguous()  # SDPA's output layout


def _backward(do, q, k, v, out, lse, causal, scale):
    grads = blocks.attend_backward(do, q, k, v, out, lse, causal=causal, scale=scale, impl="torch")
    return tuple(g.to(q.dtype) for g in grads)


def flash_cuda(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    _rows("flash", q, k, v, max_head_dim=256)
    assert dropout_p == 0.0 and not return_debug_mask
    o, lse = _forward(q, k, v, is_causal, scale)
    return o, lse, None, None, q.shape[2], k.shape[2], None, None, None


def flash_cuda_backward(
    do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, *, scale
):
    _rows("flash backward", q, k, v, do, out, max_head_dim=256)
    _lse("flash backward", lse, tuple(q.shape[:3]))
    assert (cum_q, cum_k, max_q, max_k, dropout_p) == (None, None, q.shape[2], k.shape[2], 0.0)
    return _backward(do, q, k, v, out, lse, is_causal, scale)


def cudnn(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale):
    _rows("cudnn", q, k, v, max_head_dim=128, gqa=blocks.KERNELS["cuda", "cudnn"].native_gqa)
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
    o, lse = _forward(q, k, v, is_causal, scale)
    return o, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], None, None, None


def cudnn_backward(do, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, *,
                   scale):  # fmt: skip
    _rows("cudnn backward", q, k, v, do, out, max_head_dim=128, gqa=blocks.KERNELS["cuda", "cudnn"].native_gqa)
    _lse("cudnn backward", lse, (*q.shape[:3], 1))
    assert bias is None and (max_q, max_k, dropout_p) == (q.shape[2], k.shape[2], 0.0)
    return _backward(do, q, k, v, out, lse.squeeze(-1), is_causal, scale)


def _padded_rows(sq: int) -> int:
    return math.ceil(sq / blocks.EFFICIENT_LSE_ROWS) * blocks.EFFICIENT_LSE_ROWS


def efficient(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    _rows("efficient", q, k, v, dtypes=(*HALF, torch.float32))
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
    o, lse = _forward(q, k, v, is_causal, scale)
    padded = torch.full((*lse.shape[:2], _padded_rows(lse.shape[2])), float("nan"))  # padding: poison
    padded[..., : lse.shape[2]] = lse
    return o, padded, None, None


def efficient_backward(do, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal, *, scale):
    _rows("efficient backward", q, k, v, do, out, dtypes=(*HALF, torch.float32))
    _lse("efficient backward", lse, (*q.shape[:2], _padded_rows(q.shape[2])))
    assert bias is None and dropout_p == 0.0 and list(grad_input_mask) == [True, True, True, False]
    return (*_backward(do, q, k, v, out, lse[..., : q.shape[2]], is_causal, scale), None)


DOUBLES = {
    "flash_cuda": flash_cuda,
    "flash_cuda_backward": flash_cuda_backward,
    "cudnn": cudnn,
    "cudnn_backward": cudnn_backward,
    "efficient": efficient,
    "efficient_backward": efficient_backward,
}


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route CPU tensors through the CUDA kernels of ``blocks`` (an sm90 device with every kernel switched
    on), with the doubles above in place of the ATen ops."""
    for name, double in DOUBLES.items():
        monkeypatch.setitem(blocks.ATEN, name, double)
    for switch in blocks.ENABLED:
        monkeypatch.setitem(blocks.ENABLED, switch, lambda: True)
    monkeypatch.setattr(blocks, "device_type", lambda device: "cuda" if device.type == "cpu" else device.type)
    monkeypatch.setattr(blocks, "cuda_capability", lambda device: (9, 0))
