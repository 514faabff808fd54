"""Input checks of ring attention that raise on EVERY rank instead of hanging some of them.

Each rank encodes what it was given (tensor or not, rank, shape, dtype, device, and every option, valid or
not) as a short row of integers; one ``all_gather`` gives every rank the whole table, and every rank then
runs the same pure validation over it. So a bad input or option on one rank, or ranks that disagree
(shapes, dtypes, devices, options, ``softmax_scale``, whether a backward will run), raise the same ringattn
error everywhere before the first P2P transfer is posted. Nothing is validated before the gather: an error
raised on one rank only would leave the others blocked in it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

from .. import backends
from ..errors import BackendError, ConfigError, DeviceError, DTypeError, LayoutError, SeqLenError, ShapeError, expected
from .blocks import IMPLS
from .schedule import SHARDINGS, packed_local_offsets

LAYOUTS = ("BSND", "BNSD")
_LAYOUT_CODES = (*LAYOUTS, "TND")  # code 2: the packed layout of ``ring_attention_varlen`` (never a user option)
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES = (*ATTN_DTYPES, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")
MERGE_BACKENDS = tuple(n for n in backends.BACKEND_NAMES if n != "reference")  # the ring's ``backend`` choices
_MAX_DIMS = 4
_NAMES = ("q", "k", "v")
# Row layout per tensor: is_tensor, ndim, 4 sizes (-1 padded), dtype code, device type code.
_FIELDS = 2 + _MAX_DIMS + 2
# Options, in row order after the tensors: (name, allowed values, error class). -1 encodes "not allowed".
_CHOICES = (
    ("layout", LAYOUTS, LayoutError),
    ("sharding", SHARDINGS, LayoutError),
    ("impl", IMPLS, BackendError),
    ("backend", MERGE_BACKENDS, BackendError),
    ("causal", (False, True), ConfigError),
)
# After the choices: softmax_scale as (kind, bits) with kind 0 = default, 1 = a float, -1 = invalid; then
# whether this rank will run a backward (ranks that disagree would hang in it); then, for the packed ring only,
# the cu_seqlens fields of :func:`inspect_cu_seqlens` (Note [packed zigzag] in ``schedule.py``).
_SCALE_AT = len(_CHOICES)  # in the options part of a row
_GRAD_AT = _SCALE_AT + 2
_MERGE_AT = _GRAD_AT + 1  # the row-merge backend this rank could run now (Note [one merge backend per ring])
_SINKS_AT = _MERGE_AT + 1  # the sinks tensor's fields (``_encode_tensor``), all 0 / -1 without sinks
_WINDOW_AT = _SINKS_AT + _FIELDS  # (left, right), -1 unbounded; -2, -2 for an invalid window
_CU_AT = _WINDOW_AT + 2


def window_of(window: Any) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` ints >= -1 (Note [windows] in ``schedule.py``), None for None or ``(-1, -1)``;
    raises ConfigError for anything else (call after the check table, which raises the same on every rank)."""
    if window is None:
        return None
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window)
    )
    if not ok:
        raise ConfigError(
            expected(
                "window", "None or (left, right): ints >= -1, -1 for unbounded (flash-attn's window_size)", repr(window)
            )  # fmt: skip
        )
    return None if tuple(window) == (-1, -1) else (int(window[0]), int(window[1]))


def _encode_window(window: Any) -> list[int]:
    try:
        normal = window_of(window)
    except ConfigError:
        return [-2, -2]
    return [-1, -1] if normal is None else list(normal)


# Note [one merge backend per ring]
# ---------------------------------
# ``backend="auto"`` on CPU runs the portable torch merge until numba has compiled the fused kernel for the call's
# argument types, then the fused one (Note [cold start] in ``backends/_warm.py``). The two agree within the
# tolerances but not always to the last bit, so ranks that switched at different calls (they compile at different
# speeds) would hold results that are not the same function of their inputs. Each rank therefore reports, in the
# check table, the backend it could run now (:func:`~ringattn.ring.attention.local_merge_backend`: a one-row probe
# merge in the ring's argument types, which also queues the compile), and the call runs the fused backend only where
# every rank reported it (:func:`agreed_merge_backend`), else torch: one backend for every rank and every step of a
# call. Under ``torch.use_deterministic_algorithms(True)`` ``auto`` never switches at all: it waits for the fused
# kernel from the first call (``backends._auto_backend``), so two runs of one script are bitwise equal.


