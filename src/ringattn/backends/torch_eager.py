"""Portable backend: the merge as vectorised torch operations; runs on every device.

It is the fallback for devices without a fused kernel and the implementation every fused backend is
compared with. Arithmetic is float32 (float64 for float64 inputs), rounded once to the output dtype.
See Note [canonical rows] in ``_contract.py`` and Note [row merge] in ``backends/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._contract import UpdateProblem

NAME = "torch"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(problem: UpdateProblem) -> str | None:
    return None


def _logical_rows(row_map: tuple[torch.Tensor, torch.Tensor], heads: int) -> torch.Tensor:
    """``(T, N)`` logical statistics row of each attention row under the per-batch map (Note [canonical rows])."""
    row_base, row_step = row_map
    return row_base.unsqueeze(1) + torch.arange(heads, device=row_base.device) * row_step.unsqueeze(1)


def _gather_rows(
    stats: torch.Tensor, row_map: tuple[torch.Tensor, torch.Tensor] | None, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Every lane of a stats view as ``(P, Q, N, lanes)`` aligned with attention rows (Note [canonical rows]);
    ``index``: :func:`_logical_rows` of ``row_map``, when already computed."""
    if row_map is None:
        return stats
    tokens, _, heads, lanes = stats.shape
    index = _logical_rows(row_map, heads) if index is None else index
    return stats.reshape(tokens * heads, lanes)[index].unsqueeze(1)


def _write_rows(
    lanes: torch.Tensor,
    out: torch.Tensor,
    row_map: tuple[torch.Tensor, torch.Tensor] | None,
    index: torch.Tensor | None = None,
) -> None:
    """Write ``lanes`` ``(P, Q, N, lanes)``, in attention-row order, to the stats view ``out``."""
    if row_map is None:
        out.copy_(lanes)
        return
    tokens, _, heads, width = out.shape
    index = _logical_rows(row_map, heads) if index is None else index
    flat = torch.empty((tokens * heads, width), dtype=out.dtype, device=out.device)
    flat[index.reshape(-1)] = lanes.reshape(-1, width).to(out.dtype)
    out.copy_(flat.view(tokens, 1, heads, width))


def _lane_index(width: int, lanes: int, device: torch.device) -> torch.Tensor:
    """Which of ``lanes`` lanes each of ``width`` positions reads: position ``d`` reads lane ``d % lanes``."""
    return torch.arange(width, device=device) % lanes


def _spread(per_lane: torch.Tensor, width: int) -> torch.Tensor:
    """``(..., lanes)`` -> ``(..., width)``, position ``d`` taking lane ``d % lanes`` (a broadcast for one lane)."""
    lanes = per_lane.shape[-1]
    if lanes == 1 or width == lanes:
        return per_lane
    return per_lane[..., _lane_index(width, lanes, per_lane.device)]


def _fold(values: torch.Tensor, lanes: int) -> torch.Tensor:
    """``(..., width)`` -> ``(..., lanes)``: lane ``j`` sums the positions ``d`` with ``d % lanes == j`` (the
    adjoint of :func:`_spread`)."""
    width = values.shape[-1]
    if width == lanes:
        return values
    out = values.new_zeros((*values.shape[:-1], lanes))
    return out.index_add_(values.dim() - 1, _lane_index(width, lanes, values.device), values)


