"""Compare the Triton forward merges (row tiles, flat packs) and their block sizes with the copy floor; needs a GPU.

    PYTHONPATH=src python3 benchmarks/triton_tune.py [--kernel tile,flat] [--flat-block 256,512,1024,2048]
        [--flat-warps 0,4] [--flat-lanes check,each] [--rows 8,16,32] [--warps 4] [--compiled]
        [--sizes 256,1024,4096,16384,65536] [--op update,merge] [--layout SBH,TND] [--dtype float32,bfloat16]
        [--repeats 20] [--json PATH]

Issue 12's question in one run: per bench case (``ringattn.bench.merge.cases``: ``ring_attention_update`` SBH and
per-batch TND with Ascend's 8-lane statistics, ``merge_states`` in the LSE form in vLLM's layout, the sizes of
``ringattn bench --sweep-t`` by default), the default tile kernel (Note [triton row tiles]), every flat configuration
(Note [triton flat merge]: elements per program x warps, 0 = the launcher's choice, and in the stats form with and
without the equal-lanes shortcut), optional tile overrides (``--rows``: rows per program at ``--warps``), optionally
``torch.compile`` of the naive formula, and the copy floor of the same bytes. Each configuration runs the public op
into preallocated outputs (``out=``) with the launcher's kernel and blocks overridden, is checked bitwise against the
default tile kernel (the two kernels compute the same bits) and timed from CUDA graph replays, interleaved with the
floor, in one process (Note [bench timing]). Prints one block per case (microseconds per call, % of the copy floor)
and a summary against issue 12's targets (>= 97 % of the floor from 50 MB moved, >= 90 % from 6 MB, and with
``--compiled`` at least torch.compile's speed). ``--device cpu`` with ``TRITON_INTERPRET=1`` runs tiny shapes through
the interpreter: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from ringattn.backends import triton_cuda
from ringattn.bench._timing import copy_floor, first_call_seconds, measure, median, synchronize
from ringattn.bench.merge import COMPILED, DTYPES, MERGE, SWEEP_T, UPDATE, bytes_moved, cases, make_inputs, providers

TILE = "tile"
FLOOR = "copy"
TARGETS = ((50e6, 97.0), (6e6, 90.0))  # (bytes moved at least, % of the copy floor at least): issue 12


def _targets(nbytes: int) -> float | None:
    return next((pct for least, pct in TARGETS if nbytes >= least), None)


def _with_launch(call, **override):
    """``call`` with ``triton_cuda._launch_merge_rows`` given ``override`` (kernel, blocks, warps) for its duration:
    also while a CUDA graph captures it, so the graph replays that configuration."""
    launch = triton_cuda._launch_merge_rows

    def run(inputs):
        triton_cuda._launch_merge_rows = functools.partial(launch, **override)
        try:
            return call(inputs)
        finally:
            triton_cuda._launch_merge_rows = launch

    return run


def configurations(args: argparse.Namespace, call, stats_form: bool) -> dict[str, object]:
    """Name -> callable on the case's inputs: the default tile kernel first, then the requested variants (the flat
    kernel's equal-lanes shortcut on and off in the stats form; the LSE form has one lane)."""
    configs = {TILE: _with_launch(call, kernel="tile")}
    if "tile" in args.kernel:
        for rows in args.rows:
            configs[f"tile rows={rows} warps={args.warps}"] = _with_launch(
                call, kernel="tile", block_rows=rows, num_warps=args.warps
            )
    if "flat" in args.kernel:
        for lanes in args.flat_lanes if stats_form else ["check"]:
            for block in args.flat_block:
                for warps in args.flat_warps:
                    name = f"flat block={block} warps={warps or 'auto'}" + (" each-lane" if lanes == "each" else "")
                    configs[name] = _with_launch(
                        call, kernel="flat", flat_block=block, num_warps=warps or None, flat_lane_check=lanes == "check"
                    )
    return configs


