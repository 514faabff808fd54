"""``ringattn bench``: the command runs, reports every provider and case, checks correctness, rejects bad
arguments. Nothing here asserts a timing: only that figures exist, are positive and errors are in tolerance
(the contract's per-dtype tolerances, which the bench itself applies)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import pytest
import torch

from ringattn import bench
from ringattn.bench import merge, merge_cli, report, ring

QUICK_CASES = {case.name for case in merge.cases(quick=True, ops=merge.OPS)}
AUTO_PROVIDERS = {"ringattn[auto]", "ringattn[auto] out=", "naive", "copy"}
# One case, one timed round: for tests that only need the command to complete.
ONE_CASE = ["--quick", "--layout", "TND", "--op", "update", "--dtype", "bf16", "--repeats", "1", "--warmup", "0"]
ONE_CASE += ["--no-progress"]


def test_quick_json_has_every_case_and_provider(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(path), "--no-progress"]) == 0
    data = json.loads(path.read_text())
    results = data["results"]
    assert {r["case"] for r in results} == QUICK_CASES
    assert any(name.startswith("merge_states TND/NT ") for name in QUICK_CASES)  # both forms by default
    for case in QUICK_CASES:
        assert {r["provider"] for r in results if r["case"] == case} == AUTO_PROVIDERS
    for r in results:
        assert len(r["seconds"]) == data["meta"]["repeats"]
        assert all(s > 0 for s in r["seconds"]), r
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["nbytes"] > 0, r
        assert r["pct_floor"] is None, r  # tiny cases: a copy of them times overhead, not bandwidth
        assert r["compile_s"] is None, r  # no compiled provider unless asked for on CPU
        if r["provider"] == "copy":
            assert r["max_err"] is None
        else:
            assert r["speedup_vs_naive"] > 0, r
            assert 0 <= r["max_err"] <= r["tol"], r
            assert r["backend"] in {"torch", "cpu", "triton", "eager"}, r
        if r["provider"].endswith(" out="):
            assert r["fresh_over_out"] > 0, r
    assert data["meta"]["machine"]["cpu_cores"] >= 1
    table = capsys.readouterr().out
    assert all(name in table for name in QUICK_CASES)


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="--png needs matplotlib (extra 'bench')")
    path, json_path = tmp_path / "bench.png", tmp_path / "bench.json"
    assert bench.main([*ONE_CASE, "--png", str(path), "--json", str(json_path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A plot sweeps sizes: T = 96 / 8, / 4, / 2, / 1 for the quick TND case.
    sizes = {r["case"] for r in json.loads(json_path.read_text())["results"]}
    assert len(sizes) == len(merge.SWEEP_FRACTIONS)


def test_png_without_matplotlib_is_an_argument_error_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    assert bench.main([*ONE_CASE, "--png", "x.png"]) == 2
    assert "--png needs matplotlib: pip install 'ringattn[bench]'" in capsys.readouterr().err


def test_floor_ratio_only_for_cases_large_enough_to_measure_bandwidth():
    def row(provider, nbytes, seconds):
        return report.Row(
            case=f"c{nbytes}", series="s", nbytes=nbytes, provider=provider, seconds=[seconds], backend=None,
            max_err=None, tol=None, fresh_of=None, timing="host clock",
        )  # fmt: skip

    big, small = report.FLOOR_MIN_BYTES, report.FLOOR_MIN_BYTES - 1
    rows = [row("copy", big, 1.0), row("x", big, 2.0), row("copy", small, 1.0), row("x", small, 2.0)]
    report.add_ratios(rows)
    assert [r.pct_floor for r in rows] == [100.0, 50.0, None, None]


def test_help_states_defaults(capsys):
    assert bench.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in (
        "(default SBH,TND)",
        "(default float32,bfloat16)",
        "(default 7, or 3 with --quick)",
        "(default 0)",
        "(default ringattn,naive, or ringattn,naive,compiled with --device cuda)",
        "(default ring_attention_update,merge_states;",
        "(default forward, or forward,backward with --device cuda)",
    ):
        assert fragment in text, fragment


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--dtype", "float8"], "--dtype: expected comma-separated dtypes"),
        (["--layout", "BSND"], "--layout: expected SBH and/or TND"),
        (["--backend", "nope"], "--backend: expected backends from"),
        (["--repeats", "0"], "--repeats"),
        (["--shape", "64,2,4,64"], "--shape: expected exactly one --layout"),
        (["--layout", "SBH", "--shape", "64,4,64"], "--shape: expected 4 values (S,B,N,D)"),
        (["--device", "tpu"], "--device: invalid choice"),
        (["--providers", "ringattn,fast"], "--providers: expected providers from ringattn, naive, compiled"),
        (["--op", "attention"], "--op: expected ops from ring_attention_update (update), merge_states (merge)"),
        (["--sweep-t", "--sizes", "64"], "--sweep-t: expected no --sizes with it, got --sizes 64"),
        (["--op", "merge", "--layout", "SBH"], "--op: expected a layout merge_states runs with (TND)"),
        (["--pass", "sideways"], "--pass: expected passes from forward, backward"),
    ],
)
def test_bad_argument_is_a_clear_argparse_error(argv, fragment, capsys):
    assert bench.main(["merge", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage: ringattn bench" in err
    assert fragment in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_without_cuda_is_an_argument_error(capsys):
    assert bench.main(["--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_providers_are_timed_from_graph_replays(tmp_path):
    """Every CUDA provider (ours fresh and out=, naive, compiled, copy) is captured: device times, not host
    overhead; compiled is there by default on CUDA, its compile time apart."""
    path = tmp_path / "cuda.json"
    argv = ["--device", "cuda", "--quick", "--backend", "auto,torch", "--pass", "forward", "--json", str(path)]
    assert bench.main(argv) == 0
    rows = json.loads(path.read_text())["results"]
    assert {r["provider"] for r in rows} >= {"ringattn[auto]", "ringattn[auto] out=", "naive", "compiled", "copy"}
    assert all(r["compile_s"] > 0 and r["max_err"] <= r["tol"] for r in rows if r["provider"] == "compiled")
    assert {r["timing"] for r in rows} == {"cuda graph"}, [(r["provider"], r["timing"]) for r in rows]
    assert {r["backend"] for r in rows if r["provider"].startswith("ringattn[auto]")} == {"triton"}


def test_wrong_provider_fails_the_check(monkeypatch, capsys):
    naive = merge.naive_update

    def off_by_a_little(inputs):
        out, m, l = naive(inputs)
        return out + 0.1, m, l

    monkeypatch.setattr(merge, "naive_update", off_by_a_little)
    assert bench.main(ONE_CASE) == 1
    err = capsys.readouterr().err
    assert "correctness check failed" in err and "'naive'" in err and "tolerance 0.005" in err


@pytest.mark.parametrize(("op", "layout"), [(merge.UPDATE, "SBH"), (merge.UPDATE, "TND"), (merge.MERGE, "TND")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_moved_counts_every_tensor_once(op, layout, dtype):
    (case,) = merge.cases([layout], [dtype], quick=True, ops=[op])
    inputs = merge.make_inputs(case, torch.device("cpu"))
    touched = [*inputs.tensors, *inputs.out]
    assert merge.bytes_moved(case) == sum(t.numel() * t.element_size() for t in touched)


def test_default_cases_and_sequence_split():
    assert merge.cases() == merge.cases(ops=[merge.UPDATE])  # library default: the stats form alone
    grid = merge.cases(ops=merge.OPS)
    assert [(c.op, c.layout, c.dtype, c.shape) for c in grid] == [
        (merge.UPDATE, "SBH", torch.float32, (4096, 1, 32, 128)),
        (merge.UPDATE, "SBH", torch.bfloat16, (4096, 1, 32, 128)),
        (merge.UPDATE, "TND", torch.float32, (16384, 16, 128)),
        (merge.UPDATE, "TND", torch.bfloat16, (16384, 16, 128)),
        (merge.MERGE, "TND", torch.float32, (16384, 16, 128)),
        (merge.MERGE, "TND", torch.bfloat16, (16384, 16, 128)),
    ]
    assert all(c.seq_offsets is None for c in grid if c.op == merge.MERGE)  # vLLM's layout has no batches
    assert all(c.ascend_limits for c in grid)  # N=16, D=128 is inside the Ascend TND bound
    offsets = grid[2].seq_offsets
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert offsets[0] == 0 and offsets[-1] == 16384 and len(set(lengths)) == 4 and min(lengths) > 0


def test_shapes_beyond_ascend_limits_lift_them_and_say_so():
    update, lse_form = merge.cases(["TND"], [torch.float32], shape=(8, 64, 128), ops=merge.OPS)
    assert not update.ascend_limits and "ascend_limits=False" in update.limit_note
    assert lse_form.op == merge.MERGE and lse_form.ascend_limits  # merge_states has no Ascend limits


def test_sizes_sweep_the_first_dimension():
    grid = merge.cases(["SBH"], [torch.float32], shape=(8, 1, 2, 64), sizes=[16, 32])
    assert [c.shape for c in grid] == [(16, 1, 2, 64), (32, 1, 2, 64)]
    assert len({c.series for c in grid}) == 1 and len({c.name for c in grid}) == 2


def test_naive_formula_matches_reference_on_per_batch_tnd():
    # The naive provider must read the per-batch statistics layout, or its speedups compare unequal work.
    (case,) = merge.cases(["TND"], [torch.float32], shape=(37, 3, 64), ops=[merge.UPDATE])
    inputs = merge.make_inputs(case, torch.device("cpu"), seed=3)
    ref = merge.ring_attention_update_reference(*inputs.tensors, list(case.seq_offsets), "TND")
    for got, want in zip(merge.naive_update(inputs), ref, strict=True):
        assert merge.max_error(got, want) <= merge.TOL[torch.float32]
    shuffled = merge.naive_update(merge.dataclasses.replace(inputs, naive_rows=inputs.naive_rows.flip(0)))
    assert merge.max_error(shuffled[0], ref[0]) > 1e-2


def test_max_error_treats_unexpected_nan_as_infinite():
    ref = torch.tensor([1.0, math.nan], dtype=torch.float64)
    assert merge.max_error(torch.tensor([1.0, math.nan]), ref) == 0
    assert merge.max_error(torch.tensor([math.nan, math.nan]), ref) == math.inf


# The fused CPU kernel in float64 compiles a kernel of its own (~20 s): in the `slow` run.
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.slow)])
def test_float64_case_checks_float32_statistics_at_their_own_tolerance(backend):
    # float64 attention comes with float32 statistics: holding those to 1e-12 failed every backend.
    grid = merge.cases(["TND", "SBH"], [torch.float64], quick=True, ops=merge.OPS)  # merge_states too
    options = merge.Options(cases=grid, repeats=1, warmup=0, backends=(backend,))
    rows = merge.run(options)
    checked = [row for row in rows if row.max_err is not None]
    assert checked and all(row.max_err <= merge.TOL[torch.float64] for row in checked)


@pytest.mark.parametrize(
    ("argv", "module", "rest"),
    [
        (["ring", "--world-size", "2"], "ring", ["--world-size", "2"]),
        (["merge", "--quick"], "merge_cli", ["--quick"]),
        (["--quick"], "merge_cli", ["--quick"]),  # merge is the default
        ([], "merge_cli", []),
    ],
)
def test_subcommand_is_dispatched_lazily_to_its_command_line_module(monkeypatch, argv, module, rest):
    seen = []
    fake = types.ModuleType(f"ringattn.bench.{module}")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, f"ringattn.bench.{module}", fake)
    assert bench.main(argv) == 0
    assert seen == [rest]


RING_TINY = ["--seq-len", "16", "--heads", "1", "--head-dim", "8", "--repeats", "1"]


def _fake_measure(calls: list, failing: str | None = None):
    """``ring.measure`` without spawning: records the providers asked for; ``failing`` gets an error row."""

    def measure(case, providers):
        calls.append(providers)
        rows = [{"provider": "single", "median_s": 2.0, "max_abs_diff": 0.0, "threads": 2}]
        for name in providers[1:]:
            if name == failing:
                rows.append({"provider": name, "error": "boom"})
            else:
                rows.append({"provider": name, "median_s": 1.0, "max_abs_diff": 1e-7, "threads": 1})
        for row in rows:
            if "median_s" in row:
                row["speedup_vs_single"] = ring.speedup(2.0, row["median_s"])
        return rows

    return measure


def test_missing_ring_peer_is_left_out_of_the_defaults_with_a_note_not_a_failed_row(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ring_attention_pytorch", None)  # import raises ModuleNotFoundError
    calls: list = []
    monkeypatch.setattr(ring, "measure", _fake_measure(calls))
    assert bench.main(["ring", *RING_TINY]) == 0
    out = capsys.readouterr().out
    assert calls == [("single", "ringattn")]
    assert "ring-attention-pytorch: not installed, left out (pip install 'ringattn[peers]'" in out
    assert "failed" not in out
    assert ring.default_providers() == ("single", "ringattn") and not ring.installed(ring.PEER)
    monkeypatch.setitem(sys.modules, "ring_attention_pytorch", types.ModuleType("ring_attention_pytorch"))
    assert ring.default_providers() == ring.PROVIDERS and ring.installed(ring.PEER)
    assert ring.default_providers(documents=3) == ("single", "single-mask", "ringattn")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--providers", "single,ring-attention-pytorch"],
         "--providers: ring-attention-pytorch is not installed; install it with pip install 'ringattn[peers]'"),
        (["--providers", "single,fast"],
         "--providers: expected providers from single, ringattn, ring-attention-pytorch, got 'single,fast'"),
        (["--providers", ","],
         "--providers: expected providers from single, ringattn, ring-attention-pytorch, got ','"),
        (["--documents", "3", "--providers", "ringattn,ring-attention-pytorch"],
         "--providers: expected providers from single, single-mask, ringattn with --documents"),
    ],
)  # fmt: skip
def test_bad_ring_provider_is_an_argument_error_with_status_2(monkeypatch, capsys, argv, fragment):
    monkeypatch.setitem(sys.modules, "ring_attention_pytorch", None)
    monkeypatch.setattr(ring, "measure", _fake_measure([]))
    assert bench.main(["ring", *RING_TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert "usage: ringattn bench ring" in err and fragment in err


def test_a_failing_ring_provider_makes_the_command_exit_1(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(ring, "measure", _fake_measure(calls, failing="ringattn"))
    assert bench.main(["ring", *RING_TINY, "--providers", "ringattn"]) == 1
    captured = capsys.readouterr()
    assert calls == [("single", "ringattn")]  # single is the baseline of every ratio: always run
    assert "ringattn                  failed: boom" in captured.out
    assert "ringattn bench ring: 1 provider(s) failed: ringattn" in captured.err


def test_ring_table_ratio_reads_as_the_merge_tables_higher_is_faster(monkeypatch, capsys):
    """``x single`` (ring) and ``x naive`` (merge) are both the baseline's time over the provider's."""
    monkeypatch.setattr(ring, "measure", _fake_measure([]))
    assert bench.main(["ring", *RING_TINY, "--providers", "single,ringattn"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("ringattn "))
    assert line.split()[1:3] == ["1.000", "2.00"]  # 1 s against single's 2 s: 2x faster
    assert "x single: single time / provider time (higher = faster; as x naive in `ringattn bench`)" in out
    rows = [
        report.Row(case="c", series="s", nbytes=1, provider=name, seconds=[seconds])
        for name, seconds in (("naive", 2.0), ("ringattn[cpu]", 1.0))
    ]
    report.add_ratios(rows)
    assert rows[1].speedup_vs_naive == 2.0 == ring.speedup(2.0, 1.0)


def test_missing_ring_peer_is_an_error_row_of_measure(monkeypatch):
    """Called as a function (not the command), ``measure`` reports a peer it cannot import as a row, not a crash."""
    monkeypatch.setitem(sys.modules, "ring_attention_pytorch", None)
    single, peer = ring.measure(
        ring.Case(seq_len=16, heads=1, head_dim=8, repeats=1), ("single", "ring-attention-pytorch")
    )
    assert single["provider"] == "single" and single["median_s"] > 0
    assert (
        peer["provider"] == "ring-attention-pytorch" and ring.PEER_INSTALL in peer["error"] and "median_s" not in peer
    )


@pytest.mark.parametrize(("cores", "world", "threads"), [({0, 1}, 3, 2), (set(range(8)), 3, 3), ({0}, 2, 1)])
def test_single_runs_and_reports_one_thread_per_rank_at_most_one_per_core(monkeypatch, cores, world, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    before = torch.get_num_threads()
    (row,) = ring.measure(ring.Case(world_size=world, seq_len=4 * world, heads=1, head_dim=8, repeats=1), ("single",))
    assert row["threads"] == threads and torch.get_num_threads() == before


def test_bench_ring_virtual_reports_the_decomposition_cost(capsys):
    """``bench ring --virtual``: single SDPA and the virtual ring per block kernel, grads compared once; a block
    kernel that cannot run here (cudnn on CPU) is a failed row and the command's status is 1."""
    argv = ["ring", "--virtual", "--world-size", "2", "--seq-len", "16", "--heads", "2", "--kv-heads", "1"]
    assert bench.main([*argv, "--head-dim", "8", "--repeats", "1", "--impls", "auto,torch,cudnn"]) == 1
    captured = capsys.readouterr()
    rows = ring.measure_virtual(ring.Case(world_size=2, seq_len=16, heads=2, head_dim=8, repeats=1, kv_heads=1))
    assert [r["provider"] for r in rows] == ["single (SDPA)", "virtual ring W=2 (auto)"]
    assert rows[1]["max_abs_diff"] < 1e-4
    assert rows[1]["speedup_vs_single"] == pytest.approx(rows[0]["median_s"] / rows[1]["median_s"])
    out = captured.out
    assert "virtual ring W=2 (torch)" in out and "virtual ring W=2 (cudnn)  failed: BackendError" in out
    assert "1 provider(s) failed: virtual ring W=2 (cudnn)" in captured.err


