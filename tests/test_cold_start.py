"""``backend="auto"`` on CPU answers with ``torch`` while numba compiles, then runs the fused kernel (Note [cold
start] in ``backends/_warm.py``).

The routing is tested with a stand-in for the fused module whose launcher guards a tiny numba kernel exactly as
``numba_cpu._launch`` guards the merge kernel, so nothing here waits for the merge kernel's own compile.
"""

from __future__ import annotations

import os
import sys
import textwrap
import types
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from ringattn import backends
from ringattn.backends import _kernel_cache, _warm, torch_eager


def _fake_fused(kernel) -> types.ModuleType:
    """A fused-backend stand-in: ``_warm.check`` on ``kernel`` (as the real launcher does before writing), then the
    row merge itself (torch's, so results can be compared) recorded as run by "fake"."""
    module = types.ModuleType("fake_fused")
    module.NAME = "fake"
    module.calls = 0

    def merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, **kw):
        x = np.zeros(3, np.float32)
        _warm.check(kernel, (x,))
        kernel(x)
        module.calls += 1
        torch_eager.merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, **kw)

    module.merge_rows = merge_rows
    return module


def _rows(gen, k=2):
    parts_o = [torch.randn(5, 1, 3, 8, generator=gen) for _ in range(k)]
    parts_m = [torch.randn(5, 1, 3, 1, generator=gen) for _ in range(k)]
    outs = (torch.full((5, 1, 3, 8), float("nan")), torch.full((5, 1, 3, 1), float("nan")))
    return parts_o, parts_m, outs


def _want(parts_o, parts_m):
    lse = torch.stack([m[..., 0].double() for m in parts_m])
    w = torch.softmax(lse, 0)
    return (w.unsqueeze(-1) * torch.stack([o.double() for o in parts_o])).sum(0), torch.logsumexp(lse, 0)


def test_auto_answers_with_torch_until_the_kernel_is_compiled(monkeypatch) -> None:
    kernel = numba.njit(lambda x: x + 1)  # fresh: no compiled version yet
    fake = _fake_fused(kernel)
    monkeypatch.setitem(_warm._modules, "fake_fused", fake)
    auto = _warm.AutoBackend("fake_fused", torch_eager)
    gen = torch.Generator().manual_seed(0)

    parts_o, parts_m, (out_o, out_m) = _rows(gen)
    auto.merge_rows(parts_o, parts_m, None, out_o, out_m, None)
    assert _warm.last_backend() == "torch" and backends.ran(auto) == "torch" and fake.calls == 0
    want_o, want_lse = _want(parts_o, parts_m)
    torch.testing.assert_close(out_o.double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_m[..., 0].double(), want_lse, atol=1e-5, rtol=1e-5)

    assert _warm.wait(120)  # the lambda cannot be imported by the child process: compiled on the thread
    assert len(kernel.overloads) == 1
    parts_o, parts_m, (out_o, out_m) = _rows(gen, k=3)
    auto.merge_rows(parts_o, parts_m, None, out_o, out_m, None)
    assert _warm.last_backend() == "fake" and fake.calls == 1
    want_o, want_lse = _want(parts_o, parts_m)
    torch.testing.assert_close(out_o.double(), want_o, atol=1e-5, rtol=1e-5)


def test_check_only_acts_inside_auto_calls() -> None:
    kernel = numba.njit(lambda x: x * 2)
    x = np.ones(2)
    _warm.check(kernel, (x,))  # an explicit backend: numba compiles on the caller's thread as usual
    with _warm.auto_call(), pytest.raises(_warm.NotReady):
        _warm.check(numba.njit(lambda x: x * 3), (x,))
    with _warm.auto_call():
        kernel(x)  # compiled above
        _warm.check(kernel, (x,))
    assert _warm.wait(120)


