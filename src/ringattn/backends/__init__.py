"""Backends: ``torch_eager``, ``numba_cpu`` (+ backward), ``triton_cuda`` (+ kernels), ``reference_backend``.

Every fused backend implements one row-merge kernel, and every public op is a call of it.

Note [row merge]
----------------
``merge_rows(parts_o, parts_m, parts_l, out_o, out_m, out_l, *, row_map=None, lse_scale=1.0)`` merges K
partial results row by row (a row is one (token, head) pair; see Note [canonical rows] in
``_contract.py``):

* ``parts_o``: K tensors ``(P, Q, N, D)``, one dtype (fp16/bf16/fp32/fp64), any strides.
* ``parts_m``: K tensors ``(P, Q, N, lanes)`` float32 (float64 allowed with float64 outputs), any
  strides. Stats form (``parts_l`` given): the row max of the scaled scores, Ascend's 8 lanes.
  LSE form (``parts_l`` is None): the log-sum-exp ``lse``, one lane, in natural log after multiplying by
  ``lse_scale`` (``ln 2`` for base-2 producers); ``+inf`` (old FlashAttention's empty rows) reads as
  ``-inf``.
* ``parts_l``: K sums ``sum(exp(s - max))`` shaped like ``parts_m``, or None (LSE form).
* ``out_o``: ``(P, Q, N, D)``; ``out_m`` ``(P, Q, N, lanes_out)``: max (stats form) or LSE (LSE form,
  in the caller's base, i.e. divided by ``lse_scale``), output lane ``c`` holding merged lane
  ``c % lanes``; ``out_l``: the sum (stats form) or None. Outputs may be exactly the same views as inputs
  (in-place accumulation).
* ``row_map``: None, or ``(row_base, row_step)`` for the per-batch TND statistics layout; then every stats
  view is the raw ``(T, 1, N, lanes)`` tensor and row ``(t, n)`` is located as in Note [canonical rows].

Per row and lane j (every lane on its own; the LSE form has one), in float32 (float64 for float64
outputs)::

    M = max_k m_k;  shift = 0 if M == -inf else M     # all parts empty -> weights 0, never NaN
    w_k = l_k * exp(m_k - shift);  L = sum_k w_k
    stats form: out_m = M, out_l = L;   LSE form: out_m = (M + ln L) / lse_scale, -inf where M == -inf

and per output element d, with the weights and empty flags of lane ``j = d % lanes`` (Atlas A2: each
32-byte block of a row meets the 8-lane statistics with a block stride of 0)::

    out_o[d] = sum over parts k not empty in lane j of o_k[d] * (w_k / L), rounded once to the output dtype
    (0 where every part is empty in lane j)

A part is *empty* in a lane where ``m_k == -inf`` and ``l_k == 0`` (stats form), or its LSE is ``+-inf``
(LSE form). Its output is never read: a select, not a multiply by zero, so NaN or garbage there (outputs
of rows no key reached are often ``torch.empty`` memory) does not leak; the select contributes -0.0, the
identity of ``+``, so the row is bitwise the merge of the other parts. NaN in a statistic, or in the output
of a non-empty part, propagates. For K = 2 this is ``docs/contract.md`` ("What it computes") exactly (two
products then one add).
Equal lanes (the contract) give every element lane 0's weights; the fused CPU kernel evaluates such rows
once (Note [cpu merge kernel]).

Each backend module has:

``unavailable_reason() -> str | None``
    Why the backend cannot run in this process (a missing package), or None.
``unsupported_reason(problem) -> str | None``
    Why it cannot run this particular problem (device, dtype), or None.
``merge_rows(...)``
    Note [row merge]. ``ring_attention_update`` below runs the contract's op through it (K = 2). The
    reference backend has instead its own ``ring_attention_update(problem, out_o, out_m, out_l)``: a separate
    transcription of the contract (``docs/contract.md``), sharing nothing with the row merge.
``merge_rows_backward(...)``, optional
    Note [row merge backward] in ``_backward.py``; backends without it use the torch version.

``auto`` picks the fused backend for the inputs' device when it is available and supports the problem,
else the portable ``torch`` backend. On CPU, ``auto`` runs ``torch`` while numba compiles the fused kernel for
a call's argument types on a background thread, and the fused kernel from then on (Note [cold start] in
``_warm.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from .._contract import UpdateProblem
from ..errors import BackendError, expected
from . import _warm

_MODULES = {
    "reference": "reference_backend",
    "torch": "torch_eager",
    "cpu": "numba_cpu",
    "triton": "triton_cuda",
}
# Preference order of `auto` per device type; `torch` always ends the list.
_AUTO = {"cpu": ("cpu",), "cuda": ("triton",)}

BACKEND_NAMES = ("auto", *_MODULES)
AutoBackend = _warm.AutoBackend
# `auto` on CPU: the fused kernels once compiled, `torch` meanwhile (Note [cold start]); None until first needed.
_auto_cpu: _warm.AutoBackend | None = None


def _auto_backend(candidate: str) -> ModuleType | _warm.AutoBackend | None:
    """What `auto` runs for ``candidate`` when it is installed (without importing it on the caller's thread when
    it is the numba backend, whose import and compiles run in the background), else None."""
    global _auto_cpu
    # Deterministic mode: the fused kernel from the first call, never a switch mid-run (Note [one merge backend per
    # ring] in ring/checks.py).
    waits = os.environ.get(_warm.POLICY_ENV, "background") == "wait" or torch.are_deterministic_algorithms_enabled()
    if candidate != "cpu" or waits:
        return load(candidate) if _installed(candidate) else None
    if _auto_cpu is None:
        if importlib.util.find_spec("numba") is None:
            return None
        _auto_cpu = _warm.AutoBackend(_MODULES["cpu"], load("torch"))
    return _auto_cpu


def load(name: str) -> ModuleType:
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def _installed(name: str) -> bool:
    try:
        module = load(name)
    except ModuleNotFoundError:
        return False
    return module.unavailable_reason() is None


def check_name(name: object) -> None:
    """Raise BackendError unless ``name`` is one of ``BACKEND_NAMES``."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise BackendError(expected("backend", f"one of {', '.join(map(repr, BACKEND_NAMES))}", name))