def _lane0(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per row ``(..., 1)`` in lane 0 of ``like``'s lanes, 0 in the others (the LSE form reads lane 0)."""
    if like.shape[-1] == 1:
        return values
    out = values.new_zeros((*values.shape[:-1], like.shape[-1]))
    out[..., :1] = values
    return out


def _out_lanes(per_lane: torch.Tensor, lanes_out: int) -> torch.Tensor:
    """Merged lanes ``(..., lanes)`` as ``lanes_out`` output lanes: output lane ``c`` holds lane ``c % lanes``."""
    return _spread(per_lane, lanes_out).expand(*per_lane.shape[:-1], lanes_out)


# Note [torch merge passes]
# -------------------------
# The portable backend's cost is its passes over the big ``(P, Q, N, D)`` tensors and, on a busy machine, the number
# of ops: each multi-threaded op hands work to torch's other threads, which costs milliseconds when the cores are
# shared. The statistics ``(P, Q, N, lanes)`` are small next to the rows. So:
#
# * Lanes by reshape, never by index tensors. When every statistics lane of every part is bitwise equal to lane 0
#   (the contract's 8 equal lanes, the common case), the weights are computed on lane 0 alone, ``(..., 1)``, and
#   broadcast over D: every lane would compute exactly the same bits. Otherwise, when D is a multiple of the lanes,
#   a row is viewed as ``(..., D / lanes, lanes)`` against ``(..., 1, lanes)`` weights: position d meets lane
#   ``d % lanes``. Only a row width that is not a multiple of unequal lanes spreads the small per-lane weights to
#   ``(..., D)`` by an index gather (``_spread``). The gather versions of the whole merge, the backend before
#   these passes, live in ``tests/backends/torch_eager_before.py``: what the tests compare with.
# * The statistics of the K parts are stacked, so that each step of the weights is one op whatever K is.
# * The forward accumulates ``o_0 w_0``, then ``+= o_k w_k`` by ``addcmul_`` (one rounding per part: an FMA, where
#   the gather path rounds the product, then the sum), in float32 (float64), rounded once to the output dtype. A
#   float32 (float64) output with no part after the first in its memory is the accumulator itself (whole tensors:
#   one pass per part, no scratch); otherwise rows go in chunks of about ``_CHUNK_ELEMENTS`` through scratch chunks
#   that stay in cache (a part in another dtype is converted into one by ``copy_``: a mixed-dtype op would convert a
#   whole copy first), and each output chunk is written once.
# * The backward goes in chunks too: ``g`` converted once per chunk, each part read once for its per-lane dots
#   ``<g, o_k>`` (one lane and no empty row: a batched ``matmul`` of ``(..., 1, D)`` by ``(..., D, 1)``; otherwise
#   a product in scratch, summed per lane), each ``w_k g`` written once.
# * Empty parts are selected out, never multiplied by zero: a part with an empty row has its product set to -0.0
#   there (forward: the identity of ``+``, as the select of Note [row merge]) or 0 (backward) by ``masked_fill_``;
#   rows empty in every part are set to +0. Parts without an empty row (the common case) skip both.
# * Outputs may alias inputs: a chunk reads every input chunk before it writes its output chunk, which is correct
#   when the output is exactly an input view or shares no memory with any; any other overlap runs as one chunk.

# Elements per chunk: 4 Mi (16 MiB of float32 scratch). On 2 shared cores (SBH S=4096 N=32 D=128, 16 Mi elements),
# 4 chunks were within 15% of 16 when the machine was quiet (bfloat16 forward 30 / 26 ms, float32 backward 54 / 53
# ms; whole tensors 61 / 72 ms) and steadier when it was busy: each op costs a thread hand-off of several ms there.
_CHUNK_ELEMENTS = 1 << 22


def _equal_lanes(stats: Sequence[torch.Tensor]) -> bool:
    """Whether every lane of every tensor in ``stats`` (``(..., lanes)``) is bitwise lane 0 (NaN payloads and the sign
    of zero included), so lane 0's arithmetic is every lane's."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    for t in stats:
        bits = t.view(as_int[t.element_size()])
        if not torch.equal(bits, bits[..., :1].expand_as(bits)):
            return False
    return True


class _Lanes:
    """How ``(..., lanes)`` per-lane values meet rows of ``width`` elements (Note [torch merge passes]): one lane by
    broadcast, a width that is a multiple of the lanes by ``(..., width / lanes, lanes)`` views, any other width by
    spreading the per-lane values to ``(..., width)`` (an index gather of the small tensors)."""

    def __init__(self, lanes: int, width: int) -> None:
        self.lanes, self.width = lanes, width
        self.blocks = lanes > 1 and width % lanes == 0
        self.spread = lanes > 1 and not self.blocks

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """A big ``(..., width)`` tensor (or chunk) in the layout the per-lane values broadcast against."""
        return t.unflatten(-1, (-1, self.lanes)) if self.blocks else t

    def per_lane(self, t: torch.Tensor) -> torch.Tensor:
        """Per-lane values ``(..., lanes)`` (or one lane) broadcastable against :meth:`rows`."""
        if t.shape[-1] == 1:
            return t.unsqueeze(-2) if self.blocks else t
        return t.unsqueeze(-2) if self.blocks else _spread(t, self.width)

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., lanes)``: per lane, the sum of a ``(..., width)`` chunk's elements of that lane (one op: a
        reduction with ``out=`` would first fill its output)."""
        if self.spread:
            return _fold(t, self.lanes)
        return self.rows(t).sum(-2) if self.blocks else t.sum(-1, keepdim=True)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` that ``t`` (non-empty; torch strides are never negative) can touch."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (their byte ranges meet)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a_lo, a_hi = _span(a)
    b_lo, b_hi = _span(b)
    return a_lo < b_hi and b_lo < a_hi


def _chunkable(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``out`` is exactly each input view or shares no memory with it (then chunks may write as they go)."""
    same = [t.data_ptr() == out.data_ptr() and t.shape == out.shape and t.stride() == out.stride() for t in inputs]
    return all(s or not _overlaps(out, t) for s, t in zip(same, inputs, strict=True))


def _chunks(shape: Sequence[int], whole: bool) -> list[tuple[int, int, int]]:
    """``(dim, start, length)`` pieces cutting the row dimensions ``shape[:-1]`` along the longest into chunks of
    about ``_CHUNK_ELEMENTS`` elements (one piece when ``whole``)."""
    rows_shape = list(shape[:-1])
    dim = max(range(len(rows_shape)), key=lambda d: rows_shape[d])
    size = rows_shape[dim]
    per_step = max(1, torch.Size(shape).numel() // max(size, 1))
    step = max(size, 1) if whole else max(1, _CHUNK_ELEMENTS // per_step)
    return [(dim, start, min(step, size - start)) for start in range(0, size, step)]


def _take(t: torch.Tensor, piece: tuple[int, int, int]) -> torch.Tensor:
    """Chunk ``piece`` of ``t`` (its row dimensions are the big tensors')."""
    return t.narrow(*piece)


class _Merged:
    """The statistics side of a merge (small tensors) in the fewest ops, the K parts stacked.

    ``maxima`` ``(K, ..., lanes)`` (``m_k``, or the LSE in natural log), ``sums`` (``l_k``; None in the LSE form),
    ``empty[k]`` (part k's empty flags, or None when it has no empty row: the common case skips every select),
    ``empty_stack`` (all of them, or None), ``all_empty`` (rows empty in every part, or None), ``new_max`` ``M``,
    ``decay`` ``exp(m_k - shift)``, ``scaled`` ``a_k``, ``new_sum`` ``L``. Lanes are narrowed to lane 0 when every
    lane is bitwise lane 0. The formulas of the gather version; ``L`` adds the parts in order, as the fused kernels
    do."""

    def __init__(self, parts_m, parts_l, row_map, compute: torch.dtype, lse_scale: float) -> None:
        # Per-batch statistics: the row index once, and lane 0 alone when all lanes are equal (checked before the
        # gather, which then moves an eighth of the bytes).
        self.index = index = None if row_map is None else _logical_rows(row_map, parts_m[0].shape[2])
        if parts_l is not None and index is not None and parts_m[0].shape[-1] > 1:
            if _equal_lanes([*parts_m, *parts_l]):
                parts_m, parts_l = [m[..., :1] for m in parts_m], [s[..., :1] for s in parts_l]
        if parts_l is None:  # LSE form: one lane; +-inf is empty and reads as -inf
            maxima = torch.stack([_gather_rows(m[..., :1], row_map, index) for m in parts_m]).to(compute)
            if lse_scale != 1.0:
                maxima = maxima * lse_scale
            flags = maxima.isinf()
            has = neg = flags.flatten(1).any(1).tolist()
            if any(has):
                maxima = maxima.masked_fill(flags, float("-inf"))
            sums = None
        else:
            maxima = torch.stack([_gather_rows(m, row_map, index) for m in parts_m]).to(compute)
            sums = torch.stack([_gather_rows(s, row_map, index) for s in parts_l]).to(compute)
            if maxima.shape[-1] > 1 and index is None and _equal_lanes([maxima, sums]):
                maxima, sums = maxima[..., :1], sums[..., :1]
            flags = maxima.isneginf()
            has = neg = flags.flatten(1).any(1).tolist()  # -inf with l != 0 is not empty, but may make M -inf
            if any(has):
                flags = flags & (sums == 0)
                has = flags.flatten(1).any(1).tolist()
        self.maxima, self.sums = maxima, sums
        self.empty = [flags[k] if h else None for k, h in enumerate(has)]
        self.empty_stack = flags if any(has) else None
        self.new_max = new_max = maxima.amax(0)
        # Rows whose every part has m = -inf (empty, or l != 0): shift by 0 so exp() gives 0, not NaN. None when there
        # are none, as when some part has no -inf.
        all_empty = None
        if all(neg):
            all_empty = new_max == float("-inf")
            all_empty = all_empty if bool(all_empty.any()) else None
        self.all_empty = all_empty
        shift = new_max if all_empty is None else new_max.masked_fill(all_empty, 0.0)
        self.decay = torch.exp(maxima - shift)
        self.scaled = self.decay if sums is None else sums * self.decay
        # L in part order, one add at a time (as every fused kernel adds): a reduction over the stack may associate
        # differently for another K, and then an empty part (a = 0, the identity of +) would change the bits of the
        # merge of the others (Note [row merge]: such a row is bitwise the merge without it).
        new_sum = self.scaled[0].clone()
        for scaled in self.scaled[1:]:
            new_sum += scaled
        self.new_sum = new_sum


def merge_rows(
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    out_o: torch.Tensor,
    out_m: torch.Tensor,
    out_l: torch.Tensor | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Note [row merge] in ``backends/__init__.py`` as torch operations, with the passes of Note [torch merge
    passes]. Against the gather version (``tests/backends/torch_eager_before.py``): the statistics outputs are
    bitwise its own for K = 2 (the sum of more parts within a float32 rounding); the attention output within one
    float32 (float64) rounding per part (an FMA in place of a rounded product and a sum), then rounded once, so it
    may be the adjacent value of the output dtype. Every row width; a width that is not a multiple of unequal lanes
    spreads the weights."""
    compute = torch.float64 if out_o.dtype == torch.float64 else torch.float32
    dim = out_o.shape[-1]
    st = _Merged(parts_m, parts_l, row_map, compute, lse_scale)
    lanes = st.maxima.shape[-1]
    weights = st.scaled / st.new_sum
    if st.all_empty is not None:
        weights = weights.masked_fill_(st.all_empty, 0.0)
    if st.empty_stack is not None:  # +0 (an empty part's l may be -0): its -0.0 times it is -0.0
        weights = weights.masked_fill_(st.empty_stack, 0.0)
    view = _Lanes(lanes, dim)
    # Accumulate in out_o itself when no part after the first lives there, else in scratch chunks.
    direct = out_o.dtype == compute and not any(_overlaps(out_o, o) for o in parts_o[1:])
    if out_o.numel():
        pieces = _chunks(out_o.shape, whole=direct or not _chunkable(out_o, parts_o))
        first = _take(out_o, pieces[0]).shape
        acc_buf = None if direct else torch.empty(first, dtype=compute, device=out_o.device)
        tmp_buf: torch.Tensor | None = None
        for piece in pieces:
            out_chunk = _take(out_o, piece)
            acc = out_chunk if direct else acc_buf.narrow(piece[0], 0, piece[2])
            for k, (o, e) in enumerate(zip(parts_o, st.empty, strict=True)):
                o, w = _take(o, piece), view.per_lane(_take(weights[k], piece))
                if o.dtype != compute or (k and e is not None):  # through a scratch chunk
                    if tmp_buf is None:
                        tmp_buf = torch.empty(first, dtype=compute, device=out_o.device)
                    o = tmp_buf.narrow(piece[0], 0, piece[2]).copy_(o)  # converted, or to be selected in
                if k == 0:
                    torch.mul(view.rows(o), w, out=view.rows(acc))
                    if e is not None:  # not read: -0.0, the identity of +, whatever o holds there
                        view.rows(acc).masked_fill_(view.per_lane(_take(e, piece)), -0.0)
                    continue
                if e is not None:  # -0.0 times a weight of +0: the -0.0 of the select, by the same FMA as other rows
                    view.rows(o).masked_fill_(view.per_lane(_take(e, piece)), -0.0)
                view.rows(acc).addcmul_(view.rows(o), w)  # acc += o_k w_k
            if st.all_empty is not None:  # a row empty in every part: +0, not -0
                view.rows(acc).masked_fill_(view.per_lane(_take(st.all_empty, piece)), 0.0)
            if not direct:
                out_chunk.copy_(acc)
    lanes_out = out_m.shape[-1]
    if out_l is None:
        lse = st.new_max + torch.log(st.new_sum)
        if lse_scale != 1.0:
            lse = lse / lse_scale
        if st.all_empty is not None:
            lse = lse.masked_fill(st.all_empty, float("-inf"))
        _write_rows(_out_lanes(lse, lanes_out), out_m, row_map, st.index)
    else:
        _write_rows(_out_lanes(st.new_max, lanes_out), out_m, row_map, st.index)
        _write_rows(_out_lanes(st.new_sum, lanes_out), out_l, row_map, st.index)


def merge_rows_backward(
    grad_o: torch.Tensor,
    grad_m: torch.Tensor,
    grad_l: torch.Tensor | None,
    parts_o: Sequence[torch.Tensor],
    parts_m: Sequence[torch.Tensor],
    parts_l: Sequence[torch.Tensor] | None,
    grad_parts_o: Sequence[torch.Tensor],
    grad_parts_m: Sequence[torch.Tensor],
    grad_parts_l: Sequence[torch.Tensor] | None,
    *,
    row_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_scale: float = 1.0,
) -> None:
    """Note [row merge backward] in ``_backward.py`` as torch operations, with the passes of Note [torch merge
    passes]. Within float32 (float64) rounding of the gather version (``tests/backends/torch_eager_before.py``;
    the dots are summed in another order). Every row width; a width that is not a multiple of unequal lanes spreads
    the weights."""
    compute = torch.float64 if parts_o[0].dtype == torch.float64 else torch.float32
    dim = grad_o.shape[-1]
    lanes = parts_m[0].shape[-1] if parts_l is not None else 1
    st = _Merged(parts_m, parts_l, row_map, compute, lse_scale)  # weights on lane 0 when the lanes are equal
    inv_sum = 1.0 / st.new_sum
    if st.all_empty is not None:  # all empty: weights 0, not NaN
        inv_sum = inv_sum.masked_fill_(st.all_empty, 0.0)
    weights = st.scaled * inv_sum
    view = _Lanes(lanes, dim)  # the dots stay per lane

    def meet(small: torch.Tensor) -> torch.Tensor:  # one lane against flat rows, else against view.rows
        return small if small.shape[-1] == 1 else view.per_lane(small)

    def rows(big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        return big if small.shape[-1] == 1 else view.rows(big)

    dots: list[list[torch.Tensor]] = [[] for _ in parts_o]  # per part, its chunks' dots
    pieces = _chunks(grad_o.shape, whole=False)  # gradient outputs never alias inputs
    if grad_o.numel():
        first = _take(grad_o, pieces[0]).shape
        g_buf = None if grad_o.dtype == compute else torch.empty(first, dtype=compute, device=grad_o.device)
        tmp_buf = torch.empty(first, dtype=compute, device=grad_o.device)
        for piece in pieces:
            g = _take(grad_o, piece)
            if g_buf is not None:
                g = g_buf.narrow(piece[0], 0, piece[2]).copy_(g)
            tmp = tmp_buf.narrow(piece[0], 0, piece[2])
            for k, (o, e) in enumerate(zip(parts_o, st.empty, strict=True)):
                o = _take(o, piece)
                if e is None and lanes == 1:  # one op, no product in memory: a batched dot product
                    src = o if o.dtype == compute else tmp.copy_(o)
                    dots[k].append(torch.matmul(g.unsqueeze(-2), src.unsqueeze(-1)).squeeze(-1))
                else:
                    if o.dtype == compute:
                        torch.mul(g, o, out=tmp)
                    else:
                        tmp.copy_(o).mul_(g)
                    if e is not None:  # d_k = <g, o_k> leaves an empty part's output unread
                        e = _take(e, piece)
                        rows(tmp, e).masked_fill_(meet(e), 0.0)
                    dots[k].append(view.fold(tmp))
                w = _take(weights[k], piece)
                dst = _take(grad_parts_o[k], piece)
                out = dst if dst.dtype == compute else tmp
                torch.mul(rows(g, w), meet(w), out=rows(out, w))
                if e is not None:
                    rows(out, e).masked_fill_(meet(e), 0.0)
                if out is not dst:
                    dst.copy_(out)
    if grad_o.numel():
        dot = torch.stack([d[0] if len(d) == 1 else torch.cat(d, pieces[0][0]) for d in dots])
    else:
        dot = torch.zeros((len(parts_o), *grad_o.shape[:-1], lanes), dtype=compute, device=grad_o.device)
    products = weights * dot
    mean_dot = products[0].clone()  # <g, o> recomputed from the parts, in part order (as _Merged adds L)
    for product in products[1:]:
        mean_dot += product
    centred = dot - mean_dot
    # Output lane c holds merged lane c % lanes, so lane j's gradient sums those output lanes.
    g_m = _fold(_gather_rows(grad_m, row_map).to(compute), lanes)

    def write(values: torch.Tensor, dst: Sequence[torch.Tensor], lse: bool = False) -> None:
        for k, e in enumerate(st.empty):  # an empty part's gradients are 0
            v = values[k] if e is None else torch.where(e, 0.0, values[k])
            _write_rows(_lane0(v, dst[k]) if lse else v.expand(*v.shape[:-1], lanes), dst[k], row_map, st.index)

    if parts_l is None:
        write(weights * (lse_scale * centred + g_m), grad_parts_m, lse=True)
        return
    assert grad_l is not None and grad_parts_l is not None
    g_l = _fold(_gather_rows(grad_l, row_map, st.index).to(compute), lanes)
    # The max is shared equally by tied parts (torch.maximum's rule and the central difference's); empty parts
    # take no share (their gradient is 0).
    ties = st.maxima == st.new_max
    if st.empty_stack is not None:
        ties = ties & ~st.empty_stack
    ties = ties.to(compute)
    share = ties / ties.sum(0).clamp_min(1.0)
    max_grad = g_m - st.new_sum * g_l
    write((centred * inv_sum + g_l) * st.decay, grad_parts_l)
    write(weights * centred + st.scaled * g_l + share * max_grad, grad_parts_m)
