"""Note [slow sweeps] in ``tests/conftest.py``: the `slow` sweeps stay out of a narrowed run unless it asks for them.

Each case collects ``tests/test_bench.py`` (three slow tests, many others; collection only, nothing runs) in a fresh
pytest process with the repository's own configuration, with the options of a README command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW_IN_BENCH = {
    "tests/test_bench.py::test_float64_case_checks_float32_statistics_at_their_own_tolerance[cpu]",
    "tests/test_bench.py::test_kernel_ab_script_runs_both_kernels_and_compares_them[forward]",
    "tests/test_bench.py::test_kernel_ab_script_runs_both_kernels_and_compares_them[backward]",
}


def _collected(*args: str) -> set[str]:
    env = {**os.environ, "RINGATTN_TEST_PRECOMPILE": "0"}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
    result = subprocess.run(
        [*command, "tests/test_bench.py"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if line.startswith("tests/")}


def _readme_pytest_options() -> list[list[str]]:
    """The options of every ``python -m pytest`` command in the README (paths and -q left out: collection is -q)."""
    commands = re.findall(r"^python -m pytest([^#\n]*)", (ROOT / "README.md").read_text(), flags=re.M)
    return [
        [arg for arg in shlex.split(command) if not arg.startswith("tests/") and arg != "-q"] for command in commands
    ]


@pytest.mark.timeout(600)
def test_every_readme_test_command_runs_the_slow_sweeps_exactly_when_it_names_them() -> None:
    commands = _readme_pytest_options()
    assert ["-m", "slow"] in commands and len(commands) >= 3  # the three of the Tests section at least
    for options in commands:
        collected = _collected(*options)
        if "slow" in " ".join(options):
            assert collected == SLOW_IN_BENCH, options
        else:
            assert collected and not collected & SLOW_IN_BENCH, options


@pytest.mark.timeout(600)
def test_a_narrowed_m_still_leaves_the_slow_sweeps_out_and_m_slow_runs_exactly_them() -> None:
    default = _collected()
    narrowed = _collected("-m", "not distributed and not triton")
    assert default and not default & SLOW_IN_BENCH
    assert narrowed and not narrowed & SLOW_IN_BENCH  # the README's "while editing" form
    assert _collected("-m", "slow") == SLOW_IN_BENCH  # CI's second command
    assert _collected("--run-slow") == default | SLOW_IN_BENCH
