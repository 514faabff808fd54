"""Attention of one block pair, forward and backward, returning / consuming the log-sum-exp.

Layout here is SDPA's: ``q (B, N, Sq, D)``, ``k, v (B, Nkv, Sk, D)`` with ``N % Nkv == 0`` (any strides: each
kernel gets the layout it needs, Note [block kernels]; the ring passes transposed views of ``(B, S, N, D)``
tensors). ``lse (B, N, Sq)`` is the natural-log
log-sum-exp of the scaled scores of each query row over the block's keys. ``causal`` is the top-left
causal mask of a square block (the ring never masks anything else, Note [ring schedule]). A block with no
queries or no keys is computed here, not by a kernel: output 0, LSE ``-inf`` (an empty partial result).

Note [block kernels]
--------------------
Each kernel is a :class:`BlockKernel`: the ATen entry points it calls, what it supports, and its layout
contract, enforced in one place (:func:`_kernel_layout`, :func:`_lse_for_backward`) for forward and backward:

========== ======= ===================================================== ====================================
name       device  ATen op (fwd / bwd)                                   contract
========== ======= ===================================================== ====================================
flash      cpu     ``_scaled_dot_product_flash_attention_for_cpu``       fp16/bf16/fp32/fp64, unit stride
                                                                         along D (q, k, v, out, dout)
flash      cuda    ``_scaled_dot_product_flash_attention`` (FA2)         fp16/bf16, D % 8 == 0, D <= 256
cudnn      cuda    ``_scaled_dot_product_cudnn_attention``               fp16/bf16, D % 8 == 0, D <= 128,
                                                                         sm80+; lse ``(B, N, Sq, 1)``
efficient  cuda    ``_scaled_dot_product_efficient_attention``           fp16/bf16/fp32, D % (16 bytes) == 0;
                                                                         lse padded to ``ceil(Sq/32)*32``
flash_     cuda    ``_flash_attention_forward`` / ``_backward`` (FA2     fp16/bf16, D % 8 == 0, D <= 256;
window             varlen) with ``window_size_left/right``: a window's  FA2's window, bottom-right aligned
                   band tiles (Note [windows] in ``schedule.py``)        (:func:`_fa2_window`); rows contiguous
torch      any     plain torch in float32 (float64 for float64)          none
========== ======= ===================================================== ====================================

``flash_window`` has run only through its CPU double (``tests/ring/cuda_doubles.py``), never on a GPU (2026-12-08):
the alignment it relies on is FlashAttention-2's documented one (row i sees keys ``i + sk - sq - left .. i + sk - sq
+ right``). A band FA2 cannot express (a negative size) runs on plain torch.

The CPU flash kernel, forward and backward, reads ``q, k, v`` and ``out`` as if their stride along D were 1
whatever it is. Measured on a grid of views (torch 2.13, ``B, N, S, D = 2, 3, 40, 16``: every one of the 24 memory
orders of the 4 dims, each with and without a stride-2 slice of one dim, for each of q, k, v, out and dout, causal
and not, against float64 autograd): the 384 of 960 cases with a non-unit D stride in q, k, v or out were wrong
(NaN, or relative errors of 0.6-3.6 in the output and every gradient), every case with a unit D stride was exact
(within 1e-6), and stride-0 (expanded) batch and head dims were exact too. ``F.scaled_dot_product_attention``
copies such inputs first, so only direct callers of the ATen op see it. :func:`_cpu_layout` therefore copies a
tensor whose D stride is not 1 (a permuted or ``[..., ::2]`` view), and leaves every other layout alone.

Every CUDA kernel reads ``q, k, v, out, dout`` with a unit stride along D and the LSE as a CONTIGUOUS
buffer whatever strides the tensor claims: handing the backward the ring's strided slice ``lse[:, :, qs]``
gave dq errors of 1e3-5e4 on an H100 (issue 11), silently. So the wrappers below make the row tensors
D-contiguous in the ``(B, S, N, D)`` memory order SDPA itself produces (no copy for the ring's B = 1
slices), and hand every backward a fresh contiguous LSE in the kernel's own shape. ``tests/ring/
test_block_doubles.py`` replaces the ATen ops by CPU doubles that assert exactly these preconditions, so CI
runs the CUDA code path without a GPU.

The backwards take the FINAL output and LSE of the whole ring: given those, each block's gradients are
its exact share (``P = exp(s - lse)`` and ``delta = rowsum(dout * out)`` use the totals).

``impl="auto"`` picks, per device, the first kernel of :data:`AUTO_ORDER` that supports the call (cuDNN
before FlashAttention-2 on CUDA, as PyTorch's SDPA does on Hopper and Ampere: 1.7x faster there), and
``torch`` for float64 or when none does. ``impl="sdpa"`` is the same choice among the fused kernels only
(an error where none runs); a kernel name forces that kernel. GQA/MQA key/value heads go unrepeated to
kernels that take them so (cuDNN on PyTorch >= 2.11); for the others they are repeated here, once per block,
and their gradients summed back per group (on an H100 at S = 32768, W = 8, N/Nkv = 32/8 those copies were 20%
of the ring's kernel time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..errors import BackendError, expected

_aten = torch.ops.aten
# The ATen entry points, looked up through this table so tests can put CPU doubles in their place.
ATEN: dict[str, Callable] = {
    "flash_cpu": _aten._scaled_dot_product_flash_attention_for_cpu,
    "flash_cpu_backward": _aten._scaled_dot_product_flash_attention_for_cpu_backward,
    "flash_cuda": _aten._scaled_dot_product_flash_attention,
    "flash_cuda_backward": _aten._scaled_dot_product_flash_attention_backward,
    "cudnn": _aten._scaled_dot_product_cudnn_attention,
    "cudnn_backward": _aten._scaled_dot_product_cudnn_attention_backward,
    "efficient": _aten._scaled_dot_product_efficient_attention,
    "efficient_backward": _aten._scaled_dot_product_efficient_attention_backward,
    # FlashAttention-2's varlen entry points (packed documents, cumulative lengths): Note [packed blocks], varlen.py
    "flash_varlen": _aten._flash_attention_forward,
    "flash_varlen_backward": _aten._flash_attention_backward,
}

_HALF = (torch.float16, torch.bfloat16)
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
EFFICIENT_LSE_ROWS = 32  # the memory-efficient kernel pads its LSE to a multiple of 32 query rows


def device_type(device: torch.device) -> str:
    """The device type kernels are chosen for (a function so that tests can route CPU tensors as CUDA)."""
    return device.type


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, (0, 0) without CUDA (a function so that tests can stand in for a
    GPU)."""
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)