def _flat_launches(fn, inputs) -> tuple[tuple[torch.Tensor, ...], list]:
    """``fn(inputs)`` and the plan (``triton_cuda.FlatPlan``) of each flat kernel launch it made: a configuration must
    run the kernel it names, and the plan says what it ran (pack width, rows per program, programs, warps)."""
    launch, plans = triton_cuda._launch_merge_flat, []

    def recorded(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map, lse_scale, *overrides):
        stats = [out_m] if out_l is None else [out_m, out_l]
        plans.append(triton_cuda._flat_plan(parts_o, parts_m, parts_l, out_o, *overrides, stats=stats))
        return launch(parts_o, parts_m, parts_l, out_o, out_m, out_l, row_map, lse_scale, *overrides)

    triton_cuda._launch_merge_flat = recorded
    try:
        return fn(inputs), plans
    finally:
        triton_cuda._launch_merge_flat = launch


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_case(case, args: argparse.Namespace, device: torch.device) -> dict:
    inputs = make_inputs(case, device)
    call = providers(["triton"], kinds=("ringattn",), op=case.op)["ringattn[triton] out="]
    configs = configurations(args, call, stats_form=case.op == UPDATE)
    want = [t.clone() for t in configs[TILE](inputs)]
    plans: dict[str, str] = {}
    for name, fn in configs.items():
        for t in inputs.out:
            t.fill_(float("nan"))
        got, flat = _flat_launches(fn, inputs)
        assert bool(flat) == name.startswith("flat"), f"{case.name} {name}: {len(flat)} flat launches"
        if flat:
            p = flat[0]
            check = ", lane check" if p.lane_check else ""
            shape = f"{p.vec}/pack, {p.rows_per_program} rows x {p.programs} programs, {p.num_warps} warps"
            plans[name] = f"[{shape}, {'int32' if p.int32_index else 'int64'}{check}]"
        same = all(torch.equal(_bits(g), _bits(w)) for g, w in zip(got, want, strict=True))
        assert same, f"{case.name} {name}: not bitwise equal to the tile kernel"
    timed = {name: functools.partial(fn, inputs) for name, fn in configs.items()}
    compile_s = None
    if args.compiled:
        torch._dynamo.reset()
        compiled = providers(kinds=(COMPILED,), op=case.op)[COMPILED]
        compile_s, _ = first_call_seconds(functools.partial(compiled, inputs), device)
        timed[COMPILED] = functools.partial(compiled, inputs)
    nbytes = bytes_moved(case)
    timed[FLOOR] = copy_floor(nbytes, device)
    eager: list[tuple[str, str]] = []
    samples = measure(timed, device=device, warmup=args.warmup, repeats=args.repeats, eager_timed=eager)
    floor = median(samples[FLOOR])
    times = {name: median(secs) for name, secs in samples.items()}
    print(f"{case.name}  ({nbytes / 1e6:.1f} MB moved, copy {floor * 1e6:.1f} us)", flush=True)
    best = min((n for n in times if n not in (FLOOR, COMPILED)), key=times.get)
    for name, secs in times.items():
        mark = "  <- fastest merge" if name == best else ""
        extra = f"  (compile {compile_s:.1f} s)" if name == COMPILED and compile_s is not None else ""
        extra += f"  {plans[name]}" if name in plans else ""
        print(f"  {name:<38} {secs * 1e6:9.1f} us  {100 * floor / secs:6.1f}% floor{mark}{extra}")
    if eager:
        print(f"  timed eagerly (not capturable): {eager}")
    del inputs, timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "case": case.name,
        "op": case.op,
        "layout": case.layout,
        "dtype": case.dtype_name,
        "shape": list(case.shape),
        "bytes": nbytes,
        "us": {name: secs * 1e6 for name, secs in times.items()},
        "pct_floor": {name: 100 * floor / secs for name, secs in times.items()},
        "compile_s": compile_s,
        "flat_plans": plans,
        "eager_timed": [name for name, _ in eager],
    }


