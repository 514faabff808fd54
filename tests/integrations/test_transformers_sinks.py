"""A GPT-OSS-style model (attention sinks, ``s_aux``) made context parallel matches the single-process model.

A tiny random GptOssForCausalLM (2 layers, both full attention: sliding windows are issue 26's other half; 4 heads,
2 key/value heads, 2 experts; nothing downloaded), the reference on transformers' eager attention (its SDPA path has
no sinks). Loss and every parameter gradient, the sinks' included, within 1e-5 relative L2 (float32; the ring
reassociates sums over W blocks), at W = 1 in process and W = 2, 3 over gloo.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GptOssForCausalLM"):
    pytest.skip("needs transformers with GPT-OSS (4.55 or newer)", allow_module_level=True)

import ringattn  # noqa: E402
from integrations.test_transformers import _batch, _rel  # noqa: E402
from ring.ring_spawn import run_ranks  # noqa: E402
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs  # noqa: E402

TOL = 1e-5


def tiny_gpt_oss(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=128,
        max_position_embeddings=256,
        layer_types=["full_attention", "full_attention"],
        attention_dropout=0.0,
    )
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).float()
    with torch.no_grad():  # random sinks of both signs (they start at 0)
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def _compare(seq: int) -> None:
    ref = tiny_gpt_oss()
    model = apply_ring_attention(copy.deepcopy(ref))
    ids, labels = _batch(5, 2, seq)
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    got = model(**shard_inputs(ids, labels))
    got.loss.backward()
    loss = got.loss.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss)
    logits = ringattn.gather_sequence(got.logits.detach(), dim=1)[:, :seq]
    assert _rel(logits, want.logits) < TOL, f"logits {_rel(logits, want.logits):.2e}"
    assert abs(loss.item() - want.loss.item()) < TOL * abs(want.loss.item()), "loss"
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        if p.grad is None:  # an expert no token was routed to
            assert q.grad is None or not q.grad.any(), f"d{name}"
            continue
        assert _rel(q.grad, p.grad) < TOL, f"d{name}: rel. L2 error {_rel(q.grad, p.grad):.2e}"
    sinks = [n for n, p in ref.named_parameters() if n.endswith("sinks") and p.grad is not None]
    assert len(sinks) == 2, "the sinks have gradients"


def test_gpt_oss_ring_of_one() -> None:
    _compare(seq=11)


def _rank(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    _compare(seq=4 * world_size + 2)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [2, 3])
def test_gpt_oss_over_gloo(world_size, tmp_path) -> None:
    run_ranks(_rank, world_size, tmp_path, deadline_s=130)
