"""``ringattn bench merge``: ``ring_attention_update`` against the naive eager formula and a copy floor.

Per case (layout, dtype, shape) the providers are

* ``ringattn[<backend>]``: ``ring_attention_update(..., backend=<backend>)`` with fresh outputs, exactly
  as a user calls it (validation included); the backend column says which backend really ran;
* ``ringattn[<backend>] out=``: the same into preallocated outputs; its ``fresh/out`` column is the
  fresh-output time over this time;
* ``naive``: the formula as MindSpeed's ``forward_update`` writes it in eager PyTorch (whole-tensor
  ``maximum``, ``exp``, mul, div, add, the scales repeated to the full ``(S, B, H)`` / ``(T, N, D)`` size,
  float32 products, one cast back), plus, for the per-batch TND statistics layout, one precomputed
  gather of the scale rows (the MindSpeed-MM approach);
* ``copy``: the floor, Note [copy floor] in ``_timing.py``.

Each provider's result is checked once against ``ringattn.reference`` (float64) before timing.
Inputs have no empty rows: the naive formula turns them into NaN (SPEC section 7), which would be a
correctness difference, not a speed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch

from .. import backends
from .._contract import validate_update
from ..api import ring_attention_update
from ..errors import BackendError, HardwareLimitError
from ..reference import ring_attention_update_reference
from . import report
from ._timing import Progress, copy_floor, machine_info, measure, set_threads, synchronize

__all__ = ["Case", "cases", "bytes_moved", "make_inputs", "naive_update", "providers", "run", "main"]

# SPEC section 6 (atol = rtol against float64); float64 only differs from the reference in operation order.
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
# TND batches: 4 sequences of unequal lengths, 40/30/20/10 % of T, as a packed batch of real documents.
SEQ_WEIGHTS = (4, 3, 2, 1)
STATS_LANES = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. ``shape`` is ``(S, B, N, D)`` for SBH and ``(T, N, D)`` for TND.

    ``seq_offsets`` is TND's ``actual_seq_qlen`` (cumulative, from 0 to T); statistics use the default
    per-batch layout. ``ascend_limits`` is False when the shape exceeds the Ascend TND limits (then
    ``limit_note`` says why) and the bench lifts them explicitly.
    """

    layout: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    seq_offsets: tuple[int, ...] | None = None
    ascend_limits: bool = True
    limit_note: str = ""

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
    def name(self) -> str:
        return f"{self.layout} {self.dtype_name} {self._dims(False)}"

    @property
    def series(self) -> str:
        """The case name without the swept (first) dimension: one plot panel per series."""
        return f"{self.layout} {self.dtype_name} {self._dims(True)}"


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
    if case.layout != "TND":
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
) -> list[Case]:
    """The shape grid: every layout x dtype x size.

    ``shape`` replaces the default shape (one layout only); ``sizes`` sweeps its first dimension (S for
    SBH, T for TND); ``quick`` starts from tiny shapes for smoke runs.
    """
    out = []
    for layout in layouts:
        base = shape if shape is not None else (QUICK_SHAPES if quick else DEFAULT_SHAPES)[layout]
        for dtype in dtypes:
            for first in sizes or (base[0],):
                dims = (first, *base[1:])
                offsets = default_seq_offsets(first) if layout == "TND" else None
                out.append(_with_limits(Case(layout, dtype, dims, offsets)))
    return out


def bytes_moved(case: Case) -> int:
    """Bytes one merge must read and write at least: each tensor touched exactly once.

    Reads ``prev_attn_out``, ``cur_attn_out`` (``rows * D`` elements of the case dtype each) and the four
    float32 statistics tensors (``rows * 8`` each: the 8 lanes share cache lines, so reading lane 0 costs
    them all); writes ``attn_out``, ``softmax_max``, ``softmax_sum``. TND's per-token index map (int64,
    ``T`` entries) is not counted: it is under 1% of the total for D >= 64.
    """
    elem = torch.empty((), dtype=case.dtype).element_size()
    return case.rows * (3 * case.head_dim * elem + 6 * STATS_LANES * 4)