def test_naive_merge_matches_reference_in_vllm_layout():
    # merge_states cases: outputs (T, N, D), LSE (N, T). T != N so that reading the LSE as (T, N) cannot pass.
    (case,) = merge.cases(["TND"], [torch.float32], shape=(37, 3, 64), ops=[merge.MERGE])
    inputs = merge.make_inputs(case, torch.device("cpu"), seed=3)
    o_a, lse_a, o_b, lse_b = inputs.tensors
    assert o_a.shape == (37, 3, 64) and lse_a.shape == (3, 37)
    ref = merge._reference(inputs)
    assert ref[1].shape == (3, 37)
    for got, want in zip(merge.naive_merge(inputs), ref, strict=True):
        assert merge.max_error(got, want) <= merge.TOL[torch.float32]
    swapped = merge.naive_merge_formula(o_a, lse_b, o_b, lse_a)  # each part weighted by the other's LSE
    assert merge.max_error(swapped[0], ref[0]) > 1e-2


def test_compiled_provider_is_checked_and_its_compile_time_reported_apart(tmp_path, capsys):
    """One real torch.compile (Inductor, C++ on CPU) of the LSE-form formula on one tiny case."""
    path = tmp_path / "compiled.json"
    argv = ["--quick", "--layout", "TND", "--op", "merge", "--dtype", "fp32", "--backend", "torch", "--repeats", "2"]
    assert bench.main([*argv, "--warmup", "0", "--providers", "ringattn,naive,compiled", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = {r["provider"]: r for r in data["results"]}
    assert set(rows) == {"ringattn[torch]", "ringattn[torch] out=", "naive", "compiled", "copy"}
    compiled = rows["compiled"]
    assert compiled["backend"] == "inductor" and 0 <= compiled["max_err"] <= compiled["tol"] == 1e-4
    assert compiled["compile_s"] > 0 and len(compiled["seconds"]) == 2 and compiled["speedup_vs_naive"] > 0
    assert all(r["compile_s"] is None for name, r in rows.items() if name != "compiled")
    out = capsys.readouterr().out
    assert " compile " in out.splitlines()[0] and "compiled: torch.compile(naive formula, dynamic=False" in out


class _FakeCompile:
    """Stands in for ``torch.compile``: records its arguments, returns the function (optionally altered)."""

    def __init__(self, alter=None):
        self.calls, self.kwargs, self.alter = 0, [], alter

    def __call__(self, fn, **kwargs):
        self.kwargs.append((fn, kwargs))

        def compiled(*args):
            self.calls += 1
            out = fn(*args)
            return self.alter(out) if self.alter else out

        return compiled


def test_compiled_provider_times_its_first_call_apart_in_both_forms(monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setattr(merge, "first_call_seconds", lambda fn, device: (1234.5, fn()))  # a recognisable value
    grid = merge.cases(["SBH", "TND"], [torch.float32], quick=True, ops=merge.OPS)
    options = merge.Options(cases=grid, providers=("naive", "compiled"), warmup=1, repeats=2)
    rows = merge.run(options)
    compiled = [r for r in rows if r.provider == "compiled"]
    assert [r.case for r in compiled] == [c.name for c in grid] and len(grid) == 3  # SBH, TND, merge_states TND
    for row in compiled:
        assert row.compile_s == 1234.5 and len(row.seconds) == 2 and 1234.5 not in row.seconds
        assert row.median_s == merge.report.median(row.seconds) and row.max_err <= row.tol
    assert all(r.compile_s is None for r in rows if r.provider != "compiled")
    # The naive formula of each form, static shapes, one graph; each case: check + warm-up + repeats, no extra call.
    assert {fn for fn, _ in fake.kwargs} == {merge.naive_update_formula, merge.naive_merge_formula}
    assert all(kw == {"dynamic": False, "fullgraph": True} for _, kw in fake.kwargs)
    assert fake.calls == len(grid) * (1 + 1 + 2)


def test_wrong_compiled_provider_fails_the_check(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", _FakeCompile(alter=lambda out: (out[0] + 0.1, *out[1:])))
    assert bench.main([*ONE_CASE, "--providers", "naive,compiled"]) == 1
    err = capsys.readouterr().err
    assert "correctness check failed" in err and "'compiled'" in err and "attn_out" in err


def test_sweep_t_and_cuda_defaults(monkeypatch):
    parser = merge_cli.build_parser()
    cpu = merge_cli._options(parser, parser.parse_args(["--sweep-t", "--op", "merge", "--dtype", "bf16"]))
    assert [c.shape[0] for c in cpu.cases] == list(merge.SWEEP_T) and cpu.providers == ("ringattn", "naive")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # _options only checks that CUDA exists
    cuda = merge_cli._options(parser, parser.parse_args(["--device", "cuda", "--sweep-t"]))
    assert cuda.providers == ("ringattn", "naive", "compiled")
    assert {c.shape[0] for c in cuda.cases} == set(merge.SWEEP_T)
    assert {(c.op, c.layout) for c in cuda.cases} == {
        (merge.UPDATE, "SBH"),
        (merge.UPDATE, "TND"),
        (merge.MERGE, "TND"),
    }
    # Issue 12: forward and backward on CUDA by default; the forward alone on CPU.
    assert {c.direction for c in cuda.cases} == {merge.FORWARD, merge.BACKWARD}
    assert {c.direction for c in cpu.cases} == {merge.FORWARD}


def test_backend_that_fails_inside_merge_states_is_an_argument_error(monkeypatch, capsys):
    # merge_states(backend="triton") on CPU without the interpreter fails inside Triton with a RuntimeError (no
    # driver); the bench turns such a failure of its probe call into an error naming --backend.
    def no_driver(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(merge, "merge_states", no_driver)
    argv = ["--quick", "--layout", "TND", "--op", "merge", "--dtype", "fp32", "--backend", "torch", "--no-progress"]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: ringattn bench" in err
    assert "--backend: backend: expected a backend that runs merge_states on cpu, got 'torch' (0 active drivers" in err


def test_auto_is_timed_only_once_the_fused_kernel_answers(monkeypatch):
    """``auto`` on CPU answers with torch while the fused module imports, then while its kernel compiles, each
    queued by a call (Note [cold start]): the bench must call and wait until the fused kernel answers, or it times
    torch under the name ``auto`` (it did: one call and one wait only reached the import)."""
    from ringattn import backends

    state = {"queued": None, "imported": False, "compiled": False, "last": None}

    def call(inputs):  # auto's behaviour, one background job queued per call at most
        if state["imported"] and state["compiled"]:
            state["last"] = "cpu"
            return
        state["queued"] = "compile" if state["imported"] else "import"
        state["last"] = "torch"

    def wait_compiled(timeout=None):
        if state["queued"] == "import":
            state["imported"] = True
        elif state["queued"] == "compile":
            state["compiled"] = True
        state["queued"] = None
        return True

    monkeypatch.setattr(merge, "providers", lambda *a, **k: {"ringattn[auto]": call})
    monkeypatch.setattr(backends, "wait_compiled", wait_compiled)
    monkeypatch.setattr(backends, "ran", lambda module: state["last"])
    case = merge.cases(["SBH"], [torch.float32], quick=True)[0]
    assert merge.resolve_backend("auto", merge.make_inputs(case, torch.device("cpu"))) == "cpu"


def test_ring_bench_warm_up_lets_the_fused_kernels_load(monkeypatch):
    """The ring bench times after ``settle_compiles``: calls that each queue one background step, each waited for."""
    from ringattn import backends

    events = []
    monkeypatch.setattr(backends, "wait_compiled", lambda timeout=None: events.append("wait") or True)
    backends.settle_compiles(lambda: events.append("call"))
    assert events == ["call", "wait", "call", "wait"]


@pytest.mark.slow  # compiles the old kernel's float32 K = 2 merge in a temporary directory (~20-30 s)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_kernel_ab_script_runs_both_kernels_and_compares_them(direction, capsys):
    """``benchmarks/kernel_ab.py`` (the A/B behind the lane rule's cost in README): against HEAD's kernel, loaded from
    git as a second module, both give the same bits and the working tree's kernel is restored afterwards."""
    import importlib.util
    import subprocess
    from pathlib import Path

    from ringattn.backends import numba_cpu, numba_cpu_backward

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("needs the git history of the repository (not a source archive)")
    spec = importlib.util.spec_from_file_location("kernel_ab", root / "benchmarks" / "kernel_ab.py")
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    before = (numba_cpu.merge_rows, numba_cpu_backward.merge_rows_backward)
    rows = kernel_ab.main(["--rev", "HEAD", "--quick", "--repeats", "3", "--layouts", "SBH", "--dtypes", "float32",
                           "--ops", "ring_attention_update", "--pass", direction])  # fmt: skip
    assert (numba_cpu.merge_rows, numba_cpu_backward.merge_rows_backward) == before
    (case,) = merge.cases(["SBH"], [torch.float32], quick=True, passes=[direction])
    assert [(label, same) for label, _, _, same in rows] == [(case.name, True)]
    assert all(new > 0 and old > 0 for _, new, old, _ in rows)
    assert "new/old" in capsys.readouterr().out


def test_backward_pass_times_the_gradients_of_every_provider(tmp_path, capsys):
    """``--pass backward``: per case, the gradients of every output with respect to every input, checked against
    float64 autograd (the naive formula's lane-0-only statistics gradients by their lane sums), no out= rows."""
    path = tmp_path / "backward.json"
    argv = ["--quick", "--pass", "backward", "--backend", "auto,torch", "--repeats", "2", "--no-progress"]
    assert bench.main([*argv, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    cases = {r["case"] for r in rows}
    assert cases == {case.name for case in merge.cases(quick=True, ops=merge.OPS, passes=[merge.BACKWARD])}
    assert all(" backward " in name for name in cases)
    for case in cases:
        assert {r["provider"] for r in rows if r["case"] == case} == {"ringattn[auto]", "ringattn[torch]", "naive",
                                                                      "copy"}  # fmt: skip
    for r in rows:
        if r["provider"] != "copy":
            assert 0 <= r["max_err"] <= r["tol"] and r["speedup_vs_naive"] > 0, r
    assert {r["backend"] for r in rows if r["provider"] == "ringattn[auto]"} == {"cpu"}
    assert "backward: torch.autograd.grad of every output" in capsys.readouterr().out


@pytest.mark.parametrize(("op", "layout"), [(merge.UPDATE, "SBH"), (merge.UPDATE, "TND"), (merge.MERGE, "TND")])
def test_backward_bytes_moved_counts_every_tensor_once(op, layout):
    """Read: the upstream gradients and every input; written: one gradient per input (the inputs' shapes)."""
    (case,) = merge.cases([layout], [torch.bfloat16], quick=True, ops=[op], passes=[merge.BACKWARD])
    inputs = merge.make_inputs(case, torch.device("cpu"))
    touched = [*inputs.grads, *inputs.tensors, *inputs.tensors]
    assert len(inputs.grads) == len(merge.OUTPUT_NAMES[op])
    assert merge.bytes_moved(case) == sum(t.numel() * t.element_size() for t in touched)


def test_wrong_backward_fails_the_check_naming_the_gradient(monkeypatch, capsys):
    naive = merge.naive_update

    def scaled(inputs):  # 1% off: so is the gradient of every input
        out, m, l = naive(inputs)
        return out * 1.01, m, l

    monkeypatch.setattr(merge, "naive_update", scaled)
    assert bench.main([*ONE_CASE, "--pass", "backward", "--providers", "ringattn,naive"]) == 1
    err = capsys.readouterr().err
    assert "correctness check failed" in err and "'naive'" in err and "grad of prev_attn_out" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backward_pass_is_checked_and_timed(tmp_path):
    """Issue 12: the backward of every provider on CUDA (graph-captured where autograd allows, else timed eagerly)."""
    path = tmp_path / "cuda-backward.json"
    assert bench.main(["--device", "cuda", "--quick", "--pass", "backward", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert {r["provider"] for r in rows} == {"ringattn[auto]", "naive", "compiled", "copy"}
    assert all(r["max_err"] <= r["tol"] for r in rows if r["provider"] != "copy")
    assert {r["backend"] for r in rows if r["provider"] == "ringattn[auto]"} == {"triton"}


def _cli_parsers():
    from ringattn import cli
    from ringattn.ring import demo as ring_demo

    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        "ringattn demo": commands.choices["demo"],
        "ringattn bench": merge_cli.build_parser(),
        "ringattn bench ring": ring.build_parser(),
        "python -m ringattn.ring.demo": ring_demo.build_parser(),
    }


@pytest.mark.parametrize(
    "name", ["ringattn demo", "ringattn bench", "ringattn bench ring", "python -m ringattn.ring.demo"]
)
def test_every_help_line_states_a_real_default_once(name):
    """No ``(default: True)`` on a flag, no ``(default: None)`` after prose that gives the default, no default said
    twice; every option with a value default states it."""
    parser = _cli_parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
            continue
        text = formatter._expand_help(action)
        option = action.option_strings[-1]
        assert "(default: None)" not in text and "(default None)" not in text, (option, text)
        assert text.count("default") <= 1, (option, text)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            assert "default" not in text, (option, text)
        elif action.default is not None:
            assert "default" in text, (option, text)