def _verdict(pct: dict[str, float], name: str | None, target: float | None, compiled: float | None) -> str:
    """``name``'s % of the floor, marked ``ok`` when it meets the target and torch.compile's speed (those known)."""
    if name is None:
        return "-"
    if target is None and compiled is None:
        return f"{pct[name]:5.1f}  "
    ok = (target is None or pct[name] >= target) and (compiled is None or pct[name] >= compiled)
    return f"{pct[name]:5.1f}{'ok' if ok else '  '}"


def summary(results: list[dict]) -> None:
    """One line per case: tile and the best flat configuration against the copy floor, issue 12's targets and (when
    timed) torch.compile."""
    print("\nsummary (% of the copy floor; 'ok': meets issue 12's target for the bytes moved and, with --compiled, is "
          "at least as fast as torch.compile)")  # fmt: skip
    print(f"  {'case':<52} {'MB':>8} {'target':>6} {'tile':>7} {'best flat':>9}  {'config':<36} {'compiled':>8}")
    for r in results:
        pct = r["pct_floor"]
        target = _targets(r["bytes"])
        flats = {n: p for n, p in pct.items() if n.startswith("flat")}
        best = max(flats, key=flats.get) if flats else None
        compiled = pct.get(COMPILED)
        print(
            f"  {r['case']:<52} {r['bytes'] / 1e6:8.1f} {'' if target is None else f'{target:.0f}%':>6} "
            f"{_verdict(pct, TILE, target, compiled):>7} {_verdict(pct, best, target, compiled):>9}  "
            f"{(best or '-').removeprefix('flat '):<36} {'-' if compiled is None else f'{compiled:.1f}':>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def ints(s: str) -> list[int]:
        return [int(v) for v in s.split(",") if v]

    def names(choices):
        def parse(s: str) -> list[str]:
            got = [v.strip() for v in s.split(",") if v.strip()]
            bad = [v for v in got if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"expected values from {', '.join(choices)}, got {', '.join(bad)}")
            return got

        return parse

    parser.add_argument("--kernel", type=names(triton_cuda.MERGE_KERNELS), default=list(triton_cuda.MERGE_KERNELS))
    parser.add_argument("--flat-block", type=ints, default=[256, 512, 1024, 2048], help="flat: elements per program")
    parser.add_argument("--flat-warps", type=ints, default=[0], help="flat: warps per program (0: the launcher's)")
    parser.add_argument(
        "--flat-lanes", type=names(("check", "each")), default=["check", "each"],
        help="flat, stats form: with the equal-lanes shortcut (check) and/or every lane's own weights (each)",
    )  # fmt: skip
    parser.add_argument("--rows", type=ints, default=[], help="tile: extra configurations with these rows/program")
    parser.add_argument("--warps", type=int, default=4, help="tile: warps of the --rows configurations")
    parser.add_argument("--sizes", type=ints, default=list(SWEEP_T), help="first dimension: S (SBH) or T (TND)")
    parser.add_argument("--op", type=names(("update", "merge")), default=["update", "merge"])
    parser.add_argument("--layout", type=names(("SBH", "TND")), default=["SBH", "TND"])
    parser.add_argument("--dtype", type=names(tuple(DTYPES)), default=["float32", "bfloat16"])
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile of the naive formula")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: TRITON_INTERPRET=1 smoke")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (with --device cpu)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    ops = [UPDATE if op == "update" else MERGE for op in args.op]
    grid = cases(
        args.layout, [DTYPES[d] for d in args.dtype], sizes=None if args.quick else args.sizes, quick=args.quick,
        ops=ops,
    )  # fmt: skip
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        print("CPU through the Triton interpreter: a smoke test of this script, not a measurement", flush=True)
    results = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    for case in grid:
        results.append(run_case(case, args, device))
        synchronize(device)
        if args.json:  # after every case, so a run cut short by a time limit still leaves its numbers
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=1)
    summary(results)


if __name__ == "__main__":
    main()
