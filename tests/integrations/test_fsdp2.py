"""FSDP2 / HSDP with ringattn context parallelism on a ``dp x cp`` DeviceMesh (Note [dp x cp gradients] in
``integrations/_mesh.py``), 4 gloo processes: ``examples/fsdp2_cp.py`` (its own verdict: float32 parameters after 3
AdamW steps and first gradients within 1e-5 relative L2 of one process on the whole batch; bf16 params no worse
than 2x single-process bf16 autocast), the compositions that are refused (ConfigError naming what to change, on
every rank), and the ring entry points taking a mesh in place of a group, eager and compiled.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import ringattn  # noqa: E402
from integrations.test_transformers import _raises  # noqa: E402
from ring.ring_spawn import run_ranks  # noqa: E402
from ringattn.errors import ConfigError  # noqa: E402
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_cp.py"


def _example():
    spec = importlib.util.spec_from_file_location("fsdp2_cp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp2_example_under_torchrun():
    """The script as users run it: 4 gloo processes, PASS printed, exit status 0."""
    path = os.pathsep.join([str(EXAMPLE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "PASS" in done.stdout, done.stdout


def _compositions(rank: int, world: int) -> None:
    example = _example()
    assert example.main(["--hsdp"]), "HSDP"
    torch._dynamo.reset()
    assert example.main(["--bf16"]), "FSDP2 with bf16 params"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    args = example.argparse.Namespace(hidden=32, layers=1, heads=2, vocab=64, seq=16)

    # FSDP over the dp ranks alone: the cp ranks' gradients would never be summed
    model = example.build(args)
    fully_shard(model, mesh=mesh["dp"])
    _raises(ConfigError, "mesh", lambda: apply_ring_attention(model, mesh=mesh))
    model = apply_ring_attention(example.build(args), mesh=mesh)  # the same, fully_shard after: at the first loss
    fully_shard(model, mesh=mesh["dp"])
    ids, labels = example.batch(args, 0, 1)
    _raises(ConfigError, "mesh", lambda: model(**shard_inputs(ids, labels, mesh=mesh)))
    # the integration's gradient hooks together with FSDP2
    model = apply_ring_attention(example.build(args), mesh["cp"].get_group())
    fully_shard(model, mesh=mesh["dp", "cp"]._flatten("dp_cp_test"))
    _raises(ConfigError, "reduce_gradients", lambda: model(**shard_inputs(ids, labels, mesh=mesh)))
    # arguments
    _raises(ConfigError, "reduce_gradients", lambda: apply_ring_attention(example.build(args), mesh=mesh,
                                                                           reduce_gradients=True))  # fmt: skip
    _raises(ConfigError, "group", lambda: apply_ring_attention(example.build(args), dist.group.WORLD, mesh=mesh))
    unnamed = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    _raises(ConfigError, "mesh", lambda: apply_ring_attention(example.build(args), mesh=unnamed))
    _raises(ConfigError, "mesh", lambda: shard_inputs(ids, labels, mesh=unnamed))
    _raises(ConfigError, "mesh", lambda: apply_ring_attention(example.build(args), mesh="cp"))

    # the ring entry points take the mesh (its cp ranks) where they take a group, eager and compiled
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 2, 8, generator=gen).requires_grad_()
    want = ringattn.ring_attention(q, q, q, layout="BSND", causal=True, group=mesh["cp"].get_group())

    def fn(x):
        return ringattn.ring_attention(x, x, x, layout="BSND", causal=True, group=mesh)

    assert torch.equal(fn(q), want)
    assert torch.equal(ringattn.ring_attention(q, q, q, layout="BSND", causal=True, group=mesh["cp"]), want)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend="aot_eager", fullgraph=True)(q), want)
    _raises(ConfigError, "group", lambda: ringattn.ring_attention(q, q, q, layout="BSND", group=unnamed))


@pytest.mark.slow  # 4 processes, several trainings: the example under torchrun covers FSDP2 in the default run
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_hsdp_bf16_wrong_compositions_and_mesh_groups(tmp_path):
    run_ranks(_compositions, 4, tmp_path, deadline_s=280)
