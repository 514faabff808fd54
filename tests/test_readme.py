"""The README's ```python examples run as written, each in a fresh process with the default settings a user has.

The README is a front page: its ring example runs every rank in one process. The ring attention example under
``torchrun --nproc-per-node 2`` lives in ``docs/ring.md`` and runs in ``tests/test_docs.py``. Sketches that are not
meant to run are fenced as ```text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RINGATTN_AUTO_CPU", None)  # the user's default (conftest.py sets "wait" for the in-process tests)
    return env


def test_readme_has_examples():
    assert BLOCKS, "the README's short example"
    assert any("simulate_ring_attention" in b for b in BLOCKS)  # the front page shows the ring, checked against SDPA
    assert not any("init_process_group" in b for b in BLOCKS)  # the torchrun example is docs/ring.md's


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
