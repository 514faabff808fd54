"""The float64 oracle (``ringattn.reference``) behind the backend interface, rounded to output dtypes."""

from __future__ import annotations

import torch

from .._contract import UpdateProblem
from ..reference import ring_attention_update_reference

NAME = "reference"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(problem: UpdateProblem) -> str | None:
    return None


def ring_attention_update(
    problem: UpdateProblem, out_o: torch.Tensor, out_m: torch.Tensor, out_l: torch.Tensor
) -> None:
    offsets = problem.seq_offsets.cpu() if problem.seq_offsets is not None else None
    o, m, l = ring_attention_update_reference(
        problem.prev_o,
        problem.prev_m,
        problem.prev_l,
        problem.cur_o,
        problem.cur_m,
        problem.cur_l,
        offsets,
        problem.layout,
        None if problem.stats_order != "token_major" else "TND",
    )
    out_o.copy_(o)
    out_m.copy_(m)
    out_l.copy_(l)
