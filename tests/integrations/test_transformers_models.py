"""Models whose layers have sliding windows or attention sinks, made context parallel, match the single-process model.

Tiny random models (nothing downloaded), each against the same weights with transformers' own attention (SDPA, or
eager where sinks need it) on the whole sequence: a Mistral (a window on every layer), a Gemma 3 with alternating
sliding-window and global layers (``layer_types``), a GPT-OSS with sinks on full-attention layers, and one with a
sliding-window layer and sinks (random sinks of both signs: they start at 0). Windows shorter than a rank's shard, so
that ring steps are skipped. Loss and every parameter gradient within 1e-5 relative
L2 (float32; the ring reassociates sums over blocks), at W = 1 in process and W = 2, 3 over gloo.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")

import ringattn  # noqa: E402
from integrations.test_transformers import _batch, _rel  # noqa: E402
from ring.ring_spawn import run_ranks  # noqa: E402
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs  # noqa: E402

TOL = 1e-5
SMALL = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256}  # fmt: skip


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5)), "sdpa"


def gemma3():
    config = transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=6,
                                           layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    return transformers.Gemma3ForCausalLM(config), "sdpa"


def gpt_oss(layer_types=("sliding_attention", "full_attention")):
    config = transformers.GptOssConfig(**SMALL, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                       sliding_window=4, layer_types=list(layer_types))  # fmt: skip
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model, "eager"  # transformers' SDPA path has no sinks


def gpt_oss_sinks_only():
    return gpt_oss(layer_types=("full_attention", "full_attention"))


MODELS = {"mistral": mistral, "gemma3": gemma3, "gpt_oss": gpt_oss, "gpt_oss_sinks_only": gpt_oss_sinks_only}


def _model(name: str):
    torch.manual_seed(0)
    model, attn = MODELS[name]()
    model.config._attn_implementation = attn
    return model.float().eval().train()


def _compare(name: str, seq: int) -> None:
    ref = _model(name)
    model = apply_ring_attention(copy.deepcopy(ref))
    ids, labels = _batch(7, 2, seq)
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    got = model(**shard_inputs(ids, labels))
    got.loss.backward()
    loss = got.loss.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss)
    logits = ringattn.gather_sequence(got.logits.detach(), dim=1)[:, :seq]
    assert _rel(logits, want.logits) < TOL, f"{name} logits {_rel(logits, want.logits):.2e}"
    assert abs(loss.item() - want.loss.item()) < TOL * abs(want.loss.item()), f"{name} loss"
    for (pname, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        if p.grad is None:  # an expert no token was routed to
            assert q.grad is None or not q.grad.any(), f"{name} d{pname}"
            continue
        assert _rel(q.grad, p.grad) < TOL, f"{name} d{pname}: rel. L2 error {_rel(q.grad, p.grad):.2e}"
    sinks = [p for pname, p in ref.named_parameters() if pname.endswith("sinks")]
    assert all(p.grad is not None and p.grad.any() for p in sinks), f"{name}: the sinks have gradients"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ring_of_one(name) -> None:
    _compare(name, seq=13)


def _rank(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    for name in sorted(MODELS):
        _compare(name, seq=8 * world_size + 2)


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_over_gloo(world_size, tmp_path) -> None:
    run_ranks(_rank, world_size, tmp_path, deadline_s=220)


def test_packed_batches_with_windows() -> None:
    """Documents packed in one row: each sees only itself, within its window (against each document run alone)."""
    from integrations.test_transformers import _compare_packed

    for name in ("mistral", "gemma3"):
        ref = _model(name)
        _compare_packed(f"{name} packed", ref, apply_ring_attention(copy.deepcopy(ref)), [3, 9, 1, 7], via="cu_seqlens")
