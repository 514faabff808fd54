"""Random inputs for ``ring_attention_update`` and the tolerances they are checked with.

Tolerances (atol = rtol, against the float64 reference) per output dtype. ``docs/contract.md`` ("Numerics") gives the
tolerances, the original's own: float32 1e-4, float16 1e-3, bfloat16 5e-3. Each is above one rounding of the result to
that dtype (2**-24, 2**-11, 2**-8 relative) plus float32 arithmetic on the weights, and below any real
mistake (a wrong statistics row changes results at the 1e-1 level). float64 keeps 1e-12: only the
order of float64 operations differs from the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ringattn import backends

TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}
ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def backend_device(name: str) -> torch.device:
    """Where ``name``'s tests put their tensors: Triton on the GPU when there is one (else CPU tensors
    under ``TRITON_INTERPRET=1``), every other backend on the CPU."""
    if name == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def available_backends() -> list[str]:
    """Every backend that can run in this process, the reference excluded."""
    names = []
    for name in ("torch", "cpu", "triton"):
        try:
            module = backends.load(name)
        except ModuleNotFoundError:
            continue
        if module.unavailable_reason() is None:
            names.append(name)
    return names


@dataclasses.dataclass
class UpdateInputs:
    layout: str
    prev_o: torch.Tensor
    prev_m: torch.Tensor
    prev_l: torch.Tensor
    cur_o: torch.Tensor
    cur_m: torch.Tensor
    cur_l: torch.Tensor
    seq_offsets: list[int] | None = None
    softmax_layout: str | None = None

    def args(self) -> tuple:
        return (
            self.prev_o,
            self.prev_m,
            self.prev_l,
            self.cur_o,
            self.cur_m,
            self.cur_l,
            self.seq_offsets,
            self.layout,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.prev_o, self.prev_m, self.prev_l, self.cur_o, self.cur_m, self.cur_l]

    def to(self, device: torch.device) -> UpdateInputs:
        """The same inputs on ``device`` (contiguous copies; ``actual_seq_qlen`` stays a host list)."""
        moved = [t.to(device) for t in self.tensors()]
        return UpdateInputs(self.layout, *moved, self.seq_offsets, self.softmax_layout)


def random_stats(
    rows_shape: tuple[int, ...], gen: torch.Generator, empty_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum) statistics, equal over the 8 lanes, as FlashAttention produces them.

    Maxima are spread over several units so the weights cover many magnitudes; sums lie in [1, 64] (a
    row that saw keys has sum >= 1). About ``empty_fraction`` of the rows are empty: (-inf, 0).
    """
    m = torch.randn(rows_shape, generator=gen, dtype=torch.float64) * 4
    l = 1 + torch.rand(rows_shape, generator=gen, dtype=torch.float64) * 63
    empty = torch.rand(rows_shape, generator=gen, dtype=torch.float64) < empty_fraction
    m = m.masked_fill(empty, -math.inf)
    l = l.masked_fill(empty, 0.0)
    lanes = (*rows_shape, 8)
    return (
        m.to(torch.float32).unsqueeze(-1).expand(lanes).contiguous(),
        l.to(torch.float32).unsqueeze(-1).expand(lanes).contiguous(),
    )


def make_update_inputs(
    layout: str,
    dtype: torch.dtype,
    gen: torch.Generator,
    *,
    seq: int = 5,
    batch: int = 2,
    heads: int = 3,
    head_dim: int = 4,
    seq_lens: list[int] | None = None,
    softmax_layout: str | None = None,
    empty_fraction: float = 0.1,
) -> UpdateInputs:
    """Fresh random inputs; attention values uniform in [-1, 1) rounded to ``dtype``."""
    if layout == "SBH":
        attn_shape: tuple[int, ...] = (seq, batch, heads * head_dim)
        rows: tuple[int, ...] = (batch, heads, seq)
        offsets = None
    else:
        lens = seq_lens if seq_lens is not None else [seq]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        attn_shape = (offsets[-1], heads, head_dim)
        rows = (offsets[-1], heads)

    def attn() -> torch.Tensor:
        return (torch.rand(attn_shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)

    prev_m, prev_l = random_stats(rows, gen, empty_fraction)
    cur_m, cur_l = random_stats(rows, gen, empty_fraction)
    return UpdateInputs(layout, attn(), prev_m, prev_l, attn(), cur_m, cur_l, offsets, softmax_layout)


def strided_copy(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (``how``: 'gap' or 'transposed')."""
    if how == "gap":  # every dimension strided: a slice of a larger buffer
        big = torch.full([2 * s + 1 for s in t.shape], float("nan"), dtype=t.dtype, device=t.device)
        view = big[tuple(slice(1, 2 * s + 1, 2) for s in t.shape)]
    else:  # reversed dimension order in memory
        view = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype, device=t.device).permute(*reversed(range(t.dim())))
    view.copy_(t)
    return view
