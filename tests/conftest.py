"""Shared fixtures: the backends under test, seeded generators, per-dtype tolerances."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# backend="auto" on CPU compiles the fused kernel on the caller's thread instead of answering with torch meanwhile
# (Note [cold start] in backends/_warm.py): every test then runs one backend, the same in its worker processes, and
# auto keeps exercising the fused kernel. tests/test_cold_start.py tests the default policy.
os.environ["RINGATTN_AUTO_CPU"] = "wait"

# Triton kernels run on CPU through the interpreter when no GPU is present; this must be set before
# triton is first imported anywhere in the test process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- kernels compiled in the background (Note [test-time compiles] in precompile_kernels.py) ----------------------

# The files whose tests launch the fused CPU kernels most: run last, while the kernels compile.
_KERNEL_TEST_FILES = {
    "test_lanes_and_empty.py",
    "test_numba_cpu.py",
    "test_numba_cpu_backward.py",
    "test_ring_attention_update.py",
    "test_merge.py",
}
_precompile: subprocess.Popen | None = None
_done_dir: Path | None = None


# --- the slow sweeps (Note [slow sweeps]) -------------------------------------------------------------------------

# Note [slow sweeps]: tests marked `slow` (exhaustive sweeps, minutes each) are left out of every run unless the run
# asks for them: `-m` names `slow` (`python -m pytest -q -m slow`, CI's second command, runs exactly them; any other
# expression naming it decides for itself), or `--run-slow` is given. Done here, not with `addopts = -m "not slow"`,
# because a command-line `-m` replaces the addopts one: `pytest -m "not distributed" tests/test_merge.py` would run
# the sweeps. tests/test_slow_marker.py runs the README's narrowed commands' collection to check it.
_NAMES_SLOW = re.compile(r"\bslow\b")


def pytest_addoption(parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (left out by default)")


def slow_wanted(config) -> bool:
    """Whether this run keeps the `slow` tests: `--run-slow`, or a `-m` expression that names `slow`."""
    return bool(config.getoption("--run-slow") or _NAMES_SLOW.search(config.getoption("markexpr") or ""))


def deselect_slow(config, items: list) -> None:
    """Drop the `slow` tests from ``items`` (reported as deselected) unless the run asks for them."""
    if slow_wanted(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        names = {id(item) for item in slow}
        items[:] = [item for item in items if id(item) not in names]
        config.hook.pytest_deselected(items=slow)


def pytest_collection_modifyitems(session, config, items) -> None:
    deselect_slow(config, items)
    heavy = [item for item in items if item.path.name in _KERNEL_TEST_FILES]
    if not heavy or os.environ.get("RINGATTN_TEST_PRECOMPILE", "1") == "0" or importlib.util.find_spec("numba") is None:
        return
    names = {id(item) for item in heavy}
    items[:] = [item for item in items if id(item) not in names] + heavy
    _start_precompile()


def _start_precompile() -> None:
    """Start precompile_kernels.py; the first launch of each planned pair claims it (and compiles it here) or, if the
    background process has claimed it, waits for it."""
    global _precompile, _done_dir
    import precompile_kernels
    from ringattn.backends import numba_cpu, numba_cpu_backward

    done_dir = _done_dir = Path(tempfile.mkdtemp(prefix="ringattn-precompile-"))
    script = Path(__file__).with_name("precompile_kernels.py")
    _precompile = subprocess.Popen(
        [sys.executable, str(script), str(done_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    planned = {precompile_kernels.key(dtype, k) for dtype, k in precompile_kernels.PLAN}
    launch = numba_cpu._launch

    def launch_after_precompile(kernel, nbytes, *args):
        key = precompile_kernels.launch_key(kernel.py_func.__name__, args)
        if key in planned:
            planned.discard(key)
            if not precompile_kernels.claim(done_dir, key):  # the child has it: wait, then load it from the cache
                while not (done_dir / f"{key}.done").exists() and _precompile.poll() is None:
                    time.sleep(0.05)
        launch(kernel, nbytes, *args)

    numba_cpu._launch = launch_after_precompile
    numba_cpu_backward._launch = launch_after_precompile


def pytest_unconfigure(config) -> None:
    if _precompile is not None and _precompile.poll() is None:
        _precompile.kill()
        _precompile.wait()
    if _done_dir is not None:
        shutil.rmtree(_done_dir, ignore_errors=True)
