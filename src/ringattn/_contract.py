"""Validation and layout normalisation for ``ring_attention_update`` (``docs/contract.md``: layouts, statistics
orders, errors).

Every backend receives an :class:`UpdateProblem`: the validated user tensors plus the facts derived from
them. Backends never re-validate and never see NumPy arrays.

Note [canonical rows]
---------------------
All layouts are read as *rows*: one row is one (token, head) pair with ``D`` output elements and one
statistics entry of 8 equal lanes. :meth:`UpdateProblem.attn_rows` views an attention tensor as
``(P, Q, N, D)`` and :meth:`UpdateProblem.stats_rows` views a statistics tensor as ``(P, Q, N, 8)``,
both without copying (strides are kept):

=========================  ==============  ==================  =====================================
layout / statistics         (P, Q)          attention view       statistics view
=========================  ==============  ==================  =====================================
SBH                         (S, B)          (S, B, H) split H    (B, N, S, 8) permuted to (S, B, N, 8)
TND, token-major            (T, 1)          (T, N, D)            (T, N, 8) as (T, 1, N, 8)
TND, per-batch (default)    (T, 1)          (T, N, D)            see below
=========================  ==============  ==================  =====================================

For the first two, attention row ``[p, q, n]`` uses statistics row ``[p, q, n]`` of the views. For the
per-batch TND layout (``docs/contract.md``, "Statistics orders") the statistics tensor, read as ``(T*N, 8)`` rows
in its logical row-major order, holds batch ``i`` as a contiguous ``(N, S_i)`` block starting at row ``c_i * N``. Token
``t`` of batch ``i`` and head ``n`` therefore use logical row::

    r(t, n) = row_base[t] + n * row_step[t],   row_base[t] = c_i * (N - 1) + t,   row_step[t] = S_i

and that row lives at ``stats[r // N, r % N]`` of the ``(T, N, 8)`` tensor. :meth:`per_batch_row_map`
returns ``(row_base, row_step)`` as int64 tensors on the inputs' device, computed without a host sync.
The map is a bijection between attention rows and statistics rows, so a kernel that walks attention
rows reads and writes every statistics row exactly once.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import (
    AliasError,
    DeviceError,
    DTypeError,
    HardwareLimitError,
    LayoutError,
    SeqLenError,
    ShapeError,
    expected,
)

STATS_LANES = 8
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("SBH", "TND")
# ``docs/contract.md``, "Ascend limits": the Ascend kernel's unified-buffer budget for one TND row block.
ASCEND_UB_BYTES = 192 * 1024
ASCEND_HEAD_DIM_ALIGN = 64

_ATTN_NAMES = ("prev_attn_out", "cur_attn_out")
_STATS_NAMES = ("prev_softmax_max", "prev_softmax_sum", "cur_softmax_max", "cur_softmax_sum")
OUT_NAMES = ("out[0] (attn_out)", "out[1] (softmax_max)", "out[2] (softmax_sum)")


@dataclasses.dataclass(frozen=True)
class UpdateProblem:
    """A validated ``ring_attention_update`` call. See Note [canonical rows]."""

    layout: str  # "SBH" | "TND"
    stats_order: str  # "SBH" | "token_major" | "per_batch"
    prev_o: torch.Tensor
    prev_m: torch.Tensor
    prev_l: torch.Tensor
    cur_o: torch.Tensor
    cur_m: torch.Tensor
    cur_l: torch.Tensor
    seq_offsets: torch.Tensor | None  # int64 (batches + 1,), on the inputs' device; TND only
    num_heads: int
    head_dim: int

    @property
    def device(self) -> torch.device:
        return self.prev_o.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prev_o.dtype

    def attn_rows(self, o: torch.Tensor) -> torch.Tensor:
        """View an attention-shaped tensor as ``(P, Q, N, D)`` rows (no copy)."""
        if self.layout == "SBH":
            return o.unflatten(2, (self.num_heads, self.head_dim))
        return o.unsqueeze(1)

    def stats_rows(self, s: torch.Tensor) -> torch.Tensor:
        """View a statistics-shaped tensor as ``(P, Q, N, 8)`` rows (no copy).

        For the per-batch TND order the view is the raw ``(T, 1, N, 8)`` tensor: rows must then be
        located through :meth:`per_batch_row_map`.
        """
        if self.layout == "SBH":
            return s.permute(2, 0, 1, 3)
        return s.unsqueeze(1)

    def per_batch_row_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_base, row_step)``, int64 ``(T,)`` each: see Note [canonical rows]."""
        assert self.seq_offsets is not None, "per_batch_row_map needs a TND problem"
        return per_batch_row_map(self.seq_offsets, self.prev_o.shape[0], self.num_heads)