def _encode_tensor(x: Any) -> list[int]:
    if not isinstance(x, torch.Tensor):
        return [0, 0, *([-1] * _MAX_DIMS), -1, -1]
    sizes = list(x.shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(x.dim(), _MAX_DIMS))
    dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    device = _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else -1
    return [1, x.dim(), *sizes, dtype, device]


def _index(value: Any, allowed: tuple) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1) and allowed == (False, True):
        value = bool(value)  # causal=0 / 1
    for i, candidate in enumerate(allowed):
        if type(value) is type(candidate) and value == candidate:
            return i
    return -1


def _encode_scale(scale: Any) -> list[int]:
    if scale is None:
        return [0, 0]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return [-1, 0]
    return [1, struct.unpack("<q", struct.pack("<d", float(scale)))[0]]


def _decode_scale(kind: int, bits: int) -> float | None:
    return None if kind == 0 else struct.unpack("<d", struct.pack("<q", bits))[0]


def encode(
    q: Any,
    k: Any,
    v: Any,
    options: Any,
    *,
    needs_grad: bool,
    merge: str | None = None,
    sinks: Any = None,
    cu_seqlens: Any = None,
    world_size: int = 1,
) -> list[int]:
    """This rank's row of the check table; ``options`` is a :class:`RingOptions` (any values, valid or not).

    ``merge`` is the row-merge backend this rank could run now (Note [one merge backend per ring]), None when
    unknown. With ``cu_seqlens`` (the packed ring; pass ``world_size`` too) the layout is the packed
    ``(T_local, N, D)`` and the row ends with the fields of :func:`inspect_cu_seqlens`.
    """
    row = [v_ for x in (q, k, v) for v_ in _encode_tensor(x)]
    choices = [_index(getattr(options, name), allowed) for name, allowed, _ in _CHOICES]
    if cu_seqlens is not None:
        choices[0] = _LAYOUT_CODES.index("TND")
    merge_code = backends.BACKEND_NAMES.index(merge) if merge in backends.BACKEND_NAMES else -1
    row = [*row, *choices, *_encode_scale(options.softmax_scale), int(needs_grad), merge_code]
    row += _encode_tensor(sinks) if sinks is not None else [-1, *([-1] * (_FIELDS - 1))]
    row += _encode_window(getattr(options, "window", None))
    return row if cu_seqlens is None else [*row, *inspect_cu_seqlens(cu_seqlens, world_size)]


# --- cu_seqlens of a packed batch ----------------------------------------------------------------------------
# Codes of inspect_cu_seqlens, turned into the same error on every rank by cu_seqlens_error.
CU_OK, CU_NOT_TENSOR, CU_DTYPE, CU_SHAPE, CU_DEVICE, CU_START, CU_DECREASING = range(7)
_CU_FIELDS = 8  # code, 3 details, documents, total T, slots per rank, hash of the values


def inspect_cu_seqlens(cu_seqlens: Any, world_size: int = 1) -> list[int]:
    """``cu_seqlens`` as a fixed-length row of ints: ``[code, d0, d1, d2, documents, T, slots per rank, hash]``.

    ``code`` is ``CU_OK`` or what is wrong (the details say with what); never raises, so every rank can encode
    its own and raise the first problem of any rank together (:func:`cu_seqlens_error`). Slots per rank: the
    local length of a shard under per-document zigzag over ``world_size`` ranks (Note [packed zigzag]).
    """

    def bad(code: int, *details: int) -> list[int]:
        return [code, *details, *([0] * (3 - len(details))), 0, 0, 0, 0]

    if not isinstance(cu_seqlens, torch.Tensor):
        return bad(CU_NOT_TENSOR)
    if cu_seqlens.dtype != torch.int64:
        return bad(CU_DTYPE, _DTYPES.index(cu_seqlens.dtype) if cu_seqlens.dtype in _DTYPES else -1)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        return bad(CU_SHAPE, cu_seqlens.dim(), cu_seqlens.numel())
    if cu_seqlens.device.type not in ("cpu", "cuda"):  # values must be read on the host
        return bad(
            CU_DEVICE, _DEVICE_TYPES.index(cu_seqlens.device.type) if cu_seqlens.device.type in _DEVICE_TYPES else -1
        )
    values = cu_seqlens.tolist()
    if values[0] != 0:
        return bad(CU_START, values[0])
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            return bad(CU_DECREASING, i + 1, values[i], values[i + 1])
    lengths = [b - a for a, b in zip(values, values[1:], strict=False)]
    slots = packed_local_offsets(lengths, world_size)[-1]
    device = _DEVICE_TYPES.index(cu_seqlens.device.type)
    return [CU_OK, device, 0, 0, len(lengths), values[-1], slots, hash(tuple(values)) & (2**62 - 1)]


