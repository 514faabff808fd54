"""Triton kernels of the CUDA backend: the row merge (Note [row merge]) as row tiles and as a flat grid of packs,
and its backward (Note [row merge backward]), with the small @triton.jit helpers they share. Launchers:
``triton_cuda.py``.

Note [triton row tiles]
-----------------------
Rows are numbered over the ``(P, Q, N)`` row views of Note [canonical rows] (``_contract.py``) in the
statistics' memory order: ``r = (q * N + n) * P + p`` (heads outer) where the statistics' head stride exceeds
their token stride (SBH's ``(B, N, S)``, per-batch TND's head-major batches), else ``r = (p * Q + q) * N + n``
(token-major TND). A tile's statistics rows are then one contiguous run of 32-byte records instead of
``BLOCK_ROWS`` records a head stride apart, while each attention row stays a contiguous run of ``D`` elements
whatever the order. (On an H100 this measured no faster than the heads-inner order, within 1 %: the sector
reads were not what held the kernel back, see ``ONE_CHUNK`` below. It is kept because it costs nothing and
the CPU kernel visits rows the same way, by the same rule: ``backends.heads_outer``.) Program ``i`` owns the rows
``[i * BLOCK_ROWS, (i + 1) * BLOCK_ROWS)`` and walks
their ``D`` columns in ``BLOCK_D`` chunks, so it holds a ``BLOCK_ROWS x BLOCK_D`` tile: one program per
(token, head), as vLLM's merge does, leaves most of the GPU idle on launch and scheduling overhead. For
each row the program

1. reads every lane of every part's statistics (through ``row_map`` for per-batch TND statistics: row
   ``rr = row_base[t] + n * row_step[t]`` lives at ``[rr // N, 0, rr % N]``), and forms the maximum;
2. per ``D`` chunk, accumulates ``o_k * (w_k / L)`` in float32 (weights recomputed from the statistics,
   which are L1 hits) and rounds once (to nearest even) into ``out_o``. FMA contraction is disabled at
   launch and ``w_k / L`` is an IEEE division (``div_rn``), so ``K = 2`` is the contract's two
   products then one add; ``exp`` is Triton's (``ex2.approx`` on CUDA, a few ulp: far inside 1e-4);
3. writes the merged statistics to every lane of ``out_m`` (and ``out_l``).

A row's inputs are all read before its outputs are written and rows never straddle programs, so outputs
may be exactly the same views as inputs. The per-batch map is a bijection (Note [canonical rows]), so a
statistics row is written by the program that read it.

Block sizes. ``BLOCK_D = next_pow2(D)`` up to 256, so common head sizes (64, 128, 256) take one chunk;
larger ``D`` loop. ``BLOCK_ROWS = tile // BLOCK_D``, at most 32, with a tile of 4 KiB per part for
``K <= 2`` (2048 16-bit or 1024 32-bit elements; half that when ``D`` loops), 2 KiB for ``K <= 4`` and 1 KiB
beyond. With 4 warps that is 32 bytes of each part per thread for ``K = 2`` (two 16-byte vector loads). When
``D`` fits one chunk (``ONE_CHUNK``) the chunk is straight-line code, so the compiler issues all K parts' loads
before the statistics' arithmetic (a runtime chunk loop made them wait for it: SBH bf16 82 -> 93 % of the copy
floor on an H100). Registers grow with ``tile * K`` and with rows per thread;
these sizes keep ptxas (sm_90a, checked by compiling without a GPU) at 80 registers for fp16 ``K = 2``,
``D = 128`` and at most ~144 for every layout, dtype, ``D`` and ``K <= 8`` tried, without spills: >= 3
resident programs and >= 48 KB of loads in flight per SM, above the ~15 KB per SM that HBM latency needs
at 3.35 TB/s. Vector loads need the column stride to be 1 and the other strides to be multiples of 16
elements: Triton specialises integer arguments equal to 1 or divisible by 16 (compiled variants are
bounded by K, form, dtypes and these stride classes). Sizes that only count rows (``num_rows``, ``Q``,
``N``) are excluded from specialisation so that a new batch size or token count never compiles a new
kernel.

Cost. Per row and ``K = 2``, bf16, ``D = 128``: 2 x 256 B of partial outputs read, 256 B written, and
statistics at 32-byte sector granularity (4 sectors read, 2 written) = 960 B. Measured on an H100 (CUDA graph
replays, ``benchmarks/RESULTS.md``): 93 % of the device copy of the same bytes for SBH bf16, 84 % for float32;
per-batch TND adds two int64 loads per token (cached) and, around the kernel, the row map's launch and the
device-side checks of ``actual_seq_qlen`` (74-78 %).

Note [triton row merge backward]
--------------------------------
:func:`merge_rows_backward` is Note [row merge backward] (``_backward.py``) as one kernel over the same row
tiles, sharing the forward's helpers (``_tile_rows``, ``_part_stats``, ``_part_scale``, ``_merged_stats``,
``_store_lanes``), so the forward and backward cannot disagree about which statistics row, which empty rule or
which weight a row has. Per row tile it

1. reads the K parts' statistics (every lane) and recomputes ``M``, ``L``, ``1 / L`` and ``w_k = a_k / L`` exactly
   as the ``torch`` backend's backward does (``a_k * (1 / L)``, the same order of sums), so the two differ only
   by the order of the dot products' float32 sums and by ``exp``;
2. walks ``D`` once: per chunk it loads ``g`` and each ``o_k`` once, adds ``<g, o_k>`` to column ``k`` of a
   ``BLOCK_ROWS x next_pow2(K)`` float32 accumulator, and writes ``do_k = w_k g`` rounded once to the parts'
   dtype. ``do_k`` needs only the statistics, not the dots, so no second pass re-reads ``g`` even when ``D``
   spans several chunks (the two-pass plan in Note [row merge backward] is not needed);
3. reduces ``<g, o> = sum_k w_k d_k``, sums ``grad_m`` (and ``grad_l``) over their lanes, and writes
   ``dm_k`` (and ``dl_k``, or the LSE form's ``dx_k``) lane by lane; 0 for an empty part.

Lanes. Statistics are ``[BLOCK_ROWS, LANES_IN]`` tiles (``LANES_IN`` 8 in the stats form, 1 in the LSE form), so
every lane merges on its own. Element ``d`` of a row takes lane ``d % LANES_IN``: the per-lane weights become a
``[BLOCK_ROWS, BLOCK_D]`` tile by a broadcast to ``[BLOCK_ROWS, BLOCK_D // LANES_IN, LANES_IN]`` and a reshape
(``_spread``, no gather; ``BLOCK_D >= LANES_IN``), and the backward's per-lane dots are the adjoint reshape and sum
(``_fold``). An empty part (max ``-inf`` and sum 0, or an LSE of ``+-inf``) is selected out per element, not
multiplied by zero: ``-0.0`` is added instead, the identity of ``+``, so NaN or garbage in its output never
reaches the merge.

Bytes per row, ``K`` parts of ``D`` elements of ``e`` bytes, statistics in 32-byte sectors: read
``(K + 1) D e`` (``g`` and the parts) plus ``K`` (stats form ``2K``) statistic sectors and 1 (2) incoming
gradient sectors; write ``K D e`` plus ``K`` (``2K``) sectors. For ``K = 2``, bf16, ``D = 128``, stats form:
768 B + 192 B read, 512 B + 128 B written = 1600 B; a two-pass kernel (dots, then writes that re-read ``g``)
would move 256 B (16 %) more. At the ~3.0 TB/s an H100 copies that is ~1.9e9 rows/s (expected, not measured:
no GPU). Each chunk holds ``K + 1`` D-tiles (``g`` and the ``o_k``), so the tile is sized by
``_block_sizes(D, K + 1)``; compiled for sm_90a without a GPU (ptxas through Triton 3.9), every dtype, both
forms, ``K`` in 1, 2, 3, 4, 8 and ``D`` in 64, 128, 256, 320 take 40-128 registers and no spills (fp16
``K = 2``, ``D = 128``: 54).

Note [triton flat merge]
------------------------
A second forward design, :func:`_merge_flat_kernel`, selected without editing code by ``RINGATTN_TRITON_MERGE=flat``
(or the launcher's ``kernel="flat"``). **It has not yet run on a GPU**: it is checked bitwise against the tile
kernel and against float64 under the interpreter, and compiled for sm_90a, but never timed, so ``tile`` stays the
default until ``benchmarks/triton_tune.py --kernel tile,flat`` has measured both (issue 12). It follows vLLM's CUDA
merge: the output is a flat array of *packs*, ``VEC`` consecutive elements of one row (16 bytes: 8 fp16/bf16 or 4
fp32), one pack per thread; each pack finds its row (``x // D`` in int32 within its program, the row number in
int64), reads that row's statistics for its lanes from every part (L1/L2 hits after the row's first pack), forms
the weights and writes its rounded elements with one 16-byte store.

Why it might beat the row tiles: the weights are formed in the packs' own layout, so there is no shared-memory
layout conversion between a ``[rows, lanes]`` statistics tile and a ``[rows, D]`` tile (the tile kernel's sm_90a code
for bf16, ``K = 2``, ``D = 128`` has 7 ``bar.sync``, this one 2); every part's elements are loaded before any
statistics arithmetic; and the LSE form takes 31-32 registers (tile: 56-62), so more programs are in flight per SM.
Why it might not: every pack recomputes its lanes' weights. In the LSE form that is ``K`` exps and ``K`` divisions per
pack, as vLLM does. In the stats form a bf16 pack covers all 8 lanes, so per element ``K`` exps and ``K`` IEEE
divisions (sm_90a, ``K = 2``: 18 ``ex2`` and 16 ``div.rn`` per thread, against 2 and 2 in the tile kernel), at the
copy floor's element rate about half of an H100's special-function throughput (an estimate, not a measurement).
Hence the *equal-lanes shortcut* (``LANE_CHECK``, on by default, ``flat_lane_check=False`` turns it off): the stats
form compares each pack's lanes with its first lane, bit for bit, and when every pack of the chunk agrees (the
contract's equal lanes, as FlashAttention writes them) forms the weights once per pack from that lane, as in the LSE
form; equal bits in give equal bits out, so the output is the same either way, NaN included. The price is one
reduction over the program (a ``bar.sync``) before the weights; the elements' loads are already in flight. The
measurement decides between the three (tile, flat, flat without the shortcut).

Whole rows per program, for in-place merges. Program ``i`` owns the rows ``[i R, (i + 1) R)``, ``R = max(1, BLOCK //
D)`` (at most 128): the contiguous run of ``R D`` elements when rows are contiguous, walked in ``BLOCK``-element
chunks when ``D > BLOCK``. Rows never straddle programs: outputs may be exactly the inputs' views, every pack of a
row reads the row's statistics, and programs are not ordered, so a program writing a row's merged statistics could
not know that another program holding part of the row had read them. After its packs, a program merges its rows'
statistics again as an ``[R, lanes]`` tile (the same helpers; L1 hits), and one ``bar.sync`` (``tl.debug_barrier``)
separates every read of its statistics, by any of its threads, from the first write of them. Each output element is
computed from loads of that same element only, so the attention outputs need no barrier. The per-batch map is a
bijection, so each statistics row belongs to the one program holding its attention row. The price: when ``D`` does
not divide ``BLOCK``, ``BLOCK - R D < D`` elements of the chunk idle.

Packs and strides. ``VEC`` comes from the launcher (``_flat_vector``): 16 bytes of the output's elements, halved until
``D`` and the strides of every attention tensor (dimensions longer than 1) are multiples of it and the column stride
is 1. The kernel passes that promise to the compiler (``tl.multiple_of`` / ``tl.max_contiguous``), so ``D = 72`` gets
16-byte packs although Triton's specialisation only sees divisibility by 16; anything else gets ``VEC = 1`` (one
element per pack) and runs correctly with any strides, so no input falls back to the tile kernel. Lanes: a pack of
``VEC >= LANES_IN`` columns holds whole groups of lanes (element ``j`` takes lane ``j % LANES_IN``), a narrower one the
``VEC`` lanes from ``d0 % LANES_IN``. Rows are numbered in the attention tensors' memory order (``HEADS_OUTER`` from
their strides), so a program's run is one block of memory.

Index arithmetic is per pack here (the tile kernel's is per row), so its width matters: when every row number and
every element offset of every tensor fits int32 (the launcher checks shapes and strides: all the bench's sizes),
``INT32_INDEX`` runs it in 32 bits (one ``IMAD`` per multiply-add, not three or four); otherwise int64, as the tile
kernel always does. On sm_90a that takes the bf16 ``K = 2``, ``D = 128`` kernel from 920 to 568 instructions (LSE
form) and from 1848 to 1416 (stats form); the tile kernel's are 1224 and 1184 (static counts: the tile kernel's
thread holds two packs of a row, the flat kernel's one).

Arithmetic: exactly the tile kernel's, through the same helpers (``_rows_at``, ``_merged_stats``, ``_part_scale``,
``_spread``, ``_store_merged``): the same max and sum order, ``w_k / L`` by ``div_rn``, no FMA contraction, -0.0
selected for an empty part, one rounding to nearest even; the tests compare the two kernels' bits, and the tune
script compares them on the GPU before timing. sm_90a (Triton 3.9's ptxas, ``K = 2``, ``D = 128``, no spills,
``tests/backends/test_triton_compile.py``, 32-bit indices): stats form fp32 56 registers, fp16/bf16 93 (without the
shortcut 56 and 91); LSE form fp32 31, fp16/bf16 32; LSE ``K = 8`` fp32 75. The tile kernel: fp32 88, bf16 60, fp16
62. What to watch on the GPU: at 93 registers a 4-warp program of the bf16 stats form leaves room for ~5 programs per
SM (~20 KB of the parts' 16-byte loads in flight per SM, about what HBM latency needs at 3.35 TB/s, so a bigger
``flat_block`` may help), while the LSE form's 32 leave room for ~16.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_rows(
    num_rows,
    Q,
    N,
    row_base,
    row_step,
    HAS_ROW_MAP: tl.constexpr,
    HEADS_OUTER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """This program's rows (Note [triton row tiles]): ``(mask, p, q, n, sp, sq, sn)``, attention view indices
    ``(p, q, n)`` and statistics view indices ``(sp, sq, sn)``, all int64."""
    # int64 before any multiplication: offsets pass 2**31 near a million tokens.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    p, q, n, sp, sq, sn = _rows_at(rows, row_mask, num_rows, Q, N, row_base, row_step, HAS_ROW_MAP, HEADS_OUTER)
    return row_mask, p, q, n, sp, sq, sn


@triton.jit
def _rows_at(rows, row_mask, num_rows, Q, N, row_base, row_step, HAS_ROW_MAP: tl.constexpr, HEADS_OUTER: tl.constexpr):
    """Row numbers (int64, in the order of Note [triton row tiles]) -> ``(p, q, n, sp, sq, sn)``: attention view
    indices and statistics view indices (through the per-batch row map where there is one). Shared by the tile
    kernels and the flat kernel (Note [triton flat merge]), so they cannot disagree about which statistics row a
    row has."""
    if HEADS_OUTER:  # r = (q * N + n) * P + p: consecutive rows are consecutive statistics rows
        P = num_rows // (Q * N)
        p = rows % P
        n = (rows // P) % N
        q = rows // P // N
    else:  # r = (p * Q + q) * N + n
        n = rows % N
        q = (rows // N) % Q
        p = rows // N // Q
    if HAS_ROW_MAP:  # Note [canonical rows]: per-batch TND statistics (Q == 1, p is the token)
        base = tl.load(row_base + p, mask=row_mask, other=0)
        stat_row = base + n * tl.load(row_step + p, mask=row_mask, other=0)
        sp = stat_row // N
        sq = tl.zeros_like(stat_row)
        sn = stat_row % N
    else:
        sp = p
        sq = q
        sn = n
    return p, q, n, sp, sq, sn


@triton.jit
def _spread(per_lane, BLOCK_D: tl.constexpr):
    """``[rows, LANES]`` -> ``[rows, BLOCK_D]``: column ``d`` takes lane ``d % LANES`` (``BLOCK_D`` a multiple of
    ``LANES``, chunks start at multiples of ``BLOCK_D``), as a broadcast and a reshape, no gather."""
    rows: tl.constexpr = per_lane.shape[0]
    lanes: tl.constexpr = per_lane.shape[1]
    wide = tl.broadcast_to(tl.expand_dims(per_lane, 1), (rows, BLOCK_D // lanes, lanes))
    return tl.reshape(wide, (rows, BLOCK_D))


@triton.jit
def _fold(values, LANES: tl.constexpr):
    """``[rows, BLOCK_D]`` -> ``[rows, LANES]``: lane ``j`` sums the columns ``d`` with ``d % LANES == j`` (the
    adjoint of :func:`_spread`)."""
    rows: tl.constexpr = values.shape[0]
    width: tl.constexpr = values.shape[1]
    return tl.sum(tl.reshape(values, (rows, width // LANES, LANES)), axis=1)


@triton.jit
def _part_stats(
    parts_m, m_strides, parts_l, l_strides, k: tl.constexpr, sp, sq, sn, mask, IS_LSE: tl.constexpr, lse_scale, lanes,
):  # fmt: skip
    """``(max, sum, empty)`` of part ``k`` at stats rows (sp, sq, sn) and lanes ``lanes`` (int, ``[1, LANES_IN]``
    for a whole row's lanes, or ``[rows, W]`` per row: the flat kernel's pack of elements), ``[rows, W]`` tiles,
    every lane on its own. LSE form (one lane): ``(lse * lse_scale, 1)``; ``+inf`` and ``-inf`` are empty. Stats
    form: empty where max is ``-inf`` and sum 0."""
    m_off = (sp * m_strides[k][0] + sq * m_strides[k][1] + sn * m_strides[k][2])[:, None] + lanes * m_strides[k][3]
    tile_mask = tl.broadcast_to(mask[:, None], m_off.shape)
    m = tl.load(parts_m[k] + m_off, mask=tile_mask, other=float("-inf")).to(tl.float32)
    if IS_LSE:
        m = m * lse_scale
        empty = (m == float("inf")) | (m == float("-inf"))
        m = tl.where(m == float("inf"), float("-inf"), m)  # old FlashAttention's empty rows
        l = tl.full(m.shape, 1.0, tl.float32)
    else:
        l_off = (sp * l_strides[k][0] + sq * l_strides[k][1] + sn * l_strides[k][2])[:, None]
        l = tl.load(parts_l[k] + l_off + lanes * l_strides[k][3], mask=tile_mask, other=0.0).to(tl.float32)
        empty = (m == float("-inf")) & (l == 0.0)
    return m, l, empty


@triton.jit
def _part_scale(
    parts_m,
    m_strides,
    parts_l,
    l_strides,
    k: tl.constexpr,
    sp,
    sq,
    sn,
    mask,
    IS_LSE: tl.constexpr,
    lse_scale,
    lanes,
    shift,
):
    """``(m_k, exp(m_k - shift), a_k = l_k exp(m_k - shift), empty_k)`` of part ``k`` per lane; 0, 0 for an empty
    part."""
    m, l, empty = _part_stats(parts_m, m_strides, parts_l, l_strides, k, sp, sq, sn, mask, IS_LSE, lse_scale, lanes)
    decay = tl.exp(m - shift)
    return m, decay, l * decay, empty


@triton.jit
def _merged_stats(
    parts_m, m_strides, parts_l, l_strides, K: tl.constexpr, sp, sq, sn, mask, IS_LSE: tl.constexpr, lse_scale, lanes,
):  # fmt: skip
    """``(M, all_empty, shift, L)`` of the K parts per lane, ``[rows, W]`` (Note [row merge]): ``shift`` is ``M``,
    or 0 where every part is empty, so that the weights of such lanes are 0 instead of NaN."""
    new_max = tl.full((sp.shape[0], lanes.shape[1]), float("-inf"), tl.float32)
    for k in tl.static_range(K):
        m, _, _ = _part_stats(parts_m, m_strides, parts_l, l_strides, k, sp, sq, sn, mask, IS_LSE, lse_scale, lanes)
        new_max = tl.maximum(new_max, m, propagate_nan=tl.PropagateNan.ALL)
    all_empty = new_max == float("-inf")
    shift = tl.where(all_empty, 0.0, new_max)
    new_sum = tl.zeros((sp.shape[0], lanes.shape[1]), tl.float32)
    for k in tl.static_range(K):
        _, _, a, _ = _part_scale(
            parts_m, m_strides, parts_l, l_strides, k, sp, sq, sn, mask, IS_LSE, lse_scale, lanes, shift
        )
        new_sum += a
    return new_max, all_empty, shift, new_sum


@triton.jit
def _store_lanes(ptr, strides, sp, sq, sn, lanes, value, mask, LANE0_ONLY: tl.constexpr):
    """Write ``value`` (``[rows, LANES_IN]``: one lane broadcast to all, or one value per lane) to the stats rows
    (sp, sq, sn): output lane ``c`` takes lane ``c % LANES_IN``; or (``LANE0_ONLY``, the LSE form's gradients) to
    lane 0 and 0 to the other lanes."""
    dst = (sp * strides[0] + sq * strides[1] + sn * strides[2])[:, None] + lanes[None, :] * strides[3]
    tile = tl.broadcast_to(value, mask.shape)
    if LANE0_ONLY:
        tile = tl.where(lanes[None, :] == 0, tile, 0.0)
    tl.store(ptr + dst, tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_merged(
    out_m, out_m_strides, out_l, out_l_strides, sp, sq, sn, row_mask, merged, LANES, lse_scale, IS_LSE: tl.constexpr,
    BLOCK_LANES: tl.constexpr,
):  # fmt: skip
    """Write the merged statistics of the rows (sp, sq, sn) to every output lane: ``merged`` is ``(M, all_empty, L,
    safe_L)`` from :func:`_merged_stats`, ``[rows, LANES_IN]``; the LSE form writes ``(M + ln L) / lse_scale``
    (``-inf`` where every part is empty), the stats form ``M`` and ``L``."""
    new_max, all_empty, new_sum, safe_sum = merged
    lanes = tl.arange(0, BLOCK_LANES)
    lane_mask = row_mask[:, None] & (lanes < LANES)[None, :]
    if IS_LSE:
        lse = tl.where(all_empty, float("-inf"), tl.div_rn(new_max + tl.log(safe_sum), lse_scale))
        _store_lanes(out_m, out_m_strides, sp, sq, sn, lanes, lse, lane_mask, False)
    else:
        _store_lanes(out_m, out_m_strides, sp, sq, sn, lanes, new_max, lane_mask, False)
        _store_lanes(out_l, out_l_strides, sp, sq, sn, lanes, new_sum, lane_mask, False)


@triton.jit
def _lane_grads(ptr, strides, sp, sq, sn, row_mask, LANES, BLOCK_LANES: tl.constexpr, LANES_IN: tl.constexpr):
    """The incoming gradient of a merged statistic per merged lane, ``[rows, LANES_IN]`` in float32: lane ``j`` sums
    the output lanes ``c`` with ``c % LANES_IN == j`` (all of them for one lane; itself for ``LANES_IN`` lanes)."""
    lanes = tl.arange(0, BLOCK_LANES)
    mask = row_mask[:, None] & (lanes < LANES)[None, :]
    src = (sp * strides[0] + sq * strides[1] + sn * strides[2])[:, None] + lanes[None, :] * strides[3]
    tile = tl.load(ptr + src, mask=mask, other=0.0).to(tl.float32)
    return _fold(tile, LANES_IN)  # BLOCK_LANES is LANES_IN (stats form) or a multiple of it (LSE form: 1)


@triton.jit
def _columns(d0, BLOCK_D: tl.constexpr, WIDE_COLS: tl.constexpr):
    """Column indices ``[d0, d0 + BLOCK_D)``: int32, or int64 where a column offset (``d * stride``) may pass 2**31
    (``WIDE_COLS``: the launcher checks the strides), so that it cannot wrap around."""
    cols = d0 + tl.arange(0, BLOCK_D)
    if WIDE_COLS:
        cols = cols.to(tl.int64)
    return cols


@triton.jit
def _merge_chunk(
    d0,
    parts_o,
    o_strides,
    stats,  # (parts_m, m_strides, parts_l, l_strides)
    out_o,
    out_o_strides,
    rows,  # (p, q, n, sp, sq, sn, row_mask) from _tile_rows
    merged,  # (all_empty, shift, safe_sum) from _merged_stats
    D,
    lse_scale,
    K: tl.constexpr,
    IS_LSE: tl.constexpr,
    LANES_IN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WIDE_COLS: tl.constexpr,
):
    """Columns ``[d0, d0 + BLOCK_D)`` of the tile's merged rows: ``sum_k o_k * (a_k / L)`` with the weights of lane
    ``d % LANES_IN``, rounded once; an empty part's ``o_k`` is not read (a select of -0.0, the identity of +)."""
    p, q, n, sp, sq, sn, row_mask = rows
    all_empty, shift, safe_sum = merged
    cols = _columns(d0, BLOCK_D, WIDE_COLS)
    tile_mask = row_mask[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    in_lanes = tl.arange(0, LANES_IN)[None, :]
    for k in tl.static_range(K):
        # Recomputed per chunk (statistics are L1 hits) rather than carried: K is a compile-time count.
        _, _, a, empty = _part_scale(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes, shift)
        weight = _spread(tl.where(all_empty, 0.0, tl.div_rn(a, safe_sum)), BLOCK_D)
        o_off = p * o_strides[k][0] + q * o_strides[k][1] + n * o_strides[k][2]
        o = tl.load(parts_o[k] + o_off[:, None] + cols[None, :] * o_strides[k][3], mask=tile_mask, other=0.0)
        acc += tl.where(_spread(empty, BLOCK_D), -0.0, o.to(tl.float32) * weight)
    dst = p * out_o_strides[0] + q * out_o_strides[1] + n * out_o_strides[2]
    dst = dst[:, None] + cols[None, :] * out_o_strides[3]
    tl.store(out_o + dst, acc.to(out_o.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=["num_rows", "Q", "N"])
def _merge_rows_kernel(
    parts_o,  # K pointers to [P, Q, N, D]
    o_strides,  # K tuples of (P, Q, N, D) strides
    parts_m,  # K pointers to [P, Q, N, LANES_IN] (raw [T, 1, N, LANES_IN] with a row map)
    m_strides,  # K tuples of (P, Q, N, lane) strides
    parts_l,  # like parts_m; None in the LSE form
    l_strides,
    out_o,  # [P, Q, N, D]
    out_o_strides,
    out_m,  # [P, Q, N, LANES]: max, or LSE divided by lse_scale
    out_m_strides,  # (P, Q, N, lane)
    out_l,  # [P, Q, N, LANES]: sum; None in the LSE form
    out_l_strides,
    row_base,  # [T] int64, with HAS_ROW_MAP
    row_step,  # [T] int64, with HAS_ROW_MAP
    num_rows,
    Q,
    N,
    D,
    LANES,
    lse_scale,
    K: tl.constexpr,
    IS_LSE: tl.constexpr,
    HAS_ROW_MAP: tl.constexpr,
    HEADS_OUTER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_LANES: tl.constexpr,
    LANES_IN: tl.constexpr,  # lanes of the parts' statistics: 1 (LSE) or 8 (Ascend), a power of 2 <= BLOCK_D
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK_D
    WIDE_COLS: tl.constexpr,  # some (D - 1) * column stride passes 2**31: int64 column offsets
):
    # Note [triton row tiles].
    row_mask, p, q, n, sp, sq, sn = _tile_rows(num_rows, Q, N, row_base, row_step, HAS_ROW_MAP, HEADS_OUTER, BLOCK_ROWS)
    stats = (parts_m, m_strides, parts_l, l_strides)
    in_lanes = tl.arange(0, LANES_IN)[None, :]
    new_max, all_empty, shift, new_sum = _merged_stats(*stats, K, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes)
    safe_sum = tl.where(all_empty, 1.0, new_sum)  # the weights of empty lanes are 0: no 0 / 0 on the way

    rows = (p, q, n, sp, sq, sn, row_mask)
    merged = (all_empty, shift, safe_sum)
    if ONE_CHUNK:  # straight-line code: the compiler can issue the o_k loads before the statistics' arithmetic
        _merge_chunk(0, parts_o, o_strides, stats, out_o, out_o_strides, rows, merged, D, lse_scale, K, IS_LSE,
                     LANES_IN, BLOCK_ROWS, BLOCK_D, WIDE_COLS)  # fmt: skip
    else:
        for d0 in range(0, D, BLOCK_D):
            _merge_chunk(d0, parts_o, o_strides, stats, out_o, out_o_strides, rows, merged, D, lse_scale, K, IS_LSE,
                         LANES_IN, BLOCK_ROWS, BLOCK_D, WIDE_COLS)  # fmt: skip

    merged = (new_max, all_empty, new_sum, safe_sum)
    _store_merged(out_m, out_m_strides, out_l, out_l_strides, sp, sq, sn, row_mask, merged, LANES, lse_scale, IS_LSE,
                  BLOCK_LANES)  # fmt: skip


@triton.jit
def _widen(per_lane, VEC: tl.constexpr):
    """``[packs, W]`` -> ``[packs, VEC]``: element ``j`` of a pack takes column ``j % W`` (:func:`_spread`), or the one
    column of a ``[packs, 1]`` tile (one lane per pack) by a plain broadcast."""
    if per_lane.shape[1] == 1:
        return tl.broadcast_to(per_lane, (per_lane.shape[0], VEC))
    return _spread(per_lane, VEC)


@triton.jit
def _flat_sum(o_tiles, stats, K: tl.constexpr, sp, sq, sn, pack_mask, IS_LSE: tl.constexpr, lse_scale, lanes,
              VEC: tl.constexpr):  # fmt: skip
    """``sum_k o_k * (a_k / L)`` in float32 over the packs, ``[packs, VEC]``, with the weights of ``lanes`` (``[packs,
    W]`` or ``[1, W]``: element ``j`` takes column ``j % W``); an empty part's ``o_k`` is selected out (-0.0, the
    identity of +). The arithmetic of :func:`_merge_chunk`, term for term."""
    new_max, all_empty, shift, new_sum = _merged_stats(*stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes)
    safe_sum = tl.where(all_empty, 1.0, new_sum)
    acc = tl.zeros([sp.shape[0], VEC], tl.float32)
    for k in tl.static_range(K):
        _, _, a, empty = _part_scale(*stats, k, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes, shift)
        weight = _widen(tl.where(all_empty, 0.0, tl.div_rn(a, safe_sum)), VEC)
        acc += tl.where(_widen(empty, VEC), -0.0, o_tiles[k].to(tl.float32) * weight)
    return acc


@triton.jit
def _lanes_equal(stats, K: tl.constexpr, sp, sq, sn, pack_mask, lanes, lane0):
    """Whether, in every pack of the program and every part, the statistics of all of the pack's ``lanes`` have the
    bits of the pack's first lane ``lane0`` (a scalar: one reduction over the program). Then the weights of the first
    lane are every lane's, bit for bit, NaN included."""
    same = tl.full((sp.shape[0], lanes.shape[1]), 1, tl.int32)
    for k in tl.static_range(K):
        m, l, _ = _part_stats(*stats, k, sp, sq, sn, pack_mask, False, 1.0, lanes)
        m0, l0, _ = _part_stats(*stats, k, sp, sq, sn, pack_mask, False, 1.0, lane0)
        equal = (m.to(tl.int32, bitcast=True) == m0.to(tl.int32, bitcast=True)) & (
            l.to(tl.int32, bitcast=True) == l0.to(tl.int32, bitcast=True)
        )
        same = same & equal.to(tl.int32)
    return tl.min(same) == 1


@triton.jit
def _flat_chunk(
    x0,
    span,
    first_row,
    parts_o,
    o_strides,
    stats,  # (parts_m, m_strides, parts_l, l_strides)
    out_o,
    out_o_strides,
    row_args,  # (num_rows, Q, N, row_base, row_step)
    D,
    lse_scale,
    K: tl.constexpr,
    IS_LSE: tl.constexpr,
    HAS_ROW_MAP: tl.constexpr,
    HEADS_OUTER: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    LANES_IN: tl.constexpr,
    LANE_CHECK: tl.constexpr,
):
    """Elements ``[x0, x0 + BLOCK)`` of this program's run (counted from column 0 of ``first_row``; ``span``
    elements in all) as ``BLOCK // VEC`` packs of ``VEC`` consecutive elements of one row (Note [triton flat
    merge]): each pack finds its row, reads its lanes' statistics of every part and writes
    ``sum_k o_k * (a_k / L)``, rounded once. ``LANE_CHECK``: when every pack's lanes hold equal statistics (the
    contract's case), the weights are formed once per pack from its first lane."""
    num_rows, Q, N, row_base, row_step = row_args
    PACKS: tl.constexpr = BLOCK // VEC
    W: tl.constexpr = VEC if VEC < LANES_IN else LANES_IN  # lanes per pack
    # int32 inside a program's run (at most max(BLOCK, D) elements); row numbers in first_row's index type.
    x = x0 + tl.arange(0, PACKS) * VEC
    pack_mask = x < span
    local_row = x // D
    d0 = x - local_row * D  # column of the pack's first element: a multiple of VEC (D and VEC: the launcher's)
    rows = first_row + local_row
    p, q, n, sp, sq, sn = _rows_at(rows, pack_mask, num_rows, Q, N, row_base, row_step, HAS_ROW_MAP, HEADS_OUTER)
    # Columns in the index type (int64 unless every offset fits int32): a column stride other than 1 (a transposed
    # view) times D may pass 2**31.
    cols = d0.to(first_row.dtype)[:, None] + tl.arange(0, VEC)[None, :]
    mask = tl.broadcast_to(pack_mask[:, None], (PACKS, VEC))  # a pack is wholly inside or outside the run
    # Every part's elements are loaded first, so they are in flight during the statistics' loads and arithmetic.
    o_tiles = ()
    for k in tl.static_range(K):
        o_off = (p * o_strides[k][0] + q * o_strides[k][1] + n * o_strides[k][2])[:, None] + cols * o_strides[k][3]
        if VEC > 1:  # the launcher checked unit column strides and strides, D multiples of VEC: 16-byte vectors
            o_off = tl.max_contiguous(tl.multiple_of(o_off, [1, VEC]), [1, VEC])
        o_tiles = o_tiles + (tl.load(parts_o[k] + o_off, mask=mask, other=0.0),)
    if LANES_IN <= VEC:  # a pack holds whole groups of LANES_IN columns: element j takes lane j % LANES_IN
        lanes = tl.arange(0, W)[None, :]
        lane0 = tl.zeros((1, 1), tl.int32)
    else:  # a pack holds the VEC consecutive lanes from d0 % LANES_IN
        lane0 = (d0 % LANES_IN)[:, None]
        lanes = lane0 + tl.arange(0, W)[None, :]
    if LANE_CHECK:  # the stats form with W > 1 lanes per pack (the launcher's)
        if _lanes_equal(stats, K, sp, sq, sn, pack_mask, lanes, lane0):
            acc = _flat_sum(o_tiles, stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lane0, VEC)
        else:
            acc = _flat_sum(o_tiles, stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes, VEC)
    else:
        acc = _flat_sum(o_tiles, stats, K, sp, sq, sn, pack_mask, IS_LSE, lse_scale, lanes, VEC)
    dst = (p * out_o_strides[0] + q * out_o_strides[1] + n * out_o_strides[2])[:, None] + cols * out_o_strides[3]
    if VEC > 1:
        dst = tl.max_contiguous(tl.multiple_of(dst, [1, VEC]), [1, VEC])
    tl.store(out_o + dst, acc.to(out_o.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows", "Q", "N", "rows_per_program"])
def _merge_flat_kernel(
    parts_o,  # K pointers to [P, Q, N, D]
    o_strides,  # K tuples of (P, Q, N, D) strides
    parts_m,  # K pointers to [P, Q, N, LANES_IN] (raw [T, 1, N, LANES_IN] with a row map)
    m_strides,  # K tuples of (P, Q, N, lane) strides
    parts_l,  # like parts_m; None in the LSE form
    l_strides,
    out_o,  # [P, Q, N, D]
    out_o_strides,
    out_m,  # [P, Q, N, LANES]: max, or LSE divided by lse_scale
    out_m_strides,  # (P, Q, N, lane)
    out_l,  # [P, Q, N, LANES]: sum; None in the LSE form
    out_l_strides,
    row_base,  # [T] int64, with HAS_ROW_MAP
    row_step,  # [T] int64, with HAS_ROW_MAP
    num_rows,
    Q,
    N,
    D,
    LANES,
    lse_scale,
    rows_per_program,  # whole rows per program: max(1, BLOCK // D), capped
    K: tl.constexpr,
    IS_LSE: tl.constexpr,
    HAS_ROW_MAP: tl.constexpr,
    HEADS_OUTER: tl.constexpr,  # row order: the attention tensors' memory order
    BLOCK: tl.constexpr,  # elements per chunk, a power of 2
    VEC: tl.constexpr,  # elements per pack (16 bytes, or fewer: the launcher's conditions)
    ROWS: tl.constexpr,  # next_pow2(rows_per_program): the statistics tile
    BLOCK_LANES: tl.constexpr,
    LANES_IN: tl.constexpr,  # lanes of the parts' statistics: 1 (LSE) or 8 (Ascend), a power of 2
    ONE_CHUNK: tl.constexpr,  # D <= BLOCK: the run is one straight-line chunk
    LANE_CHECK: tl.constexpr,  # stats form, several lanes per pack: weights once per pack where lanes are equal
    INT32_INDEX: tl.constexpr,  # every row number and element offset of every tensor fits int32 (the launcher's)
):
    # Note [triton flat merge].
    if INT32_INDEX:  # 32-bit index arithmetic: one instruction per multiply-add instead of three or four
        first_row = tl.program_id(0) * rows_per_program
    else:  # int64 before any multiplication: offsets pass 2**31 near a million tokens
        first_row = tl.program_id(0).to(tl.int64) * rows_per_program
    span = (tl.minimum(num_rows - first_row, rows_per_program) * D).to(tl.int32)
    stats = (parts_m, m_strides, parts_l, l_strides)
    row_args = (num_rows, Q, N, row_base, row_step)
    if ONE_CHUNK:
        _flat_chunk(0, span, first_row, parts_o, o_strides, stats, out_o, out_o_strides, row_args, D, lse_scale, K,
                    IS_LSE, HAS_ROW_MAP, HEADS_OUTER, BLOCK, VEC, LANES_IN, LANE_CHECK)  # fmt: skip
    else:
        for x0 in range(0, span, BLOCK):
            _flat_chunk(x0, span, first_row, parts_o, o_strides, stats, out_o, out_o_strides, row_args, D,
                        lse_scale, K, IS_LSE, HAS_ROW_MAP, HEADS_OUTER, BLOCK, VEC, LANES_IN,
                        LANE_CHECK)  # fmt: skip

    # The merged statistics of this program's rows, every lane, from the parts (L1/L2 hits).
    local = tl.arange(0, ROWS)
    rows = first_row + local
    row_mask = (local < rows_per_program) & (rows < num_rows)
    p, q, n, sp, sq, sn = _rows_at(rows, row_mask, num_rows, Q, N, row_base, row_step, HAS_ROW_MAP, HEADS_OUTER)
    in_lanes = tl.arange(0, LANES_IN)[None, :]
    new_max, all_empty, _, new_sum = _merged_stats(*stats, K, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes)
    safe_sum = tl.where(all_empty, 1.0, new_sum)
    # Every read of this program's statistics (by any of its threads, above) happens before any is overwritten:
    # outputs may be the inputs' views (Note [triton flat merge], in place).
    tl.debug_barrier()
    merged = (new_max, all_empty, new_sum, safe_sum)
    _store_merged(out_m, out_m_strides, out_l, out_l_strides, sp, sq, sn, row_mask, merged, LANES, lse_scale, IS_LSE,
                  BLOCK_LANES)  # fmt: skip


@triton.jit
def _column(tile, k):
    """Column ``k`` of a ``[rows, columns, lanes]`` tile (a per-part accumulator indexed by a compile-time ``k``)."""
    return tl.sum(tl.where(tl.arange(0, tile.shape[1])[None, :, None] == k, tile, 0.0), axis=1)


@triton.jit(do_not_specialize=["num_rows", "Q", "N"])
def _merge_rows_backward_kernel(
    grad_o,  # [P, Q, N, D]: dJ/d out_o
    grad_o_strides,
    grad_m,  # [P, Q, N, GRAD_LANES]: dJ/d out_m (max, or LSE in the caller's base)
    grad_m_strides,  # (P, Q, N, lane)
    grad_l,  # like grad_m: dJ/d out_l; None in the LSE form
    grad_l_strides,
    parts_o,  # K pointers to [P, Q, N, D]
    o_strides,  # K tuples of (P, Q, N, D) strides
    parts_m,  # K pointers to [P, Q, N, LANES_IN] (raw [T, 1, N, LANES_IN] with a row map)
    m_strides,  # K tuples of (P, Q, N, lane) strides
    parts_l,  # like parts_m; None in the LSE form
    l_strides,
    grad_parts_o,  # K pointers to [P, Q, N, D], the parts' dtype
    grad_parts_o_strides,  # K tuples of (P, Q, N, D) strides
    grad_parts_m,  # K pointers to [P, Q, N, LANES]: each lane's gradient (LSE form: lane 0, 0 in the others)
    grad_parts_m_strides,  # K tuples of (P, Q, N, lane) strides
    grad_parts_l,  # like grad_parts_m; None in the LSE form
    grad_parts_l_strides,
    row_base,  # [T] int64, with HAS_ROW_MAP
    row_step,  # [T] int64, with HAS_ROW_MAP
    num_rows,
    Q,
    N,
    D,
    GRAD_LANES,
    LANES,
    lse_scale,
    K: tl.constexpr,
    IS_LSE: tl.constexpr,
    HAS_ROW_MAP: tl.constexpr,
    HEADS_OUTER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_GRAD_LANES: tl.constexpr,
    BLOCK_LANES: tl.constexpr,
    LANES_IN: tl.constexpr,  # lanes merged: the stats form's (== LANES), 1 in the LSE form (lane 0)
    WIDE_COLS: tl.constexpr,  # some (D - 1) * column stride passes 2**31: int64 column offsets
):
    # Note [triton row tiles] and Note [triton row merge backward]; the formulas are Note [row merge backward],
    # lane by lane: lane j of the statistics meets the elements d with d % LANES_IN == j.
    row_mask, p, q, n, sp, sq, sn = _tile_rows(num_rows, Q, N, row_base, row_step, HAS_ROW_MAP, HEADS_OUTER, BLOCK_ROWS)
    stats = (parts_m, m_strides, parts_l, l_strides)
    in_lanes = tl.arange(0, LANES_IN)[None, :]
    new_max, all_empty, shift, new_sum = _merged_stats(*stats, K, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes)
    # All parts empty: weights 0, never 0 / 0 (the torch backend's rule, mirrored term by term).
    safe_sum = tl.where(all_empty, 1.0, new_sum)
    inv_sum = tl.where(all_empty, 0.0, tl.div_rn(tl.full(new_sum.shape, 1.0, tl.float32), safe_sum))

    # One pass over D: do_k = w_k g needs only the statistics, so it is written while d_k = <g, o_k> (per lane) is
    # accumulated; dots[:, k, :] holds d_k (K is a compile-time count, so no list of accumulators).
    k_ids = tl.arange(0, BLOCK_K)
    dots = tl.zeros([BLOCK_ROWS, BLOCK_K, LANES_IN], tl.float32)
    g_row = p * grad_o_strides[0] + q * grad_o_strides[1] + n * grad_o_strides[2]
    for d0 in range(0, D, BLOCK_D):
        cols = _columns(d0, BLOCK_D, WIDE_COLS)
        tile_mask = row_mask[:, None] & (cols < D)[None, :]
        g = tl.load(grad_o + g_row[:, None] + cols[None, :] * grad_o_strides[3], mask=tile_mask, other=0.0)
        g = g.to(tl.float32)
        for k in tl.static_range(K):
            _, _, a, empty = _part_scale(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes, shift)
            skip = _spread(empty, BLOCK_D)  # an empty part's o_k is not read; its gradient is 0
            o_off = p * o_strides[k][0] + q * o_strides[k][1] + n * o_strides[k][2]
            o = tl.load(parts_o[k] + o_off[:, None] + cols[None, :] * o_strides[k][3], mask=tile_mask, other=0.0)
            dot = _fold(tl.where(skip, 0.0, g * o.to(tl.float32)), LANES_IN)
            dots = tl.where(k_ids[None, :, None] == k, dots + dot[:, None, :], dots)  # dots[:, k] += d_k
            dst = p * grad_parts_o_strides[k][0] + q * grad_parts_o_strides[k][1] + n * grad_parts_o_strides[k][2]
            dst = dst[:, None] + cols[None, :] * grad_parts_o_strides[k][3]
            do = tl.where(skip, 0.0, g * _spread(a * inv_sum, BLOCK_D))
            tl.store(grad_parts_o[k] + dst, do.to(grad_parts_o[k].dtype.element_ty), mask=tile_mask)

    mean_dot = tl.zeros([BLOCK_ROWS, LANES_IN], tl.float32)  # <g, o> = sum_k w_k d_k, from the parts
    for k in tl.static_range(K):
        _, _, a, _ = _part_scale(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes, shift)
        mean_dot += (a * inv_sum) * _column(dots, k)
    g_m = _lane_grads(grad_m, grad_m_strides, sp, sq, sn, row_mask, GRAD_LANES, BLOCK_GRAD_LANES, LANES_IN)
    lanes = tl.arange(0, BLOCK_LANES)
    lane_mask = row_mask[:, None] & (lanes < LANES)[None, :]
    if IS_LSE:
        for k in tl.static_range(K):
            _, _, a, empty = _part_scale(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes, shift)
            centred = _column(dots, k) - mean_dot
            dx = tl.where(empty, 0.0, (a * inv_sum) * (lse_scale * centred + g_m))
            _store_lanes(grad_parts_m[k], grad_parts_m_strides[k], sp, sq, sn, lanes, dx, lane_mask, True)
    else:
        g_l = _lane_grads(grad_l, grad_l_strides, sp, sq, sn, row_mask, GRAD_LANES, BLOCK_GRAD_LANES, LANES_IN)
        # The max is shared equally by tied non-empty parts (torch.maximum's rule and the central difference's).
        tie_count = tl.zeros([BLOCK_ROWS, LANES_IN], tl.float32)
        for k in tl.static_range(K):
            m, _, empty = _part_stats(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes)
            tie_count += tl.where((m == new_max) & (~empty), 1.0, 0.0)
        tie_count = tl.maximum(tie_count, 1.0)
        max_grad = g_m - new_sum * g_l
        for k in tl.static_range(K):
            m, decay, a, empty = _part_scale(*stats, k, sp, sq, sn, row_mask, IS_LSE, lse_scale, in_lanes, shift)
            centred = _column(dots, k) - mean_dot
            dl = tl.where(empty, 0.0, (centred * inv_sum + g_l) * decay)
            tie = tl.where((m == new_max) & (~empty), 1.0, 0.0) / tie_count
            dm = tl.where(empty, 0.0, (a * inv_sum) * centred + a * g_l + tie * max_grad)
            _store_lanes(grad_parts_l[k], grad_parts_l_strides[k], sp, sq, sn, lanes, dl, lane_mask, False)
            _store_lanes(grad_parts_m[k], grad_parts_m_strides[k], sp, sq, sn, lanes, dm, lane_mask, False)


@triton.jit(do_not_specialize=["num_batches", "num_tokens", "N", "search_steps"])
def _per_batch_row_map_kernel(
    seq_offsets,  # [num_batches + 1] int64, valid (validated before any kernel runs)
    num_batches,
    num_tokens,
    N,
    search_steps,  # bit_length(num_batches): enough halvings of [0, num_batches - 1]
    row_base,  # [num_tokens] int64, written
    row_step,  # [num_tokens] int64, written
    BLOCK: tl.constexpr,
):
    """Note [canonical rows]' per-batch map, one launch: token ``t`` of batch ``b`` (the last ``b`` with
    ``offsets[b] <= t``, so empty batches are skipped) gets ``row_base = c_b (N - 1) + t`` and ``row_step = S_b``."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = t < num_tokens
    lo = tl.zeros([BLOCK], tl.int64)  # offsets[lo] <= t holds throughout (offsets[0] == 0)
    hi = tl.zeros([BLOCK], tl.int64) + (num_batches - 1)
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(seq_offsets + mid, mask=mask, other=0) <= t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    start = tl.load(seq_offsets + lo, mask=mask, other=0)
    length = tl.load(seq_offsets + lo + 1, mask=mask, other=0) - start
    tl.store(row_base + t, start * (N - 1) + t, mask=mask)
    tl.store(row_step + t, length, mask=mask)
