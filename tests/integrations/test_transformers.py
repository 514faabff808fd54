"""``ringattn.integrations.transformers``: a tiny random Llama trained with its sequence sharded over W ranks.

Every rank builds the same random LlamaForCausalLM from a config (hidden 64, 2 layers, 4 heads, 2 key/value heads,
vocab 128; nothing downloaded) and the same batch, runs the single-process model (transformers' SDPA attention) as
the reference, and the same weights through ``apply_ring_attention`` + ``shard_inputs`` on its shard. Compared in
float32: the logits (gathered, padding dropped), the loss (the ranks' shares summed) and EVERY parameter gradient,
each within 1e-5 relative L2 (the ring reassociates float32 sums over W blocks; measured <= 2e-7). The cases of one
world size run inside one spawn: batch 2 with unscored labels, a length that needs padding to 2W, a right-padded
batch, packed documents (the varlen ring; against each document run alone), gradient checkpointing, torch.compile
(fullgraph: one graph), bfloat16 (no worse than bf16 SDPA), DDP over the same ranks; then each trap of issue 16 raising.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers (ringattn[transformers])")

import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import ringattn  # noqa: E402
from ring.ring_spawn import run_ranks  # noqa: E402
from ringattn.errors import ConfigError, DTypeError, ShapeError  # noqa: E402
from ringattn.integrations.transformers import (  # noqa: E402
    all_reduce_gradients,
    apply_ring_attention,
    shard_inputs,
)
from ringattn.ring import gather_packed  # noqa: E402

TOL = 1e-5
VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        **overrides,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()


def _batch(seed: int, batch: int, seq: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, : seq // 3] = -100  # a prompt that is not scored
    return ids, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(name: str, ref, model, ids, labels, *, mask=None, step=None, group=None) -> None:
    """Reference step on the full batch vs. the ring step on this rank's shard; asserts logits, loss, gradients."""
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    ref_labels = labels if mask is None else labels.masked_fill(mask == 0, -100)
    want = ref(input_ids=ids, attention_mask=mask, labels=ref_labels)
    want.loss.backward()
    batch = shard_inputs(ids, labels, attention_mask=mask, group=group)
    got = (step if step is not None else model)(**batch)
    got.loss.backward()
    loss = got.loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
    seq = ids.shape[1]
    logits = ringattn.gather_sequence(got.logits.detach(), dim=1)[:, :seq]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert _rel(logits[real], want.logits[real]) < TOL, f"{name}: logits {_rel(logits[real], want.logits[real])}"
    assert abs(loss.item() - want.loss.item()) < TOL * abs(want.loss.item()), f"{name}: loss"
    for (pname, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert q.grad is not None, f"{name}: no gradient for {pname}"
        assert _rel(q.grad, p.grad) < TOL, f"{name}: d{pname} rel. L2 error {_rel(q.grad, p.grad):.2e}"


def _raises(error, name: str, fn) -> None:
    try:
        fn()
    except error as e:
        assert str(e).startswith(f"{name}: expected"), str(e)
    else:
        raise AssertionError(f"expected {error.__name__} naming {name}")


def _grid(rank: int, world_size: int, compile_backend: str | None = None, bf16: bool = False) -> None:
    torch.set_num_threads(1)
    ref = tiny_llama()
    model = apply_ring_attention(copy.deepcopy(ref))
    # batch 2, sequence a multiple of 2W, part of the labels unscored
    ids, labels = _batch(1, 2, 8 * world_size)
    _compare("batch 2", ref, model, ids, labels)
    # a length that needs padding to a multiple of 2W (padding neither attends nor is scored)
    ids, labels = _batch(2, 2, 8 * world_size + 3)
    _compare("padded to 2W", ref, model, ids, labels)
    # a right-padded batch: the reference masks the pads, the ring never lets a real token see them
    ids, labels = _batch(3, 2, 6 * world_size)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    _compare("right-padded batch", ref, model, ids, labels, mask=mask)
    # packed documents (the varlen ring): lengths with padding slots, a one-token document
    _compare_packed("packed by position ids", ref, model, [5, 1, 4 * world_size + 3, 3], via="position_ids")
    _compare_packed("packed by cu_seqlens", ref, model, [2 * world_size, 7], via="cu_seqlens")
    # gradient checkpointing
    model.gradient_checkpointing_enable()
    ids, labels = _batch(4, 2, 4 * world_size + 1)
    _compare("gradient checkpointing", ref, model, ids, labels)
    model.gradient_checkpointing_disable()
    if bf16:
        _bf16_no_worse_than_sdpa(ref, *_batch(9, 2, 8 * world_size))
    if compile_backend is not None:
        _compiled_is_one_graph_and_equals_eager(ref, model, compile_backend, *_batch(5, 2, 4 * world_size))
    _traps(rank, world_size, ref, model)


def _compiled_is_one_graph_and_equals_eager(ref, model, backend: str, ids, labels) -> None:
    """torch.compile(model, fullgraph=True): one graph (explain); loss and every gradient within TOL of the eager ring
    model (and of the single-process model, by _compare)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**shard_inputs(ids, labels))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    results = []
    for step in (model, torch.compile(model, backend=backend, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = step(**shard_inputs(ids, labels)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (loss, grads) = results
    assert abs(loss.item() - eager_loss.item()) <= TOL * abs(eager_loss.item()), "compiled loss"
    for (pname, _), got, want in zip(model.named_parameters(), grads, eager_grads, strict=True):
        assert _rel(got, want) < TOL, f"compiled d{pname} rel. L2 error {_rel(got, want):.2e}"
    _compare("torch.compile fullgraph", ref, model, ids, labels, step=torch.compile(model, backend=backend,
                                                                                 fullgraph=True))  # fmt: skip


def _compare_packed(name: str, ref, model, lengths: list[int], *, via: str, group=None) -> None:
    """A packed row of documents (restarting position ids, or cu_seqlens) against each document run alone."""
    gen = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    ids = torch.randint(0, VOCAB, (1, total), generator=gen)
    labels = ids.clone()
    labels[0, 0] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    # Reference: every document through the single-process model on its own; the loss over the packed row
    # (shifted over the whole row, as transformers' loss does).
    want_logits = torch.cat([ref(input_ids=ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:], strict=True)], 1)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    count = (shifted != -100).sum()
    want_loss = (
        torch.nn.functional.cross_entropy(want_logits.view(-1, VOCAB), shifted.view(-1), reduction="sum") / count
    )
    want_loss.backward()
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    kw = {"position_ids": positions} if via == "position_ids" else {"cu_seqlens": cu}
    got = model(**shard_inputs(ids, labels, group=group, **kw))
    got.loss.backward()
    loss = got.loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
    logits = gather_packed(got.logits[0].detach(), cu, dim=0)
    assert _rel(logits, want_logits[0]) < TOL, f"{name}: logits {_rel(logits, want_logits[0]):.2e}"
    assert abs(loss.item() - want_loss.item()) < TOL * want_loss.item(), f"{name}: loss"
    for (pname, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert _rel(q.grad, p.grad) < TOL, f"{name}: d{pname} rel. L2 error {_rel(q.grad, p.grad):.2e}"


def _bf16_no_worse_than_sdpa(ref, ids, labels) -> None:
    """bfloat16 ring vs float32 reference: no worse than 2x bf16 SDPA's own error on the same model (logits and
    every parameter gradient, relative L2). Both round the same weights and activations to bf16; the ring differs
    only in how attention sums its blocks (float32 accumulators), so its error is of the same size."""
    ref.zero_grad(set_to_none=True)
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    sdpa = copy.deepcopy(ref).to(torch.bfloat16)
    ring = apply_ring_attention(copy.deepcopy(ref).to(torch.bfloat16))
    base = sdpa(input_ids=ids, labels=labels)
    base.loss.backward()
    got = ring(**shard_inputs(ids, labels))
    got.loss.backward()
    logits = ringattn.gather_sequence(got.logits.detach(), dim=1)[:, : ids.shape[1]]
    assert _rel(logits.float(), want.logits) <= 2 * _rel(base.logits.float(), want.logits)
    for (name, p), q, r in zip(ref.named_parameters(), sdpa.parameters(), ring.parameters(), strict=True):
        eager_err, ring_err = _rel(q.grad.float(), p.grad), _rel(r.grad.float(), p.grad)
        assert ring_err <= 2 * eager_err, f"bf16 d{name}: ring {ring_err:.2e}, SDPA {eager_err:.2e}"


def _traps(rank: int, world_size: int, ref, model) -> None:
    ids, labels = _batch(6, 2, 4 * world_size)
    batch = shard_inputs(ids, labels)
    # local positions (the model's own arange): rotary would see the wrong positions
    _raises(ConfigError, "position_ids", lambda: model(input_ids=batch["input_ids"], use_cache=False))
    # labels shifted inside each shard
    _raises(
        ConfigError,
        "labels",
        lambda: model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]),
    )
    # the per-rank mean instead of the share of the global one
    no_count = {k: v for k, v in batch.items() if k != "num_items_in_batch"}
    _raises(ConfigError, "num_items_in_batch", lambda: model(**no_count))
    # a padding mask reaching the model (transformers would drop it for an unknown attention)
    holes = torch.ones_like(batch["input_ids"])
    holes[0, 1] = 0
    _raises(ConfigError, "attention_mask", lambda: model(**batch, attention_mask=holes))
    # packed documents: only through shard_inputs, one row, no mask, positions and cu_seqlens agreeing
    half = ids.shape[1] // 2
    restart = torch.cat([torch.arange(half)] * 2).expand(2, -1)
    _raises(ConfigError, "position_ids", lambda: shard_inputs(ids, labels, position_ids=restart))
    cu = torch.tensor([0, half, ids.shape[1]])
    _raises(ShapeError, "input_ids", lambda: shard_inputs(ids, labels, cu_seqlens=cu))
    one = (ids[:1], labels[:1])
    _raises(ConfigError, "attention_mask", lambda: shard_inputs(*one, cu_seqlens=cu, attention_mask=ids[:1] * 0 + 1))
    other = torch.tensor([0, half + 1, ids.shape[1]])
    _raises(ConfigError, "position_ids", lambda: shard_inputs(*one, cu_seqlens=other, position_ids=restart[:1]))
    _raises(ConfigError, "cu_seqlens", lambda: shard_inputs(*one, cu_seqlens=torch.tensor([0, half, 3])))
    # ... straight to the model, they raise: restarting positions, or transformers' own varlen keywords
    packed = {**batch, "position_ids": batch["position_ids"] % half}
    _raises(ConfigError, "position_ids", lambda: model(**packed))
    _raises(ConfigError, "cu_seq_lens_q", lambda: model(**batch, cu_seq_lens_q=cu, cu_seq_lens_k=cu))
    # left padding cannot be expressed
    left = torch.ones_like(ids)
    left[0, 0] = 0
    _raises(ConfigError, "attention_mask", lambda: shard_inputs(ids, labels, attention_mask=left))
    # attention dropout in training
    dropout = apply_ring_attention(tiny_llama(attention_dropout=0.1))
    dropout.train()
    _raises(ConfigError, "attention dropout", lambda: dropout(**batch))
    dropout.eval()
    dropout(**batch)  # no dropout in evaluation: runs
    # a KV cache of earlier tokens (generation)
    _raises(ConfigError, "key", lambda: _with_cache(model, batch))
    if world_size > 1:
        # ranks holding different batches (a data sampler per context-parallel rank)
        _raises(ConfigError, "input_ids", lambda: shard_inputs(ids + rank % 2, labels))
        # gradient accumulation: two backwards without zero_grad sum both steps' global gradients
        _compare_accumulated(ref, model, _batch(9, 2, 4 * world_size), _batch(10, 2, 4 * world_size))
        # DDP on top of the hooks would rewrite the sum: refused, naming the argument
        hooked = apply_ring_attention(copy.deepcopy(ref))
        ddp = torch.nn.parallel.DistributedDataParallel(hooked)
        ids, labels = _batch(7, 2, 4 * world_size)
        _raises(ConfigError, "reduce_gradients", lambda: ddp(**shard_inputs(ids, labels)).loss.backward())
        # DDP over the (flattened dp x) cp group with reduce_gradients=False and the loss times the cp size: exact
        plain = apply_ring_attention(copy.deepcopy(ref), reduce_gradients=False)
        _compare_ddp(ref, plain, torch.nn.parallel.DistributedDataParallel(plain), ids, labels, world_size)
        # reduce_gradients=False + all_reduce_gradients: the same gradients
        manual = apply_ring_attention(copy.deepcopy(ref), reduce_gradients=False)
        _compare_manual(ref, manual, *_batch(8, 2, 4 * world_size))


def _with_cache(model, batch):
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
    out = model(**{**batch, "use_cache": True})
    return model(**{**batch, "use_cache": True, name: out.past_key_values})


def _compare_accumulated(ref, model, first, second) -> None:
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    for ids, labels in (first, second):
        ref(input_ids=ids, labels=labels).loss.backward()
        model(**shard_inputs(ids, labels)).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert _rel(q.grad, p.grad) < TOL, f"accumulated d{name} rel. L2 error {_rel(q.grad, p.grad):.2e}"


def _compare_ddp(ref, model, ddp, ids, labels, world_size: int) -> None:
    ref.zero_grad(set_to_none=True)
    ref(input_ids=ids, labels=labels).loss.backward()
    (ddp(**shard_inputs(ids, labels)).loss * world_size).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert _rel(q.grad, p.grad) < TOL, f"DDP d{name} rel. L2 error {_rel(q.grad, p.grad):.2e}"


def _compare_manual(ref, model, ids, labels) -> None:
    ref.zero_grad(set_to_none=True)
    ref(input_ids=ids, labels=labels).loss.backward()
    model(**shard_inputs(ids, labels)).loss.backward()
    all_reduce_gradients(model)
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert _rel(q.grad, p.grad) < TOL


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world_size", "compile_backend", "bf16"), [(2, "aot_eager", False), (4, None, True)])
def test_llama_sharded_over_w_ranks_matches_single_process(world_size, compile_backend, bf16, tmp_path):
    run_ranks(_grid, world_size, tmp_path, deadline_s=100, compile_backend=compile_backend, bf16=bf16)


def test_single_process_is_a_ring_of_one():
    """No process group: the same two lines give the single-process model exactly (W = 1)."""
    ref = tiny_llama()
    model = apply_ring_attention(copy.deepcopy(ref))
    ids, labels = _batch(11, 2, 13)
    _compare("W = 1", ref, model, ids, labels)


def test_packed_single_process():
    ref = tiny_llama()
    model = apply_ring_attention(copy.deepcopy(ref))
    _compare_packed("packed W = 1", ref, model, [3, 6, 1, 4], via="position_ids")


def test_models_without_the_attention_interface_are_refused():
    _raises(ConfigError, "model", lambda: apply_ring_attention(torch.nn.Linear(2, 2)))

    class Legacy(transformers.PreTrainedModel):
        config_class = LlamaConfig
        _supports_attention_backend = False

    legacy = Legacy(LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=8))
    _raises(ConfigError, "model", lambda: apply_ring_attention(legacy))


def test_non_causal_attention_modules_are_refused():
    model = apply_ring_attention(tiny_llama())
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    ids, labels = _batch(12, 1, 8)
    _raises(ConfigError, "module.is_causal", lambda: model(**shard_inputs(ids, labels)))


def test_shard_inputs_bad_arguments():
    ids = torch.randint(0, VOCAB, (2, 8))
    _raises(DTypeError, "input_ids", lambda: shard_inputs(ids.float()))
    _raises(DTypeError, "input_ids", lambda: shard_inputs([[1, 2]]))
    _raises(ShapeError, "input_ids", lambda: shard_inputs(ids[0]))
    _raises(ShapeError, "labels", lambda: shard_inputs(ids, ids[:, :4]))
    _raises(ShapeError, "attention_mask", lambda: shard_inputs(ids, attention_mask=torch.ones(2, 7, dtype=torch.long)))
    _raises(ConfigError, "attention_mask", lambda: shard_inputs(ids, attention_mask=torch.full_like(ids, 2)))


def test_shard_inputs_shifts_over_the_full_sequence_and_counts_globally():
    """W = 1 here: the shift, the padding to 2W and the count, checked value by value."""
    ids = torch.arange(10, 17).unsqueeze(0)  # 7 tokens -> padded to 8
    labels = ids.clone()
    labels[0, 1] = -100
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    got = shard_inputs(ids, labels, attention_mask=mask, pad_token_id=3)
    assert got["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 16, 3]]
    assert got["position_ids"].tolist() == [list(range(8))]
    # token t is scored against token t+1 when t+1 is real and labelled
    assert got["shift_labels"].tolist() == [[-100, 12, 13, 14, 15, -100, -100, -100]]
    assert got["labels"] is got["shift_labels"]
    assert int(got["num_items_in_batch"]) == 4
    assert got["use_cache"] is False


def test_compiled_model_is_one_graph():
    """torch.compile(fullgraph=True) of the prepared model: one graph (the ring is a custom op, the position check
    another: Note [torch.compile] in the integration), exact against the single-process model, and the position
    check still runs inside the compiled graph."""
    ref = tiny_llama()
    model = apply_ring_attention(copy.deepcopy(ref))
    ids, labels = _batch(13, 2, 10)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**shard_inputs(ids, labels))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _compare("torch.compile aot_eager fullgraph", ref, model, ids, labels, step=compiled)
    batch = shard_inputs(ids, labels)
    batch["position_ids"] = batch["position_ids"].flip(-1)
    _raises(ConfigError, "position_ids", lambda: compiled(**batch))


def _run_example(rank: int, world_size: int) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "transformers_ring.py"
    spec = importlib.util.spec_from_file_location("transformers_ring", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = ["--seq", "32", "--hidden", "64", "--heads", "4", "--vocab", "128"]
    err = example.main(small)
    assert err < TOL, f"examples/transformers_ring.py: worst gradient rel. L2 {err:.2e}"


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_transformers_example_two_ranks(tmp_path):
    run_ranks(_run_example, 2, tmp_path, deadline_s=100)


@pytest.mark.parametrize(("kwarg", "value"), [("softcap", 30.0)])
def test_attention_features_the_ring_does_not_implement_raise(kwarg, value):
    from ringattn.integrations.transformers import ring_attention_forward

    model = apply_ring_attention(tiny_llama())
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    positions = torch.arange(8).unsqueeze(0)
    ring_attention_forward(attn, q, kv, kv, None, position_ids=positions)  # runs without the feature
    _raises(
        ConfigError,
        kwarg,
        lambda: ring_attention_forward(attn, q, kv, kv, None, position_ids=positions, **{kwarg: value}),
    )
    stranger = torch.nn.Module()
    stranger.config = LlamaConfig()
    _raises(ConfigError, "model", lambda: ring_attention_forward(stranger, q, kv, kv, None, position_ids=positions))


def test_transformers_without_the_mask_interface_is_refused(monkeypatch):
    from ringattn.integrations import transformers as integration

    monkeypatch.setattr(integration, "AttentionMaskInterface", None)
    _raises(ConfigError, "transformers", lambda: apply_ring_attention(tiny_llama()))


def test_shard_inputs_bad_packing_arguments():
    ids = torch.randint(0, VOCAB, (1, 8))
    _raises(DTypeError, "cu_seqlens", lambda: shard_inputs(ids, cu_seqlens=torch.tensor([0.0, 8.0])))
    _raises(ConfigError, "cu_seqlens", lambda: shard_inputs(ids, cu_seqlens=[0, 5, 3, 8]))
    _raises(ShapeError, "position_ids", lambda: shard_inputs(ids, position_ids=torch.arange(8)))
    _raises(ConfigError, "position_ids", lambda: shard_inputs(ids, position_ids=torch.arange(1, 9).unsqueeze(0)))
    # one document described either way is the dense ring's batch
    dense = shard_inputs(ids)
    for kw in ({"cu_seqlens": [0, 8]}, {"position_ids": torch.arange(8).unsqueeze(0)}):
        got = shard_inputs(ids, **kw)
        assert got.keys() == dense.keys() and torch.equal(got["input_ids"], dense["input_ids"])


# --- the gradient sum over the group, without processes (Note [gradient sum over the group]) ----------------------


class _TwoRanks:
    """``dist.all_reduce`` as if a second rank sent ``other(flat)``: counts the messages."""

    def __init__(self, other):
        self.other, self.calls = other, 0

    def __call__(self, flat, op=None, group=None, async_op=False):
        self.calls += 1
        flat.add_(self.other(flat.clone()))
        return _DoneWork() if async_op else None


class _DoneWork:
    """A completed torch Work."""

    def wait(self, timeout=None):
        return True


def _summed(monkeypatch, params, other, bucket_bytes=None):
    from ringattn.integrations import transformers as integration

    fake = _TwoRanks(other)
    monkeypatch.setattr(integration.dist, "all_reduce", fake)
    monkeypatch.setattr(integration, "bounded_wait", lambda work, what, **kw: work.wait())  # no process group here
    if bucket_bytes is not None:
        monkeypatch.setattr(integration, "_BUCKET_BYTES", bucket_bytes)
    summed = integration._GroupGradientSum(params, group=None)
    for i, p in enumerate(params):
        p.register_hook(functools.partial(summed.hook, i))
    return fake


def _params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((3, 4), (5,), (2, 2))]


def test_gradients_are_summed_once_per_backward_and_accumulate(monkeypatch):
    """A rank identical to this one: every gradient doubles, in one message per backward; a second backward without
    zero_grad adds its own doubled gradient (accumulation); a parameter no rank used keeps ``None``."""
    used, also, unused = _params(1)
    fake = _summed(monkeypatch, [used, also, unused], other=lambda flat: flat)
    gen = torch.Generator().manual_seed(2)
    total = {id(used): 0, id(also): 0}
    for _ in range(2):
        up = torch.randn(3, 4, generator=gen)
        ((used * up).sum() + also.pow(2).sum()).backward()
        total[id(used)] = total[id(used)] + 2 * up
        total[id(also)] = total[id(also)] + 2 * 2 * also.detach()
    assert fake.calls == 2
    torch.testing.assert_close(used.grad, total[id(used)], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(also.grad, total[id(also)], rtol=1e-6, atol=1e-6)
    assert unused.grad is None


def test_a_parameter_only_other_ranks_used_gets_their_sum(monkeypatch):
    """The other rank has a gradient (all 7.0) for a parameter this rank never used: this rank receives it, as the
    sum over the ranks; the flags travel in the same message, so both ranks ran one identical collective."""
    used, lonely, _ = _params(3)
    sizes = [used.numel(), lonely.numel()]

    def other(flat):
        sent = torch.zeros_like(flat)
        sent[sizes[0] : sum(sizes)] = 7.0  # lonely's gradient on the other rank
        sent[sum(sizes) + 1] = 1  # and its flag
        return sent

    fake = _summed(monkeypatch, [used, lonely], other)
    up = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    (used * up).sum().backward()
    assert fake.calls == 1
    torch.testing.assert_close(used.grad, up)
    torch.testing.assert_close(lonely.grad, torch.full((5,), 7.0))


def test_gradients_travel_in_buckets_of_bounded_size(monkeypatch):
    a, b, c = _params(5)
    fake = _summed(monkeypatch, [a, b, c], other=lambda flat: flat, bucket_bytes=4 * 12)  # a alone fills a bucket
    (a.sum() + b.sum() + c.sum()).backward()
    assert fake.calls == 2  # [a], [b, c]
    for p in (a, b, c):
        torch.testing.assert_close(p.grad, torch.full_like(p, 2.0))


def test_a_gradient_rewritten_after_the_sum_raises_naming_reduce_gradients(monkeypatch):
    """What DDP or FSDP on top would do (write their own reduction over the sum): refused, not silently wrong."""
    a, b, _ = _params(6)
    _summed(monkeypatch, [a, b], other=lambda flat: flat)
    queue = torch.autograd.Variable._execution_engine.queue_callback
    a.register_hook(lambda g: queue(lambda: a.grad.mul_(0.5)) or g)  # like DDP's averaging, after our sum
    _raises(ConfigError, "reduce_gradients", lambda: (a.sum() + b.sum()).backward())


def test_summed_gradients_are_previous_plus_sum_bitwise_on_both_ranks(monkeypatch):
    """One bit pattern per replica (issue 22): with gradients accumulated over two backwards, each "rank" (this
    process playing rank A, then rank B with the roles swapped) ends with exactly ``previous + (mine + theirs)``,
    the same bits on both; ``(previous + mine) + (sum - mine)``, the former rule, rounds differently per rank."""
    gen = torch.Generator().manual_seed(21)
    shape = (2, 32, 32)  # two backwards of a 32 x 32 weight
    ups = [torch.randn(shape, generator=gen) * 10 ** torch.randint(-3, 4, shape, generator=gen) for _ in "ab"]

    def run(me: int) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(shape[1:]))
        step = [0]

        def other(flat):  # the other rank's gradient of the same backward: its upstream tensor
            sent = torch.zeros_like(flat)
            sent[: weight.numel()] = ups[1 - me][step[0]].reshape(-1)
            sent[weight.numel()] = 1
            return sent

        _summed(monkeypatch, [weight], other)
        want = None
        for step[0] in range(2):
            (weight * ups[me][step[0]]).sum().backward()
            total = ups[me][step[0]] + ups[1 - me][step[0]]  # what the all-reduce gives both ranks (commutative)
            want = total if want is None else want + total
        assert torch.equal(weight.grad, want)
        return weight.grad

    a, b = run(0), run(1)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    mine, theirs = ups[0], ups[1]
    old = [(mine[0] + theirs[0] + mine[1]) + ((mine[1] + theirs[1]) - mine[1])]
    old.append((theirs[0] + mine[0] + theirs[1]) + ((theirs[1] + mine[1]) - theirs[1]))
    assert not torch.equal(old[0], old[1])  # the data tells the rules apart: the test can fail


def _replicas_stay_bitwise_equal(rank: int, world_size: int, steps: int) -> None:
    """``steps`` AdamW steps of 2 micro-batches each: after every sum the gradients, and after every step the
    parameters, are bitwise equal on every rank (gathered as int32 bits); the parameters track the single-process
    model's."""
    torch.set_num_threads(1)
    ref = tiny_llama(seed=3)
    model = apply_ring_attention(copy.deepcopy(ref))
    start = [p.detach().clone() for p in ref.parameters()]
    opt_ref, opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model))

    def same_bits_everywhere(tensors, what: str) -> None:
        bits = torch.cat([t.detach().reshape(-1) for t in tensors]).view(torch.int32)
        every = [torch.empty_like(bits) for _ in range(world_size)]
        dist.all_gather(every, bits)
        differ = [int((other != every[0]).sum()) for other in every[1:]]
        assert differ == [0] * (world_size - 1), f"{what}: elements differing from rank 0's, per rank: {differ}"

    for step in range(steps):
        opt_ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        for micro in range(2):
            ids, labels = _batch(100 + 2 * step + micro, 2, 8 * world_size)
            ref(input_ids=ids, labels=labels).loss.backward()
            model(**shard_inputs(ids, labels)).loss.backward()
        same_bits_everywhere([p.grad for p in model.parameters()], f"gradients of step {step}")
        opt_ref.step()
        opt.step()
        same_bits_everywhere(list(model.parameters()), f"parameters after step {step}")
    for (name, p), q, p0 in zip(ref.named_parameters(), model.parameters(), start, strict=True):
        # the updates (20 steps of ~lr each) agree with one process's: measured <= 1.2e-5 relative L2
        assert _rel(q.detach() - p0, p.detach() - p0) < 1e-4, f"{name}: update rel. L2 {_rel(q - p0, p - p0):.2e}"


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_replicas_stay_bitwise_equal_over_20_steps_of_2_micro_batches(tmp_path):
    """Issue 22 item 3: one bit pattern per replica at W = 2, 20 optimizer steps of 2 micro-batches each."""
    run_ranks(_replicas_stay_bitwise_equal, 2, tmp_path, deadline_s=150, steps=20)


def test_launched_as_one_of_several_ranks_without_a_process_group_raises(monkeypatch):
    """The integration's "no group" path agrees with the ring's (Note [launched without a process group] in
    ring/comm.py): under torchrun's WORLD_SIZE=2 without init_process_group, a ring of one would be silently wrong."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _raises(ConfigError, "group", lambda: apply_ring_attention(tiny_llama()))
    _raises(ConfigError, "group", lambda: shard_inputs(torch.randint(0, VOCAB, (1, 8))))
    monkeypatch.setenv("WORLD_SIZE", "1")
    apply_ring_attention(tiny_llama())  # a ring of one again