def per_batch_row_map(
    seq_offsets: torch.Tensor, total_tokens: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(row_base, row_step)`` of the per-batch statistics layout, on ``seq_offsets``'s device.

    Pure device arithmetic (no host sync), so it can be captured in a CUDA graph. For plain CPU offsets the map
    comes from a small cache keyed by their values (Note [row map cache]); callers must treat it as read-only. On
    CUDA with Triton it is one kernel launch (nine torch ops otherwise: in a CUDA graph each costs a few
    microseconds, a sixth of a 16k-token bf16 merge on an H100).
    """
    if type(seq_offsets) is torch.Tensor and not torch.compiler.is_compiling():
        if seq_offsets.device.type == "cpu":
            return _cpu_row_map(tuple(seq_offsets.tolist()), total_tokens, num_heads)
        if seq_offsets.device.type == "cuda":
            from .backends import triton_cuda  # the device kernel, where Triton is installed

            if triton_cuda.unavailable_reason() is None:
                return triton_cuda.per_batch_row_map(seq_offsets, total_tokens, num_heads)
    return _row_map(seq_offsets, total_tokens, num_heads)


# Note [row map cache]
# ~~~~~~~~~~~~~~~~~~~~
# A CPU row map holds 16 bytes per token (two int64) and takes about 1 ns per token to build with NumPy: 0.02 ms at
# 16k tokens, 1.0 ms at T = 2**20, against 46 ms for the merge itself at T = 2**20, N = 1, D = 64, bf16 (2%; the
# 2-core CI machine, quiet). A hit costs about 1 us (the key is the offsets as a tuple). So the cache saves a few
# percent on calls that repeat a packing and must never cost much memory: it is an LRU bounded in *bytes*
# (``ROW_MAP_CACHE_BYTES``, the maps plus their keys), not in entries; a map larger than the whole budget is built
# and returned but not cached. (The former bound of 32 entries kept 16 bytes per token for each of 32 packings:
# +0.5 GB at T = 2**20 with changing packings, issue 13.)

ROW_MAP_CACHE_BYTES = 32 << 20
_KEY_BYTES_PER_OFFSET = 40  # a Python int (28-32 bytes) plus its tuple slot
_row_map_lock = threading.Lock()
_row_map_cache: OrderedDict[tuple, tuple[tuple[torch.Tensor, torch.Tensor], int]] = OrderedDict()
_row_map_cache_bytes = 0


def row_map_cache_info() -> tuple[int, int]:
    """``(entries, bytes)`` held by the CPU row-map cache (Note [row map cache])."""
    with _row_map_lock:
        return len(_row_map_cache), _row_map_cache_bytes


def clear_row_map_cache() -> None:
    """Drop every cached CPU row map (Note [row map cache])."""
    global _row_map_cache_bytes
    with _row_map_lock:
        _row_map_cache.clear()
        _row_map_cache_bytes = 0


def _cpu_row_map(seq_offsets: tuple[int, ...], total_tokens: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    global _row_map_cache_bytes
    key = (seq_offsets, total_tokens, num_heads)
    with _row_map_lock:
        hit = _row_map_cache.get(key)
        if hit is not None:
            _row_map_cache.move_to_end(key)
            return hit[0]
    maps = _build_cpu_row_map(seq_offsets, total_tokens, num_heads)
    nbytes = 16 * total_tokens + _KEY_BYTES_PER_OFFSET * len(seq_offsets)
    if nbytes <= ROW_MAP_CACHE_BYTES:
        with _row_map_lock:
            if key not in _row_map_cache:
                _row_map_cache[key] = (maps, nbytes)
                _row_map_cache_bytes += nbytes
            while _row_map_cache_bytes > ROW_MAP_CACHE_BYTES:
                _, (_, dropped) = _row_map_cache.popitem(last=False)
                _row_map_cache_bytes -= dropped
    return maps


def _build_cpu_row_map(
    seq_offsets: tuple[int, ...], total_tokens: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    start = np.repeat(offsets[:-1], lengths)
    row_base = start * (num_heads - 1) + np.arange(total_tokens, dtype=np.int64)
    with torch.inference_mode(False):  # cached: must stay usable outside an inference_mode block
        return torch.from_numpy(row_base), torch.from_numpy(np.repeat(lengths, lengths))


def _row_map(seq_offsets: torch.Tensor, total_tokens: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = seq_offsets.to(torch.int64)
    tokens = torch.arange(total_tokens, device=offsets.device, dtype=torch.int64)
    # right=True picks, among repeated offsets of empty batches, the batch that really holds the token.
    batch = torch.searchsorted(offsets, tokens, right=True) - 1
    start = offsets[batch]
    length = offsets[batch + 1] - start
    return start * (num_heads - 1) + tokens, length


# Note [NumPy arrays]
# ~~~~~~~~~~~~~~~~~~~
# NumPy inputs are viewed as tensors without a copy (``torch.from_numpy``) wherever torch can view them. Two kinds
# of array torch cannot view are copied once instead, exactly (the values are unchanged): arrays with a negative
# stride (``a[::-1]``: tensors have no negative strides) and arrays in non-native byte order (``dtype('>f4')``).
# Arrays of a dtype torch has no counterpart for (object, strings, datetimes) raise DTypeError naming the argument.
# ``out=`` arrays are written in place, so a copy would lose the result: a read-only ``out=`` array raises
# AliasError (torch would only warn, then write into it), as does one with a negative stride; one in non-native
# byte order raises DTypeError. Read-only *input* arrays are fine (inputs are never written) and raise no warning.

_NUMPY_KINDS = "biufc"  # bool, signed, unsigned, float, complex: what torch.from_numpy may accept


def from_numpy(name: str, value: np.ndarray, *, output: bool = False) -> torch.Tensor:
    """``value`` as a tensor under Note [NumPy arrays]; ``output`` for ``out=`` arrays (written in place)."""
    if value.dtype.kind not in _NUMPY_KINDS:
        raise DTypeError(expected(name, "a NumPy array of a numeric dtype", f"an array of dtype {value.dtype}"))
    native = value.dtype.isnative
    negative = any(stride < 0 for stride in value.strides)
    if output:
        if not value.flags.writeable:
            raise AliasError(expected(name, "a writeable array (out= is written in place)", "a read-only array"))
        if negative:
            want = "an array with non-negative strides (out= is written in place)"
            raise AliasError(expected(name, want, f"strides {value.strides}"))
        if not native:
            raise DTypeError(
                expected(name, "an array in native byte order (out= is written in place)", f"dtype {value.dtype.str}")
            )
    else:
        if not native:
            value = value.astype(value.dtype.newbyteorder("="))  # a copy, with non-negative strides
        elif negative:
            value = np.ascontiguousarray(value)
    try:
        if not value.flags.writeable:  # an input: never written, so torch's warning about it does not apply
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(value)
        return torch.from_numpy(value)
    except TypeError as error:  # a numeric dtype torch lacks (e.g. float128)
        raise DTypeError(expected(name, "a NumPy dtype torch supports", f"an array of dtype {value.dtype}")) from error


def normalise_layout(layout: Any) -> str:
    if not isinstance(layout, str) or layout.upper() not in LAYOUTS:
        raise LayoutError(expected("layout", "'SBH' or 'TND' (case-insensitive)", layout))
    return layout.upper()


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DTypeError(expected(name, "a torch.Tensor or numpy.ndarray", type(value).__name__))
    return value


def _check_rank(name: str, t: torch.Tensor, rank: int, letters: str) -> None:
    if t.dim() != rank:
        raise ShapeError(expected(name, f"rank {rank} {letters}", f"rank {t.dim()} with shape {tuple(t.shape)}"))


def _check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ShapeError(expected(name, f"shape {tuple(ref.shape)} (the shape of {ref_name})", tuple(t.shape)))


def _check_dtypes(attn: Sequence[torch.Tensor], stats: Sequence[torch.Tensor]) -> None:
    prev_o, cur_o = attn
    if prev_o.dtype not in ATTN_DTYPES:
        raise DTypeError(expected("prev_attn_out", "float16, bfloat16, float32 or float64", prev_o.dtype))
    if cur_o.dtype != prev_o.dtype:
        raise DTypeError(expected("cur_attn_out", f"{prev_o.dtype} (the dtype of prev_attn_out)", cur_o.dtype))
    allowed = (torch.float32, torch.float64) if prev_o.dtype == torch.float64 else (torch.float32,)
    want = "float32 (or float64 with float64 attention)" if len(allowed) == 2 else "float32"
    for name, s in zip(_STATS_NAMES, stats, strict=True):
        if s.dtype not in allowed:
            raise DTypeError(expected(name, want, s.dtype))
        if s.dtype != stats[0].dtype:
            raise DTypeError(expected(name, f"{stats[0].dtype} (the dtype of prev_softmax_max)", s.dtype))


def _check_devices(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise DeviceError(expected(name, f"device {device} (the device of {named[0][0]})", f"device {t.device}"))


def normalise_seq_offsets(actual_seq_qlen: Any, total_tokens: int, device: torch.device) -> torch.Tensor:
    """Validate ``actual_seq_qlen`` and return it as int64 on ``device`` (Note [checking actual_seq_qlen])."""
    if actual_seq_qlen is None:
        raise SeqLenError(
            expected("actual_seq_qlen", "a 1-D int64 tensor of cumulative lengths for layout 'TND'", "None")
        )
    if isinstance(actual_seq_qlen, torch.Tensor):
        offsets = actual_seq_qlen
    elif isinstance(actual_seq_qlen, np.ndarray):
        offsets = from_numpy("actual_seq_qlen", actual_seq_qlen)
    elif isinstance(actual_seq_qlen, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in actual_seq_qlen):
            raise DTypeError(expected("actual_seq_qlen", "integers", actual_seq_qlen))
        check_offset_values(list(actual_seq_qlen), total_tokens)
        return torch.tensor(list(actual_seq_qlen), dtype=torch.int64, device=device)
    else:
        raise DTypeError(
            expected("actual_seq_qlen", "an int64 tensor, array or a list of ints", type(actual_seq_qlen).__name__)
        )
    if offsets.dtype != torch.int64:
        raise DTypeError(expected("actual_seq_qlen", "dtype int64", offsets.dtype))
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise SeqLenError(expected("actual_seq_qlen", "a non-empty 1-D tensor", f"shape {tuple(offsets.shape)}"))
    if _device_checks_only(offsets.device):
        # Note [checking actual_seq_qlen]: no host sync allowed; a bad sequence is a device-side assert.
        torch._assert_async(offsets[0] == 0, "actual_seq_qlen: expected a sequence starting at 0")
        torch._assert_async(
            offsets[-1] == total_tokens, f"actual_seq_qlen: expected a sequence ending at T = {total_tokens}"
        )
        torch._assert_async((offsets[1:] >= offsets[:-1]).all(), "actual_seq_qlen: expected a non-decreasing sequence")
        return offsets if offsets.device == device else offsets.to(device, non_blocking=True)
    if offsets.device.type == "meta":
        raise DeviceError(
            expected(
                "actual_seq_qlen",
                "a tensor holding values (a list, a NumPy array, a CPU tensor or one on the inputs' device)",
                "a tensor on device meta",
            )
        )
    if _values_on_host(offsets.device):
        check_offset_values(offsets.tolist(), total_tokens)
    else:
        valid = (offsets[0] == 0) & (offsets[-1] == total_tokens) & (offsets[1:] >= offsets[:-1]).all()
        if not _fetch_flag(valid):  # the one host sync of a device actual_seq_qlen
            check_offset_values(offsets.tolist(), total_tokens)  # raises, naming the problem
            raise SeqLenError(expected("actual_seq_qlen", "a non-decreasing sequence from 0 to T", "an invalid one"))
    return offsets if offsets.device == device else offsets.to(device, non_blocking=True)


# Note [checking actual_seq_qlen]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A bad ``actual_seq_qlen`` must raise SeqLenError and leave the process usable. Host values (a list, a NumPy array,
# a CPU tensor) are checked on the host at no device cost. A device tensor (CUDA) is checked on its device: the
# three conditions are reduced to one boolean there and read back with one ``.item()``: one host sync per call,
# which costs a device round trip (~10-20 us) *and* waits for all work queued before it on the current stream to
# finish, so the host can no longer run ahead of the GPU. Callers avoid that cost by passing ``actual_seq_qlen`` as a
# list or a CPU tensor (checked on the host, then copied to the device asynchronously), or by capturing the call in
# a CUDA graph.
# Two contexts forbid a host sync: CUDA-graph capture (``torch.cuda.is_current_stream_capturing()``) and
# torch.compile tracing (``torch.compiler.is_compiling()``). There the checks stay on the device
# (``torch._assert_async``): a bad sequence fails as a device-side assert at the next synchronising call, which on
# CUDA leaves the CUDA context unusable for the rest of the process. Validate packings before capturing or compiling.
# A meta tensor has no values to check and raises DeviceError (outside tracing).


def _device_checks_only(device: torch.device) -> bool:
    """Whether ``actual_seq_qlen`` on ``device`` must be checked without a host sync (tracing or graph capture)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _values_on_host(device: torch.device) -> bool:
    """Whether a tensor's values can be read without a device sync."""
    return device.type == "cpu"


def _fetch_flag(flag: torch.Tensor) -> bool:
    """Read a 0-d boolean device tensor on the host: the one host sync of Note [checking actual_seq_qlen]."""
    return bool(flag.item())


def check_offset_values(values: list[int], total_tokens: int, name: str = "actual_seq_qlen") -> None:
    """Raise SeqLenError naming ``name`` unless ``values`` rise (non-decreasing) from 0 to ``total_tokens``."""
    if not values:
        raise SeqLenError(expected(name, "a non-empty 1-D sequence", "an empty one"))
    if values[0] != 0:
        raise SeqLenError(expected(name, "a sequence starting at 0", f"first value {values[0]}"))
    if values[-1] != total_tokens:
        raise SeqLenError(expected(name, f"a sequence ending at T = {total_tokens}", f"last value {values[-1]}"))
    for at, (a, b) in enumerate(zip(values[:-1], values[1:], strict=True)):
        if b < a:
            raise SeqLenError(expected(name, "a non-decreasing sequence", f"{a} followed by {b} at index {at}"))


def _check_ascend_limits(num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    if head_dim % ASCEND_HEAD_DIM_ALIGN:
        raise HardwareLimitError(
            expected(
                "prev_attn_out",
                f"head size D a multiple of {ASCEND_HEAD_DIM_ALIGN} for layout 'TND' "
                "(an Ascend limit; lift it with ascend_limits=False)",
                f"D = {head_dim}",
            )
        )
    data_size = torch.empty((), dtype=dtype).element_size()

    def align_up(x: int, a: int = 64) -> int:
        return (x + a - 1) // a * a

    need = align_up(num_heads * head_dim) * (data_size * 6 + 8) + align_up(num_heads * 8) * 56
    if need > ASCEND_UB_BYTES:
        raise HardwareLimitError(
            expected(
                "prev_attn_out",
                f"AlignUp(N*D, 64)*(DataSize*6+8) + AlignUp(N*8, 64)*56 <= {ASCEND_UB_BYTES} "
                "for layout 'TND' (an Ascend limit; lift it with ascend_limits=False)",
                f"{need} with N = {num_heads}, D = {head_dim}, DataSize = {data_size}",
            )
        )


def validate_update(
    prev_attn_out: Any,
    prev_softmax_max: Any,
    prev_softmax_sum: Any,
    cur_attn_out: Any,
    cur_softmax_max: Any,
    cur_softmax_sum: Any,
    actual_seq_qlen: Any,
    layout: Any,
    softmax_layout: Any = None,
    ascend_limits: bool = True,
) -> UpdateProblem:
    """Check a ``ring_attention_update`` call against ``docs/contract.md`` ("Errors") and normalise it."""
    layout = normalise_layout(layout)
    if not isinstance(ascend_limits, (bool, np.bool_)):
        raise DTypeError(expected("ascend_limits", "True or False", repr(ascend_limits)))
    if softmax_layout is not None:
        if not isinstance(softmax_layout, str) or softmax_layout.upper() != "TND":
            raise LayoutError(expected("softmax_layout", "None or 'TND'", softmax_layout))
        if layout != "TND":
            raise LayoutError(expected("softmax_layout", "None for layout 'SBH'", softmax_layout))
    attn = [_check_tensor(n, t) for n, t in zip(_ATTN_NAMES, (prev_attn_out, cur_attn_out), strict=True)]
    stats = [
        _check_tensor(n, t)
        for n, t in zip(
            _STATS_NAMES, (prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum), strict=True
        )
    ]
    attn_letters, stats_rank, stats_letters = (
        ("(S, B, H)", 4, "(B, N, S, 8)") if layout == "SBH" else ("(T, N, D)", 3, "(T, N, 8)")
    )
    for name, t in zip(_ATTN_NAMES, attn, strict=True):
        _check_rank(name, t, 3, attn_letters)
    for name, s in zip(_STATS_NAMES, stats, strict=True):
        _check_rank(name, s, stats_rank, stats_letters)
        if s.shape[-1] != STATS_LANES:
            raise ShapeError(expected(name, f"last dimension {STATS_LANES}", f"shape {tuple(s.shape)}"))
    prev_o, cur_o = attn
    prev_m = stats[0]
    if layout == "SBH":
        seq, batch, hidden = prev_o.shape
        b_stats, num_heads, s_stats = prev_m.shape[0], prev_m.shape[1], prev_m.shape[2]
        if (s_stats, b_stats) != (seq, batch):
            raise ShapeError(
                expected(
                    "prev_softmax_max",
                    f"(B, N, S, 8) with S = {seq} and B = {batch} from prev_attn_out",
                    f"shape {tuple(prev_m.shape)}",
                )
            )
        if num_heads == 0 and hidden != 0 or num_heads and hidden % num_heads:
            raise ShapeError(
                expected("prev_attn_out", f"H divisible by N = {num_heads} (N from prev_softmax_max)", f"H = {hidden}")
            )
        head_dim = hidden // num_heads if num_heads else 0
    else:
        tokens, num_heads, head_dim = prev_o.shape
        if tuple(prev_m.shape[:2]) != (tokens, num_heads):
            raise ShapeError(
                expected(
                    "prev_softmax_max",
                    f"(T, N, 8) with T = {tokens} and N = {num_heads} from prev_attn_out",
                    f"shape {tuple(prev_m.shape)}",
                )
            )
    _check_same_shape("cur_attn_out", cur_o, "prev_attn_out", prev_o)
    for name, s in zip(_STATS_NAMES[1:], stats[1:], strict=True):
        _check_same_shape(name, s, "prev_softmax_max", prev_m)
    _check_dtypes(attn, stats)
    _check_devices(list(zip(_ATTN_NAMES + _STATS_NAMES, attn + stats, strict=True)))

    seq_offsets = None
    stats_order = "SBH"
    if layout == "TND":
        seq_offsets = normalise_seq_offsets(actual_seq_qlen, prev_o.shape[0], prev_o.device)
        stats_order = "token_major" if softmax_layout is not None else "per_batch"
        if ascend_limits:
            _check_ascend_limits(num_heads, head_dim, prev_o.dtype)
    return UpdateProblem(
        layout=layout,
        stats_order=stats_order,
        prev_o=prev_o,
        prev_m=stats[0],
        prev_l=stats[1],
        cur_o=cur_o,
        cur_m=stats[2],
        cur_l=stats[3],
        seq_offsets=seq_offsets,
        num_heads=num_heads,
        head_dim=head_dim,
    )


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    start = t.data_ptr()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (expanded or otherwise self-overlapping strides).

    Exact for every layout torch or NumPy produces by slicing, transposing, expanding or broadcasting: sorted by
    stride, each dimension of size > 1 must step past everything the smaller-stride dimensions reach. A layout that
    fails that test without overlapping (interleaved strides) is reported as overlapping: a destination whose
    elements cannot be shown distinct is refused rather than written with undefined results.
    """
    if t.numel() <= 1:
        return False
    reach = 0  # the largest element offset the dimensions seen so far address
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_destinations(outputs: Sequence[tuple[str, torch.Tensor]], inputs: Sequence[tuple[str, torch.Tensor]]) -> None:
    """The aliasing rule of every ``out=`` in ringattn; raises :class:`AliasError` naming the output.

    An output may be exactly the same view as an input (in-place accumulation: each element is read before it is
    written, by the same row); any other overlap with an input, any overlap between two outputs, and any overlap
    inside one output (expanded strides) is refused: the kernels would write one location from several rows and
    return garbage.
    """
    for name, t in outputs:
        if has_internal_overlap(t):
            raise AliasError(
                expected(
                    name,
                    "a tensor without internally overlapping memory (no expanded or broadcast strides)",
                    f"shape {tuple(t.shape)} with strides {t.stride()}",
                )
            )
    output_names = {name for name, _ in outputs}
    spans = [(n, t, _byte_range(t)) for n, t in (*inputs, *outputs) if t.numel()]
    for name, t in outputs:
        if not t.numel() or t.device.type == "meta":  # meta tensors own no memory
            continue
        lo, hi = _byte_range(t)
        for other_name, other, (o_lo, o_hi) in spans:
            if other_name == name or other.device != t.device:
                continue
            overlaps = lo < o_hi and o_lo < hi
            if overlaps and (other_name in output_names or not _same_view(t, other)):
                raise AliasError(
                    expected(
                        name,
                        f"no overlap with {other_name} other than being exactly the same view",
                        "a partial overlap",
                    )
                )


def check_like(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """An output buffer ``t`` must have ``ref``'s shape, dtype and device (the error names ``name``)."""
    if t.shape != ref.shape:
        raise ShapeError(expected(name, f"shape {tuple(ref.shape)}", tuple(t.shape)))
    if t.dtype != ref.dtype:
        raise DTypeError(expected(name, f"dtype {ref.dtype}", t.dtype))
    if t.device != ref.device:
        raise DeviceError(expected(name, f"device {ref.device}", f"device {t.device}"))


def check_outputs(
    out: Any, problem: UpdateProblem, inputs: Sequence[tuple[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate ``out=(attn_out, softmax_max, softmax_sum)`` for ``problem`` (aliasing: :func:`check_destinations`)."""
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ShapeError(expected("out", "a tuple (attn_out, softmax_max, softmax_sum)", type(out).__name__))
    names = OUT_NAMES
    refs = (problem.prev_o, problem.prev_m, problem.prev_m)
    outs = tuple(_check_tensor(n, t) for n, t in zip(names, out, strict=True))
    for name, t, ref in zip(names, outs, refs, strict=True):
        check_like(name, t, ref)
    check_destinations(list(zip(names, outs, strict=True)), inputs)
    return outs  # type: ignore[return-value]
