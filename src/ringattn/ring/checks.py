"""Input checks of ring attention that raise on EVERY rank instead of hanging some of them.

Each rank encodes what it was given (tensor or not, rank, shape, dtype, device, options) as a short row
of integers; one ``all_gather`` gives every rank the whole table, and every rank then runs the same
pure validation over it. So a bad input on one rank, or ranks that disagree, raise the same ringattn
error everywhere before the first P2P transfer is posted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, DeviceError, DTypeError, ShapeError, expected
from .schedule import SHARDINGS

LAYOUTS = ("BSND", "BNSD")
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES = (*ATTN_DTYPES, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")
_MAX_DIMS = 4
_NAMES = ("q", "k", "v")
# Row layout per tensor: is_tensor, ndim, 4 sizes (-1 padded), dtype code, device type code.
_FIELDS = 2 + _MAX_DIMS + 2


def _encode_tensor(x: Any) -> list[int]:
    if not isinstance(x, torch.Tensor):
        return [0, 0, *([-1] * _MAX_DIMS), -1, -1]
    sizes = list(x.shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(x.dim(), _MAX_DIMS))
    dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    device = _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else -1
    return [1, x.dim(), *sizes, dtype, device]


def encode(q: Any, k: Any, v: Any, *, causal: bool, layout: str, sharding: str) -> list[int]:
    """This rank's row of the check table."""
    row = [v_ for x in (q, k, v) for v_ in _encode_tensor(x)]
    return [*row, int(causal), LAYOUTS.index(layout), SHARDINGS.index(sharding)]


def _fields(row: Sequence[int], i: int) -> tuple[bool, int, tuple[int, ...], str, str]:
    is_tensor, ndim, *rest = row[i * _FIELDS : (i + 1) * _FIELDS]
    sizes, dtype, device = tuple(rest[:_MAX_DIMS]), rest[_MAX_DIMS], rest[_MAX_DIMS + 1]
    dtype_name = str(_DTYPES[dtype]) if dtype >= 0 else "an unsupported dtype"
    device_name = _DEVICE_TYPES[device] if device >= 0 else "another device type"
    return bool(is_tensor), ndim, sizes[: min(ndim, _MAX_DIMS)], dtype_name, device_name


def _check_row(row: Sequence[int], where: str) -> None:
    """Validate one rank's inputs; ``where`` (e.g. ``" (rank 2)"``) is appended to argument names."""
    q, k, v = (_fields(row, i) for i in range(3))
    causal, layout, sharding = bool(row[-3]), LAYOUTS[row[-2]], SHARDINGS[row[-1]]
    letters = "(B, S_local, N, D)" if layout == "BSND" else "(B, N, S_local, D)"
    for name, (is_tensor, ndim, sizes, dtype, _) in zip(_NAMES, (q, k, v), strict=True):
        if not is_tensor:
            raise DTypeError(expected(name + where, "a torch.Tensor", "a non-tensor"))
        if ndim != 4:
            raise ShapeError(expected(name + where, f"a 4-D tensor {letters} (layout {layout})", f"shape {sizes}"))
        if dtype not in map(str, ATTN_DTYPES):
            raise DTypeError(expected(name + where, "float16, bfloat16, float32 or float64", dtype))
    for name, other in (("k", k), ("v", v)):
        if other[3] != q[3]:
            raise DTypeError(expected(name + where, f"{q[3]} like q", other[3]))
        if other[4] != q[4]:
            raise DeviceError(expected(name + where, f"a {q[4]} tensor like q", other[4]))
    if v[2] != k[2]:
        raise ShapeError(expected("v" + where, f"shape {k[2]} like k", f"shape {v[2]}"))
    seq, heads = (1, 2) if layout == "BSND" else (2, 1)
    if k[2][0] != q[2][0] or k[2][3] != q[2][3]:
        raise ShapeError(expected("k" + where, f"batch {q[2][0]} and head size {q[2][3]} like q", f"shape {k[2]}"))
    if q[2][heads] % max(k[2][heads], 1) != 0 or k[2][heads] == 0:
        raise ShapeError(expected("k" + where, f"a head count dividing q's {q[2][heads]}", k[2][heads]))
    if causal and k[2][seq] != q[2][seq]:
        raise ShapeError(expected("k" + where, f"local sequence length {q[2][seq]} like q (causal)", k[2][seq]))
    if causal and sharding == "zigzag" and q[2][seq] % 2:
        raise ShapeError(
            expected("q" + where, "an even local sequence length (causal zigzag holds two chunks)", q[2][seq])
        )


def check_table(table: Sequence[Sequence[int]]) -> None:
    """Raise the first problem in the gathered table: a rank's own inputs, then disagreement with rank 0."""
    for rank, row in enumerate(table):
        _check_row(row, f" (rank {rank})" if len(table) > 1 else "")
    first = table[0]
    for rank, row in enumerate(table[1:], start=1):
        for i, name in enumerate(_NAMES):
            _, _, sizes0, dtype0, device0 = _fields(first, i)
            _, _, sizes, dtype, device = _fields(row, i)
            where = f"{name} (rank {rank})"
            if sizes != sizes0:
                raise ShapeError(expected(where, f"shape {sizes0} as on rank 0", f"shape {sizes}"))
            if dtype != dtype0:
                raise DTypeError(expected(where, f"{dtype0} as on rank 0", dtype))
            if device != device0:
                raise DeviceError(expected(where, f"a {device0} tensor as on rank 0", device))
        for label, pos, values in (("causal", -3, (False, True)), ("layout", -2, LAYOUTS), ("sharding", -1, SHARDINGS)):
            if row[pos] != first[pos]:
                raise ConfigError(
                    expected(f"{label} (rank {rank})", f"{values[first[pos]]!r} as on rank 0", values[row[pos]])
                )
