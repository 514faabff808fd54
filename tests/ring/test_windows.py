"""Sliding windows in the ring (Note [windows] in ``ring/schedule.py``) against float64 attention with the window's
explicit mask, and the ring steps a window skips.

Output, LSE and dq, dk, dv (random upstream gradients) of the virtual ring at W = 1..8 and over gloo at W = 2, 3,
for windows of 0, 1 and 17 tokens, a chunk, several chunks and longer than S, causal and two-sided, zigzag and
contiguous, GQA. float32 within 1e-5 of float64, relative to max(1, the reference's largest magnitude) (float32
accumulation over <= 48 keys; a window of one token has dq exactly 0); bfloat16 no worse than 2x bfloat16 SDPA's own
error with the same mask (+ 1e-3: one ulp of bf16 at the outputs' magnitude). Skipped steps send nothing: messages
are counted at the comm layer and must equal what the pure schedule predicts; a window of S sends and computes
exactly what the ring without a window does (bitwise). Bad windows raise ConfigError naming ``window``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ring_spawn import run_ranks
from test_strides import attention64

import ringattn
from ringattn.errors import ConfigError
from ringattn.ring import schedule, virtual

N, NKV, D = 4, 2, 8


def window_mask(sq: int, window: tuple[int, int], causal: bool, sk: int | None = None) -> torch.Tensor:
    """Keep-mask ``(sq, sk)`` of ``window``, top-left aligned: row i sees ``i - left .. i + right``, causal ``<= i``."""
    i, j = torch.arange(sq)[:, None], torch.arange(sq if sk is None else sk)[None]
    keep = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
    if window[0] >= 0:
        keep &= j >= i - window[0]
    if window[1] >= 0:
        keep &= j <= i + window[1]
    return keep & (j <= i) if causal else keep


def _inputs(s: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, s, N, D, generator=gen)
    k, v = (torch.randn(1, s, NKV, D, generator=gen) for _ in range(2))
    return [x.to(dtype) for x in (q, k, v, torch.randn(1, s, N, D, generator=gen))]


def _reference(q, k, v, g, mask):
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out, lse = attention64(*leaves, mask)
    return [out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, g.double())]


def _run(fn, q, k, v, g):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    return [out.detach(), lse, *torch.autograd.grad(out, leaves, g)]


def _assert_close(got, want, what) -> None:
    for name, x, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(x), finite), f"{what} {name}: -inf where the reference is not"
        err = (x.double()[finite] - e[finite]).abs().max().item()
        assert err <= 1e-5 * max(1.0, e[finite].abs().max().item()), f"{what} {name}: error {err:.3g}"


CHUNK = 6  # tokens per zigzag chunk: S = 2 W CHUNK
WINDOWS = [(0, 0), (1, 0), (17, 0), (CHUNK, 0), (3 * CHUNK, -1), (1000, 0), (1, 1), (17, 3), (-1, 2), (CHUNK, CHUNK)]


def _simulate(world, causal, sharding, window):
    def fn(q, k, v):
        return ringattn.simulate_ring_attention(q, k, v, world_size=world, causal=causal, sharding=sharding,
                                                layout="BSND", window=window, return_lse=True)  # fmt: skip

    return fn


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize(("world", "sharding"), [(1, "zigzag"), (2, "zigzag"), (3, "contiguous"), (4, "zigzag"),
                                                 (5, "contiguous"), (8, "zigzag")])  # fmt: skip
@pytest.mark.parametrize("causal", [True, False])
def test_virtual_ring_with_a_window(world, sharding, causal, window) -> None:
    s = 2 * world * CHUNK
    q, k, v, g = _inputs(s, seed=world)
    want = _reference(q, k, v, g, window_mask(s, window, causal))
    _assert_close(_run(_simulate(world, causal, sharding, window), q, k, v, g), want, f"W={world} {window}")


@pytest.mark.parametrize("window", [(1, 0), (CHUNK, 0), (5, 5)], ids=str)
def test_bf16_no_worse_than_sdpa(window) -> None:
    s, causal = 4 * 2 * CHUNK, True
    q, k, v, g = _inputs(s, seed=11)
    mask = window_mask(s, window, causal)
    out64 = attention64(*(x.double() for x in (q, k, v)), mask)[0]
    bf = [x.bfloat16() for x in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in bf), attn_mask=mask, enable_gqa=True)
    ours = ringattn.simulate_ring_attention(*bf, world_size=4, causal=causal, layout="BSND", window=window)
    base_err = (sdpa.transpose(1, 2).double() - out64).abs().max().item()
    err = (ours.double() - out64).abs().max().item()
    assert err <= 2 * base_err + 1e-3, f"bf16 {window}: {err:.3g} vs SDPA {base_err:.3g}"


def _gloo_rank(rank: int, world_size: int, window, sharding) -> None:
    s = 2 * world_size * CHUNK
    q, k, v, g = _inputs(s, seed=20 + world_size)
    want = _reference(q, k, v, g, window_mask(s, window, True))
    shard = [ringattn.shard_sequence(x, rank, world_size, sharding=sharding) for x in (q, k, v, g)]
    got = _run(lambda q, k, v: ringattn.ring_attention(q, k, v, layout="BSND", causal=True, sharding=sharding,
                                                       window=window, return_lse=True), *shard)  # fmt: skip
    dims = (1, 2, 1, 1, 1)
    mine = [
        ringattn.shard_sequence(x, rank, world_size, sharding=sharding, dim=d) for x, d in zip(want, dims, strict=True)
    ]
    _assert_close(got, mine, f"gloo rank {rank} {window}")


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "window", "sharding"), [(2, (3, 0), "zigzag"), (3, (CHUNK + 1, 0), "contiguous"),
                                                           (3, (2, 0), "zigzag")], ids=str)  # fmt: skip
def test_gloo_ring_with_a_window(tmp_path, world, window, sharding) -> None:
    run_ranks(_gloo_rank, world, tmp_path, window=window, sharding=sharding)


class _Counter:
    def __init__(self, monkeypatch) -> None:
        self.sent: list[tuple[int, int]] = []
        exchange = virtual.VirtualComm.exchange

        def counting(comm, send, recv, **kw):
            if send is not None:
                self.sent.append((comm.rank, kw.get("tag", 0)))
            return exchange(comm, send, recv, **kw)

        monkeypatch.setattr(virtual.VirtualComm, "exchange", counting)


def _predicted_messages(world, causal, sharding, window) -> int:
    """Messages of a forward + backward, from the pure schedule (Note [windows])."""
    chunk = CHUNK if schedule.chunks_per_rank(causal or window is not None, sharding) == 2 else 2 * CHUNK

    def blocks(r, s):
        return schedule.window_step_blocks(r, s, world, causal=causal, sharding=sharding, chunk=chunk, window=window)

    steps = schedule.active_steps(world, blocks)
    if steps == list(range(world)):  # the relay: kv W-1 forward and backward, dk/dv W hops
        return world * (3 * world - 2) if world > 1 else 0
    kv = sum(1 for s in steps[1:] for r in range(world) if blocks((r + s) % world, s))  # sent where needed
    dkv = sum(1 for s in steps[1:] for r in range(world) if blocks(r, s))
    return 2 * kv + dkv


@pytest.mark.parametrize(("world", "causal", "sharding", "window"), [
    (8, True, "contiguous", (1, 0)), (8, True, "zigzag", (1, 0)), (8, True, "contiguous", (2 * CHUNK + 1, 0)),
    (6, False, "contiguous", (3, 3)), (4, True, "zigzag", (0, 0)), (4, True, "zigzag", (1000, 0)),
])  # fmt: skip
def test_skipped_steps_send_nothing(monkeypatch, world, causal, sharding, window) -> None:
    counter = _Counter(monkeypatch)
    q, k, v, g = _inputs(2 * world * CHUNK, seed=3)
    _run(_simulate(world, causal, sharding, window), q, k, v, g)
    assert len(counter.sent) == _predicted_messages(world, causal, sharding, window)
    if window == (1, 0) and sharding == "contiguous":  # only the neighbour: one kv and one dk/dv hop, no relay
        assert len(counter.sent) == 3 * (world - 1)


def test_a_window_of_s_is_the_ring_without_one() -> None:
    """Bitwise: the same blocks, kernels, merges and messages (Note [windows])."""
    q, k, v, g = _inputs(4 * 2 * CHUNK, seed=5)
    plain = _run(_simulate(4, True, "zigzag", None), q, k, v, g)
    wide = _run(_simulate(4, True, "zigzag", (4 * 2 * CHUNK, 0)), q, k, v, g)
    assert all(torch.equal(a, b) for a, b in zip(plain, wide, strict=True))


@pytest.mark.parametrize("window", [(-2, 0), (1.5, 0), (3,), "left", (True, 0), (0, -5)], ids=str)
def test_bad_windows_name_the_argument(window) -> None:
    q = torch.randn(1, 8, N, D)
    with pytest.raises(ConfigError, match=r"^window: expected None or \(left, right\)"):
        ringattn.ring_attention(q, q, q, layout="BSND", causal=True, window=window)
    with pytest.raises(ConfigError, match=r"^window"):
        ringattn.simulate_ring_attention(q, q, q, world_size=2, layout="BSND", causal=True, window=window)


def test_ranks_that_disagree_on_the_window_raise_on_every_rank() -> None:
    from ringattn.ring import checks
    from ringattn.ring.attention import RingOptions

    q = torch.randn(1, 4, N, D)
    rows = [checks.encode(q, q, q, RingOptions(layout="BSND", window=w), needs_grad=False) for w in ((3, 0), None)]
    with pytest.raises(ConfigError, match=r"window \(rank 1\)"):
        checks.check_table(rows)


@pytest.mark.parametrize(
    ("sharding", "window", "causal"), [("zigzag", (40, 0), True), ("contiguous", (150, 60), False)]
)
def test_band_blocks_cut_into_tiles(sharding, window, causal) -> None:
    """Chunks of 300 tokens under a narrow band: several row tiles per band block (``DensePlan._pieces``)."""
    from ringattn.ring.attention import DensePlan

    world, s = 2, 1200
    plan = DensePlan(causal, sharding, s // world, world, window)
    tiles = [
        len(plan._pieces(b)) for r in range(world) for step in range(world) for b in plan.step_blocks(r, step, world)
    ]
    assert max(tiles) > 1, tiles
    q, k, v, g = _inputs(s, seed=9)
    want = _reference(q, k, v, g, window_mask(s, window, causal))
    _assert_close(_run(_simulate(world, causal, sharding, window), q, k, v, g), want, f"tiles {window}")


def _block_reference(q, k, v, window, causal):
    """float64 ``(out, lse)`` of ``(B, Sq, N, D)`` over ``(B, Sk, Nkv, D)``, the window top-left aligned; rows that see
    no key: (0, -inf)."""
    keep = window_mask(q.shape[1], window, causal, sk=k.shape[1])
    empty = ~keep.any(1)  # rows that see no key: a finite softmax (then zeroed), so gradients stay finite
    groups = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    s = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keep, float("-inf")).masked_fill(empty[:, None], 0.0)
    out = torch.einsum("bnqk,bknd->bqnd", torch.softmax(s, -1), v) * (~empty)[None, :, None, None]
    return out, torch.logsumexp(s, -1).masked_fill(empty, float("-inf"))


@pytest.mark.parametrize(("sq", "sk"), [(40, 40), (25, 300), (300, 33)])
@pytest.mark.parametrize("window", [(0, 0), (3, 0), (17, 5), (-1, 2), (150, -1)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_with_a_window(sq, sk, window, causal) -> None:
    gen = torch.Generator().manual_seed(sq + sk)
    q = torch.randn(2, sq, N, D, generator=gen)
    k, v = (torch.randn(2, sk, NKV, D, generator=gen) for _ in range(2))
    g_out, g_lse = torch.randn(2, sq, N, D, generator=gen), torch.randn(2, N, sq, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ringattn.block_attention(*leaves, layout="BSND", causal=causal, window=window)
    seen = torch.isfinite(lse)
    grads = torch.autograd.grad((out, lse), leaves, (g_out, g_lse.masked_fill(~seen, 0)))
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    out64, lse64 = _block_reference(*ref, window, causal)
    assert torch.equal(seen, torch.isfinite(lse64)), "rows that see no key: lse -inf"
    want = torch.autograd.grad((out64, lse64.masked_fill(~seen, 0)), ref, (g_out.double(), g_lse.double()))
    got = [out.detach(), lse, *grads]
    expect = [out64.detach(), lse64.detach(), *want]
    _assert_close(got, expect, f"block {sq}x{sk} {window} causal={causal}")


def _packed_mask(cu: list[int], window, causal: bool) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    return (doc[:, None] == doc[None, :]) & window_mask(cu[-1], window, causal)


PACKED = [0, 3, 4, 40, 47, 90]  # documents of 3, 1, 36, 7 and 43 tokens: shorter and longer than the windows


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("window", "causal"), [((2, 0), True), ((9, 0), True), ((5, 3), False), ((100, 0), True)],
                         ids=str)  # fmt: skip
def test_packed_ring_with_a_window(world, window, causal) -> None:
    q, k, v, g = (x[0] for x in _inputs(PACKED[-1], seed=30 + world))
    cu = torch.tensor(PACKED)
    mask = _packed_mask(PACKED, window, causal)
    want = _reference(*(x.unsqueeze(0) for x in (q, k, v, g)), mask)

    def fn(q, k, v):
        out, lse = ringattn.simulate_ring_attention(q, k, v, world_size=world, cu_seqlens=cu, causal=causal,
                                                    window=window, return_lse=True)  # fmt: skip
        return out, lse

    got = _run(fn, q, k, v, g)
    got = [got[0].unsqueeze(0), got[1].unsqueeze(0), *(x.unsqueeze(0) for x in got[2:])]
    _assert_close(got, want, f"packed W={world} {window}")


def _gloo_packed_rank(rank: int, world_size: int) -> None:
    q, k, v, g = (x[0] for x in _inputs(PACKED[-1], seed=40))
    cu = torch.tensor(PACKED)
    want = _reference(*(x.unsqueeze(0) for x in (q, k, v, g)), _packed_mask(PACKED, (4, 0), True))
    shards = [ringattn.shard_packed(x, cu, rank, world_size) for x in (q, k, v, g)]
    leaves = [x.requires_grad_() for x in shards[:3]]
    out = ringattn.ring_attention_varlen(*leaves, cu, window=(4, 0))
    grads = torch.autograd.grad(out, leaves, shards[3])
    for name, x, e in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), (want[0], *want[2:]), strict=True):
        mine = ringattn.shard_packed(e[0], cu, rank, world_size)
        err = (x.double() - mine).abs().max().item()
        assert err <= 1e-5 * max(1.0, mine.abs().max().item()), f"gloo packed rank {rank} {name}: {err:.3g}"


@pytest.mark.distributed
def test_gloo_packed_ring_with_a_window(tmp_path) -> None:
    run_ranks(_gloo_packed_rank, 2, tmp_path)


@pytest.mark.parametrize("window", [(3, 0), (5, 5), (2 * CHUNK, 0)], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cuda_band_blocks_run_fa2_window_arguments(monkeypatch, window, packed) -> None:
    """The CUDA path, through CPU doubles asserting FA2's contract (``tests/ring/cuda_doubles.py``): band tiles reach
    FlashAttention-2's ``window_size_left/right`` (bottom-right aligned, as FA2 documents), the result within bf16's
    tolerance of ``test_virtual.py`` (3e-2 absolute and relative) of float64 attention with the window's mask."""
    import cuda_doubles

    cuda_doubles.install(monkeypatch)
    windows = []
    varlen = cuda_doubles.DOUBLES["flash_varlen"]

    def recording(*args, **kwargs):
        windows.append((kwargs.get("window_size_left"), kwargs.get("window_size_right")))
        return varlen(*args, **kwargs)

    monkeypatch.setitem(ringattn.ring.blocks.ATEN, "flash_varlen", recording)
    causal, world = window[1] == 0, 3
    if packed:
        q, k, v, g = (x[0].bfloat16() for x in _inputs(PACKED[-1], seed=50))
        mask = _packed_mask(PACKED, window, causal)
        kw = {"cu_seqlens": torch.tensor(PACKED)}
    else:
        q, k, v, g = (x.bfloat16() for x in _inputs(2 * world * CHUNK, seed=50))
        mask = window_mask(q.shape[1], window, causal)
        kw = {"layout": "BSND"}

    def run(w):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ringattn.simulate_ring_attention(*leaves, world_size=w, causal=causal, window=window, **kw)
        return [out.detach(), *torch.autograd.grad(out, leaves, g)]

    got = run(world)
    assert any(w != (None, None) for w in windows), "no band tile reached FA2's window arguments"
    lift = (lambda x: x.unsqueeze(0)) if packed else (lambda x: x)
    want = _reference(*(lift(x) for x in (q, k, v, g)), mask)
    for name, x, e in zip(("out", "dq", "dk", "dv"), got, (want[0], *want[2:]), strict=True):
        torch.testing.assert_close(lift(x).double(), e, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_bench_ring_reports_the_steps_a_window_takes(capsys) -> None:
    from ringattn.bench.ring import main

    assert main(["--window", "8"]) == 2  # needs --virtual: an argument error, named
    assert "--window and --sharding need --virtual" in capsys.readouterr().err
    args = ["--virtual", "--world-size", "4", "--seq-len", "128", "--heads", "2", "--head-dim", "8", "--repeats", "1"]
    assert main([*args, "--window", "4", "--sharding", "contiguous"]) == 0
    out = capsys.readouterr().out
    assert "ring steps taken [0, 1] of 4" in out and "single (window)" in out
