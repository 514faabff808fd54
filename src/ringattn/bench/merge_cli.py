"""``ringattn bench [merge]``'s command line: options, their checks, the printed table and the JSON / PNG files.

The measurement itself (cases, inputs, providers, checks, timing) is :mod:`ringattn.bench.merge`; this module
only turns arguments into its :class:`~ringattn.bench.merge.Options` and its rows into output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from collections.abc import Callable, Sequence

import torch

from .. import backends
from ..errors import BackendError
from . import report
from ._timing import GRAPH_CALLS, Progress, machine_info, set_threads
from .merge import (
    COMPILED,
    DTYPES,
    MERGE,
    OPS,
    PASSES,
    PROVIDER_KINDS,
    SHAPE_LETTERS,
    SWEEP_T,
    UPDATE,
    CheckFailure,
    Options,
    cases,
    make_inputs,
    resolve_backend,
    run,
)

__all__ = ["build_parser", "main"]


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


_OP_NAMES = {UPDATE: UPDATE, "update": UPDATE, MERGE: MERGE, "merge": MERGE}


def _op(text: str) -> str:
    return _OP_NAMES[text]


def _provider(text: str) -> str:
    if text not in PROVIDER_KINDS:
        raise ValueError(text)
    return text


def _pass(text: str) -> str:
    if text not in PASSES:
        raise ValueError(text)
    return text


def default_passes(device: str) -> list[str]:
    """``--pass`` when not given: the forward, and on CUDA the backward too (issue 12 times both there)."""
    return list(PASSES) if device == "cuda" else [PASSES[0]]


def default_providers(device: str) -> list[str]:
    """``--providers`` when not given: ``compiled`` only on CUDA (an Inductor compile on CPU takes tens of seconds
    per case: ask for it by name there)."""
    return [k for k in PROVIDER_KINDS if k != COMPILED or device == "cuda"]


def _backend(text: str) -> str:
    if text not in backends.BACKEND_NAMES or text == "reference":
        raise ValueError(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringattn bench [merge]",
        description="Time ring_attention_update and merge_states (LSE form, vLLM's layout; fresh outputs and out=) "
        "against the naive eager formula, torch.compile of it, and a copy of the same bytes, in one process. "
        "`ringattn bench ring --help` benchmarks ring attention.",
    )
    dtypes = "comma-separated dtypes from " + ", ".join(DTYPES)
    parser.add_argument(
        "--layout", type=_csv(_layout, "SBH and/or TND"), default=["SBH", "TND"],
        help="comma-separated layouts (default SBH,TND)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", type=_csv(DTYPES.__getitem__, dtypes), default=None,
        help=f"comma-separated dtypes from {', '.join(DTYPES)} (default float32,bfloat16)",
    )  # fmt: skip
    parser.add_argument(
        "--shape", type=_csv(_positive, "positive integers"), default=None,
        help="S,B,N,D for SBH or T,N,D for TND (needs exactly one --layout; default SBH 4096,1,32,128 and TND "
        "16384,16,128, or with --quick SBH 64,2,4,64 and TND 96,2,64)",
    )  # fmt: skip
    parser.add_argument("--sizes", type=_csv(_positive, "positive integers"), default=None,
                        help="sweep the first dimension (S for SBH, T for TND) over these values (default the "
                        "shape's alone, or with --png 1/8, 1/4, 1/2 and 1 times it)")  # fmt: skip
    parser.add_argument(
        "--sweep-t", action="store_true",
        help=f"sweep the first dimension (T for TND, S for SBH) over {', '.join(map(str, SWEEP_T))} "
        "(instead of --sizes)",
    )  # fmt: skip
    parser.add_argument(
        "--op", type=_csv(_op, f"ops from {UPDATE} (update), {MERGE} (merge)"), default=list(OPS),
        help=f"comma-separated forms (default {UPDATE},{MERGE}; {MERGE} runs with layout TND: outputs (T, N, D), "
        "LSE (N, T) as vLLM)",
    )  # fmt: skip
    parser.add_argument(
        "--pass", dest="passes", type=_csv(_pass, "passes from " + ", ".join(PASSES)), default=None,
        help="comma-separated passes: forward (the op), backward (the gradients of its outputs, given random upstream "
        "gradients, with respect to every input; each provider's forward runs once and every timed call is the "
        "backward over that graph) (default forward, or forward,backward with --device cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--providers", type=_csv(_provider, "providers from " + ", ".join(PROVIDER_KINDS)), default=None,
        help="comma-separated providers: ringattn (every --backend, fresh and out=), naive (eager formula), compiled "
        "(torch.compile of it, dynamic=False; its first call is reported apart as its compile time) (default "
        "ringattn,naive, or ringattn,naive,compiled with --device cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", type=_csv(_backend, "backends from auto, torch, cpu, triton"), default=["auto"],
        help="comma-separated backends to time (default auto; also torch, cpu, triton)",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to time on (default cpu)")
    parser.add_argument(
        "--threads", type=_positive, default=None, help="CPU threads for torch and numba (default torch's count)"
    )
    parser.add_argument(
        "--repeats", type=_positive, default=None, help="timed calls per provider (default 7, or 3 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per provider after the check (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument(
        "--png", metavar="PATH",
        help="plot GB/s against size, sweeping sizes unless --sizes is given (needs matplotlib: "
        "pip install 'ringattn[bench]')",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help=f"tiny shapes, few repeats: a smoke run for CI (no %% floor: under {report.FLOOR_MIN_BYTES >> 20} MB)",
    )  # fmt: skip
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
    if args.sweep_t and args.sizes:
        parser.error("--sweep-t: expected no --sizes with it, got --sizes " + ",".join(map(str, args.sizes)))
    grid = cases(
        args.layout, args.dtype or (torch.float32, torch.bfloat16), shape=tuple(args.shape) if args.shape else None,
        sizes=SWEEP_T if args.sweep_t else args.sizes, quick=args.quick, sweep=bool(args.png),
        ops=tuple(dict.fromkeys(args.op)), passes=tuple(dict.fromkeys(args.passes or default_passes(args.device))),
    )  # fmt: skip
    if not grid:
        parser.error(f"--op: expected a layout {MERGE} runs with (TND), got --layout " + ",".join(args.layout))
    return Options(
        cases=grid,
        backends=tuple(dict.fromkeys(args.backend)),
        providers=tuple(dict.fromkeys(args.providers or default_providers(args.device))),
        device=torch.device(args.device),
        warmup=args.warmup if args.warmup is not None else 1,
        repeats=args.repeats or (3 if args.quick else 7),
        seed=args.seed,
        threads=args.threads,
    )


def _notes(options: Options, rows: Sequence[report.Row]) -> list[str]:
    notes = [
        "floor: median time of dst.copy_(src), two uint8 buffers of (bytes moved)/2 each on the same device; "
        f"% floor = copy time / provider time, left out (-) below {report.FLOOR_MIN_BYTES >> 20} MB moved, where "
        "a copy times call and thread wake-up overhead rather than memory bandwidth",
        "bytes moved: both attention inputs + four float32 statistics read, three outputs written, once each; "
        f"{MERGE}: two outputs + two float32 LSEs read, one output + one LSE written; backward: the output "
        "gradients and every input read, every input's gradient written (5 attention tensors, 10 float32 statistics "
        f"tensors or 5 LSEs)",
        "max err: max |got - ref| / (1 + |ref|) of attn_out (merge_states: out) against ringattn.reference "
        "(float64); under tol = allclose; the float32 statistics and LSEs are checked at the float32 tolerance",
        "x naive: naive time / provider time; fresh/out: fresh-output time / out= time of the same backend",
    ]
    if any(case.direction == "backward" for case in options.cases):
        notes.append(
            "backward: torch.autograd.grad of every output (random upstream gradients) with respect to every input, "
            "over one forward graph per provider (retain_graph); max err: the first input's gradient, each gradient "
            "scaled by its reference's largest magnitude, against float64 autograd through ringattn.reference (the "
            "naive formulas credit lane 0 alone: their statistics gradients are compared summed over the lanes)"
        )
    if COMPILED in options.providers:
        notes.append(
            "compiled: torch.compile(naive formula, dynamic=False, fullgraph=True), default Inductor backend, timed "
            "like the others; compile: its first call per case after torch._dynamo.reset() (trace + compile, "
            "Inductor's on-disk cache may shorten it), not part of median or any ratio"
        )
    for name in options.backends if "ringattn" in options.providers else ():
        ran = sorted({row.backend for row in rows if row.provider == f"ringattn[{name}]"} - {None})  # type: ignore[arg-type]
        notes.append(f"ringattn[{name}] ran backend {', '.join(ran)}")
    if options.device.type == "cuda":
        eager = sorted({row.provider for row in rows if row.timing == "cuda eager"})
        notes.append(
            f"cuda: device time per call, from CUDA graph replays of {GRAPH_CALLS} calls (Note [bench timing])"
            + (f"; not capturable, timed as eager calls (host overhead included): {', '.join(eager)}" if eager else "")
        )
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
        report.write_png(args.png, rows, f"merge ops on {meta['machine']['cpu_model']} ({options.device})")
    return 0


def _check_backends(parser: argparse.ArgumentParser, options: Options) -> None:
    """Report an unusable ``--backend`` as an argument error before any timing, on one-token cases."""
    for case in options.cases if "ringattn" in options.providers else ():
        probe = dataclasses.replace(case, shape=(1, *case.shape[1:]), seq_offsets=(0, 1) if case.seq_offsets else None)
        for name in options.backends:
            try:
                resolve_backend(name, make_inputs(probe, options.device), settle=False)
            except BackendError as exc:
                parser.error(f"--backend: {exc}")