def test_a_fused_module_that_cannot_be_imported_leaves_torch_running() -> None:
    auto = _warm.AutoBackend("no_such_fused_module", torch_eager)
    gen = torch.Generator().manual_seed(1)
    parts_o, parts_m, (out_o, out_m) = _rows(gen)
    auto.merge_rows(parts_o, parts_m, None, out_o, out_m, None)
    with pytest.raises(ModuleNotFoundError, match="no_such_fused_module"):
        _warm.wait(120)
    auto.merge_rows(parts_o, parts_m, None, out_o, out_m, None)
    assert _warm.last_backend() == "torch"
    torch.testing.assert_close(out_o.double(), _want(parts_o, parts_m)[0], atol=1e-5, rtol=1e-5)


def test_a_child_process_writes_the_disk_cache(tmp_path, monkeypatch) -> None:
    """The compile runs in a child process (no GIL contention here), which leaves the kernel in numba's disk cache
    for this process and the next ones."""
    (tmp_path / "coldstart_kernel.py").write_text(
        textwrap.dedent(
            """
            import numba

            @numba.njit(cache=True)
            def add_one(x):
                return x + 1
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import coldstart_kernel

    signature = (numba.typeof(np.zeros(4)),)
    other = (numba.typeof(np.zeros(4, np.int32)),)
    try:
        assert not _warm.in_disk_cache(coldstart_kernel.add_one, signature)
        assert _warm.compile_in_child(coldstart_kernel.add_one, signature)
        assert not coldstart_kernel.add_one.overloads  # compiled elsewhere, not here
        # next to the module, or under NUMBA_CACHE_DIR when set (the child inherits the environment)
        assert list(Path(coldstart_kernel.add_one.stats.cache_path).glob("coldstart_kernel.add_one-*.nbi"))
        assert _warm.in_disk_cache(coldstart_kernel.add_one, signature)
        assert not _warm.in_disk_cache(coldstart_kernel.add_one, other)  # keyed by signature

        children = []
        monkeypatch.setattr(_warm, "compile_in_child", lambda kernel, sig: children.append(sig) or False)
        _warm._compile(coldstart_kernel.add_one, signature)  # in the cache: loaded here, no child
        assert children == [] and coldstart_kernel.add_one.stats.cache_hits
        assert coldstart_kernel.add_one(np.arange(4.0))[3] == 4.0
        _warm._compile(coldstart_kernel.add_one, other)  # not in it: the child's turn (here a failing one)
        assert children == [other] and len(coldstart_kernel.add_one.overloads) == 2
    finally:
        sys.modules.pop("coldstart_kernel", None)


def test_a_kernel_numba_cannot_key_counts_as_not_cached() -> None:
    """``in_disk_cache`` reads numba internals; anything it cannot read means "compile", never a crash."""
    assert not _warm.in_disk_cache(numba.njit(lambda x: x), (numba.typeof(np.zeros(2)),))  # cache=False
    assert not _warm.in_disk_cache(object(), ())


def test_auto_on_cpu_is_the_cold_start_backend_unless_told_to_wait(monkeypatch) -> None:
    monkeypatch.delenv(_warm.POLICY_ENV)  # the default policy (conftest sets "wait" for every other test)
    assert isinstance(backends.for_device(torch.device("cpu"), "auto"), _warm.AutoBackend)
    monkeypatch.setenv(_warm.POLICY_ENV, "wait")
    assert backends.for_device(torch.device("cpu"), "auto") is backends.load("cpu")
    assert backends.for_device(torch.device("cpu"), "torch") is torch_eager
    assert backends.ran(torch_eager) == "torch"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_starts_its_own_worker() -> None:
    """A child forked after the worker thread started (DataLoader workers) gets a fresh queue and worker."""
    _warm.fused_module("no_such_module_before_fork")
    with pytest.raises(ModuleNotFoundError):
        _warm.wait(120)
    pid = os.fork()
    if pid == 0:  # the child: its own worker must run its jobs, or wait() would block forever
        status = 1
        try:
            _warm.fused_module("no_such_module_in_child")
            try:
                _warm.wait(60)
            except ModuleNotFoundError:
                status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# --- compiles that outlive their program (Note [detached compiles] in backends/_warm.py) ------------------------------

_SLOW_KERNEL = """
import os, time

import numba

if os.environ.get("COLDSTART_SLOW_IMPORT"):  # the worker's import: long enough to outlive the program that asked
    time.sleep(float(os.environ["COLDSTART_SLOW_IMPORT"]))


@numba.njit(cache=True)
def add_two(x):
    return x + 2
"""

_ASKER = """
import os, sys
import numba, numpy as np
import detached_kernel
from ringattn.backends import _warm

os.environ["COLDSTART_SLOW_IMPORT"] = sys.argv[1]
job, worker = _warm.enqueue(detached_kernel.add_two, (numba.typeof(np.zeros(3)),))
print(worker.pid, flush=True)
"""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _private(tmp_path, monkeypatch) -> Path:
    """A kernel module and a private cache directory (RINGATTN_CACHE_DIR, inherited by subprocesses)."""
    (tmp_path / "detached_kernel.py").write_text(_SLOW_KERNEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1] / "src")]))
    monkeypatch.setenv(_kernel_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; flock")
def test_a_compile_outlives_the_program_that_asked(tmp_path, monkeypatch) -> None:
    """A program queues a compile and ends at once; the detached worker finishes it into the disk cache, where the
    next process finds it, and then exits: nothing is left running."""
    import subprocess
    import time

    _private(tmp_path, monkeypatch)
    asker = subprocess.run([sys.executable, "-c", _ASKER, "3"], capture_output=True, text=True, timeout=120)
    assert asker.returncode == 0, asker.stderr
    worker = int(asker.stdout.split()[0])
    import detached_kernel

    signature = (numba.typeof(np.zeros(3)),)
    try:
        assert _alive(worker) and not _warm.in_disk_cache(detached_kernel.add_two, signature)  # still importing
        deadline = time.monotonic() + 120
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)  # exited once its queue was empty
        assert _warm.in_disk_cache(detached_kernel.add_two, signature)
        assert list((tmp_path / "cache" / "compile-queue").iterdir()) == []
        detached_kernel.add_two.compile(signature)
        assert detached_kernel.add_two.stats.cache_hits  # loaded, not compiled, by this process
    finally:
        if _alive(worker):
            os.kill(worker, 9)
        sys.modules.pop("detached_kernel", None)


@pytest.mark.slow  # 30 s: a worker sleeps to its (shortened) time limit
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock; SIGALRM")
def test_a_worker_stops_at_its_time_limit_and_its_job_is_not_left_claimed(tmp_path, monkeypatch) -> None:
    """A worker past its hard limit is killed mid-job; the job's leftover claim is recognised as stale (the lock is
    free) and the asker compiles on its own thread rather than wait for it."""
    import subprocess

    _private(tmp_path, monkeypatch)
    monkeypatch.setenv("COLDSTART_SLOW_IMPORT", "30")
    import detached_kernel

    signature = (numba.typeof(np.zeros(3)),)
    queued = _warm.enqueue(detached_kernel.add_two, signature)  # starts a worker with the default limit: stop it
    assert queued is not None
    job, started = queued
    started.kill()
    started.wait()
    if job.with_suffix(".running").exists():  # it had taken the job: queue it again for the worker below
        os.replace(job.with_suffix(".running"), job)
    worker = subprocess.run(
        [sys.executable, "-c", f"from ringattn.backends import _warm; _warm.worker_main({str(job.parent)!r}, 1)"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        assert worker.returncode == -14  # SIGALRM: killed at its limit, in the job's module import
        assert job.with_suffix(".running").exists() and not job.exists()  # the leftover of the killed worker
        assert not _warm._claimed(job) and not job.with_suffix(".running").exists()  # stale: removed
        assert not _warm.in_disk_cache(detached_kernel.add_two, signature)
    finally:
        sys.modules.pop("detached_kernel", None)
