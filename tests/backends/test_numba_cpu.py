"""What is specific to the fused CPU backend (``backends/numba_cpu.py``) and ``_alloc.empty_fast``.

The shared property tests (every layout, dtype and edge row against the float64 reference) run this
backend from ``test_ring_attention_update.py``; here: odd sizes, strides on every argument, thread
counts, K-part merges in both statistics forms, per-batch row maps, bit-exact 16-bit rounding, NaN,
empty rows, aliasing, zero sizes. Tolerances: ``inputs.TOL`` (``docs/contract.md``, "Numerics") against float64.

Each distinct (dtype, K) compiles the kernel once per process (seconds, cached on disk afterwards), so
the tests reuse few signatures: fp32 for K = 1..8, the other dtypes at K = 2.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("numba", reason="the cpu backend needs numba")

from inputs import TOL, make_update_inputs, strided_copy  # noqa: E402
from ringattn import backends  # noqa: E402
from ringattn._alloc import empty_fast  # noqa: E402
from ringattn._contract import per_batch_row_map, validate_update  # noqa: E402
from ringattn.backends import numba_cpu, torch_eager  # noqa: E402
from ringattn.reference import ring_attention_update_reference  # noqa: E402

LN2 = math.log(2.0)


def run_update(x, *, out=None):
    """The contract's op through ``numba_cpu.merge_rows`` on ``x``, into NaN-poisoned fresh outputs unless ``out``."""
    problem = validate_update(*x.args(), softmax_layout=x.softmax_layout, ascend_limits=False)
    if out is None:
        out = tuple(torch.full_like(t, math.nan) for t in (x.prev_o, x.prev_m, x.prev_l))
    backends.ring_attention_update(numba_cpu, problem, *out)
    return out


def assert_reference(x, got) -> None:
    want = ring_attention_update_reference(*x.args(), softmax_layout=x.softmax_layout)
    tol = TOL[x.prev_o.dtype]
    torch.testing.assert_close(got[0].double(), want[0], atol=tol, rtol=tol)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.double(), w, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def parts(k: int, shape: tuple[int, ...], gen: torch.Generator, dtype=torch.float32, lse: bool = False):
    """K random partial results ``(P, Q, N, D)`` with 8-lane stats; ~1 row in 5 empty in each part."""
    p, q, n, d = shape
    os_, ms, ls = [], [], []
    for _ in range(k):
        os_.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype))
        m = torch.randn((p, q, n, 1), generator=gen, dtype=torch.float64) * 4
        s = 1 + torch.rand((p, q, n, 1), generator=gen, dtype=torch.float64) * 63
        empty = torch.rand((p, q, n, 1), generator=gen) < 0.2
        if lse:
            m = (m + s.log()).masked_fill(empty, -math.inf)
        ms.append(m.masked_fill(empty, -math.inf).float().expand(p, q, n, 8).contiguous())
        ls.append(s.masked_fill(empty, 0.0).float().expand(p, q, n, 8).contiguous())
    return os_, ms, (None if lse else ls)


def outputs_like(o: torch.Tensor, m: torch.Tensor, lse: bool):
    return torch.full_like(o, math.nan), torch.full_like(m, math.nan), None if lse else torch.full_like(m, math.nan)


def float64_merge(parts_o, parts_m, parts_l, lse_scale=1.0):
    """Note [row merge] in float64 (via the portable backend's formula on float64 copies)."""
    o64 = [o.double() for o in parts_o]
    m64 = [m.double() for m in parts_m]
    l64 = None if parts_l is None else [s.double() for s in parts_l]
    out = outputs_like(o64[0], m64[0], parts_l is None)
    torch_eager.merge_rows(o64, m64, l64, *out, lse_scale=lse_scale)
    return out


# --- merge_rows: K parts, both forms ----------------------------------------------------------------


