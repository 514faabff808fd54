"""``auto`` on CPU: the portable backend answers while the fused numba kernels compile on a background thread.

Note [cold start]
-----------------
numba compiles a kernel for each new combination of argument types (the dtypes and the number of parts K; the
statistics or LSE form is a run-time flag) on its first call: 10-20 s for a forward merge and 10-30 s for a
backward on a 2-core machine (longer under load), and 0.3-0.4 s even when numba's disk cache (``cache=True``, in
the per-user directory of Note [kernel cache] in ``_kernel_cache.py``) already holds it, since loading links LLVM
objects. Of one compile (bfloat16, K = 3,
13.5 s), numba's parallel (parfor) lowering took 6.7 s, type inference 3.2 s, parfor fusion 1.6 s; LLVM about
5.7 s of those. A PyTorch op is expected to answer in milliseconds, so ``backend="auto"`` on CPU never waits
for numba:

* the first ``auto`` call runs the ``torch`` backend, then has a background thread import the fused module;
* once the module is imported, a call reaches ``numba_cpu._launch``, which calls :func:`check` with the
  kernel and its exact arguments. If the kernel has no compiled version for those argument types yet,
  :func:`check` queues its compilation on the background thread and raises :class:`NotReady` *before
  anything is written*; the call then runs the ``torch`` backend instead. The background thread has the
  detached compile worker compile it into numba's disk cache (Note [detached compiles] below: at low priority, one
  compile at a time per machine, finishing even when this process ends; numba's compiler is mostly Python and
  would otherwise hold this process's GIL for the whole compile, slowing the caller's torch calls meanwhile), then
  loads it from there, or compiles it itself where no worker can run;
* from then on the same call runs the fused kernel. A later process finds the kernel in the disk cache and
  loads it on the background thread in 0.2-0.4 s, without a child (:func:`in_disk_cache`).

Explicit ``backend="cpu"`` keeps numba's own behaviour: it compiles (or waits for the background compile of
the same kernel) on the caller's thread. :func:`wait` blocks until the queue is empty (the benchmark uses it
before timing). The environment variable ``RINGATTN_AUTO_CPU=wait`` (read at each call, inherited by worker
processes) makes ``auto`` on CPU behave like ``cpu``: the fused kernel from the first call, compiled on the
caller's thread. The test suite sets it, so every test is deterministic and exercises the fused kernel as it
did before; ``tests/test_cold_start.py`` tests the default.

Results: both backends evaluate the same formula in float32 (float64 for float64 inputs) and round once to
the output dtype, but they do not always agree to the last bit (the fused kernel's vectorised ``exp`` and
fused loops can differ from torch's by an ulp of float32). A program that needs bitwise-repeatable results
from the first call on should pass ``backend="cpu"`` (waits for the compile) or ``backend="torch"``.

The check costs about 2 us per call: a key of numba's C type fingerprints of the arguments, looked up in a set
of kernels known to be ready; numba's full ``typeof`` runs once per new key.

The background thread is a daemon: a process that ends while a kernel compiles does not wait for it, and the
worker finishes the compile into the cache for the next process, then exits (Note [detached compiles]).
Concurrent processes that need the same kernel share one job. ``ringattn compile`` compiles named kernels ahead
of time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["AutoBackend", "NotReady", "auto_call", "check", "fused_module", "last_backend", "wait"]


# "background" (default) or "wait": see the Note above.
POLICY_ENV = "RINGATTN_AUTO_CPU"


class NotReady(Exception):
    """The fused kernel for these argument types is still compiling; run the portable backend."""


_local = threading.local()
_jobs: queue.Queue[Callable[[], object]] = queue.Queue()
_lock = threading.Lock()
_worker: threading.Thread | None = None
_queued: set[object] = set()  # keys of jobs queued or running, so a key is compiled once
_ready: set[object] = set()  # (kernel, fingerprint key) pairs that have a compiled version
_modules: dict[str, ModuleType] = {}
_failures: list[BaseException] = []  # errors of background jobs (re-raised by wait)


def _reset_after_fork() -> None:
    """A forked child (DataLoader workers, fork-started processes) has no worker thread: start from scratch, with
    locks no thread of the child holds."""
    global _jobs, _lock, _worker
    _jobs, _lock, _worker = queue.Queue(), threading.Lock(), None
    _queued.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _run_jobs() -> None:
    while True:
        job = _jobs.get()
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by wait(); the auto path keeps running torch
            _failures.append(exc)
        finally:
            _jobs.task_done()


def _submit(key: object, job: Callable[[], object]) -> None:
    global _worker
    with _lock:
        if key in _queued:
            return
        _queued.add(key)
        if _worker is None:
            _worker = threading.Thread(target=_run_jobs, name="ringattn-numba-compile", daemon=True)
            _worker.start()
    _jobs.put(job)


def fused_module(name: str) -> ModuleType | None:
    """The module ``ringattn.backends.<name>`` if it is imported, else None after queueing its import."""
    module = _modules.get(name)
    if module is not None:
        return module

    def load() -> None:
        _modules[name] = importlib.import_module(f"{__package__}.{name}")

    _submit(("import", name), load)
    return None


class auto_call:  # noqa: N801 - used as a context manager, like a function
    """Within this context, :func:`check` raises :class:`NotReady` rather than letting numba compile."""

    def __enter__(self) -> None:
        self._previous = getattr(_local, "auto", False)
        _local.auto = True

    def __exit__(self, *exc: object) -> None:
        _local.auto = self._previous


_fingerprint: Callable[[Any], bytes] | None = None


def _key(args: tuple[Any, ...]) -> object:
    """numba's C type fingerprints of ``args`` (what its dispatcher keys on), or None. Imported here, not at module
    import: ``import ringattn`` must not import numba (0.3 s)."""
    global _fingerprint
    if _fingerprint is None:
        try:  # private, hence the fallback
            from numba._dispatcher import compute_fingerprint as _fingerprint
        except ImportError:  # pragma: no cover - depends on the numba version
            return None
    try:
        return tuple(map(_fingerprint, args))
    except Exception:  # noqa: BLE001 - a type without a fingerprint: numba's typeof in check() decides
        return None


def check(kernel: Any, args: tuple[Any, ...]) -> None:
    """Raise :class:`NotReady` inside :class:`auto_call` when ``kernel`` (a numba dispatcher) has no compiled
    version for ``args``' types, after queueing its compilation; otherwise return. Launchers call this before
    writing anything, so the caller can run another backend on the same outputs."""
    if not getattr(_local, "auto", False):
        return
    fast = _key(args)
    if fast is not None and (kernel, fast) in _ready:
        return
    signature = tuple(kernel.typeof_pyval(a) for a in args)
    if signature in kernel.overloads:
        if fast is not None:
            _ready.add((kernel, fast))
        return
    _submit((kernel, signature), lambda: _compile(kernel, signature))
    raise NotReady


def _compile(kernel: Any, signature: tuple[Any, ...]) -> None:
    """Compile ``kernel`` for ``signature``: by the detached compile worker, which writes numba's disk cache, then
    load it here (Note [detached compiles]).

    The worker keeps numba's compiler (mostly Python) from holding this process's GIL for 10-30 s, which would
    slow the caller's own work meanwhile, and it finishes the compile even if this process ends first. Where no
    worker can run or its cache entry is not usable here, ``kernel.compile`` compiles on this thread instead. A
    kernel already in the disk cache is loaded here directly: a worker would only add its own start-up (1.5 s of a
    core, at low priority: with every core busy, as in a W=2 ring on 2 cores, that load took the first ~20 steps).
    """
    if not in_disk_cache(kernel, signature):
        compile_in_child(kernel, signature)
    kernel.compile(signature)


def in_disk_cache(kernel: Any, signature: tuple[Any, ...]) -> bool:
    """Whether numba's disk cache holds ``kernel`` (a ``cache=True`` dispatcher) for ``signature``, as
    ``kernel.compile`` would look it up (index key: signature, CPU and the function's bytecode; an index for another
    source stamp counts as empty). Reads numba internals: False where they differ (the worker then compiles)."""
    try:
        cache = kernel._cache
        key = cache._index_key(signature, kernel.targetctx.codegen())
        return bool(cache._enabled) and key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - another numba version: take the general path
        return False


# Note [detached compiles]
# ------------------------
# A compile that started finishes into the disk cache even when the program that asked for it ends, so short
# programs (test runs, CLI tools, notebooks that restart) get the fused kernel from a later run on. A compile is a
# *job*: a file ``<hash>.job`` (the kernel's module, name, signature and the asker's ``sys.path``) in
# ``<cache dir>/compile-queue`` (the directory of Note [kernel cache] in ``_kernel_cache.py``); one job per kernel
# and signature, so programs that ask for the same kernel share it. The asker starts a *worker*, ``python -c
# _WORKER``, in its own session (it is not killed with the asker's terminal or process group), at low priority
# (nice 10), and polls the disk cache. The worker:
#
# * takes ``<cache dir>/compile.lock`` (``flock``): one compile at a time per cache directory, i.e. per user and
#   machine, whatever number of programs ask; the other workers wait for it, asleep;
# * takes the oldest job (renamed ``.running``, so no other worker takes it; removed when done), compiles it unless
#   the cache has it by now, and goes on until the queue is empty, then exits;
# * exits after ``_WORKER_LIMIT_S`` seconds whatever it is doing (``SIGALRM``, default action): nothing is left
#   running for ever; numba writes cache files atomically, so a killed compile leaves no broken entry. Its job is
#   then gone, and the asker, seeing neither the job nor the kernel, compiles on its own thread.
#
# Every asker starts a worker (it may find the queue empty and exit at once), so no job waits for a worker that
# has already decided to exit. The asker waits ``_CHILD_TIMEOUT_S`` at most, then compiles on its own thread.
_WORKER = """
import json, sys
sys.path[:0] = json.loads(sys.argv[2])  # the asker's: this ringattn, and the kernels' modules
from ringattn.backends import _warm
_warm.worker_main(sys.argv[1])
"""

# A compile takes 10-30 s on a busy 2-core machine; past this, the asker stops waiting and compiles on its thread.
_CHILD_TIMEOUT_S = 600
# The worker's hard limit (it may queue behind other programs' compiles: K = 64 takes ~6 minutes on 2 cores).
_WORKER_LIMIT_S = 1800
_POLL_S = 0.2


def _queue_dir() -> Path:
    from ._kernel_cache import effective_dir

    return effective_dir() / "compile-queue"


def enqueue(kernel: Any, signature: tuple[Any, ...]) -> tuple[Path, subprocess.Popen] | None:
    """Queue ``kernel`` (a module-level ``cache=True`` numba dispatcher) for ``signature`` and start a worker
    (Note [detached compiles]); the job's path and the worker, or None where no job or worker can be made."""
    try:
        job = (kernel.py_func.__module__, kernel.py_func.__qualname__, signature, list(sys.path))
        payload = pickle.dumps(job)
        queue_dir = _queue_dir()
        queue_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(pickle.dumps(job[:3])).hexdigest()[:24]
        path = queue_dir / f"{name}.job"
        if not _claimed(path):
            tmp = queue_dir / f"{name}.{os.getpid()}.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, path)
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(queue_dir), json.dumps([p for p in sys.path if p])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, ImportError, subprocess.SubprocessError, pickle.PicklingError, AttributeError, TypeError):
        return None  # ImportError: no fcntl (Windows); the caller compiles on its thread
    _workers.append(worker)
    return path, worker