def cu_seqlens_error(fields: Sequence[int], where: str = "") -> Exception | None:
    """The error for a row of :func:`inspect_cu_seqlens` (None when it is fine), naming ``cu_seqlens`` + ``where``."""
    code, d0, d1, d2 = fields[:4]
    name = "cu_seqlens" + where
    if code == CU_NOT_TENSOR:
        return DTypeError(expected(name, "a 1-D int64 torch.Tensor", "a non-tensor"))
    if code == CU_DTYPE:
        return DTypeError(expected(name, "dtype torch.int64", str(_DTYPES[d0]) if d0 >= 0 else "another dtype"))
    if code == CU_SHAPE:
        return ShapeError(expected(name, "a 1-D tensor [0, ..., T] with at least one entry", f"{d0}-D, {d1} entries"))
    if code == CU_DEVICE:
        device = _DEVICE_TYPES[d0] if d0 >= 0 else "another device type"
        return DeviceError(expected(name, "a CPU or CUDA tensor (its values are read)", f"a {device} tensor"))
    if code == CU_START:
        return SeqLenError(expected(name, "a first entry of 0", d0))
    if code == CU_DECREASING:
        return SeqLenError(expected(name, "non-decreasing entries", f"entry {d0} = {d2} after {d1}"))
    return None


def _fields(row: Sequence[int], i: int) -> tuple[bool, int, tuple[int, ...], str, str]:
    is_tensor, ndim, *rest = row[i * _FIELDS : (i + 1) * _FIELDS]
    sizes, dtype, device = tuple(rest[:_MAX_DIMS]), rest[_MAX_DIMS], rest[_MAX_DIMS + 1]
    dtype_name = str(_DTYPES[dtype]) if dtype >= 0 else "an unsupported dtype"
    device_name = _DEVICE_TYPES[device] if device >= 0 else "another device type"
    return bool(is_tensor), ndim, sizes[: min(ndim, _MAX_DIMS)], dtype_name, device_name


def _options(row: Sequence[int]) -> list[int]:
    return list(row[3 * _FIELDS :])


_LAYOUT_WANTED = (
    "'BSND' for (B, S_local, N, D) tensors (flash-attn, transformers) or 'BNSD' for (B, N, S_local, D) "
    "(F.scaled_dot_product_attention), stated by the caller: the shapes of one are valid shapes of the other"
)


def _check_options(row: Sequence[int], where: str, given: Any) -> None:
    codes = _options(row)
    for (name, allowed, error), code in zip(_CHOICES, codes, strict=False):
        if code < 0:
            got = repr(getattr(given, name)) if given is not None else "another value on that rank"
            want = _LAYOUT_WANTED if name == "layout" else f"one of {', '.join(map(repr, allowed))}"
            raise error(expected(name + where, want, got))
    if codes[_SCALE_AT] < 0:
        got = repr(given.softmax_scale) if given is not None else "another value on that rank"
        raise ConfigError(expected("softmax_scale" + where, "None or a finite float", got))
    if codes[_WINDOW_AT] == -2:
        got = repr(given.window) if given is not None else "another value on that rank"
        raise ConfigError(
            expected("window" + where, "None or (left, right): ints >= -1, -1 for unbounded (flash-attn's)", got)
        )


def _check_tensors(row: Sequence[int], where: str, world_size: int) -> None:
    try:
        _check_tensor_fields(row, where, world_size)
    except ShapeError as error:
        layout = _LAYOUT_CODES[_options(row)[0]]
        if layout == "TND":
            raise
        other = "BNSD" if layout == "BSND" else "BSND"
        raise ShapeError(
            f"{error} (read as layout={layout!r}; tensors laid out otherwise need layout={other!r})"
        ) from None


