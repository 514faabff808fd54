"""``examples/*.py`` print a PASS/FAIL verdict and exit non-zero when it fails.

Each example runs in this process as a ring of one rank (torchrun's environment variables for a world of 1, gloo on
localhost), once as written and once with a tolerance no result meets. The multi-rank runs are in
``tests/integrations``.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_rank(monkeypatch):
    """torchrun's environment for a world of one; the process group is gone afterwards whatever happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing", [False, True])
def test_mindspeed_example_prints_a_verdict_and_its_exit_status(one_rank, monkeypatch, capsys, failing):
    example = _load("mindspeed_ring")
    if failing:
        monkeypatch.setattr(example, "TOL", 0.0)  # max |diff| < 0 never holds
    status = example.main()
    out = capsys.readouterr().out
    if not failing:
        assert status == 0 and out.count("rank 0/1 PASS ") == 4 and "rank 0/1 PASS: all 4 checks passed" in out
    else:
        assert status == 1 and out.count("rank 0/1 FAIL ") == 4 and "rank 0/1 FAIL: 4 of 4 checks failed" in out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing", [False, True])
def test_transformers_example_prints_a_verdict_and_its_exit_status(one_rank, monkeypatch, capsys, failing):
    pytest.importorskip("transformers", reason="examples/transformers_ring.py needs the 'transformers' extra")
    example = _load("transformers_ring")
    if failing:
        monkeypatch.setattr(example, "F32_TOL", -1.0)  # an error is never negative: FAIL
    err, passed = example.run(["--seq", "32", "--hidden", "64", "--heads", "4", "--vocab", "128"])
    out = capsys.readouterr().out
    assert err < 1e-5
    if not failing:
        assert passed and "PASS: worst parameter-gradient rel. L2" in out and "<= tolerance 1.0e-05" in out
    else:
        assert not passed and "FAIL: worst parameter-gradient rel. L2" in out and "> tolerance -1.0e+00" in out
