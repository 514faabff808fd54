"""``ringattn bench merge``: the merge ops against the naive eager formula, ``torch.compile`` of it and a copy floor.

A case is one op (``Case.op``), layout, dtype and shape. The ops are the two forms of the merge:
``ring_attention_update`` (Ascend statistics, SBH and TND) and ``merge_states`` in its LSE form, in vLLM's layout
(two parts, outputs ``(T, N, D)``, natural-log LSEs ``(N, T)``, i.e. ``layout="TND", lse_layout="NT"``). Per case
the providers are

* ``ringattn[<backend>]``: the op with ``backend=<backend>`` and fresh outputs, exactly
  as a user calls it (validation included); the backend column says which backend really ran;
* ``ringattn[<backend>] out=``: the same into preallocated outputs; its ``fresh/out`` column is the
  fresh-output time over this time;
* ``naive``: the formula as MindSpeed's ``forward_update`` writes it in eager PyTorch (whole-tensor
  ``maximum``, ``exp``, mul, div, add, the scales repeated to the full ``(S, B, H)`` / ``(T, N, D)`` size,
  float32 products, one cast back), plus, for the per-batch TND statistics layout, one precomputed
  gather of the scale rows (the MindSpeed-MM approach); for ``merge_states``, the LSE formula with broadcast
  scales as vLLM's PyTorch reference writes it;
* ``compiled`` (only when asked for): ``torch.compile(<the naive formula>, dynamic=False, fullgraph=True)`` with the
  default Inductor backend, what a user would write instead of calling ringattn. Its first call on each case (after
  ``torch._dynamo.reset()``: tracing plus Inductor's compile) is reported apart as ``Row.compile_s`` and is never
  one of the timed samples;
* ``copy``: the floor, Note [copy floor] in ``_timing.py``.

A case runs one pass (``Case.direction``). ``FORWARD`` times the op. ``BACKWARD`` times the gradients of every
output, given fixed random upstream gradients, with respect to every input: each provider's forward runs once, and
each timed call is ``torch.autograd.grad(..., retain_graph=True)`` over that graph (the backward alone; no ``out=``
rows). Its floor moves the backward's own bytes (``bytes_moved``).

Each provider's result is checked once against ``ringattn.reference`` (float64) before timing; a backward, against
float64 autograd through it. The naive formula reads lane 0 of the statistics, so its gradient reaches lane 0 only,
where the Atlas A2 rule gives lane c the share of the elements ``d % 8 == c`` (the bench's lanes are equal, so the
forward results agree): its statistics gradients are checked summed over the 8 lanes, which both rules agree on.
Inputs have no empty rows: the naive formula turns them into NaN (ringattn returns the exact limit), which would be a
correctness difference, not a speed one. The command line (options, table, JSON, PNG) is
:mod:`ringattn.bench.merge_cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch

from .. import backends
from .._contract import validate_update
from .._ops import row_backend
from ..api import ring_attention_update
from ..backends import settle_compiles
from ..errors import BackendError, HardwareLimitError, expected
from ..merge import merge_states
from ..reference import merge_states_reference, ring_attention_update_reference
from . import report
from ._timing import Progress, copy_floor, first_call_seconds, measure, set_threads, synchronize

__all__ = [
    "Case", "cases", "bytes_moved", "make_inputs", "naive_update", "naive_merge", "providers", "resolve_backend",
    "Options", "CheckFailure", "run", "UPDATE", "MERGE", "OPS", "PROVIDER_KINDS", "COMPILED", "SWEEP_T",
    "FORWARD", "BACKWARD", "PASSES",
]  # fmt: skip

UPDATE, MERGE = "ring_attention_update", "merge_states"  # Case.op: the stats form and the LSE form
OPS = (UPDATE, MERGE)
FORWARD, BACKWARD = "forward", "backward"  # Case.direction: the op, or the gradients of its outputs
PASSES = (FORWARD, BACKWARD)
COMPILED = "compiled"  # provider name of torch.compile of the naive formula
# Provider kinds a run can ask for: "ringattn" is every requested backend, fresh and out=.
PROVIDER_KINDS = ("ringattn", report.BASELINE, COMPILED)

# The contract's tolerances (atol = rtol against float64: one rounding to the dtype plus float32 arithmetic);
# float64 only differs from the reference in operation order.
OUTPUT_NAMES = {UPDATE: ("attn_out", "softmax_max", "softmax_sum"), MERGE: ("out", "lse")}
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3, torch.float64: 1e-12}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip
SHAPE_LETTERS = {"SBH": "SBND", "TND": "TND"}  # SBH shapes are given as (S, B, N, D), H = N * D
DEFAULT_SHAPES = {"SBH": (4096, 1, 32, 128), "TND": (16384, 16, 128)}
QUICK_SHAPES = {"SBH": (64, 2, 4, 64), "TND": (96, 2, 64)}
# A plot without --sizes sweeps the first dimension over the shape's divided by these.
SWEEP_FRACTIONS = (8, 4, 2, 1)
# --sweep-t: first dimension (T for TND, S for SBH) from launch-latency-bound to well past the last-level cache.
SWEEP_T = (256, 1024, 4096, 16384, 65536)
# TND batches: 4 sequences of unequal lengths, 40/30/20/10 % of T, as a packed batch of real documents.
SEQ_WEIGHTS = (4, 3, 2, 1)
STATS_LANES = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. ``shape`` is ``(S, B, N, D)`` for SBH and ``(T, N, D)`` for TND.

    ``op`` is ``UPDATE`` (``ring_attention_update``) or ``MERGE`` (``merge_states``, TND only, LSE ``(N, T)``).
    ``seq_offsets`` is TND's ``actual_seq_qlen`` (cumulative, from 0 to T; ``UPDATE`` only); statistics use the
    default per-batch layout. ``ascend_limits`` is False when the shape exceeds the Ascend TND limits (then
    ``limit_note`` says why) and the bench lifts them explicitly.
    """

    layout: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    seq_offsets: tuple[int, ...] | None = None
    ascend_limits: bool = True
    limit_note: str = ""
    op: str = UPDATE
    direction: str = FORWARD

    @property
    def heads(self) -> int:
        return self.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Number of (token, head) rows."""
        return math.prod(self.shape[:-1])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _dims(self, skip_first: bool) -> str:
        letters = SHAPE_LETTERS[self.layout]
        pairs = list(zip(letters, self.shape, strict=True))[1 if skip_first else 0 :]
        return " ".join(f"{k}={v}" for k, v in pairs)

    @property
    def _prefix(self) -> str:
        form = self.layout if self.op == UPDATE else f"{MERGE} {self.layout}/NT"
        return form if self.direction == FORWARD else f"{form} backward"

    @property
    def name(self) -> str:
        return f"{self._prefix} {self.dtype_name} {self._dims(False)}"

    @property
    def series(self) -> str:
        """The case name without the swept (first) dimension: one plot panel per series."""
        return f"{self._prefix} {self.dtype_name} {self._dims(True)}"


def default_seq_offsets(total: int, weights: Sequence[int] = SEQ_WEIGHTS) -> tuple[int, ...]:
    """Cumulative lengths splitting ``total`` tokens in proportion to ``weights`` (rounded down)."""
    acc, offsets = 0, [0]
    for w in weights[:-1]:
        acc += w
        offsets.append(total * acc // sum(weights))
    offsets.append(total)
    return tuple(offsets)


def _stats_shape(case: Case) -> tuple[int, ...]:
    if case.layout == "SBH":
        seq, batch, heads, _ = case.shape
        return (batch, heads, seq, STATS_LANES)
    tokens, heads, _ = case.shape
    return (tokens, heads, STATS_LANES)


def _attn_shape(case: Case) -> tuple[int, ...]:
    if case.layout == "SBH":
        seq, batch, heads, head_dim = case.shape
        return (seq, batch, heads * head_dim)
    return case.shape


def _with_limits(case: Case) -> Case:
    """``case`` with ``ascend_limits`` lifted if its shape exceeds them (checked on meta tensors: free)."""
    if case.layout != "TND" or case.op != UPDATE:
        return case
    attn = torch.empty(_attn_shape(case), dtype=case.dtype, device="meta")
    stats = torch.empty(_stats_shape(case), dtype=torch.float32, device="meta")
    try:
        validate_update(attn, stats, stats, attn, stats, stats, list(case.seq_offsets or ()), "TND")
    except HardwareLimitError as exc:
        return dataclasses.replace(case, ascend_limits=False, limit_note=str(exc))
    return case


def cases(
    layouts: Sequence[str] = ("SBH", "TND"),
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    *,
    shape: tuple[int, ...] | None = None,
    sizes: Sequence[int] | None = None,
    quick: bool = False,
    sweep: bool = False,
    ops: Sequence[str] = (UPDATE,),
    passes: Sequence[str] = (FORWARD,),
) -> list[Case]:
    """The shape grid: every op x layout x dtype x size x pass (``passes``: ``FORWARD`` and/or ``BACKWARD``).

    ``ops`` picks the forms (``UPDATE`` alone by default, as scripts that time ``ring_attention_update`` expect; the
    command line asks for both): ``UPDATE`` runs every layout, ``MERGE`` (LSE form) runs when ``"TND"`` is among
    ``layouts``, on the TND shape. ``shape`` replaces the default shape (one layout only); ``sizes`` sweeps its
    first dimension (S for SBH, T for TND); ``sweep`` (without ``sizes``) sweeps it over 1/8, 1/4, 1/2 and 1 times
    the shape's, as a plot needs; ``quick`` starts from tiny shapes for smoke runs.
    """
    out = []
    forms = [(UPDATE, layout) for layout in layouts if UPDATE in ops]
    forms += [(MERGE, "TND")] if MERGE in ops and "TND" in layouts else []
    for op, layout in forms:
        base = shape if shape is not None else (QUICK_SHAPES if quick else DEFAULT_SHAPES)[layout]
        firsts = sizes or (sorted({max(1, base[0] // f) for f in SWEEP_FRACTIONS}) if sweep else (base[0],))
        for dtype in dtypes:
            for first in firsts:
                dims = (first, *base[1:])
                offsets = default_seq_offsets(first) if layout == "TND" and op == UPDATE else None
                for direction in passes:
                    out.append(_with_limits(Case(layout, dtype, dims, offsets, op=op, direction=direction)))
    return out


def bytes_moved(case: Case) -> int:
    """Bytes one merge must read and write at least: each tensor touched exactly once.

    Reads ``prev_attn_out``, ``cur_attn_out`` (``rows * D`` elements of the case dtype each) and the four
    float32 statistics tensors (``rows * 8`` each: the 8 lanes share cache lines, so reading lane 0 costs
    them all); writes ``attn_out``, ``softmax_max``, ``softmax_sum``. TND's per-token index map (int64,
    ``T`` entries) is not counted: it is under 1% of the total for D >= 64. ``merge_states``: two outputs and
    two float32 LSEs read, one output and one LSE written.

    Backward: reads the gradient of each output and every input (the parts' outputs for the ``<g, o_k>`` terms),
    writes the gradient of every input: ``5 rows D`` attention elements (``g``, two parts, two gradients) and ten
    float32 statistics tensors (stats form: 2 output gradients, 4 inputs, 4 gradients) or five LSE rows.
    """
    elem = torch.empty((), dtype=case.dtype).element_size()
    attn = (5 if case.direction == BACKWARD else 3) * case.head_dim * elem
    stats = (10 if case.direction == BACKWARD else 6) // (2 if case.op == MERGE else 1)
    lanes = 1 if case.op == MERGE else STATS_LANES
    return case.rows * (attn + stats * lanes * 4)


@dataclasses.dataclass
class Inputs:
    """Inputs of one case on the bench device, plus preallocated outputs and the naive gather index."""

    case: Case
    tensors: tuple[torch.Tensor, ...]  # prev_o, prev_m, prev_l, cur_o, cur_m, cur_l; MERGE: o_a, lse_a, o_b, lse_b
    seq_qlen: torch.Tensor | None  # int64 on the inputs' device
    out: tuple[torch.Tensor, ...]
    naive_rows: torch.Tensor | None  # TND: (T, N) per-batch statistics row of each (token, head)
    grads: tuple[torch.Tensor, ...] = ()  # BACKWARD: the upstream gradient of each output (random, fixed)


def _per_batch_rows(offsets: Sequence[int], heads: int, device: torch.device) -> torch.Tensor:
    """Row of the ``(T*N, 8)`` statistics view holding (token, head), per batch: batch i's rows are a
    contiguous head-major ``(N, S_i)`` block from row ``c_i * N``."""
    parts = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        length = end - start
        local = torch.arange(length).unsqueeze(1) + torch.arange(heads).unsqueeze(0) * length
        parts.append(start * heads + local)
    return torch.cat(parts).to(device)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs as FlashAttention produces them: attention in [-1, 1), maxima ~ 4 N(0, 1), sums in
    [1, 64], equal over the 8 lanes; no empty rows. Generated on the CPU, so every device sees the same."""
    gen = torch.Generator().manual_seed(seed)
    attn_shape, stats_shape = _attn_shape(case), _stats_shape(case)

    def attn() -> torch.Tensor:
        return (torch.rand(attn_shape, generator=gen) * 2 - 1).to(device=device, dtype=case.dtype)

    def stats(low: float, scale: float, gaussian: bool) -> torch.Tensor:
        draw = torch.randn if gaussian else torch.rand
        lane = low + scale * draw((*stats_shape[:-1], 1), generator=gen)
        return lane.expand(stats_shape).contiguous().to(device)

    if case.op == MERGE:  # LSE form, vLLM's layout: LSE (N, T), natural log, max + log(sum) of the stats above
        tokens, heads, _ = case.shape

        def lse() -> torch.Tensor:
            return (4 * torch.randn((heads, tokens), generator=gen) + 2).to(device)

        o_a, lse_a, o_b, lse_b = attn(), lse(), attn(), lse()
        out = (torch.empty_like(o_a), torch.empty_like(lse_a))
        return Inputs(case, (o_a, lse_a, o_b, lse_b), None, out, None, _upstream(case, out, gen))
    prev_o, cur_o = attn(), attn()
    tensors = (prev_o, stats(0, 4, True), stats(1, 63, False), cur_o, stats(0, 4, True), stats(1, 63, False))
    out = (torch.empty_like(prev_o), torch.empty_like(tensors[1]), torch.empty_like(tensors[1]))
    offsets = case.seq_offsets
    return Inputs(
        case=case,
        tensors=tensors,
        # On the inputs' device, as varlen attention keeps its cumulative lengths: no host copy per call, and
        # a CUDA call can be captured in a graph (Note [bench timing]).
        seq_qlen=torch.tensor(offsets, dtype=torch.int64, device=device) if offsets is not None else None,
        out=out,
        naive_rows=_per_batch_rows(offsets, case.heads, device) if offsets is not None else None,
        grads=_upstream(case, out, gen),
    )


def _upstream(case: Case, outputs: tuple[torch.Tensor, ...], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """BACKWARD cases: a standard normal upstream gradient for each output (in its shape and dtype); else ()."""
    if case.direction != BACKWARD:
        return ()
    return tuple(torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype) for t in outputs)


def naive_update(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge formula (two products, then one add) as eager whole-tensor ops, written the way MindSpeed's
    ``forward_update`` does (:func:`naive_update_formula` on the case's tensors)."""
    return naive_update_formula(*inputs.tensors, inputs.naive_rows, inputs.case.layout)


def naive_update_formula(
    prev_o: torch.Tensor,
    prev_m: torch.Tensor,
    prev_l: torch.Tensor,
    cur_o: torch.Tensor,
    cur_m: torch.Tensor,
    cur_l: torch.Tensor,
    naive_rows: torch.Tensor | None,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``naive_update`` on tensors: SBH ``(S, B, H)`` / stats ``(B, N, S, 8)``, or TND ``(T, N, D)`` / per-batch
    stats ``(T, N, 8)`` with ``naive_rows`` the ``(T, N)`` statistics row of each (token, head). Only tensors,
    a string and shapes: what ``torch.compile`` traces into one graph."""
    compute = torch.promote_types(prev_o.dtype, torch.float32)  # float32 as MindSpeed; float64 stays float64
    stats_dtype = prev_m.dtype
    prev_m, prev_l, cur_m, cur_l = (t.to(compute) for t in (prev_m, prev_l, cur_m, cur_l))  # no-op below float64
    softmax_max = torch.maximum(prev_m, cur_m)
    prev_scaled = prev_l * torch.exp(prev_m - softmax_max)
    cur_scaled = cur_l * torch.exp(cur_m - softmax_max)
    softmax_sum = prev_scaled + cur_scaled
    prev_scale = prev_scaled / softmax_sum
    cur_scale = cur_scaled / softmax_sum
    if layout == "SBH":  # (B, N, S, 8) -> (S, B, N*D), materialised as MindSpeed does
        head_dim = prev_o.shape[2] // prev_m.shape[1]

        def spread(scale: torch.Tensor) -> torch.Tensor:
            full = scale[..., 0].unsqueeze(3).repeat(1, 1, 1, head_dim)
            return full.permute(2, 0, 1, 3).flatten(2).contiguous()

    else:  # (T, N, 8) per batch -> (T, N, D) through the precomputed row gather
        tokens, heads, head_dim = prev_o.shape

        def spread(scale: torch.Tensor) -> torch.Tensor:
            rows = scale.reshape(tokens * heads, STATS_LANES)[:, 0][naive_rows]
            return rows.unsqueeze(2).repeat(1, 1, head_dim)

    out = prev_o.to(compute) * spread(prev_scale) + cur_o.to(compute) * spread(cur_scale)
    return out.to(prev_o.dtype), softmax_max.to(stats_dtype), softmax_sum.to(stats_dtype)


def naive_merge(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE-form merge of two parts as eager whole-tensor ops (:func:`naive_merge_formula`)."""
    return naive_merge_formula(*inputs.tensors)


def naive_merge_formula(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two parts in vLLM's layout, outputs ``(T, N, D)`` and natural-log LSEs ``(N, T)``, merged the way vLLM's
    PyTorch reference of ``merge_attn_states`` writes it: max-shifted weights, scales broadcast over D, float32
    products, one cast back. Rows empty in both parts (``-inf`` twice) give NaN, as in vLLM."""
    compute = torch.promote_types(o_a.dtype, torch.float32)
    lse_dtype = lse_a.dtype
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    max_lse = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - max_lse)
    w_b = torch.exp(lse_b - max_lse)
    total = w_a + w_b
    lse = max_lse + torch.log(total)
    scale_a = (w_a / total).transpose(0, 1).unsqueeze(-1)  # (N, T) -> (T, N, 1)
    scale_b = (w_b / total).transpose(0, 1).unsqueeze(-1)
    out = o_a.to(compute) * scale_a + o_b.to(compute) * scale_b
    return out.to(o_a.dtype), lse.to(lse_dtype)


Provider = Callable[[Inputs], tuple[torch.Tensor, ...]]


def _compiled(op: str) -> Provider:
    """``torch.compile`` of the op's naive formula (default Inductor backend, static shapes, one graph).

    The compiled function is shared by every case of a run; ``run`` calls ``torch._dynamo.reset()`` before each
    case's first call, so every case pays its own compile (reported apart) and a long sweep never reaches
    dynamo's recompile limit, past which it would silently run the formula eagerly.
    """
    if op == MERGE:
        merge_fn = torch.compile(naive_merge_formula, dynamic=False, fullgraph=True)
        return lambda inputs: merge_fn(*inputs.tensors)
    update_fn = torch.compile(naive_update_formula, dynamic=False, fullgraph=True)
    return lambda inputs: update_fn(*inputs.tensors, inputs.naive_rows, inputs.case.layout)


def providers(
    backend_names: Sequence[str] = ("auto",),
    kinds: Sequence[str] = ("ringattn", report.BASELINE),
    op: str = UPDATE,
    direction: str = FORWARD,
) -> dict[str, Provider]:
    """Provider name -> callable on :class:`Inputs` of an ``op`` case: for ``kinds`` (from ``PROVIDER_KINDS``),
    ``ringattn[<backend>]`` and ``ringattn[<backend>] out=`` per requested backend, ``naive``, ``compiled``.
    ``direction=BACKWARD``: the same providers' gradients (:func:`_backward_of`), no ``out=`` ones.

    The copy floor is not a provider (it computes nothing to check); ``run`` times it alongside.
    """

    def fresh(backend: str) -> Provider:
        def call(inputs: Inputs) -> tuple[torch.Tensor, ...]:
            c = inputs.case
            if c.op == MERGE:
                o_a, lse_a, o_b, lse_b = inputs.tensors
                return merge_states(
                    (o_a, o_b), (lse_a, lse_b), layout="TND", lse_layout="NT", backend=backend, lse_base="e"
                )
            return ring_attention_update(
                *inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits, backend=backend
            )

        return call

    def into_out(backend: str) -> Provider:
        def call(inputs: Inputs) -> tuple[torch.Tensor, ...]:
            c = inputs.case
            if c.op == MERGE:
                o_a, lse_a, o_b, lse_b = inputs.tensors
                return merge_states(
                    (o_a, o_b), (lse_a, lse_b), layout="TND", lse_layout="NT", backend=backend,
                    out=inputs.out[0], out_lse=inputs.out[1], lse_base="e",
                )  # fmt: skip
            return ring_attention_update(
                *inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits, backend=backend,
                out=inputs.out,
            )  # fmt: skip

        return call

    table: dict[str, Provider] = {}
    if "ringattn" in kinds:
        for name in backend_names:
            table[f"ringattn[{name}]"] = fresh(name)
            if direction == FORWARD:  # a backward has no out=
                table[f"ringattn[{name}] out="] = into_out(name)
    if report.BASELINE in kinds:
        table[report.BASELINE] = naive_merge if op == MERGE else naive_update
    if COMPILED in kinds:
        table[COMPILED] = _compiled(op)
    if direction == BACKWARD:
        table = {name: _backward_of(provider) for name, provider in table.items()}
    return table


def _backward_of(forward: Provider) -> Provider:
    """A provider returning the gradients of ``forward``'s outputs (upstream ``Inputs.grads``) with respect to every
    input tensor. The forward runs on the first call for an ``Inputs`` (leaves detached from its tensors); every call
    runs ``torch.autograd.grad`` over that one graph, ``retain_graph=True``: the backward alone is timed."""
    graph: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def call(inputs: Inputs) -> tuple[torch.Tensor, ...]:
        if id(inputs) not in graph:
            graph.clear()  # one case at a time
            leaves = [t.detach().requires_grad_() for t in inputs.tensors]
            graph[id(inputs)] = (leaves, forward(dataclasses.replace(inputs, tensors=tuple(leaves))))
        leaves, outputs = graph[id(inputs)]
        return torch.autograd.grad(outputs, leaves, inputs.grads, retain_graph=True)

    return call


def resolve_backend(name: str, inputs: Inputs, *, settle: bool = True) -> str:
    """The backend ``name`` really runs for ``inputs`` (``auto`` resolved); raises BackendError.

    ``auto`` on CPU runs ``torch`` until numba has compiled the fused kernel (Note [cold start] in
    ``backends/_warm.py``): with ``settle``, this lets it load (``settle_compiles``), then makes one call to see
    which backend answers.
    """
    c = inputs.case
    call = providers((name,), ("ringattn",), c.op, c.direction)[f"ringattn[{name}]"]
    if c.op == MERGE:
        device = inputs.tensors[0].device
        try:
            call(inputs)  # an unusable backend raises here, before any timing
        except RuntimeError as exc:  # merge_states(backend="triton") on CPU fails inside Triton (no driver)
            got = f"{name!r} ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
            raise BackendError(expected("backend", f"a backend that runs merge_states on {device}", got)) from exc
        module = row_backend(device, name, c.dtype)
    else:
        problem = validate_update(*inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits)
        module = backends.select(name, problem)
    if name == "auto" and settle:
        settle_compiles(lambda: call(inputs))
        call(inputs)
    return backends.ran(module)


def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / (1 + |ref|)``; below tol iff allclose(atol=rtol=tol). NaN where ref is not -> inf."""
    g = got.to(device=ref.device, dtype=torch.float64)
    err = (g - ref).abs() / (1 + ref.abs())
    err = torch.where(torch.isnan(g) & torch.isnan(ref), 0.0, err).nan_to_num(nan=math.inf)
    return float(err.max()) if err.numel() else 0.0


def _reference(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The case's op in float64 (``ringattn.reference``), on the CPU, in the op's output layout; for a BACKWARD
    case, float64 autograd through it: the gradient of every input."""
    c = inputs.case
    tensors = [t.detach().cpu().double().requires_grad_(c.direction == BACKWARD) for t in inputs.tensors]
    if c.op == MERGE:
        o_a, lse_a, o_b, lse_b = tensors
        out, lse = merge_states_reference([o_a, o_b], [lse_a.T, lse_b.T])  # rows (T, N)
        outputs = (out, lse.T)
    else:
        outputs = ring_attention_update_reference(*tensors, list(c.seq_offsets or ()), c.layout)
    if c.direction == FORWARD:
        return outputs
    return torch.autograd.grad(outputs, tensors, [g.cpu().double() for g in inputs.grads])


def _checked_outputs(case: Case, provider: str, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]):
    """``(name, got, want, scale)`` per output to compare (``max_error(got / scale, want / scale)``): the op's outputs;
    for a backward, each input's gradient, scaled by the largest of its reference (a gradient of a statistic sums
    ``D`` products), and the naive formulas' statistics gradients summed over the lanes (module docstring)."""
    if case.direction == FORWARD:
        return [(name, g, w, 1.0) for name, g, w in zip(OUTPUT_NAMES[case.op], got, want, strict=True)]
    names = ("o_a", "lse_a", "o_b", "lse_b") if case.op == MERGE else ("prev_attn_out", "prev_softmax_max",
             "prev_softmax_sum", "cur_attn_out", "cur_softmax_max", "cur_softmax_sum")  # fmt: skip
    out = []
    for name, g, w in zip(names, got, want, strict=True):
        if case.op == UPDATE and "softmax" in name and provider in (report.BASELINE, COMPILED):
            g, w = g.sum(-1), w.sum(-1)
        out.append((f"grad of {name}", g, w, max(1.0, float(w.abs().max()))))
    return out


class CheckFailure(Exception):
    """A provider disagrees with the float64 reference beyond the dtype's tolerance."""


@dataclasses.dataclass(frozen=True)
class Options:
    cases: list[Case]
    backends: tuple[str, ...] = ("auto",)
    providers: tuple[str, ...] = ("ringattn", report.BASELINE)  # kinds from PROVIDER_KINDS
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    warmup: int = 1
    repeats: int = 7
    seed: int = 0
    threads: int | None = None


def _timing(device: torch.device, *, eagerly: bool) -> str:
    """``report.Row.timing`` of a provider on ``device`` (Note [bench timing])."""
    if device.type != "cuda":
        return "host clock"
    return "cuda eager" if eagerly else "cuda graph"


def run(options: Options, progress: Progress | None = None) -> list[report.Row]:
    """Check, then time, every provider and the copy floor on every case; rows with ratios filled."""
    progress = progress or Progress(enabled=False)
    device, rows = options.device, []
    for index, case in enumerate(options.cases):
        label = f"[{index + 1}/{len(options.cases)}] {case.name}"
        progress.show(f"{label}: checking")
        inputs = make_inputs(case, device, options.seed)
        provs = providers(options.backends, options.providers, case.op, case.direction)
        resolved: dict[str, str] = {}
        if "ringattn" in options.providers:
            if "auto" in options.backends:
                progress.show(f"{label}: compiling the fused kernel if needed (numba: seconds, once per machine)")
            resolved = {f"ringattn[{b}]": resolve_backend(b, inputs) for b in options.backends}
        resolved[report.BASELINE], resolved[COMPILED] = "eager", "inductor"
        ref = _reference(inputs)
        tol, errors, compile_s = TOL[case.dtype], {}, None
        for name, fn in provs.items():
            for t in inputs.out:  # poison: an out= provider that skips a write cannot pass
                t.fill_(math.nan)
            if name == COMPILED:
                progress.show(f"{label}: torch.compile of the naive formula (first call: trace + Inductor compile)")
                torch._dynamo.reset()  # this case's own compile, and no recompile limit (_compiled)
                compile_s, got_all = first_call_seconds(functools.partial(fn, inputs), device)
            else:
                got_all = fn(inputs)
            # Each output is held to its own dtype's tolerance: the statistics are float32 whatever the attention
            # dtype. The table reports the attention output's error (the dtype under test).
            for output, got, want, scale in _checked_outputs(case, name, got_all, ref):
                error, limit = max_error(got.detach().double() / scale, want / scale), TOL[got.dtype]
                if not error <= limit:
                    raise CheckFailure(
                        f"{case.name}: provider {name!r} has max error {error:.3g} in {output} against the float64 "
                        f"reference, above the {got.dtype} tolerance {limit:g}"
                    )
                errors.setdefault(name, error)
        del ref, got_all
        nbytes = bytes_moved(case)
        timed = {name: functools.partial(fn, inputs) for name, fn in provs.items()}
        timed[report.FLOOR] = copy_floor(nbytes, device)
        if options.threads:
            # numba's OpenMP pool resets the process's OpenMP thread count when it first starts (during
            # the check above), which torch reads: restore the requested count before timing.
            set_threads(options.threads)
        synchronize(device)

        def tick(r: int, label: str = label) -> None:
            progress.show(f"{label}: timing round {r + 1}/{options.repeats}", transient=True)

        eager: list[tuple[str, str]] = []
        samples = measure(
            timed, device=device, warmup=options.warmup, repeats=options.repeats, on_repeat=tick, eager_timed=eager
        )
        for name, why in eager:
            progress.show(f"{label}: {name} could not be captured in a CUDA graph ({why}); timed eagerly")
        eager_names = {name for name, _ in eager}
        for name, seconds in samples.items():
            base = name.removesuffix(" out=")
            rows.append(
                report.Row(
                    case=case.name,
                    series=case.series,
                    nbytes=nbytes,
                    provider=name,
                    seconds=seconds,
                    backend=resolved.get(base),
                    max_err=errors.get(name),
                    tol=tol if name in errors else None,
                    fresh_of=base if name.endswith(" out=") else None,
                    timing=_timing(device, eagerly=name in eager_names),
                    compile_s=compile_s if name == COMPILED else None,
                )
            )
        del inputs, timed
    progress.done()
    report.add_ratios(rows)
    return rows