def _check_tensor_fields(row: Sequence[int], where: str, world_size: int) -> None:
    q, k, v = (_fields(row, i) for i in range(3))
    layout = _LAYOUT_CODES[_options(row)[0]]
    causal, sharding = bool(_options(row)[4]), SHARDINGS[_options(row)[1]]
    windowed = _options(row)[_WINDOW_AT : _WINDOW_AT + 2] != [-1, -1]
    letters = {"BSND": "(B, S_local, N, D)", "BNSD": "(B, N, S_local, D)", "TND": "(T_local, N, D)"}[layout]
    rank_ = 3 if layout == "TND" else 4
    for name, (is_tensor, ndim, sizes, dtype, _) in zip(_NAMES, (q, k, v), strict=True):
        if not is_tensor:
            raise DTypeError(expected(name + where, "a torch.Tensor", "a non-tensor"))
        if ndim != rank_:
            what = f"a {rank_}-D tensor {letters}" + ("" if layout == "TND" else f" (layout {layout})")
            raise ShapeError(expected(name + where, what, f"shape {sizes}"))
        if dtype not in map(str, ATTN_DTYPES):
            raise DTypeError(expected(name + where, "float16, bfloat16, float32 or float64", dtype))
    for name, other in (("k", k), ("v", v)):
        if other[3] != q[3]:
            raise DTypeError(expected(name + where, f"{q[3]} like q", other[3]))
        if other[4] != q[4]:
            raise DeviceError(expected(name + where, f"a {q[4]} tensor like q", other[4]))
    if v[2] != k[2]:
        raise ShapeError(expected("v" + where, f"shape {k[2]} like k", f"shape {v[2]}"))
    seq, heads = {"BSND": (1, 2), "BNSD": (2, 1), "TND": (0, 1)}[layout]
    if q[2][-1] == 0 or q[2][heads] == 0:
        raise ShapeError(expected("q" + where, "at least one head of size >= 1", f"shape {q[2]}"))
    if layout == "TND" and k[2][2] != q[2][2]:
        raise ShapeError(expected("k" + where, f"head size {q[2][2]} like q", f"shape {k[2]}"))
    if layout != "TND" and (k[2][0] != q[2][0] or k[2][3] != q[2][3]):
        raise ShapeError(expected("k" + where, f"batch {q[2][0]} and head size {q[2][3]} like q", f"shape {k[2]}"))
    if k[2][heads] == 0 or q[2][heads] % k[2][heads] != 0:
        raise ShapeError(expected("k" + where, f"a head count dividing q's {q[2][heads]}", k[2][heads]))
    if (causal or layout == "TND") and k[2][seq] != q[2][seq]:
        if layout == "TND":  # k and v are sharded like q (Note [packed zigzag])
            raise ShapeError(expected("k" + where, f"{q[2][seq]} tokens like q (packed shards)", k[2][seq]))
        raise ShapeError(expected("k" + where, f"local sequence length {q[2][seq]} like q (causal)", k[2][seq]))
    if (causal or windowed) and sharding == "zigzag" and layout != "TND" and world_size > 1 and q[2][seq] % 2:
        raise ShapeError(
            expected("q" + where, "an even local sequence length (a zigzag shard holds two chunks)", q[2][seq])
        )
    if windowed and not causal and k[2][seq] != q[2][seq] and layout != "TND":
        raise ShapeError(expected("k" + where, f"local sequence length {q[2][seq]} like q (a window)", k[2][seq]))


def _check_sinks(row: Sequence[int], where: str) -> None:
    """``sinks``: absent (marker -1), or a 1-D floating tensor of q's head count on q's device type."""
    fields = _options(row)[_SINKS_AT : _SINKS_AT + _FIELDS]
    if fields[0] == -1:
        return
    name = "sinks" + where
    is_tensor, ndim, *rest = fields
    sizes, dtype, device = rest[:_MAX_DIMS], rest[_MAX_DIMS], rest[_MAX_DIMS + 1]
    q = _fields(row, 0)
    heads = q[2][1] if _LAYOUT_CODES[_options(row)[0]] in ("TND", "BNSD") else q[2][2]
    if not is_tensor:
        raise DTypeError(expected(name, "None or a torch.Tensor of one logit per query head", "a non-tensor"))
    if ndim != 1 or sizes[0] != heads:
        raise ShapeError(expected(name, f"shape ({heads},): one logit per query head", f"shape {tuple(sizes[:ndim])}"))
    dtype_name = str(_DTYPES[dtype]) if dtype >= 0 else "an unsupported dtype"
    if dtype_name not in map(str, ATTN_DTYPES):
        raise DTypeError(expected(name, "float16, bfloat16, float32 or float64", dtype_name))
    if device < 0 or _DEVICE_TYPES[device] != q[4]:
        raise DeviceError(expected(name, f"a {q[4]} tensor like q", _DEVICE_TYPES[device] if device >= 0 else "other"))


