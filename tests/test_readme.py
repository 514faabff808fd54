"""The README's ```python examples run as written, each in a fresh process with the default settings a user has.

The ring attention example runs as its comment says, under ``torchrun --nproc-per-node 2``, with a check
appended that every rank's gathered output matches single-process attention over the same full inputs.
Sketches that are not meant to run are fenced as ```text.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

# Appended to the ring example: each rank compares the gathered output with single-process causal attention.
# Tolerance: float32 attention over 4096 keys, the same order of rounding as the merge's (1e-4, atol = rtol).
RING_CHECK = """
import torch.nn.functional as F

want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (full_q, full_k, full_v)), is_causal=True)
torch.testing.assert_close(full_out, want.transpose(1, 2), atol=1e-4, rtol=1e-4)
print(f"rank {rank}: gathered output matches single-process attention")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RINGATTN_AUTO_CPU", None)  # the user's default (conftest.py sets "wait" for the in-process tests)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
    ring = [b for b in BLOCKS if "init_process_group" in b]
    assert len(ring) == 1 and "torchrun --nproc-per-node 2 example.py" in ring[0]
    assert "manual_seed" in ring[0]  # every rank must build the same full inputs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if "init_process_group" not in b])
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_readme_ring_example_under_torchrun_matches_single_process_attention_on_every_rank(tmp_path):
    (code,) = [b for b in BLOCKS if "init_process_group" in b]
    script = tmp_path / "example.py"
    script.write_text(code + RING_CHECK)
    # `torchrun` is this entry point; the module form runs the one of this interpreter.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script)]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in range(2):
        assert f"rank {rank}: gathered output matches single-process attention" in result.stdout
