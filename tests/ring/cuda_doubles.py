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


def _not_one_by_one(kernel: str, q, k) -> None:
    assert not q.shape[2] == k.shape[2] == 1, f"{kernel}: cuDNN refuses s_q = s_kv = 1 (seen on an H100)"


def cudnn(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale):
    _rows("cudnn", q, k, v, max_head_dim=128, gqa=blocks.KERNELS["cuda", "cudnn"].native_gqa)
    _not_one_by_one("cudnn", q, k)
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
    o, lse = _forward(q, k, v, is_causal, scale)
    return o, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], None, None, None


def cudnn_backward(do, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, *,
                   scale):  # fmt: skip
    _rows("cudnn backward", q, k, v, do, out, max_head_dim=128, gqa=blocks.KERNELS["cuda", "cudnn"].native_gqa)
    _not_one_by_one("cudnn backward", q, k)
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


def _cumulative(kernel: str, cu: torch.Tensor, rows: torch.Tensor, max_len: int) -> list[int]:
    """FA2 varlen's cumulative lengths: int32, contiguous, on the rows' device, ``[0, ..., rows]``; the max given."""
    assert cu.dtype == torch.int32, f"{kernel}: int32 cumulative lengths, got {cu.dtype}"
    assert cu.dim() == 1 and cu.is_contiguous(), f"{kernel}: contiguous 1-D cumulative lengths"
    assert cu.device == rows.device, f"{kernel}: cumulative lengths on {rows.device}, got {cu.device}"
    values = cu.tolist()
    assert values[0] == 0 and values[-1] == rows.shape[0], (
        f"{kernel}: cumulative lengths {values} of {rows.shape[0]} rows"
    )
    lengths = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert min(lengths) >= 0 and max_len == max(lengths), f"{kernel}: max length {max_len} for lengths {lengths}"
    return values


def _packed_rows(kernel: str, *tensors: torch.Tensor) -> None:
    q = tensors[0]
    for x in tensors:
        assert x.dim() == 3, f"{kernel}: 3-D (total, N, D) tensors, got {tuple(x.shape)}"
        assert x.is_contiguous(), f"{kernel}: contiguous rows, got strides {x.stride()}"
        assert x.dtype == q.dtype, f"{kernel}: one dtype, got {x.dtype} and {q.dtype}"
    assert q.dtype in HALF, f"{kernel}: dtype {q.dtype} not in {HALF}"
    d = q.shape[-1]
    assert d % 8 == 0 and d <= 256, f"{kernel}: head size {d}"
    k, v = tensors[1], tensors[2]
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape, f"{kernel}: GQA heads {q.shape[1]} / {k.shape[1]}"


def _per_document(cu_q, cu_k, causal, fn) -> None:
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:], strict=False), zip(cu_k, cu_k[1:], strict=False), strict=True):
        # The ring only sends square causal blocks (FA2 aligns unequal ones bottom-right: not relied on).
        assert not causal or q1 - q0 == k1 - k0, "flash varlen: causal blocks must be square per document"
        fn(slice(q0, q1), slice(k0, k1))


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # (S, N, D) -> (1, N, S, D)


def _window_band(name: str, sq: int, sk: int, left, right) -> tuple[int, int] | None:
    """FA2's window of one document as a band (columns minus rows): bottom-right aligned, sizes ints >= 0 or None."""
    if left is None and right is None:
        return None
    for size in (left, right):
        assert isinstance(size, int) and size >= 0, f"{name}: window sizes must be ints >= 0, got {left}, {right}"
    shift = sk - sq
    return (shift - left, shift + right)


def flash_varlen(q, k, v, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale,
                 window_size_left=None, window_size_right=None):  # fmt: skip
    _packed_rows("flash varlen", q, k, v)
    cu_q, cu_k = _cumulative("flash varlen", cum_q, q, max_q), _cumulative("flash varlen", cum_k, k, max_k)
    assert dropout_p == 0.0 and not return_debug_mask
    out = torch.full_like(q, float("nan"))  # poison: every row must be written
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))

    def doc(qs, ks):
        band = _window_band("flash varlen", qs.stop - qs.start, ks.stop - ks.start, window_size_left, window_size_right)
        o, l = blocks.attend(_heads(q[qs]), _heads(k[ks]), _heads(v[ks]), causal=is_causal, scale=scale, impl="torch",
                             band=band)  # fmt: skip
        out[qs] = o[0].transpose(0, 1).to(q.dtype)
        lse[:, qs] = l[0].float()

    _per_document(cu_q, cu_k, is_causal, doc)
    return out, lse, None, None, None


def flash_varlen_backward(do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, rng_state,
                          unused, *, scale, window_size_left=None, window_size_right=None):  # fmt: skip
    _packed_rows("flash varlen backward", q, k, v, do, out)
    _lse("flash varlen backward", lse, (q.shape[1], q.shape[0]))  # (N, total_q), heads first
    cu_q = _cumulative("flash varlen backward", cum_q, q, max_q)
    cu_k = _cumulative("flash varlen backward", cum_k, k, max_k)
    assert dropout_p == 0.0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def doc(qs, ks):
        band = _window_band("flash varlen backward", qs.stop - qs.start, ks.stop - ks.start, window_size_left,
                            window_size_right)  # fmt: skip
        rows = [_heads(x[qs]) for x in (do, q)] + [_heads(x[ks]) for x in (k, v)] + [_heads(out[qs])]
        grads = blocks.attend_backward(*rows, lse[:, qs].unsqueeze(0), causal=is_causal, scale=scale, impl="torch",
                                       band=band)  # fmt: skip
        for acc, g, rows in zip((dq, dk, dv), grads, (qs, ks, ks), strict=True):
            acc[rows] += g[0].transpose(0, 1).to(q.dtype)

    _per_document(cu_q, cu_k, is_causal, doc)
    return dq, dk, dv


DOUBLES = {
    "flash_cuda": flash_cuda,
    "flash_cuda_backward": flash_cuda_backward,
    "cudnn": cudnn,
    "cudnn_backward": cudnn_backward,
    "efficient": efficient,
    "efficient_backward": efficient_backward,
    "flash_varlen": flash_varlen,
    "flash_varlen_backward": flash_varlen_backward,
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
