"""``ringattn demo``: a PASS/FAIL verdict per check, a non-zero exit on failure, plain-word ratios, any world size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ringattn import cli, demo
from ringattn.ring import demo as ring_demo


def test_default_length_is_rounded_to_fit_the_world_size_and_an_explicit_one_is_refused_in_one_line() -> None:
    assert demo.ring_seq_len(2, None) == (4096, None)
    assert demo.ring_seq_len(3, None) == (4098, None)  # 2W = 6 chunks of 683 tokens
    length, problem = demo.ring_seq_len(3, 4096)
    assert length == 4096 and "--seq-len 4096" in problem and "2 x world size = 6" in problem
    assert "try --seq-len 4098" in problem and "\n" not in problem
    assert demo.ring_seq_len(0, None)[1] == "the world size must be at least 1, got 0"


def test_cli_refuses_a_length_that_does_not_split_with_status_2(capsys) -> None:
    assert cli.main(["demo", "--world-size", "3", "--seq-len", "4096"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--seq-len 4096 is not a multiple of 2 x world size = 6" in out


@pytest.mark.parametrize(("cores", "world", "threads"), [({0, 1}, 3, 2), ({0, 1, 2, 3}, 3, 3), ({0}, 1, 1)])
def test_single_process_threads_are_one_per_rank_at_most_one_per_core(monkeypatch, cores, world, threads) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert ring_demo.usable_cpus() == len(cores) and ring_demo.single_process_threads(world) == threads


def test_speed_and_check_lines_are_plain_words() -> None:
    assert ring_demo.speed_sentence(0.34, 0.48, 2) == "ring (W=2) 0.34 s, single process 0.48 s: ring is 1.4x faster"
    assert ring_demo.speed_sentence(0.5, 0.25, 4).endswith("ring is 2.0x slower")
    ok = {"name": "x", "error": 1e-6, "limit": 2e-6, "passed": True}
    bad = {"name": "x", "error": 3e-6, "limit": 2e-6, "passed": False}
    assert ring_demo.check_line(ok) == "  PASS  x: error 1.0e-06 <= tolerance 2.0e-06"
    assert ring_demo.check_line(bad) == "  FAIL  x: error 3.0e-06 > tolerance 2.0e-06"


def _one_call(fn, repeats=7) -> float:  # tests never time anything: one call instead of the demo's median of 7
    fn()
    return 1.0


@pytest.mark.timeout(300)
def test_merge_part_passes_and_exits_0(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RINGATTN_AUTO_CPU")  # the user's default: the demo compiles the kernel it times first
    monkeypatch.setattr(demo, "_median_seconds", _one_call)
    assert demo.main(ring=False) == 0
    out = capsys.readouterr().out
    assert "compiling the fused CPU kernel" in out and "backend 'cpu'" in out
    assert out.count("  PASS  ") == 2 and "FAIL" not in out and "PASS: all 2 checks passed" in out
    assert "naive eager formula" in out and ("x faster" in out or "x slower" in out)


@pytest.mark.timeout(300)
def test_a_failing_check_prints_fail_and_exits_1(monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "_median_seconds", _one_call)
    monkeypatch.setitem(demo.TOL, torch.bfloat16, 0.0)  # no bfloat16 result is exact: the realistic merge fails
    assert demo.main(ring=False) == 1
    out = capsys.readouterr().out
    assert "  FAIL  merge SBH" in out and "FAIL: 1 of 2 checks failed" in out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ring_part_on_three_processes_gives_a_verdict_per_output(monkeypatch, capsys) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # W = 3 on 2 cores
    report = ring_demo.run_demo(world_size=3, seq_len=48, heads=2, head_dim=16)
    assert [c["name"] for c in report["checks"]] == [f"ring attention {n}" for n in ("out", "dq", "dk", "dv")]
    assert all(c["passed"] and c["error"] <= c["limit"] for c in report["checks"])
    # The single process runs (and says it runs) one thread per core, not one per rank: 2, not 3.
    assert report["single_threads"] == 2
    assert "single process: SDPA causal forward+backward, 2 threads (2 CPU cores usable)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 x world size = 6"):
        ring_demo.run_demo(world_size=3, seq_len=50, verbose=False)


@pytest.mark.timeout(120)
def test_python_dash_m_ringattn_is_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "ringattn", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--seq-len" in result.stdout and "--world-size" in result.stdout and "(default 2)" in result.stdout


@pytest.mark.timeout(300)
def test_packed_documents_part_gives_a_verdict_per_output(capsys) -> None:
    """The packed case (issue 14): a virtual ring of 3 over random document lengths, PASS for out, dq, dk, dv."""
    checks = demo.packed_documents(3, seed=1)
    assert [c["name"] for c in checks] == [f"packed documents {n}" for n in ("out", "dq", "dk", "dv")]
    assert all(c["passed"] and c["error"] <= c["limit"] for c in checks)
    assert capsys.readouterr().out.count("  PASS  packed documents") == 4
