"""The documentation site (``docs/``): its ```python examples run, the API reference covers the public API, and the
schedule pictures are drawn from the schedule the ring runs.

Examples run as ``tests/test_readme.py`` runs the README's: each in a fresh process with the user's default settings;
the ring example runs under ``torchrun --nproc-per-node 2`` with a check appended. Sketches are fenced as ```text.
The strict site build itself (``mkdocs build --strict``) runs in ``.ci/run``.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [
    (f"{page.relative_to(DOCS)}:{i}", code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M))
]
RING = [code for _, code in BLOCKS if "init_process_group" in code]

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
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _figures():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("gen_figures")
    finally:
        sys.path.remove(str(DOCS))


def test_docs_have_examples_and_one_ring_example_for_torchrun():
    pages = {name.split(":")[0] for name, _ in BLOCKS}
    assert {"contract.md", "merging.md", "ring.md", "virtual-ring.md", "errors.md", "porting.md"} <= pages
    assert len(RING) == 1 and "torchrun --nproc-per-node 2 example.py" in RING[0]
    assert "manual_seed" in RING[0]  # every rank must build the same full inputs


def test_every_public_name_has_a_reference_entry():
    import ringattn
    import ringattn.integrations.transformers as hf

    sys.path.insert(0, str(DOCS))
    try:
        hooks = importlib.import_module("hooks")
    finally:
        sys.path.remove(str(DOCS))
    public = [f"ringattn.{n}" for n in ringattn.__all__]
    public += [f"ringattn.integrations.transformers.{n}" for n in hf.__all__]
    assert hooks.public_names() == public  # the build's static reading of __all__ is the runtime one
    missing = sorted(set(public) - hooks.reference_entries())
    assert not missing, f"no '::: name' entry in docs/reference/ for {missing}"
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (DOCS / "reference").glob("*.md"):
        assert f"reference/{page.name}" in nav, page


def test_every_page_is_in_the_navigation_and_readme_links_exist():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, page
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "the README links into the docs"
    for link in links:
        assert (ROOT / link).is_file(), link


# Every block of a page in one process (one import of torch, not one per block), each in a fresh namespace
# (``runpy.run_path``); a failure names its block.
_RUN_BLOCKS = """
import runpy, sys
for path in sys.argv[1:]:
    try:
        runpy.run_path(path, run_name="__main__")
    except BaseException:
        print(f"failed: {path}", file=sys.stderr)
        raise
"""
PAGES_WITH_EXAMPLES = sorted({name.split(":")[0] for name, code in BLOCKS if "init_process_group" not in code})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_docs_examples_of_a_page_run(page, tmp_path):
    paths = []
    for name, code in BLOCKS:
        if name.split(":")[0] == page and "init_process_group" not in code:
            paths.append(tmp_path / f"{name.replace(':', '_').replace('.', '_')}.py")
            paths[-1].write_text(code)
    assert paths
    command = [sys.executable, "-c", _RUN_BLOCKS, *map(str, paths)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_docs_ring_example_under_torchrun_matches_single_process_attention_on_every_rank(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(RING[0] + RING_CHECK)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script)]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in range(2):
        assert f"rank {rank}: gathered output matches single-process attention" in result.stdout


@pytest.mark.timeout(120)
def test_figure_script_writes_every_picture_the_pages_embed(tmp_path):
    result = subprocess.run(
        [sys.executable, str(DOCS / "gen_figures.py"), str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = {p.name for p in tmp_path.glob("*.png")}
    embedded = {m for page in PAGES for m in re.findall(r"\]\((?:\.\./)?img/([\w.-]+\.png)\)", page.read_text())}
    assert embedded and embedded <= written, (embedded, written)
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_dense_picture_covers_the_causal_triangle_once(world_size, sharding):
    gen = _figures()
    s = 8 * world_size
    grid, taken = gen.dense_grid(world_size, s, sharding=sharding)
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    computed = (grid >= 0).sum(axis=0)
    assert np.array_equal(computed, (j <= i).astype(int))  # every causal score exactly once, nothing else
    assert taken == list(range(world_size))
    if sharding == "zigzag":  # the balance the picture shows: every rank computes as many scores at every step
        for step in range(1, world_size):
            counts = [(grid[step] == r).sum() for r in range(world_size)]
            assert len(set(counts)) == 1, (step, counts)
    # each score is computed by the rank holding its query, at the step that brings it its key's block
    owner = np.empty(s, dtype=np.int64)
    for rank in range(world_size):
        owner[gen._local_to_global(rank, world_size, s, sharding=sharding, causal=True, windowed=False)] = rank
    for step in range(world_size):
        rows, cols = np.nonzero(grid[step] >= 0)
        assert np.array_equal(grid[step][rows, cols], owner[rows])
        assert ((owner[rows] - owner[cols]) % world_size == step).all()


@pytest.mark.parametrize("window", [(15, 0), (3, 0), (40, 0), (-1, 0)])
@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_window_picture_covers_the_band_once_and_skips_only_empty_steps(window, sharding):
    gen = _figures()
    w, s = 4, 128
    grid, taken = gen.dense_grid(w, s, sharding=sharding, window=window)
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    band = (j <= i) & ((j >= i - window[0]) | (window[0] < 0))
    assert np.array_equal((grid >= 0).sum(axis=0), band.astype(int))
    assert taken == [step for step in range(w) if step == 0 or (grid[step] >= 0).any()]


@pytest.mark.parametrize("lengths,world_size", [([24, 5, 21, 14], 2), ([7, 1, 30], 3), ([16], 4), ([3, 3, 3], 2)])
def test_packed_picture_covers_each_document_causal_triangle_once(lengths, world_size):
    gen = _figures()
    grid, slots = gen.packed_grid(lengths, world_size)
    t = sum(lengths)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    want = (j <= i) & (doc[:, None] == doc[None])
    assert np.array_equal((grid >= 0).sum(axis=0), want.astype(int))
    held = np.sort(np.concatenate([x[x >= 0] for x in slots]))
    assert np.array_equal(held, np.arange(t))  # every token on exactly one rank