@dataclasses.dataclass
class Inputs:
    """Inputs of one case on the bench device, plus preallocated outputs and the naive gather index."""

    case: Case
    tensors: tuple[torch.Tensor, ...]  # prev_o, prev_m, prev_l, cur_o, cur_m, cur_l
    seq_qlen: torch.Tensor | None  # int64 on the CPU (ringattn's advice for hot loops)
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    naive_rows: torch.Tensor | None  # TND: (T, N) per-batch statistics row of each (token, head)


def _per_batch_rows(offsets: Sequence[int], heads: int, device: torch.device) -> torch.Tensor:
    """Row of the ``(T*N, 8)`` statistics view holding (token, head), per batch (SPEC section 4)."""
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

    prev_o, cur_o = attn(), attn()
    tensors = (prev_o, stats(0, 4, True), stats(1, 63, False), cur_o, stats(0, 4, True), stats(1, 63, False))
    out = (torch.empty_like(prev_o), torch.empty_like(tensors[1]), torch.empty_like(tensors[1]))
    offsets = case.seq_offsets
    return Inputs(
        case=case,
        tensors=tensors,
        seq_qlen=torch.tensor(offsets, dtype=torch.int64) if offsets is not None else None,
        out=out,
        naive_rows=_per_batch_rows(offsets, case.heads, device) if offsets is not None else None,
    )


