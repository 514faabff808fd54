"""Fresh CPU outputs without page-fault storms: ``empty_fast``.

Note [fresh outputs]
--------------------
The merge streams its bytes at memory bandwidth, so a fresh output tensor can cost more than the kernel:
glibc serves large blocks (over 32 MiB always) with a new ``mmap`` and returns them with ``munmap``, so
every new 64 MiB output takes ~16k page faults, each trapping into the kernel to zero one 4 KiB page. Two
things remove that cost, and ``empty_fast`` does both for large CPU tensors:

* **Reuse.** Buffers come from ``mmap`` blocks kept in a small pool. A block returns to the pool when the
  last tensor (or view) using it is freed, and the next request of the same size class gets it back
  already mapped: no fault, no zeroing. The pool holds at most ``POOL_BYTES`` of idle blocks; beyond
  that, freed blocks are unmapped. ``release_pool()`` unmaps every idle block.
* **Huge pages.** Each block is 2 MiB aligned and advised ``MADV_HUGEPAGE`` (Linux transparent huge
  pages, where enabled as ``always`` or ``madvise``): its first touch costs one fault per 2 MiB instead of
  one per 4 KiB, and the kernel that writes it misses the TLB 512x less often.

Small tensors and other devices go to ``torch.empty`` (its allocator is cheap there). The contents of a
tensor from ``empty_fast`` are undefined, as with ``torch.empty``.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["empty_fast", "release_pool", "POOL_BYTES", "MIN_BYTES"]

MIN_BYTES = 1 << 20  # below this torch.empty is as fast
POOL_BYTES = 1 << 30  # idle bytes the pool may keep mapped
_HUGE = 2 << 20  # x86-64 / aarch64 (4 KiB granule) transparent huge page size

_HAS_ANON_MMAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")  # not on Windows

_lock = threading.Lock()
_idle: dict[int, list[mmap.mmap]] = {}  # size class -> idle blocks
_idle_bytes = 0


def _size_class(nbytes: int) -> int:
    return -(-nbytes // _HUGE) * _HUGE


def _new_block(size: int) -> mmap.mmap:
    # Private: a shared anonymous map would be shmem, which transparent huge pages do not cover by default.
    # One extra huge page leaves room to align the start.
    block = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            block.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: plain pages still work
            pass
    return block


def _take(size: int) -> mmap.mmap:
    global _idle_bytes
    with _lock:
        blocks = _idle.get(size)
        if blocks:
            _idle_bytes -= size
            return blocks.pop()
    return _new_block(size)


def _give_back(size: int, block: mmap.mmap) -> None:
    global _idle_bytes
    with _lock:
        if _idle_bytes + size <= POOL_BYTES:
            _idle.setdefault(size, []).append(block)
            _idle_bytes += size
    # Otherwise drop it: the mmap unmaps itself once the NumPy view exporting it is gone as well (this
    # runs while that view is being freed, so close() would fail here).


def release_pool() -> None:
    """Unmap every idle block (tensors still alive are unaffected)."""
    global _idle_bytes
    with _lock:
        _idle.clear()  # idle blocks have no live views: dropping them unmaps them
        _idle_bytes = 0


def empty_fast(shape: Sequence[int] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised contiguous tensor, like ``torch.empty(shape, dtype=dtype, device=device)``.

    Large CPU tensors come from a pool of huge-page-advised ``mmap`` blocks (Note [fresh outputs]), so a
    repeated allocation of the same size costs no page faults. Every call returns memory no other live
    tensor uses; the block is reused only after the returned tensor and all its views are freed. Not
    pinned, not shared between processes; ``requires_grad`` False.
    """
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        numel *= int(size)
    nbytes = numel * itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not _HAS_ANON_MMAP:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    size = _size_class(nbytes)
    block = _take(size)
    raw = np.frombuffer(block, dtype=np.uint8)
    start = -raw.ctypes.data % _HUGE
    window = raw[start : start + size]
    # The block goes back to the pool once the last tensor viewing ``window`` is gone: torch.from_numpy
    # keeps ``window`` alive for as long as the storage lives.
    weakref.finalize(window, _give_back, size, block)
    return torch.from_numpy(window)[:nbytes].view(dtype).view(tuple(shape))