# numba compiles one kernel per K (10-30 s each on 2 cores, longer for larger K): the default run covers K = 1 (which
# runs the torch backend, Note [one part]), 2 and 3, the `slow` run K = 4 to 8 (issue 15: the test command under 4
# minutes).
@pytest.mark.parametrize("k", [1, 2, 3, *(pytest.param(k, marks=pytest.mark.slow) for k in range(4, 9))])
@pytest.mark.parametrize("form", ["stats", "lse"])
def test_merge_rows_k_parts(k: int, form: str) -> None:
    gen = torch.Generator().manual_seed(k)
    lse = form == "lse"
    scale = LN2 if lse else 1.0  # LSE form: base-2 log-sum-exps, as FlashAttention-3 / Triton produce
    os_, ms, ls = parts(k, (3, 2, 5, 19), gen, lse=lse)
    got = outputs_like(os_[0], ms[0], lse)
    numba_cpu.merge_rows(os_, ms, ls, *got, lse_scale=scale)
    want = float64_merge(os_, ms, ls, lse_scale=scale)
    tol = TOL[torch.float32]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)


def test_merge_rows_lse_plus_inf_is_empty_and_all_empty_is_minus_inf() -> None:
    o = [torch.ones(1, 1, 3, 4), torch.full((1, 1, 3, 4), 2.0)]
    a = torch.tensor([math.inf, math.inf, 0.0]).view(1, 1, 3, 1).expand(1, 1, 3, 8).contiguous()
    b = torch.tensor([math.inf, 1.0, -math.inf]).view(1, 1, 3, 1).expand(1, 1, 3, 8).contiguous()
    out_o, out_m, _ = outputs_like(o[0], a, True)
    numba_cpu.merge_rows(o, [a, b], None, out_o, out_m, None, lse_scale=LN2)
    assert torch.equal(out_o[0, 0, 0], torch.zeros(4)) and bool((out_m[0, 0, 0] == -math.inf).all())
    assert torch.equal(out_o[0, 0, 1], torch.full((4,), 2.0)) and bool((out_m[0, 0, 1] == 1.0).all())
    assert torch.equal(out_o[0, 0, 2], torch.ones(4)) and bool((out_m[0, 0, 2] == 0.0).all())


@pytest.mark.parametrize("lane_stride", [1, 3])  # unit-stride lanes (Ascend's layout) and strided lanes
def test_lane_check_compares_bits_signed_zeros_and_nans_stay_exact(lane_stride: int) -> None:
    """The 8-lane check compares bits (Note [cpu merge kernel]): lanes that are float-equal but differ in bits
    (+0 / -0 maxima) go lane by lane and must give bitwise the outputs of the all-+0 rows (the lane rule is
    the same arithmetic); bit-equal NaN lanes take the one-lane path and must still give NaN like the float64
    lane rule."""
    gen = torch.Generator().manual_seed(13)
    shape = (4, 3, 5, 24)
    os_, ms, ls = parts(2, shape, gen)
    zero_rows = torch.rand(shape[:3], generator=gen) < 0.5
    for m in ms:
        m[zero_rows] = 0.0
    signed = [m.clone() for m in ms]
    signed[1][..., 4:][zero_rows] = -0.0  # float-equal to lane 0, different bits
    signed[0][0, 0, 0] = math.nan  # one NaN payload in all 8 lanes: bit-equal lanes
    stats = [
        torch.empty((*shape[:3], 8 * lane_stride))[..., ::lane_stride].copy_(t) if lane_stride != 1 else t
        for t in (*signed, *ms, *ls)
    ]
    signed_m, plain_m, ls_ = stats[:2], stats[2:4], stats[4:]
    got = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, signed_m, ls_, *got, lse_scale=1.0)
    plain = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, plain_m, ls_, *plain, lse_scale=1.0)
    nan_row = torch.zeros(shape[:3], dtype=torch.bool)
    nan_row[0, 0, 0] = True
    assert bool(zero_rows[~nan_row].any()) and bool(got[0][0, 0, 0].isnan().all())
    for g, w in zip(got, plain, strict=True):  # rows without the NaN: bitwise the +0 merge
        assert torch.equal(g[~nan_row], w[~nan_row])
    want = float64_merge(os_, signed_m, ls_)
    tol = TOL[torch.float32]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, equal_nan=True)


# --- odd sizes, strides, threads ---------------------------------------------------------------------


