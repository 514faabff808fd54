"""Attention of one block pair, forward and backward, returning / consuming the log-sum-exp.

Layout here is SDPA's: ``q (B, N, Sq, D)``, ``k, v (B, Nkv, Sk, D)`` with ``N % Nkv == 0`` (any strides;
the ring passes transposed views of ``(B, S, N, D)`` tensors). ``lse (B, N, Sq)`` is the natural-log
log-sum-exp of the scaled scores of each query row over the block's keys. ``causal`` is the top-left
causal mask of a square block (the ring never masks anything else, Note [ring schedule]).

Two implementations (``impl``):

* ``"sdpa"``: PyTorch's fused flash kernels. On CPU ``aten._scaled_dot_product_flash_attention_for_cpu``
  (float16, bfloat16, float32); on CUDA ``aten._scaled_dot_product_flash_attention`` (FlashAttention-2:
  float16 and bfloat16, head size a multiple of 8 up to 256). Both return ``(out, lse)`` with lse float32
  natural log, layout ``(B, N, Sq)``, and both backwards take ``out`` and ``lse``: given the FINAL output and
  LSE of the whole ring, their gradients for one block are that block's exact share (``P = exp(s - lse)`` and
  ``delta = rowsum(dout * out)`` use the totals).
* ``"torch"``: plain torch in float32 (float64 for float64 inputs); the fallback for what no fused kernel
  takes (CUDA float32, odd head sizes, other devices) and, by default, for float64, so float64 runs are a
  transcription of the math and not of a kernel.

``"auto"`` picks ``sdpa`` wherever :func:`sdpa_unsupported` finds nothing against it, else ``torch``. GQA/MQA
key/value heads are repeated here, locally, for the kernel; their gradients are summed back per group.
"""

from __future__ import annotations

import torch

from ..errors import BackendError, expected

IMPLS = ("auto", "sdpa", "torch")

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_flash_cuda = torch.ops.aten._scaled_dot_product_flash_attention
_flash_cuda_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward
_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_FLASH_MAX_HEAD_DIM = 256


def sdpa_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why no fused flash kernel runs blocks of ``dtype`` and head size ``head_dim`` on ``device``, or None."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no fused block kernel on {device.type}"
    if dtype not in _CUDA_FLASH_DTYPES:
        return f"CUDA flash attention takes float16 and bfloat16, got {dtype}"
    if head_dim % 8 or head_dim > _CUDA_FLASH_MAX_HEAD_DIM:
        return f"CUDA flash attention takes head sizes that are multiples of 8 up to 256, got {head_dim}"
    return None


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The implementation ``impl`` means for blocks of ``dtype`` and head size ``head_dim`` on ``device``."""
    reason = sdpa_unsupported(device, dtype, head_dim)
    if impl == "sdpa" and reason is not None:
        raise BackendError(expected("impl", f"'auto' or 'torch' here ({reason})", "'sdpa'"))
    if impl != "auto":
        return impl
    return "sdpa" if reason is None and dtype != torch.float64 else "torch"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of ring attention: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_heads(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, n, s, d = dx.shape
    return dx.view(b, n // groups, groups, s, d).sum(2)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(1)
        s.masked_fill_(mask, float("-inf"))
    return s


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention: ``(o (B, N, Sq, D) in q's dtype, lse (B, N, Sq) natural log)``.

    lse is float32 (float64 with the ``torch`` impl on float64 inputs).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    if impl == "sdpa" and q.device.type == "cuda":
        o, lse = _flash_cuda(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return o, lse
    if impl == "sdpa":
        return _flash_cpu(q, k, v, 0.0, causal, scale=scale)
    c = compute_dtype(q.dtype)
    s = _scores(q.to(c), k.to(c), causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(c))
    return o.to(q.dtype), lse


def attend_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of ``(dq, dk, dv)`` given the FINAL ``out`` and ``lse`` of the query rows.

    ``do, out (B, N, Sq, D)``, ``lse (B, N, Sq)``. Gradients come in q's dtype (``sdpa``) or the compute
    dtype (``torch``); dk/dv have k's head count.
    """
    groups = q.shape[1] // k.shape[1]
    k_rep, v_rep = _repeat_heads(k, groups), _repeat_heads(v, groups)
    if impl == "sdpa" and q.device.type == "cuda":
        # Dense inputs: no cumulative sequence lengths (None, as SDPA's own forward returns them); no dropout,
        # so the random-state tensors are never read.
        no_rng = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = _flash_cuda_backward(
            do, q, k_rep, v_rep, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, no_rng, no_rng, scale=scale
        )
    elif impl == "sdpa":
        dq, dk, dv = _flash_cpu_backward(do, q, k_rep, v_rep, out, lse, 0.0, causal, scale=scale)
    else:
        c = compute_dtype(q.dtype)
        q_c, k_c, v_c, do_c = q.to(c), k_rep.to(c), v_rep.to(c), do.to(c)
        p = torch.exp(_scores(q_c, k_c, causal, scale) - lse.to(c).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), do_c)
        delta = (do_c * out.to(c)).sum(-1, keepdim=True)  # rowsum(dout * out) of the whole ring
        ds = p * (torch.matmul(do_c, v_c.transpose(-1, -2)) - delta)
        dq = torch.matmul(ds, k_c) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q_c) * scale
    return dq, _sum_heads(dk, groups), _sum_heads(dv, groups)