@dataclasses.dataclass(frozen=True)
class BlockKernel:
    """One block-attention kernel: what it runs (dtypes, head sizes, device) and how it is called."""

    name: str
    device: str  # device type, or "any"
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None = None
    head_dim_bytes: int = 1  # D * element size must be a multiple of this
    min_capability: tuple[int, int] | None = None
    switch: str | None = None  # key of ENABLED: PyTorch's on/off switch for this kernel
    native_gqa: bool = False  # takes key/value with fewer heads than q (and returns their gradients so)

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this kernel cannot run blocks of ``dtype`` and head size ``head_dim`` on ``device``, or None."""
        kind = device_type(device)
        if self.device not in ("any", kind):
            return f"the {self.name} kernel runs on {self.device}, not {kind}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"the {kind} {self.name} kernel takes {names}, got {dtype}"
        element = torch.empty((), dtype=dtype).element_size()
        if self.max_head_dim is not None and head_dim > self.max_head_dim or (head_dim * element) % self.head_dim_bytes:
            step = self.head_dim_bytes // element
            top = f" up to {self.max_head_dim}" if self.max_head_dim else ""
            return f"the {kind} {self.name} kernel takes head sizes that are multiples of {step}{top}, got {head_dim}"
        if self.min_capability is not None and cuda_capability(device) < self.min_capability:
            return f"the {self.name} kernel needs compute capability {self.min_capability} or newer"
        if self.switch is not None and not ENABLED[self.switch]():
            return f"the {self.name} kernel is disabled here ({self.switch})"
        return None


# PyTorch's switches (torch.backends.cuda.enable_*_sdp) are honoured; cuDNN attention needs cuDNN 9.
ENABLED: dict[str, Callable[[], bool]] = {
    "cudnn_sdp_enabled": lambda: (
        torch.backends.cuda.cudnn_sdp_enabled() and (torch.backends.cudnn.version() or 0) >= 90000
    ),
    "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled,
    "mem_efficient_sdp_enabled": torch.backends.cuda.mem_efficient_sdp_enabled,
}

KERNELS: dict[tuple[str, str], BlockKernel] = {
    ("cpu", "flash"): BlockKernel("flash", "cpu", (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    ("cuda", "cudnn"): BlockKernel(
        "cudnn",
        "cuda",
        _HALF,
        max_head_dim=128,
        head_dim_bytes=16,
        min_capability=(8, 0),
        switch="cudnn_sdp_enabled",
        native_gqa=_TORCH_VERSION >= (2, 11),  # seen on 2.11 (H100): SDPA's enable_gqa runs it unrepeated
    ),
    ("cuda", "flash"): BlockKernel(
        "flash", "cuda", _HALF, max_head_dim=256, head_dim_bytes=16, switch="flash_sdp_enabled"
    ),
    ("cuda", "efficient"): BlockKernel(
        "efficient",
        "cuda",
        (*_HALF, torch.float32),
        head_dim_bytes=16,
        switch="mem_efficient_sdp_enabled",
    ),
}
TORCH_KERNEL = BlockKernel("torch", "any", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
AUTO_ORDER = {"cpu": ("flash",), "cuda": ("cudnn", "flash", "efficient")}
IMPLS = ("auto", "sdpa", "torch", "flash", "cudnn", "efficient")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel name (``"flash"``, ``"cudnn"``, ``"efficient"`` or ``"torch"``) that ``impl`` means for blocks
    of ``dtype`` and head size ``head_dim`` on ``device``; BackendError when ``impl`` names one that cannot run."""
    if impl not in IMPLS:
        raise BackendError(expected("impl", f"one of {', '.join(map(repr, IMPLS))}", repr(impl)))
    if impl == "torch":
        return "torch"
    kind = device_type(device)
    if impl in ("auto", "sdpa"):
        reasons = []
        for name in AUTO_ORDER.get(kind, ()):
            reason = KERNELS[kind, name].unsupported(device, dtype, head_dim)
            if reason is None and (impl == "sdpa" or dtype != torch.float64):
                return name
            reasons.append(reason)
        if impl == "auto":
            return "torch"
        why = "; ".join(r for r in reasons if r) or f"no fused block kernel on {kind}"
        raise BackendError(expected("impl", f"'auto' or 'torch' here ({why})", "'sdpa'"))
    kernel = KERNELS.get((kind, impl))
    reason = kernel.unsupported(device, dtype, head_dim) if kernel else f"no {impl} kernel on {kind}"
    if reason is not None:
        raise BackendError(expected("impl", f"a kernel that runs here ({reason})", repr(impl)))
    return impl


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of ring attention: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the kernels' layout contract (Note [block kernels]) -------------------------------------------------


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x (B, N, S, D)`` as the kernels read it: unit stride along D, in ``(B, S, N, D)`` memory order
    (SDPA's own); a no-op for the ring's transposed ``(B, S, N, D)`` slices when B == 1."""
    bsnd = x.transpose(1, 2)
    return x if bsnd.is_contiguous() else bsnd.contiguous().transpose(1, 2)


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the CPU flash kernel reads it correctly: unit stride along D (Note [block kernels]); no copy when it
    already has one (the ring's slices, SDPA-layout tensors, transposed ``(B, S, N, D)`` views)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _lse_for_backward(lse: torch.Tensor, kernel: str) -> torch.Tensor:
    """The FINAL LSE ``(B, N, Sq)`` as a contiguous buffer in the shape and dtype CUDA ``kernel`` reads."""
    lse = lse.to(torch.float32)
    if kernel == "cudnn":
        return lse.contiguous().unsqueeze(-1)  # (B, N, Sq, 1)
    if kernel == "efficient":
        b, n, sq = lse.shape
        padded = torch.zeros(b, n, math.ceil(sq / EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS, device=lse.device)
        padded[..., :sq] = lse
        return padded
    return lse.contiguous()


def _groups_to_repeat(impl: str, q: torch.Tensor, k: torch.Tensor) -> int:
    """How many times each key/value head is repeated for kernel ``impl`` (1 where it takes GQA natively)."""
    kernel = KERNELS.get((device_type(q.device), impl))
    return 1 if kernel is not None and kernel.native_gqa else q.shape[1] // k.shape[1]


def _kernel_for(
    impl: str, sq: int, sk: int, band: tuple[int, int] | None = None, cuda: bool = False, q: torch.Tensor | None = None
) -> str:
    """``impl`` for a block of ``sq`` queries and ``sk`` keys: cuDNN's frontend refuses ``s_q = s_kv = 1``
    ("not supported", torch 2.11 on an H100: one-token documents of the packed ring), so those go to plain torch. A
    window's band block on CUDA runs ``flash_window`` (FlashAttention-2's window arguments, :func:`_fa2_window`) where
    FA2 runs the inputs and can express the band, else plain torch: the dense fused kernels take no band."""
    if band is not None and cuda:
        fa2 = q is not None and impl != "torch" and KERNELS["cuda", "flash"].unsupported(q.device, q.dtype, q.shape[-1])
        return (
            "flash_window"
            if q is not None and impl != "torch" and fa2 is None and _fa2_window(sq, sk, band)
            else "torch"
        )
    return "torch" if impl == "cudnn" and sq == sk == 1 else impl


def _fa2_window(sq: int, sk: int, band: tuple[int, int]) -> tuple[int, int] | None:
    """FlashAttention-2's ``(window_size_left, window_size_right)`` for a band: FA2 aligns a window to the bottom-right
    corner (row i sees keys ``i + sk - sq - left .. i + sk - sq + right``), so ``left = (sk - sq) - lo`` and ``right =
    hi - (sk - sq)``; None when either is negative (FA2 reads a negative size as unbounded)."""
    shift = sk - sq
    left, right = shift - band[0], band[1] - shift
    return (left, right) if left >= 0 and right >= 0 else None


def _fa2_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, S, D)`` as FA2's varlen ``(B * S, N, D)`` rows, contiguous."""
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, n, d).contiguous()


