"""transformers models with sliding windows (Mistral) and attention sinks plus windows (GPT-OSS) under
``torch.compile(model, fullgraph=True)`` with the integration: one graph (``torch._dynamo.explain``), and loss and
every parameter gradient within 1e-5 relative of the eager ring model (the same kernels run: measured equal). The
models are those of ``test_transformers_models.py`` (W = 1 here; W = 2 with a Llama: ``test_transformers.py``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")

from integrations.test_transformers_models import _model  # noqa: E402
from ringattn.integrations.transformers import apply_ring_attention, shard_inputs  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("name", ["mistral", "gpt_oss"])
def test_compiled_model_with_windows_and_sinks_is_one_graph(name):
    model = apply_ring_attention(_model(name))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen)
    batch = shard_inputs(ids, ids.clone())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for step in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        loss = step(**batch).loss
        results.append((loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    assert abs(got.item() - want.item()) <= TOL * abs(want.item())
    for p_got, p_want in zip(got_grads, want_grads, strict=True):
        assert (p_got is None) == (p_want is None)
        if p_want is not None:
            assert (p_got - p_want).norm() <= TOL * p_want.norm().clamp_min(1e-30)