def _check_cu_seqlens(row: Sequence[int], where: str, world_size: int) -> None:
    fields = _options(row)[_CU_AT:]
    error = cu_seqlens_error(fields, where)
    if error is not None:
        raise error
    q = _fields(row, 0)
    if _DEVICE_TYPES[fields[1]] not in ("cpu", q[4]):
        raise DeviceError(
            expected(
                "cu_seqlens" + where, f"a CPU tensor or a {q[4]} tensor like q", f"a {_DEVICE_TYPES[fields[1]]} tensor"
            )
        )
    documents, total, slots = fields[4:7]
    if slots != q[2][0]:
        raise ShapeError(
            expected(
                "cu_seqlens" + where,
                f"documents whose shards over {world_size} ranks hold q's {q[2][0]} tokens"
                f" (2 ceil(L_i / {2 * world_size}) slots per document)",
                f"{documents} documents of {total} tokens in all, {slots} slots per rank",
            )
        )


def agreed_merge_backend(table: Sequence[Sequence[int]]) -> str:
    """The row-merge backend every rank runs (Note [one merge backend per ring]): the one all ranks reported, else
    the portable ``torch``."""
    codes = {_options(row)[_MERGE_AT] for row in table}
    code = codes.pop() if len(codes) == 1 else -1
    return backends.BACKEND_NAMES[code] if code >= 0 else "torch"


def check_table(table: Sequence[Sequence[int]], given: Any = None) -> None:
    """Raise the first problem in the gathered table, the same on every rank: a rank's options, then its
    inputs, then disagreement with rank 0. ``given`` (this rank's options) only makes messages name the bad
    value when the bad rank is this one's ring of one."""
    many = len(table) > 1
    for rank, row in enumerate(table):
        _check_options(row, f" (rank {rank})" if many else "", None if many else given)
    for rank, row in enumerate(table):
        _check_tensors(row, f" (rank {rank})" if many else "", len(table))
        _check_sinks(row, f" (rank {rank})" if many else "")
    for rank, row in enumerate(table):
        if _options(row)[_CU_AT:]:
            _check_cu_seqlens(row, f" (rank {rank})" if many else "", len(table))
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
        mine, theirs = _options(first), _options(row)
        for (name, allowed, _), want, got in zip(_CHOICES, mine, theirs, strict=False):
            if got != want:
                raise ConfigError(expected(f"{name} (rank {rank})", f"{allowed[want]!r} as on rank 0", allowed[got]))
        scale0 = _decode_scale(*mine[_SCALE_AT:_GRAD_AT])
        scale = _decode_scale(*theirs[_SCALE_AT:_GRAD_AT])
        if scale != scale0:
            raise ConfigError(expected(f"softmax_scale (rank {rank})", f"{scale0!r} as on rank 0", repr(scale)))
        if mine[_CU_AT:] and theirs[-1] != mine[-1]:
            raise ConfigError(expected(f"cu_seqlens (rank {rank})", "the same values as on rank 0", "other values"))
        if theirs[_WINDOW_AT : _WINDOW_AT + 2] != mine[_WINDOW_AT : _WINDOW_AT + 2]:
            want, got = (tuple(x[_WINDOW_AT : _WINDOW_AT + 2]) for x in (mine, theirs))
            raise ConfigError(expected(f"window (rank {rank})", f"{want} as on rank 0", got))
        if theirs[_SINKS_AT : _SINKS_AT + _FIELDS] != mine[_SINKS_AT : _SINKS_AT + _FIELDS]:
            raise ConfigError(expected(f"sinks (rank {rank})", "the same shape and dtype as on rank 0", "others"))
        if theirs[_GRAD_AT] != mine[_GRAD_AT]:
            want_grad, got_grad = ("a", "no") if mine[_GRAD_AT] else ("no", "a")
            raise ConfigError(
                expected(
                    f"requires_grad (rank {rank})",
                    f"{want_grad} backward as on rank 0 (inputs requiring grad with grad mode on)",
                    f"{got_grad} backward",
                )
            )
