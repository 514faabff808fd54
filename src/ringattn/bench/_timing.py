"""Shared measurement helpers of ``ringattn bench``: timers, the copy floor, threads, machine facts, progress.

Note [bench timing]
-------------------
* Every provider of a case is called once before timing (the correctness check, which is also the first
  warm-up), then ``warmup`` more times, then ``repeats`` timed calls. The timed calls are *interleaved*
  (round r times every provider once), so a burst of load from another process on a shared machine
  hits all providers alike and the ratios within one run stay meaningful even when absolute times move.
* CPU: ``time.perf_counter`` around one call; CPU torch ops are synchronous. The returned tensors are
  dropped after the clock stops (freeing memory is not part of the op).
  CUDA: each provider is captured once into a CUDA graph of ``GRAPH_CALLS`` back-to-back calls (after its
  warm-up calls, on a side stream as capture asks); a sample is one replay between a pair of
  ``torch.cuda.Event`` divided by ``GRAPH_CALLS``. That is the device time of a call: Python's per-call cost
  (argument checks, launch, ~0.1 ms) exceeds a merge's device time at these sizes (~0.03-0.1 ms on an H100),
  so events around one eager call would time the host, not the kernel. Training loops hide that cost by
  running ahead of the GPU or by capturing graphs themselves; ``ring_attention_update`` is capturable
  (``tests/test_cuda.py``). A provider that cannot be captured is timed as ``GRAPH_CALLS`` eager calls
  between the events instead, and ``measure`` reports it, with the capture's error, in ``eager_timed``.
* The reported time of a provider is the median of its repeats.
* A provider compiled on first use (``compiled``: ``torch.compile``) has that first call, which is also its
  correctness check, timed apart by ``first_call_seconds`` (host clock around the call and a device
  synchronisation: tracing and compiling are host work) and reported as its compile time, never as a sample.
  Warm-up, interleaving and CUDA-graph capture are then the same as for every other provider.

Note [copy floor]
-----------------
The floor of a case moving ``nbytes`` (bytes read + bytes written, see each op's ``bytes_moved``) is
the median time of ``dst.copy_(src)`` with ``src`` and ``dst`` two distinct contiguous uint8 buffers of
``nbytes // 2`` bytes each, on the case's device, in the same process, thread count and run: it reads
``nbytes / 2`` and writes ``nbytes / 2``. Its effective bandwidth ``nbytes / time`` is what a
memory-bound kernel moving the same bytes can hope for; "% of floor" is ``copy time / provider time``.
A kernel may beat it (it reads more than it writes, and reads are cheaper than writes, which also pay for
write-allocate; a kernel that writes with streaming stores, as the CPU merge does for large outputs, skips that
read entirely while ``copy_`` does not), so 100% is a yardstick rather than a hard bound.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import torch

__all__ = [
    "measure", "first_call_seconds", "copy_floor", "set_threads", "synchronize", "machine_info", "Progress", "median"
]  # fmt: skip

GRAPH_CALLS = 20  # calls per CUDA graph replay: Note [bench timing]


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn``, queued device work included (Note [bench timing]): a
    provider's first call, which for ``torch.compile`` is dominated by tracing and compiling."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def _cuda_graph(fn: Callable[[], Any]) -> Callable[[], None] | str:
    """``GRAPH_CALLS`` calls of ``fn`` captured as one CUDA graph, returned as its replay; the capture's error
    message if ``fn`` cannot be captured (it synchronises with the host, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            fn()  # first use of this stream: allocator and handles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except RuntimeError as exc:
        torch.cuda.synchronize()
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return graph.replay


def _eager_calls(fn: Callable[[], Any]) -> Callable[[], None]:
    def calls() -> None:
        for _ in range(GRAPH_CALLS):
            fn()

    return calls


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":  # fn runs GRAPH_CALLS calls: Note [bench timing]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / GRAPH_CALLS
    start_s = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start_s
    del result
    return elapsed


def measure(
    fns: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    on_repeat: Callable[[int], None] | None = None,
    eager_timed: list[tuple[str, str]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every ``fns`` entry: ``repeats`` interleaved samples each (Note [bench timing]).

    ``on_repeat(r)`` is called after round ``r`` (for a progress display). On CUDA, ``(name, error)`` of each
    provider that could not be captured in a CUDA graph (and was timed eagerly) is appended to ``eager_timed``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    if device.type == "cuda":
        graphs = {name: _cuda_graph(fn) for name, fn in fns.items()}
        if eager_timed is not None:
            eager_timed.extend((name, graph) for name, graph in graphs.items() if isinstance(graph, str))
        fns = {name: _eager_calls(fns[name]) if isinstance(g, str) else g for name, g in graphs.items()}
        synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
        if on_repeat is not None:
            on_repeat(r)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def copy_floor(nbytes: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A callable copying ``nbytes // 2`` bytes between two buffers on ``device`` (Note [copy floor])."""
    half = max(nbytes // 2, 1)
    # Both buffers are written once here so that their pages exist before timing.
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.zeros(half, dtype=torch.uint8, device=device)
    return lambda: dst.copy_(src)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch and, if it is already loaded, numba."""
    torch.set_num_threads(threads)
    numba = sys.modules.get("numba")
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Facts that make a figure reproducible: CPU model and cores, threads, versions, GPU name."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    numba = sys.modules.get("numba")
    if numba is not None:
        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Progress:
    """One status line on ``stream`` (stderr): rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def show(self, text: str, *, transient: bool = False) -> None:
        """Display ``text``; a transient line (per-repeat ticks) is only drawn on a terminal."""
        if not self.enabled or (transient and not self.tty):
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