def select(name: str, problem: UpdateProblem) -> ModuleType | _warm.AutoBackend:
    """The backend (module) that runs ``problem``; raises BackendError when ``name`` cannot."""
    check_name(name)
    if name == "auto":
        for candidate in _AUTO.get(problem.device.type, ()):
            backend = _auto_backend(candidate)
            if backend is not None and backend.unsupported_reason(problem) is None:
                return backend
        return load("torch")
    try:
        module = load(name)
    except ModuleNotFoundError as exc:
        raise BackendError(expected("backend", f"an available backend ({name!r} needs {exc.name})", name)) from exc
    reason = module.unavailable_reason() or module.unsupported_reason(problem)
    if reason is not None:
        raise BackendError(f"backend: {name!r} cannot run this call: {reason}")
    return module


def for_device(device: torch.device, name: str = "auto") -> ModuleType | _warm.AutoBackend:
    """The backend (module) for ``device`` when no full problem is at hand (row merges, ring attention).

    ``auto`` prefers the device's fused backend when it is installed, else ``torch``. Backends state what
    they cannot run through ``unsupported_reason``; row-level callers check dtypes themselves.
    """
    if name == "auto":
        for candidate in _AUTO.get(device.type, ()):
            backend = _auto_backend(candidate)
            if backend is not None:
                return backend
        return load("torch")
    if name not in _MODULES or name == "reference":
        raise BackendError(expected("backend", "'auto', 'torch', 'cpu' or 'triton'", name))
    try:
        module = load(name)
    except ModuleNotFoundError as exc:
        raise BackendError(expected("backend", f"an available backend ({name!r} needs {exc.name})", name)) from exc
    reason = module.unavailable_reason()
    if reason is None and hasattr(module, "device_reason"):
        reason = module.device_reason(device)
    if reason is not None:
        raise BackendError(f"backend: {name!r} cannot run on {device}: {reason}")
    return module


def wait_compiled(timeout: float | None = None) -> bool:
    """Block until the fused kernels that ``auto`` calls have queued for compilation are ready (``timeout``
    seconds at most; True when nothing is left). See Note [cold start] in ``_warm.py``."""
    return _warm.wait(timeout)


def settle_compiles(fn: Callable[[], object], rounds: int = 2) -> None:
    """Call ``fn`` and wait for the background work it queued (:func:`wait_compiled`), ``rounds`` times, so that
    what runs afterwards is the fused CPU kernels: ``backend="auto"`` answers with torch while they load (Note [cold
    start] in ``_warm.py``), and each call queues at most one more step (the fused module's import, then the kernels'
    compiles). For timing loops: the bench's and ``examples/transformers_ring.py``'s."""
    for _ in range(rounds):
        fn()
        wait_compiled()


def ran(backend: object) -> str:
    """Name of the backend that really ran the latest call made with ``backend`` (a module or ``auto``'s CPU
    backend, as ``select`` returns) on this thread."""
    if isinstance(backend, _warm.AutoBackend):
        return _warm.last_backend() or "torch"
    return backend.NAME


def heads_outer(parts_m: Sequence[torch.Tensor], row_map: object | None) -> bool:
    """Whether a fused kernel should visit rows heads outer (``(q, n, p)`` order, ``p`` fastest) rather than
    tokens outer (``(p, q, n)``, ``n`` fastest): true when that is the statistics' memory order, i.e. their head
    stride exceeds their token stride (SBH's ``(B, N, S)``) or they are per-batch TND (head-major batches,
    ``row_map`` given). Either order is correct; the statistics' order reads whole cache lines of them."""
    return row_map is not None or abs(parts_m[0].stride(2)) > abs(parts_m[0].stride(0))


def ring_attention_update(
    module: ModuleType | _warm.AutoBackend,
    problem: UpdateProblem,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor,
) -> None:
    """Write ``problem``'s merge into ``out_o, out_m, out_l`` with backend ``module`` (outputs may be exactly
    the input views): the row merge of Note [row merge] with K = 2 in the stats form."""
    if not hasattr(module, "merge_rows"):  # the reference: its own transcription of the contract
        module.ring_attention_update(problem, out_o, out_m, out_l)
        return
    row_map = problem.per_batch_row_map() if problem.stats_order == "per_batch" else None
    rows, stats = problem.attn_rows, problem.stats_rows
    module.merge_rows(
        [rows(problem.prev_o), rows(problem.cur_o)],
        [stats(problem.prev_m), stats(problem.cur_m)],
        [stats(problem.prev_l), stats(problem.cur_l)],
        rows(out_o),
        stats(out_m),
        stats(out_l),
        row_map=row_map,
    )
