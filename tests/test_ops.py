"""The torch.library custom ops: ``opcheck`` (schema, fake impls, autograd registration) and
``torch.compile(fullgraph=True)`` through the public functions, forward and backward.

Compilation uses ``backend="aot_eager"``: it runs dynamo and AOTAutograd (the parts that can graph-break or trip
over the fake impls) without inductor's C++ code generation, which takes minutes on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.merge import merge_states

OPS = torch.ops.ringattn


def sbh_inputs(dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    s, b, n, d = 3, 2, 2, 4

    def stats():
        m = torch.randn(b, n, s, 1, generator=gen).expand(b, n, s, 8).contiguous()
        l = (torch.rand(b, n, s, 1, generator=gen) + 0.5).expand(b, n, s, 8).contiguous()
        return m.to(torch.float32 if dtype != torch.float64 else dtype), l.to(
            m.dtype if dtype != torch.float64 else dtype
        )

    prev_m, prev_l = stats()
    cur_m, cur_l = stats()
    prev_m[0, 0, 0], prev_l[0, 0, 0] = float("-inf"), 0.0
    ts = [
        torch.randn(s, b, n * d, generator=gen).to(dtype),
        prev_m,
        prev_l,
        torch.randn(s, b, n * d, generator=gen).to(dtype),
        cur_m,
        cur_l,
    ]
    return [t.requires_grad_(requires_grad) for t in ts]


def lse_inputs(k=3, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    o = [torch.randn(5, 2, 4, generator=gen, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(k)]
    lse = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(k)]
    lse[0][0, 0] = float("-inf")
    return o, [t.requires_grad_(requires_grad) for t in lse]


def test_opcheck_ring_attention_update():
    ins = sbh_inputs(torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.ring_attention_update, (*ins, None, "SBH", "BNS", "auto"))
    offsets = torch.tensor([0, 1, 3])
    tnd = [torch.randn(3, 2, 4), torch.rand(3, 2, 8), torch.rand(3, 2, 8)]  # no grad: keeps opcheck quick
    torch.library.opcheck(OPS.ring_attention_update, (*tnd, *tnd, offsets, "TND", "per_batch", "torch"))
    plain = sbh_inputs()
    outs = [torch.empty_like(plain[0]), torch.empty_like(plain[1]), torch.empty_like(plain[1])]
    torch.library.opcheck(OPS.ring_attention_update_out, (*plain, None, "SBH", "BNS", "auto", *outs))


def test_opcheck_merge_states_and_backward():
    o, lse = lse_inputs(requires_grad=True)
    torch.library.opcheck(OPS.merge_states, (o, lse, "TND", "NT", 1.0, "auto"))
    plain_o, plain_lse = lse_inputs()
    out, out_lse = torch.empty_like(plain_o[0]), torch.empty_like(plain_lse[0])
    torch.library.opcheck(OPS.merge_states_out, (plain_o, plain_lse, "TND", "NT", 0.5, "auto", out, out_lse))
    g_o, g_lse = torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.library.opcheck(
        OPS.merge_backward, (g_o, g_lse, None, plain_o, plain_lse, [], None, "TND", "NT", 1.0, "auto")
    )


def _grads(fn, inputs):
    outs = fn(*inputs)
    loss = sum((t.masked_fill(torch.isinf(t), 0) * (i + 1)).sum() for i, t in enumerate(outs))
    return [t.detach() for t in outs], torch.autograd.grad(loss, inputs)


def test_compile_ring_attention_update_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    ins = sbh_inputs(requires_grad=True)
    compiled = torch.compile(ringattn.ring_attention_update, fullgraph=True, backend="aot_eager")
    want_outs, want_grads = _grads(ringattn.ring_attention_update, ins)
    got_outs, got_grads = _grads(compiled, ins)
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compile_merge_states_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    o, lse = lse_inputs(k=4, requires_grad=True)

    def fn(*x):
        return merge_states(x[:4], x[4:], layout="TND", lse_layout="NT", lse_base=2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want_outs, want_grads = _grads(fn, [*o, *lse])
    got_outs, got_grads = _grads(compiled, [*o, *lse])
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compile_out_variant_fullgraph():
    torch._dynamo.reset()
    o, lse = lse_inputs()

    def fn(a, b, c, la, lb, lc):
        return merge_states((a, b, c), (la, lb, lc), layout="TND", lse_layout="NT", out=a, out_lse=la)

    want = merge_states(o, lse, layout="TND", lse_layout="NT")
    copies = [t.clone() for t in (*o, *lse)]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*copies)
    torch.testing.assert_close(copies[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(copies[3], want[1], atol=0, rtol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_compile_ring_attention_update_tnd_fullgraph(as_tensor):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    tnd = [
        torch.randn(3, 2, 64, generator=gen),
        torch.randn(3, 2, 8, generator=gen),
        torch.rand(3, 2, 8, generator=gen),
    ]
    cur = [t + 0.5 for t in tnd]
    offsets = torch.tensor([0, 1, 3]) if as_tensor else [0, 1, 3]

    def fn(*x):
        return ringattn.ring_attention_update(*x, offsets, "TND")

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*tnd, *cur)
    want = fn(*tnd, *cur)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