_workers: list[subprocess.Popen] = []  # polled so that finished workers are reaped while this process runs


def _claimed(job: Path) -> bool:
    """Whether a live worker has taken ``job``: its ``.running`` file exists and the lock is held. A ``.running`` file
    with the lock free is what a killed worker left (the rename and the removal both happen under the lock): it is
    removed, and the job counts as not taken."""
    import fcntl

    running = job.with_suffix(".running")
    if not running.exists():
        return False
    with open(job.parent.parent / "compile.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        running.unlink(missing_ok=True)
    return False


def compile_in_child(kernel: Any, signature: tuple[Any, ...], timeout: float | None = None) -> bool:
    """Have the detached worker compile ``kernel`` for ``signature`` into numba's disk cache, and wait for it
    (``timeout`` seconds, default ``_CHILD_TIMEOUT_S``); True when the cache has it."""
    queued = enqueue(kernel, signature)
    if queued is None:
        return False
    job, mine = queued
    deadline = time.monotonic() + (_CHILD_TIMEOUT_S if timeout is None else timeout)
    while time.monotonic() < deadline:
        if in_disk_cache(kernel, signature):
            return True
        running = _claimed(job)
        if not running and (not job.exists() or mine.poll() is not None):
            # Done (the index may have landed just now), given up, or left queued by a worker that could not run.
            return in_disk_cache(kernel, signature)
        for worker in list(_workers):
            if worker.poll() is not None:
                _workers.remove(worker)
        time.sleep(_POLL_S)
    return False


def worker_main(queue_dir: str, limit_s: float | None = None) -> None:
    """The detached compile worker (Note [detached compiles]): run the queued jobs in ``queue_dir``, one at a time
    per directory, then return; the process is killed after ``limit_s`` seconds (default ``_WORKER_LIMIT_S``)."""
    import fcntl
    import signal

    signal.alarm(max(1, int(_WORKER_LIMIT_S if limit_s is None else limit_s)))
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
    queue = Path(queue_dir)
    with open(queue.parent / "compile.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        while True:
            jobs = sorted(queue.glob("*.job"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
            if not jobs:
                return
            running = jobs[0].with_suffix(".running")
            try:
                os.replace(jobs[0], running)
                module, name, signature, path = pickle.loads(running.read_bytes())
                sys.path[:0] = [p for p in path if p not in sys.path]
                kernel = getattr(importlib.import_module(module), name)
                if not in_disk_cache(kernel, signature):
                    kernel.compile(signature)
            except Exception:  # noqa: BLE001, S112 - a bad job: the asker sees it gone and compiles itself
                pass
            finally:
                running.unlink(missing_ok=True)


def wait(timeout: float | None = None) -> bool:
    """Block until every queued import and compilation has finished (``timeout`` seconds at most); True when
    the queue is empty. Raises (once) the first error a background job met since the last call, if any."""
    done = threading.Event()

    def join() -> None:
        _jobs.join()
        done.set()

    threading.Thread(target=join, daemon=True).start()
    finished = done.wait(timeout)
    if _failures:
        raise _failures.pop(0)
    return finished


class AutoBackend:
    """A backend that runs module ``fused``'s kernels once they are compiled for a call's argument types and
    ``portable``'s until then (Note [cold start]). Same interface as a backend module (Note [row merge])."""

    NAME = "auto"

    def __init__(self, fused: str, portable: ModuleType) -> None:
        self._fused = fused
        self._portable = portable

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, problem: object) -> str | None:
        return self._portable.unsupported_reason(problem)

    def merge_rows(self, *args: Any, **kwargs: Any) -> None:
        self._run("merge_rows", args, kwargs)

    def merge_rows_backward(self, *args: Any, **kwargs: Any) -> None:
        self._run("merge_rows_backward", args, kwargs)

    def _run(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        module = _modules.get(self._fused)
        if module is not None:
            try:
                with auto_call():
                    getattr(module, name)(*args, **kwargs)
                _local.last = module.NAME
                return
            except NotReady:
                pass
        getattr(self._portable, name)(*args, **kwargs)
        _local.last = self._portable.NAME
        if module is None:  # queued after answering, so the import does not compete with this call for the GIL
            fused_module(self._fused)


def last_backend() -> str | None:
    """Name of the backend that ran this thread's latest ``auto`` call on CPU (None before the first)."""
    return getattr(_local, "last", None)