def naive_update(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC section 3 as eager whole-tensor ops, written the way MindSpeed's ``forward_update`` does."""
    prev_o, prev_m, prev_l, cur_o, cur_m, cur_l = inputs.tensors
    softmax_max = torch.maximum(prev_m, cur_m)
    prev_scaled = prev_l * torch.exp(prev_m - softmax_max)
    cur_scaled = cur_l * torch.exp(cur_m - softmax_max)
    softmax_sum = prev_scaled + cur_scaled
    prev_scale = prev_scaled / softmax_sum
    cur_scale = cur_scaled / softmax_sum
    if inputs.case.layout == "SBH":  # (B, N, S, 8) -> (S, B, N*D), materialised as MindSpeed does
        head_dim = inputs.case.head_dim

        def spread(scale: torch.Tensor) -> torch.Tensor:
            full = scale[..., 0].unsqueeze(3).repeat(1, 1, 1, head_dim)
            return full.permute(2, 0, 1, 3).flatten(2).contiguous()

    else:  # (T, N, 8) per batch -> (T, N, D) through the precomputed row gather
        tokens, heads, head_dim = inputs.case.shape

        def spread(scale: torch.Tensor) -> torch.Tensor:
            rows = scale.reshape(tokens * heads, STATS_LANES)[:, 0][inputs.naive_rows]
            return rows.unsqueeze(2).repeat(1, 1, head_dim)

    out = prev_o.to(torch.float32) * spread(prev_scale) + cur_o.to(torch.float32) * spread(cur_scale)
    return out.to(prev_o.dtype), softmax_max, softmax_sum


Provider = Callable[[Inputs], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def providers(backend_names: Sequence[str] = ("auto",)) -> dict[str, Provider]:
    """Provider name -> callable on :class:`Inputs`, for each requested backend plus ``naive``.

    The copy floor is not a provider (it computes nothing to check); ``run`` times it alongside.
    """

    def fresh(backend: str) -> Provider:
        def call(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            c = inputs.case
            return ring_attention_update(
                *inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits, backend=backend
            )

        return call

    def into_out(backend: str) -> Provider:
        def call(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            c = inputs.case
            return ring_attention_update(
                *inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits, backend=backend,
                out=inputs.out,
            )  # fmt: skip

        return call

    table: dict[str, Provider] = {}
    for name in backend_names:
        table[f"ringattn[{name}]"] = fresh(name)
        table[f"ringattn[{name}] out="] = into_out(name)
    table[report.BASELINE] = naive_update
    return table


def resolve_backend(name: str, inputs: Inputs) -> str:
    """The backend ``name`` really runs for ``inputs`` (``auto`` resolved); raises BackendError."""
    c = inputs.case
    problem = validate_update(*inputs.tensors, inputs.seq_qlen, c.layout, ascend_limits=c.ascend_limits)
    module = backends.select(name, problem)
    return getattr(module, "NAME", module.__name__.rsplit(".", 1)[-1])


def max_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """``max |got - ref| / (1 + |ref|)`` over all outputs; below tol iff allclose(atol=rtol=tol). NaN -> inf."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        g = g.to(device=r.device, dtype=torch.float64)
        err = (g - r).abs() / (1 + r.abs())
        err = torch.where(torch.isnan(g) & torch.isnan(r), 0.0, err).nan_to_num(nan=math.inf)
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return worst


class CheckFailure(Exception):
    """A provider disagrees with the float64 reference beyond the dtype's tolerance."""


@dataclasses.dataclass(frozen=True)
class Options:
    cases: list[Case]
    backends: tuple[str, ...] = ("auto",)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    warmup: int = 1
    repeats: int = 7
    seed: int = 0
    threads: int | None = None


def run(options: Options, progress: Progress | None = None) -> list[report.Row]:
    """Check, then time, every provider and the copy floor on every case; rows with ratios filled."""
    progress = progress or Progress(enabled=False)
    device, rows = options.device, []
    for index, case in enumerate(options.cases):
        label = f"[{index + 1}/{len(options.cases)}] {case.name}"
        progress.show(f"{label}: checking")
        inputs = make_inputs(case, device, options.seed)
        provs = providers(options.backends)
        resolved = {f"ringattn[{b}]": resolve_backend(b, inputs) for b in options.backends}
        ref = ring_attention_update_reference(
            *(t.cpu() for t in inputs.tensors), list(case.seq_offsets or ()), case.layout
        )
        tol, errors = TOL[case.dtype], {}
        for name, fn in provs.items():
            for t in inputs.out:  # poison: an out= provider that skips a write cannot pass
                t.fill_(math.nan)
            errors[name] = max_error(fn(inputs), ref)
            if not errors[name] <= tol:
                raise CheckFailure(
                    f"{case.name}: provider {name!r} has max error {errors[name]:.3g} against the float64 "
                    f"reference, above the {case.dtype_name} tolerance {tol:g} (SPEC section 6)"
                )
        del ref
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

        samples = measure(timed, device=device, warmup=options.warmup, repeats=options.repeats, on_repeat=tick)
        for name, seconds in samples.items():
            base = name.removesuffix(" out=")
            rows.append(
                report.Row(
                    case=case.name,
                    series=case.series,
                    nbytes=nbytes,
                    provider=name,
                    seconds=seconds,
                    backend=resolved.get(base, "eager" if name == report.BASELINE else None),
                    max_err=errors.get(name),
                    tol=tol if name in errors else None,
                    fresh_of=base if name.endswith(" out=") else None,
                )
            )
        del inputs, timed
    progress.done()
    report.add_ratios(rows)
    return rows


def _csv(convert: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [convert(part.strip()) for part in text.split(",") if part.strip()]
        except (KeyError, ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from exc
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _layout(text: str) -> str:
    if text.upper() not in SHAPE_LETTERS:
        raise ValueError(text)
    return text.upper()


def _backend(text: str) -> str:
    if text not in backends.BACKEND_NAMES or text == "reference":
        raise ValueError(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringattn bench [merge]",
        description="Time ring_attention_update (fresh outputs and out=) against the naive eager formula and a "
        "copy of the same bytes, in one process. `ringattn bench ring --help` benchmarks ring attention.",
    )
    dtypes = "comma-separated dtypes from " + ", ".join(DTYPES)
    parser.add_argument("--layout", type=_csv(_layout, "SBH and/or TND"), default=["SBH", "TND"], help="SBH,TND")
    parser.add_argument("--dtype", type=_csv(DTYPES.__getitem__, dtypes), default=None, help="default float32,bfloat16")
    parser.add_argument(
        "--shape", type=_csv(_positive, "positive integers"), default=None,
        help="S,B,N,D for SBH or T,N,D for TND (needs exactly one --layout)",
    )  # fmt: skip
    parser.add_argument("--sizes", type=_csv(_positive, "positive integers"), default=None,
                        help="sweep the first dimension (S for SBH, T for TND) over these values")  # fmt: skip
    parser.add_argument(
        "--backend", type=_csv(_backend, "backends from auto, torch, cpu, triton"), default=["auto"],
        help="comma-separated backends to time (default auto; also torch, cpu, triton)",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (and numba)")
    parser.add_argument("--repeats", type=_positive, default=None, help="timed calls per provider (default 7)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per provider after the check (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--png", metavar="PATH", help="plot GB/s against size (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run for CI")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    if args.shape is not None:
        if len(args.layout) != 1:
            parser.error("--shape: expected exactly one --layout, got " + ",".join(args.layout))
        want = len(SHAPE_LETTERS[args.layout[0]])
        if len(args.shape) != want:
            parser.error(f"--shape: expected {want} values ({','.join(SHAPE_LETTERS[args.layout[0]])}) "
                         f"for layout {args.layout[0]}, got {len(args.shape)}")  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected an available device, got cuda (torch.cuda.is_available() is False)")
    if args.png and report.png_unavailable_reason():
        parser.error(report.png_unavailable_reason())
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup: expected a non-negative integer, got {args.warmup}")
    grid = cases(
        args.layout, args.dtype or (torch.float32, torch.bfloat16), shape=tuple(args.shape) if args.shape else None,
        sizes=args.sizes, quick=args.quick,
    )  # fmt: skip
    return Options(
        cases=grid,
        backends=tuple(dict.fromkeys(args.backend)),
        device=torch.device(args.device),
        warmup=args.warmup if args.warmup is not None else 1,
        repeats=args.repeats or (3 if args.quick else 7),
        seed=args.seed,
        threads=args.threads,
    )


def _notes(options: Options, rows: Sequence[report.Row]) -> list[str]:
    notes = [
        "floor: median time of dst.copy_(src), two uint8 buffers of (bytes moved)/2 each on the same device; "
        "% floor = copy time / provider time",
        "bytes moved: both attention inputs + four float32 statistics read, three outputs written, once each",
        "max err: max |got - ref| / (1 + |ref|) against ringattn.reference (float64); under tol = allclose",
        "x naive: naive time / provider time; fresh/out: fresh-output time / out= time of the same backend",
    ]
    for name in options.backends:
        ran = sorted({row.backend for row in rows if row.provider == f"ringattn[{name}]"} - {None})  # type: ignore[arg-type]
        notes.append(f"ringattn[{name}] ran backend {', '.join(ran)}")
    for case in options.cases:
        if not case.ascend_limits:
            notes.append(f"{case.name}: run with ascend_limits=False ({case.limit_note})")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    """``ringattn bench [merge]``: returns the exit status (2 for a bad argument, 1 for a failed check)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        if args.threads:
            set_threads(args.threads)
        options = _options(parser, args)
        _check_backends(parser, options)
    except SystemExit as exc:  # argparse reports and exits; the CLI wants a status
        return int(exc.code or 0)
    try:
        rows = run(options, Progress(enabled=not args.no_progress))
    except CheckFailure as exc:
        print(f"ringattn bench: correctness check failed: {exc}", file=sys.stderr)
        return 1
    notes = _notes(options, rows)
    print(report.format_table(rows))
    print()
    print("\n".join(notes))
    meta = {
        "command": "ringattn bench " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(options.device),
        "warmup": options.warmup,
        "repeats": options.repeats,
        "seed": options.seed,
        "notes": notes,
    }
    if args.json:
        report.write_json(args.json, meta, rows)
    if args.png:
        report.write_png(args.png, rows, f"ring_attention_update on {meta['machine']['cpu_model']} ({options.device})")
    return 0


def _check_backends(parser: argparse.ArgumentParser, options: Options) -> None:
    """Report an unusable ``--backend`` as an argument error before any timing, on one-token cases."""
    for case in options.cases:
        probe = dataclasses.replace(case, shape=(1, *case.shape[1:]), seq_offsets=(0, 1) if case.seq_offsets else None)
        for name in options.backends:
            try:
                resolve_backend(name, make_inputs(probe, options.device))
            except BackendError as exc:
                parser.error(f"--backend: {exc}")