def _fa2_cumulative(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Cumulative lengths of ``batch`` documents of ``length`` rows, int32 on ``device`` (FA2's)."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_heads(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, n, s, d = dx.shape
    return dx.reshape(b, n // groups, groups, s, d).sum(2)


MIN_TILE = 128  # rows per band tile at least: smaller tiles cost more in calls than they save in masked scores


def band_pieces(sq: int, sk: int, band: tuple[int, int]) -> list[tuple[slice, slice, tuple[int, int]]]:
    """``(rows, columns, band relative to them)`` of the kernel calls that compute an ``sq x sk`` band block: row tiles
    of the rows that see a key, each against only the columns its rows see. A band of width w over n rows costs about
    ``n (w + tile)`` scores instead of ``n sk``, and no tile has a row that sees nothing (the kernels' LSE of such a row
    is not ``-inf``)."""
    lo, hi = band
    first, last = max(0, -hi), min(sq - 1, sk - 1 - lo)
    tile = max(MIN_TILE, (hi - lo + 1) // 2)
    pieces = []
    for r0 in range(first, last + 1, tile):
        r1 = min(r0 + tile, last + 1)
        c0, c1 = max(0, r0 + lo), min(sk - 1, r1 - 1 + hi)
        pieces.append((slice(r0, r1), slice(c0, c1 + 1), (lo - (c0 - r0), hi - (c0 - r0))))
    return pieces


def band_mask(sq: int, sk: int, band: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``(sq, sk)`` mask of a window's band (Note [windows] in ``schedule.py``): 0 where row i sees column j,
    ``i + lo <= j <= i + hi``, else ``-inf``. The CPU flash kernel takes it (a boolean mask it refuses)."""
    offset = torch.arange(sk, device=device) - torch.arange(sq, device=device).unsqueeze(1)
    keep = (offset >= band[0]) & (offset <= band[1])
    return torch.zeros((sq, sk), dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def _scores(
    q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, band: tuple[int, int] | None = None
) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(1)
        s.masked_fill_(mask, float("-inf"))
    if band is not None:
        s = s + band_mask(s.shape[-2], s.shape[-1], band, s.dtype, s.device)
    return s


def _fused_forward(q, k, v, causal: bool, scale: float, kernel: str, cuda: bool, band=None):
    if kernel == "flash_window":  # a band on CUDA: FA2's varlen entry point, one document per batch element
        b, n, sq, _ = q.shape
        sk = k.shape[2]
        left, right = _fa2_window(sq, sk, band)
        cu_q, cu_k = _fa2_cumulative(b, sq, q.device), _fa2_cumulative(b, sk, q.device)
        o, lse = ATEN["flash_varlen"](
            _fa2_rows(q), _fa2_rows(k), _fa2_rows(v), cu_q, cu_k, sq, sk, 0.0, False, False, scale=scale,
            window_size_left=left, window_size_right=right,
        )[:2]  # fmt: skip
        return o.view(b, sq, n, -1).transpose(1, 2), lse.view(n, b, sq).transpose(0, 1)
    if not cuda:
        q, k, v = (_cpu_layout(x) for x in (q, k, v))
        mask = None if band is None else band_mask(q.shape[2], k.shape[2], band, q.dtype, q.device)
        return ATEN["flash_cpu"](q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    q, k, v = (_kernel_layout(x) for x in (q, k, v))
    if kernel == "flash":
        return ATEN["flash_cuda"](q, k, v, 0.0, causal, False, scale=scale)[:2]
    if kernel == "cudnn":
        o, lse = ATEN["cudnn"](q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return o, lse.squeeze(-1)
    o, lse = ATEN["efficient"](q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return o, lse[..., : q.shape[2]]


def _fused_backward(do, q, k, v, out, lse, causal: bool, scale: float, kernel: str, cuda: bool, band=None):
    if kernel == "flash_window":
        b, n, sq, _ = q.shape
        sk = k.shape[2]
        left, right = _fa2_window(sq, sk, band)
        no_rng = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout: never read
        lse_rows = lse.to(torch.float32).transpose(0, 1).reshape(n, b * sq).contiguous()  # (N, total_q)
        dq, dk, dv = ATEN["flash_varlen_backward"](
            _fa2_rows(do), _fa2_rows(q), _fa2_rows(k), _fa2_rows(v), _fa2_rows(out), lse_rows,
            _fa2_cumulative(b, sq, q.device), _fa2_cumulative(b, sk, q.device), sq, sk, 0.0, False, no_rng, no_rng,
            scale=scale, window_size_left=left, window_size_right=right,
        )  # fmt: skip
        return (
            dq.view(b, sq, n, -1).transpose(1, 2),
            dk.view(b, sk, k.shape[1], -1).transpose(1, 2),
            dv.view(b, sk, v.shape[1], -1).transpose(1, 2),
        )
    if not cuda:  # the CPU kernel takes the LSE in the inputs' accumulation dtype, any strides
        do, q, k, v, out = (_cpu_layout(x) for x in (do, q, k, v, out))
        mask = None if band is None else band_mask(q.shape[2], k.shape[2], band, q.dtype, q.device)
        return ATEN["flash_cpu_backward"](do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    lse = _lse_for_backward(lse, kernel)
    do, q, k, v, out = (_kernel_layout(x) for x in (do, q, k, v, out))
    # No dropout: the random-state tensors are never read. Dense inputs: no cumulative sequence lengths.
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    sq, sk = q.shape[2], k.shape[2]
    if kernel == "flash":
        return ATEN["flash_cuda_backward"](do, q, k, v, out, lse, None, None, sq, sk, 0.0, causal, no_rng, no_rng,
                                           scale=scale)  # fmt: skip
    if kernel == "cudnn":
        return ATEN["cudnn_backward"](do, q, k, v, out, lse, no_rng, no_rng, None, None, None, sq, sk, 0.0, causal,
                                      scale=scale)  # fmt: skip
    return ATEN["efficient_backward"](do, q, k, v, None, out, lse, no_rng, no_rng, 0.0, [True, True, True, False],
                                      causal, scale=scale)[:3]  # fmt: skip


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    impl: str,
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention: ``(o (B, N, Sq, D) in q's dtype, lse (B, N, Sq) natural log)``.

    ``impl`` is a kernel name from :func:`resolve_impl`. lse is float32 (float64 with the ``torch`` kernel on
    float64 inputs) and contiguous. ``band`` ``(lo, hi)``: row i sees only columns ``i + lo .. i + hi`` (a window,
    Note [windows] in ``schedule.py``); every row must see at least one (the kernels' LSE of a row that sees none is
    not ``-inf``).
    """
    b, n, sq, _ = q.shape
    if sq == 0 or k.shape[2] == 0:  # an empty block (kernels divide by these sizes)
        lse = torch.full((b, n, sq), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
        return q.new_zeros(b, n, sq, v.shape[-1]), lse
    cuda = device_type(q.device) == "cuda"
    impl = _kernel_for(impl, sq, k.shape[2], band, cuda, q)
    groups = _groups_to_repeat(impl, q, k)
    k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    if impl != "torch":
        o, lse = _fused_forward(q, k, v, causal, scale, impl, cuda, band)
        return o, lse.contiguous()
    c = compute_dtype(q.dtype)
    s = _scores(q.to(c), k.to(c), causal, scale, band)
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
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of ``(dq, dk, dv)`` given the FINAL ``out`` and ``lse`` of the query rows.

    ``do, out (B, N, Sq, D)``, ``lse (B, N, Sq)`` with any strides (each kernel gets them in its own layout,
    Note [block kernels]). Gradients come in q's dtype (fused kernels) or the compute dtype (``torch``);
    dk/dv have k's head count.
    """
    if q.shape[2] == 0 or k.shape[2] == 0:  # an empty block contributes nothing
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    cuda = device_type(q.device) == "cuda"
    impl = _kernel_for(impl, q.shape[2], k.shape[2], band, cuda, q)
    groups = _groups_to_repeat(impl, q, k)
    k_rep, v_rep = _repeat_heads(k, groups), _repeat_heads(v, groups)
    if impl != "torch":
        dq, dk, dv = _fused_backward(do, q, k_rep, v_rep, out, lse, causal, scale, impl, cuda, band)
    else:
        c = compute_dtype(q.dtype)
        q_c, k_c, v_c, do_c = q.to(c), k_rep.to(c), v_rep.to(c), do.to(c)
        p = torch.exp(_scores(q_c, k_c, causal, scale, band) - lse.to(c).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), do_c)
        delta = (do_c * out.to(c)).sum(-1, keepdim=True)  # rowsum(dout * out) of the whole ring
        ds = p * (torch.matmul(do_c, v_c.transpose(-1, -2)) - delta)
        dq = torch.matmul(ds, k_c) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q_c) * scale
    return dq, _sum_heads(dk, groups), _sum_heads(dv, groups)