# float64 compiles a kernel of its own (~20 s): in the `slow` run.
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, pytest.param(torch.float64, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(("layout", "heads", "head_dim"), [("SBH", 3, 1), ("SBH", 70, 7), ("TND", 5, 130)])
def test_odd_sizes(dtype: torch.dtype, layout: str, heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(heads)
    x = make_update_inputs(layout, dtype, gen, seq=9, batch=2, heads=heads, head_dim=head_dim, seq_lens=[4, 0, 5])
    assert_reference(x, run_update(x))


@pytest.mark.parametrize("how", ["gap", "transposed"])
@pytest.mark.parametrize(("layout", "softmax_layout"), [("SBH", None), ("TND", None), ("TND", "TND")])
def test_strides_on_every_argument_change_nothing(how: str, layout: str, softmax_layout) -> None:
    gen = torch.Generator().manual_seed(3)
    x = make_update_inputs(layout, torch.bfloat16, gen, seq=6, heads=4, head_dim=24, seq_lens=[2, 0, 4],
                           softmax_layout=softmax_layout)  # fmt: skip
    want = run_update(x)
    strided = make_update_inputs(layout, torch.bfloat16, gen, seq=6, heads=4, head_dim=24, seq_lens=[2, 0, 4],
                                 softmax_layout=softmax_layout)  # fmt: skip
    for name in ("prev_o", "prev_m", "prev_l", "cur_o", "cur_m", "cur_l"):
        setattr(strided, name, strided_copy(getattr(x, name), how))
    out = tuple(strided_copy(torch.full_like(t, math.nan), how) for t in want)
    got = run_update(strided, out=out)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_expanded_inputs_read_without_copy() -> None:
    gen = torch.Generator().manual_seed(4)
    os_, ms, ls = parts(2, (4, 1, 3, 8), gen)
    expanded = [o[:1].expand(4, 1, 3, 8) for o in os_]  # zero stride on P
    got = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(expanded, ms, ls, *got)
    want = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows([e.contiguous() for e in expanded], ms, ls, *want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_give_identical_results(threads: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x = make_update_inputs("TND", torch.float32, gen, heads=8, head_dim=64, seq_lens=[300, 0, 500])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = run_update(x)
    finally:
        torch.set_num_threads(before)
    want = run_update(x)
    assert_reference(x, got)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# --- phase 1 by chunks of rows, bfloat16 by 16-element chunks --------------------------------------------


def _stats(lane: torch.Tensor, heads_outer: bool) -> torch.Tensor:
    """``lane`` ``(P, Q, N, 1)`` as an 8-lane statistics tensor, in heads-outer memory order (as SBH's ``(B, N, S)``)
    or the tensor's own order."""
    p, q, n, _ = lane.shape
    if not heads_outer:
        return lane.expand(p, q, n, 8).contiguous()
    return lane.permute(1, 2, 0, 3).expand(q, n, p, 8).contiguous().permute(2, 0, 1, 3)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("form", ["stats", "lse"])
@pytest.mark.parametrize(("shape", "heads_outer"), [((700, 1, 3), True), ((2, 3, 300), False), ((350, 2, 2), True)])
def test_statistics_chunks_with_special_values(k: int, form: str, shape, heads_outer: bool) -> None:
    """Runs of more than one phase-1 chunk (``_CHUNK_ROWS``) in both visit orders, with empty rows, NaN and +inf
    statistics and non-contiguous outputs, against the float64 merge."""
    assert max(shape[0] * shape[1], shape[2]) > 2 * numba_cpu._CHUNK_ROWS
    gen = torch.Generator().manual_seed(k + 10 * shape[2])
    lse = form == "lse"

    def special(t: torch.Tensor, values) -> torch.Tensor:
        pick = torch.rand(t.shape, generator=gen)
        for value, low in zip(values, (0.0, 0.03, 0.06), strict=False):
            t = t.masked_fill((pick >= low) & (pick < low + 0.03), value)
        return t

    os_, ms, ls = [], [], []
    for _ in range(k):
        os_.append(torch.rand((*shape, 20), generator=gen) * 2 - 1)
        empty = torch.rand((*shape, 1), generator=gen) < 0.2
        m = (torch.randn((*shape, 1), generator=gen) * 4).masked_fill(empty, -math.inf)
        m = special(m, (math.nan, math.inf) if lse else (math.nan,))
        s = (1 + torch.rand((*shape, 1), generator=gen) * 63).masked_fill(empty, 0.0)
        ms.append(_stats(m, heads_outer))
        ls.append(_stats(special(s, (math.nan, math.inf)), heads_outer))
    assert backends.heads_outer(ms, None) == heads_outer  # the kernel visits the order under test
    parts_l = None if lse else ls
    out_o = strided_copy(torch.full_like(os_[0], math.nan), "gap")
    out_m = strided_copy(torch.full_like(ms[0], math.nan), "transposed")
    out_l = None if lse else strided_copy(torch.full_like(ms[0], math.nan), "gap")
    numba_cpu.merge_rows(os_, ms, parts_l, out_o, out_m, out_l, lse_scale=LN2 if lse else 1.0)
    want = float64_merge(os_, ms, parts_l, lse_scale=LN2 if lse else 1.0)
    tol = TOL[torch.float32]
    for g, w in zip((out_o, out_m, out_l), want, strict=True):
        if w is not None:
            torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, equal_nan=True)


def test_one_part_is_the_torch_backends_merge_and_compiles_nothing() -> None:
    """K = 1 has nothing to merge: both fused kernels hand it to the torch backend (Note [one part]) instead of
    compiling a specialisation for a copy; forward and backward are that backend's, bitwise."""
    from ringattn.backends.numba_cpu_backward import _merge_rows_backward_kernel, merge_rows_backward

    gen = torch.Generator().manual_seed(21)
    os_, ms, ls = parts(1, (5, 2, 3, 16), gen, dtype=torch.bfloat16)
    compiled = (len(numba_cpu._merge_rows_kernel.overloads), len(_merge_rows_backward_kernel.overloads))
    got, want = outputs_like(os_[0], ms[0], False), outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, ms, ls, *got)
    torch_eager.merge_rows(os_, ms, ls, *want)
    grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in want]
    got_grads = [[torch.full_like(t, math.nan)] for t in (os_[0], ms[0], ls[0])]
    want_grads = [[torch.full_like(t, math.nan)] for t in (os_[0], ms[0], ls[0])]
    merge_rows_backward(*grads, os_, ms, ls, *got_grads)
    torch_eager.merge_rows_backward(*grads, os_, ms, ls, *want_grads)
    for g, w in zip([*got, *sum(got_grads, [])], [*want, *sum(want_grads, [])], strict=True):
        assert torch.equal(g, w)
    assert (len(numba_cpu._merge_rows_kernel.overloads), len(_merge_rows_backward_kernel.overloads)) == compiled


# K = 1 never reaches the kernel (Note [one part]); K = 3 compiles one more bfloat16 kernel (~30 s): `slow` run.
@pytest.mark.parametrize("k", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("head_dim", [16, 37, 128])
@pytest.mark.parametrize("stream", [False, True])
def test_bf16_chunks_match_the_scalar_loop_bitwise(k: int, head_dim: int, stream: bool, monkeypatch) -> None:
    """bfloat16 rows of unit stride go by 16-element chunks (Note [bf16 chunk merge]); a strided part sends the
    call down the scalar element loop. Both must write the same bits, NaN / inf / rounding ties / subnormals
    included, and agree with the float64 merge."""
    gen = torch.Generator().manual_seed(k * 1000 + head_dim)
    os_, ms, ls = parts(k, (6, 2, 5, head_dim), gen, dtype=torch.float32)
    same = torch.rand((6, 2, 5, 1), generator=gen) < 0.5  # rows with equal statistics: weights 1 / K, e.g. 0.5,
    for i in range(1, k):  # whose sums of two bfloat16 values land exactly halfway (rounding ties)
        ms[i], ls[i] = torch.where(same, ms[0], ms[i]), torch.where(same, ls[0], ls[i])
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-39, 3.0e38, 1.00390625, 1.01171875])
    for o in os_:
        flat = o.view(-1)
        where = torch.randint(0, flat.numel(), (flat.numel() // 20,), generator=gen)
        flat[where] = specials[torch.randint(0, len(specials), where.shape, generator=gen)]
    os_ = [o.to(torch.bfloat16) for o in os_]

    def outputs():  # output rows padded to whole 32-byte chunks: aligned, so streamed when stream
        o = torch.full((*os_[0].shape[:3], -(-head_dim // 16) * 16), math.nan, dtype=torch.bfloat16)[..., :head_dim]
        return o, torch.full_like(ms[0], math.nan), torch.full_like(ms[0], math.nan)

    if stream:
        monkeypatch.setattr(numba_cpu, "_STREAM_BYTES", 0)
    chunked = outputs()
    assert numba_cpu._rows_aligned(chunked[0])
    numba_cpu.merge_rows(os_, ms, ls, *chunked)
    scalar = outputs()
    numba_cpu.merge_rows([strided_copy(os_[0], "gap"), *os_[1:]], ms, ls, *scalar)
    assert torch.equal(chunked[0].view(torch.int16), scalar[0].view(torch.int16))
    for g, w in zip(chunked[1:], scalar[1:], strict=True):
        assert torch.equal(g, w)
    want = float64_merge(os_, ms, ls)
    finite = want[0].isfinite()
    assert torch.equal(chunked[0].isnan(), want[0].isnan())
    assert torch.equal(chunked[0][~finite & ~want[0].isnan()].double(), want[0][~finite & ~want[0].isnan()])
    tol = TOL[torch.bfloat16]
    torch.testing.assert_close(chunked[0].double()[finite], want[0][finite], atol=tol, rtol=tol)


# --- streaming stores (Note [streaming stores]) ---------------------------------------------------------


def _output_rows(parts_o: list[torch.Tensor], placement: str) -> torch.Tensor:
    """A NaN-poisoned output shaped like the parts: a fresh tensor (rows aligned when D * itemsize is a multiple of
    32 bytes), one element into a larger buffer (misaligned), or every row padded to 64 elements (aligned, D not
    a multiple of the 32-byte chunk: a tail of plain stores)."""
    like = parts_o[0]
    if placement == "fresh":
        return torch.full_like(like, math.nan)
    if placement == "shifted":
        return torch.full((like.numel() + 1,), math.nan, dtype=like.dtype)[1:].view(like.shape)
    return torch.full((*like.shape[:3], 64), math.nan, dtype=like.dtype)[..., : like.shape[3]]


@pytest.mark.parametrize(  # float64: a kernel of its own (~20 s to compile), in the `slow` run
    "dtype", [torch.float32, torch.bfloat16, torch.float16, pytest.param(torch.float64, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(("head_dim", "placement"), [(16, "fresh"), (64, "fresh"), (16, "shifted"), (36, "padded")])
def test_streaming_stores_match_plain_stores(dtype, head_dim, placement, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    os_, ms, ls = parts(2, (5, 2, 3, head_dim), gen, dtype=dtype)
    plain = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, ms, ls, *plain)
    out_o = _output_rows(os_, placement)
    aligned = numba_cpu._rows_aligned(out_o)
    assert aligned == (placement != "shifted"), "the case does not exercise the path it is named for"
    monkeypatch.setattr(numba_cpu, "_STREAM_BYTES", 0)  # stream at any size
    streamed = (out_o, torch.full_like(ms[0], math.nan), torch.full_like(ms[0], math.nan))
    numba_cpu.merge_rows(os_, ms, ls, *streamed)
    for g, w in zip(streamed, plain, strict=True):
        assert torch.equal(g, w)
    want = float64_merge(os_, ms, ls)
    torch.testing.assert_close(streamed[0].double(), want[0], atol=TOL[dtype], rtol=TOL[dtype])


def test_streaming_stores_accumulate_in_place(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(8)
    os_, ms, ls = parts(2, (7, 1, 4, 32), gen)
    want = float64_merge(os_, ms, ls)
    monkeypatch.setattr(numba_cpu, "_STREAM_BYTES", 0)
    assert numba_cpu._rows_aligned(os_[0])
    numba_cpu.merge_rows(os_, ms, ls, os_[0], ms[0], ls[0])
    tol = TOL[torch.float32]
    for g, w in zip((os_[0], ms[0], ls[0]), want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)


_THREADS_SCRIPT = """
import torch
from ringattn.backends import numba_cpu
def call(tokens):  # 2 parts of (tokens, 1, 4, 64) float32: 1 MiB / 4 MiB outputs, below / above _PARALLEL_BYTES
    o = [torch.rand(tokens, 1, 4, 64) for _ in range(2)]
    m = [torch.randn(tokens, 1, 4, 8) for _ in range(2)]
    s = [torch.rand(tokens, 1, 4, 8) + 1 for _ in range(2)]
    numba_cpu.merge_rows(o, m, s, torch.empty_like(o[0]), torch.empty_like(m[0]), torch.empty_like(m[0]))
seen = []
for threads, tokens in [(1, 1024), (1, 4096), (2, 4096), (2, 1024), (1, 4096)]:
    torch.set_num_threads(threads)
    call(tokens)
    seen.append(torch.get_num_threads())
print(seen)
"""


def test_torch_thread_count_survives_the_first_launch() -> None:
    """numba's OpenMP pool shares libgomp with torch; starting it (once per process, so this runs in a fresh
    interpreter) used to turn ``torch.set_num_threads(1)`` into 2 behind the caller's back."""
    if numba_cpu.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 CPU threads for numba (NUMBA_NUM_THREADS)")
    run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-5:] == ["[1,", "1,", "2,", "2,", "1]"]


# --- row maps, rounding, NaN, empty rows, aliasing, zero sizes ----------------------------------------


def test_per_batch_row_map_with_zero_length_batches() -> None:
    gen = torch.Generator().manual_seed(6)
    offsets = torch.tensor([0, 0, 3, 3, 7, 7, 9, 9])
    tokens, heads = 9, 4
    os_, ms, ls = parts(2, (tokens, 1, heads, 5), gen)
    row_map = per_batch_row_map(offsets, tokens, heads)
    got = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, ms, ls, *got, row_map=row_map)
    want = outputs_like(os_[0], ms[0], False)
    torch_eager.merge_rows(os_, ms, ls, *want, row_map=row_map)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    # A stats layout whose rows are not evenly strided takes the kernel's division path: same result.
    strided = [strided_copy(m, "gap") for m in ms + ls]
    again = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, strided[:2], strided[2:], *again, row_map=row_map)
    for g, w in zip(again, got, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rounding_matches_torch(dtype: torch.dtype) -> None:
    """The float32 result rounded by torch (nearest even, overflow to inf, subnormals) is what the 16-bit
    kernel writes, bit for bit: both widen the inputs exactly and run the same float32 arithmetic."""
    gen = torch.Generator().manual_seed(7)
    os_, ms, ls = parts(2, (64, 1, 4, 33), gen)
    magnitude = torch.logspace(-9, 5, 33, dtype=torch.float64).float()  # fp16 subnormals up to overflow
    os_ = [(o * magnitude).to(dtype) for o in os_]
    os_[0][0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    got = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, ms, ls, *got)
    wide = outputs_like(os_[0].float(), ms[0], False)
    numba_cpu.merge_rows([o.float() for o in os_], ms, ls, *wide)
    want = wide[0].to(dtype)
    assert torch.equal(got[0].isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[0][finite].view(torch.int16), want[finite].view(torch.int16))


def test_nan_propagates_and_empty_rows_are_exact() -> None:
    nan, inf = math.nan, math.inf
    # rows: (prev max, prev sum, cur max, cur sum, prev o, cur o)
    rows = [
        (-inf, 0.0, -inf, 0.0, 0.0, 0.0),  # both empty -> (0, -inf, 0)
        (-inf, 0.0, 1.0, 2.0, 5.0, 3.0),  # prev empty -> cur
        (nan, 1.0, 0.0, 1.0, 1.0, 1.0),  # NaN max -> NaN everywhere
        (0.0, nan, 0.0, 1.0, 1.0, 1.0),  # NaN sum -> NaN sum and output
        (0.0, 1.0, 0.0, 1.0, nan, 1.0),  # NaN output element -> NaN output
    ]
    cols = list(zip(*rows, strict=True))
    stat = [torch.tensor(c).view(1, 1, 5, 1).expand(1, 1, 5, 8).contiguous() for c in cols[:4]]
    o = [torch.tensor(c).view(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous() for c in cols[4:]]
    got = outputs_like(o[0], stat[0], False)
    numba_cpu.merge_rows(o, stat[0::2], stat[1::2], *got)
    out_o, out_m, out_l = (t[0, 0, :, 0] for t in got)
    assert (out_o[0].item(), out_m[0].item(), out_l[0].item()) == (0.0, -inf, 0.0)
    assert (out_o[1].item(), out_m[1].item(), out_l[1].item()) == (3.0, 1.0, 2.0)
    assert math.isnan(out_o[2]) and math.isnan(out_m[2]) and math.isnan(out_l[2])
    assert math.isnan(out_o[3]) and out_m[3].item() == 0.0 and math.isnan(out_l[3])
    assert math.isnan(out_o[4]) and (out_m[4].item(), out_l[4].item()) == (0.0, 2.0)


@pytest.mark.parametrize(("layout", "dtype"), [("SBH", torch.bfloat16), ("TND", torch.float32)])
def test_out_aliasing_inputs_accumulates_in_place(layout: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    x = make_update_inputs(layout, dtype, gen, seq=7, heads=3, head_dim=64, seq_lens=[3, 0, 4])
    want = run_update(x)
    run_update(x, out=(x.cur_o, x.cur_m, x.cur_l))  # outputs are exactly the cur_* views
    for g, w in zip((x.cur_o, x.cur_m, x.cur_l), want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("shape", [(0, 1, 3, 4), (2, 1, 0, 4), (2, 1, 3, 0)])
def test_zero_sizes(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(9)
    os_, ms, ls = parts(2, shape, gen)
    got = outputs_like(os_[0], ms[0], False)
    numba_cpu.merge_rows(os_, ms, ls, *got)
    want = float64_merge(os_, ms, ls)
    for g, w in zip(got, want, strict=True):  # D == 0 still writes the statistics
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=1e-6)


def test_unsupported_off_cpu() -> None:
    x = make_update_inputs("SBH", torch.float32, torch.Generator().manual_seed(0))
    problem = validate_update(*(t.to("meta") for t in x.tensors()), None, "SBH")
    assert "cpu" in numba_cpu.unsupported_reason(problem)
    assert numba_cpu.unsupported_reason(validate_update(*x.args())) is None


# --- _alloc.empty_fast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (1024, 1024 + 3), (0, 7)])
def test_empty_fast(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    a = empty_fast(shape, dtype, "cpu")
    b = empty_fast(shape, dtype, torch.device("cpu"))
    for t in (a, b):
        assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
        assert not t.requires_grad
    a.fill_(1)
    b.fill_(2)  # both alive: disjoint memory
    assert bool((a == 1).all()) and bool((b == 2).all())
    if a.numel():
        a_lo, b_lo = a.data_ptr(), b.data_ptr()
        assert a_lo + a.nbytes <= b_lo or b_lo + b.nbytes <= a_lo


def test_empty_fast_reuses_memory_only_after_free_and_falls_back_off_cpu() -> None:
    shape = (1 << 20,)  # 4 MiB: pooled
    a = empty_fast(shape, torch.float32, "cpu")
    view = a[10:]
    ptr = a.data_ptr()
    del a
    b = empty_fast(shape, torch.float32, "cpu")
    assert b.data_ptr() != ptr  # the view keeps the first block alive
    del view
    c = empty_fast(shape, torch.float32, "cpu")
    assert c.data_ptr() == ptr  # freed block reused
    assert empty_fast(shape, torch.float32, "meta").device.type == "meta"
