"""The CUDA code path of ``ring/blocks.py`` and of the ring, run in CI on CPU through kernel doubles.

``cuda_doubles.install`` routes CPU tensors through the CUDA branch with CPU doubles of the ATen kernels that
assert each kernel's preconditions (Note [block kernels]). The ring must pass them at every world size; a
planted violation (the strided LSE slice that gave wrong ring gradients on an H100) must fail them.
Tolerances: those of ``test_virtual.py`` (the doubles compute like the plain-torch block).
"""

from __future__ import annotations

import cuda_doubles
import pytest
import torch
from test_virtual import Case, check_against_float64, inputs, simulate

from ringattn.errors import BackendError
from ringattn.ring import blocks

KERNEL_CASES = [
    Case(1, torch.bfloat16, impl="cudnn"),
    Case(2, torch.bfloat16, impl="cudnn", heads=6, kv_heads=2, chunk=5),
    Case(3, torch.float16, impl="flash", heads=4, kv_heads=1),
    Case(4, torch.bfloat16, impl="flash", causal=False, batch=2),
    Case(3, torch.float32, impl="efficient", chunk=20),  # 40-row halves: the LSE padding to 64 is exercised
    Case(8, torch.bfloat16, impl="auto", chunk=2),  # auto on an sm90 device: cudnn
    Case(4, torch.bfloat16, impl="sdpa", sharding="contiguous", layout="BNSD"),
]


@pytest.fixture
def cuda_path(monkeypatch):
    cuda_doubles.install(monkeypatch)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c.impl}-W{c.world}-{c.dtype}")
def test_ring_passes_the_cuda_kernel_contracts(cuda_path, case: Case) -> None:
    check_against_float64(case, seed=300 + case.world)


def test_auto_picks_cudnn_then_flash_then_efficient(cuda_path, monkeypatch) -> None:
    cpu = torch.device("cpu")  # routed as an sm90 CUDA device
    assert blocks.resolve_impl("auto", cpu, torch.bfloat16, 128) == "cudnn"
    assert blocks.resolve_impl("auto", cpu, torch.bfloat16, 256) == "flash"  # cuDNN takes D <= 128
    assert blocks.resolve_impl("auto", cpu, torch.float32, 64) == "efficient"
    assert blocks.resolve_impl("auto", cpu, torch.float32, 13) == "torch"  # 52 bytes: no fused kernel
    assert blocks.resolve_impl("auto", cpu, torch.float64, 64) == "torch"
    monkeypatch.setattr(blocks, "cuda_capability", lambda device: (7, 5))
    assert blocks.resolve_impl("auto", cpu, torch.bfloat16, 64) == "flash"  # no cuDNN attention before sm80
    monkeypatch.setitem(blocks.ENABLED, "flash_sdp_enabled", lambda: False)
    assert blocks.resolve_impl("auto", cpu, torch.bfloat16, 64) == "efficient"  # PyTorch's switch honoured
    with pytest.raises(BackendError, match="impl.*compute capability"):
        blocks.resolve_impl("cudnn", cpu, torch.bfloat16, 64)


def test_planted_strided_lse_fails_the_ring(cuda_path, monkeypatch) -> None:
    """Without the contract's contiguous LSE, the causal ring hands the backward ``lse[:, :, qs]``: caught."""
    monkeypatch.setattr(blocks, "_lse_for_backward", lambda lse, kernel: lse)
    case = Case(2, torch.bfloat16, impl="flash")
    with pytest.raises(AssertionError, match="contiguous LSE"):
        simulate(case, *inputs(case, seed=1))


def test_doubles_reject_what_the_kernels_misread() -> None:
    q = torch.randn(1, 6, 4, 16, dtype=torch.bfloat16).transpose(1, 2)  # SDPA's (B, S, N, D) memory order
    lse = torch.randn(1, 4, 12)[..., ::2]  # a strided view, like lse[:, :, qs]
    with pytest.raises(AssertionError, match="contiguous LSE"):
        cuda_doubles.flash_cuda_backward(q, q, q, q, q, lse, None, None, 6, 6, 0.0, False, None, None, scale=1.0)
    with pytest.raises(AssertionError, match="LSE shape"):
        cuda_doubles.cudnn_backward(q, q, q, q, q, lse.contiguous(), None, None, None, None, None, 6, 6, 0.0, False,
                                    scale=1.0)  # fmt: skip
    with pytest.raises(AssertionError, match="unit stride along D"):
        cuda_doubles.flash_cuda(q[..., ::2], q[..., ::2], q[..., ::2], 0.0, False, False, scale=1.0)
    with pytest.raises(AssertionError, match="dtype"):
        cuda_doubles.cudnn(q.float(), q.float(), q.float(), None, True, 0.0, False, False, scale=1.0)


def test_cudnn_takes_gqa_key_values_unrepeated(cuda_path, monkeypatch) -> None:
    """cuDNN gets key/value blocks with their own head count (no repeat copies) and returns dk/dv so."""
    seen = []
    for name in ("cudnn", "cudnn_backward"):
        double = cuda_doubles.DOUBLES[name]

        def recording(*args, _double=double, _name=name, **kwargs):
            q_at = 1 if _name.endswith("backward") else 0  # the backward's first argument is dout
            seen.append((args[q_at].shape[1], args[q_at + 1].shape[1]))
            return _double(*args, **kwargs)

        monkeypatch.setitem(blocks.ATEN, name, recording)
    case = Case(2, torch.bfloat16, impl="cudnn", heads=6, kv_heads=2)
    check_against_float64(case, seed=9)
    assert blocks.KERNELS["cuda", "cudnn"].native_gqa  # PyTorch >= 2.11 here
    assert seen and set(seen) == {(6, 2)}
