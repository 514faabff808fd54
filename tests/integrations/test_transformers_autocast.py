"""A transformers model made context parallel, in a training loop's mixed precision and in ``generate``.

Under ``torch.autocast("cpu", bfloat16)`` a Llama hands attention q, k in float32 and v in bfloat16; the ring takes
them as SDPA does (Note [autocast] in ``_amp.py``). Compared with the float32 model without autocast (relative L2 of
the logits and of every parameter gradient), the ring's error at W = 1 and W = 2 (gloo) is no worse than 2x that of
the single-process model under the same autocast: both round the same activations to bfloat16, the ring only sums
its attention blocks in float32 accumulators. At W = 1, ``generate`` works where the integration's advice says.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")

import ringattn  # noqa: E402
from integrations.test_transformers import _batch, _rel, tiny_llama  # noqa: E402
from ring.ring_spawn import run_ranks  # noqa: E402
from ringattn.errors import ConfigError  # noqa: E402
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs  # noqa: E402


def _autocast_no_worse_than_sdpa(seq: int) -> None:
    ref = tiny_llama()
    ids, labels = _batch(9, 2, seq)
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    sdpa, ring = copy.deepcopy(ref), apply_ring_attention(copy.deepcopy(ref))
    for model in (sdpa, ring):
        model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = sdpa(input_ids=ids, labels=labels)
        got = ring(**shard_inputs(ids, labels))
    base.loss.backward()
    got.loss.backward()
    assert got.logits.dtype == base.logits.dtype == torch.bfloat16
    logits = ringattn.gather_sequence(got.logits.detach(), dim=1)[:, :seq].float()
    ring_err, base_err = _rel(logits, want.logits), _rel(base.logits.float(), want.logits)
    assert ring_err <= 2 * base_err, f"logits: ring {ring_err:.2e}, SDPA {base_err:.2e}"
    for (name, p), q, r in zip(ref.named_parameters(), sdpa.parameters(), ring.parameters(), strict=True):
        assert r.grad.dtype == p.grad.dtype == torch.float32, f"d{name} dtype {r.grad.dtype}"
        ring_err, base_err = _rel(r.grad, p.grad), _rel(q.grad, p.grad)
        assert ring_err <= 2 * base_err, f"d{name}: ring {ring_err:.2e}, SDPA {base_err:.2e}"


def test_autocast_ring_of_one() -> None:
    _autocast_no_worse_than_sdpa(seq=13)


def _autocast_rank(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    _autocast_no_worse_than_sdpa(seq=8 * world_size)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_autocast_two_ranks(tmp_path) -> None:
    run_ranks(_autocast_rank, 2, tmp_path, deadline_s=100)


def test_generate_at_w1_follows_the_advice() -> None:
    """The KV-cache error says ``use_cache=False``; followed, ``generate`` gives the single-process tokens (odd
    lengths included: a ring of one holds the whole sequence)."""
    ref = tiny_llama()
    model = apply_ring_attention(copy.deepcopy(ref))
    ids, _ = _batch(3, 1, 5)
    with pytest.raises(ConfigError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    got = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    want = ref.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(got, want)
