"""The float64 oracle itself: ``docs/contract.md``'s per-batch layout on a hand-computed case, and identities."""

from __future__ import annotations

import math

import pytest
import torch

import ringattn
from inputs import available_backends, backend_device, make_update_inputs
from ringattn.reference import merge_stats_reference, ring_attention_update_reference

# Three batches of lengths 2, 0, 3 (T = 5) and N = 2 heads. ``docs/contract.md``, "Statistics orders": token t of
# batch i, head n uses statistics row c_i*N + n*S_i + (t - c_i). Written out by hand, (t, n) -> row:
PER_BATCH_ROWS = {
    (0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3,  # batch 0: c = 0, S = 2
    (2, 0): 4, (3, 0): 5, (4, 0): 6, (2, 1): 7, (3, 1): 8, (4, 1): 9,  # batch 2: c = 2, S = 3
}  # fmt: skip
TOKEN_MAJOR_ROWS = {(t, n): 2 * t + n for t in range(5) for n in range(2)}


def labelled_inputs(dtype: torch.dtype = torch.float64):
    """prev contributes 0, cur contributes 1 with weight (r + 1) / (r + 2) for statistics row r."""
    tokens, heads, head_dim = 5, 2, 3
    rows = torch.arange(tokens * heads, dtype=torch.float32).view(tokens, heads, 1).expand(tokens, heads, 8)
    zeros = torch.zeros(tokens, heads, 8)
    return (
        torch.zeros(tokens, heads, head_dim, dtype=dtype),
        zeros.clone(),
        torch.ones(tokens, heads, 8),
        torch.ones(tokens, heads, head_dim, dtype=dtype),
        zeros.clone(),
        (rows + 1).contiguous(),
    )


@pytest.mark.parametrize("backend", ["reference", *available_backends()])
@pytest.mark.parametrize(("softmax_layout", "table"), [(None, PER_BATCH_ROWS), ("TND", TOKEN_MAJOR_ROWS)])
def test_tnd_statistics_rows_are_the_spec_ones(backend, softmax_layout, table):
    args = [t.to(backend_device(backend)) for t in labelled_inputs(torch.float32)]
    out, _, new_sum = ringattn.ring_attention_update(
        *args, [0, 2, 2, 5], "TND", softmax_layout=softmax_layout, ascend_limits=False, backend=backend
    )
    for (t, n), r in table.items():
        want = (r + 1) / (r + 2)
        torch.testing.assert_close(out[t, n].cpu(), torch.full((3,), want), rtol=1e-6, atol=0)
    # Statistics are merged in their own layout, row by row, whatever the layout: sum = 1 + (r + 1).
    torch.testing.assert_close(new_sum[..., 0].reshape(-1).cpu(), torch.arange(10, dtype=torch.float32) + 2)


def test_single_head_layouts_coincide():
    gen = torch.Generator().manual_seed(0)
    x = make_update_inputs("TND", torch.float64, gen, seq_lens=[3, 0, 4], heads=1, head_dim=2)
    per_batch = ring_attention_update_reference(*x.args())
    token_major = ring_attention_update_reference(*x.args(), softmax_layout="TND")
    for a, b in zip(per_batch, token_major, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sbh_statistics_rows():
    """attn_out[s, b, n*D:(n+1)*D] uses statistics [b, n, s]: checked with labelled rows."""
    seq, batch, heads, head_dim = 3, 2, 2, 2
    labels = torch.arange(batch * heads * seq, dtype=torch.float32).view(batch, heads, seq, 1).expand(-1, -1, -1, 8)
    zeros = torch.zeros(batch, heads, seq, 8)
    out, _, _ = ring_attention_update_reference(
        torch.zeros(seq, batch, heads * head_dim), zeros, torch.ones_like(zeros),
        torch.ones(seq, batch, heads * head_dim), zeros, labels + 1,
    )  # fmt: skip
    for s in range(seq):
        for b in range(batch):
            for n in range(heads):
                r = (b * heads + n) * seq + s
                assert out[s, b, n * head_dim : (n + 1) * head_dim].tolist() == [(r + 1) / (r + 2)] * head_dim


def random_state(gen: torch.Generator, size: int = 64):
    m = torch.randn(size, generator=gen, dtype=torch.float64) * 3
    l = 1 + torch.rand(size, generator=gen, dtype=torch.float64) * 10
    o = torch.randn(size, 4, generator=gen, dtype=torch.float64)
    return o, m, l


def merge(a, b):
    (oa, ma, la), (ob, mb, lb) = a, b
    m, l, wa, wb = merge_stats_reference(ma, la, mb, lb)
    return oa * wa.unsqueeze(-1) + ob * wb.unsqueeze(-1), m, l


def assert_states_close(x, y):
    for a, b in zip(x, y, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_empty_state_is_the_identity():
    gen = torch.Generator().manual_seed(1)
    x = random_state(gen)
    empty = (torch.zeros_like(x[0]), torch.full_like(x[1], -math.inf), torch.zeros_like(x[2]))
    assert_states_close(merge(x, empty), x)
    assert_states_close(merge(empty, x), x)
    o, m, l = merge(empty, empty)
    assert (o == 0).all() and (m == -math.inf).all() and (l == 0).all()


def test_commutative_and_associative():
    gen = torch.Generator().manual_seed(2)
    x, y, z = (random_state(gen) for _ in range(3))
    assert_states_close(merge(x, y), merge(y, x))
    assert_states_close(merge(merge(x, y), z), merge(x, merge(y, z)))


def test_merge_equals_attention_over_the_union():
    """Splitting keys in two, attending to each part and merging gives attention over all keys."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(10, 5, generator=gen, dtype=torch.float64)

    def partial(keys: slice):
        s = q @ k[keys].T
        m = s.max(dim=-1).values
        p = torch.exp(s - m.unsqueeze(-1))
        return (p @ v[keys]) / p.sum(-1, keepdim=True), m, p.sum(-1)

    o, _, _ = merge(partial(slice(0, 4)), partial(slice(4, 10)))
    torch.testing.assert_close(o, torch.softmax(q @ k.T, dim=-1) @ v, rtol=1e-12, atol=1e-12)
