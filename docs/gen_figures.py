"""Draw the schedule pictures of the docs from the real schedule functions, so they cannot drift from the code.

``python docs/gen_figures.py [OUT_DIR]`` (default ``docs/img``) writes one PNG per figure. The MkDocs hook
(``docs/hooks.py``) runs it before every build, and ``tests/test_docs.py`` runs it and checks the grids it draws.

Every picture is a raster of score entries: entry ``[step, i, j]`` of a grid is the rank that computes the score of
query ``i`` against key ``j`` (global positions) at that ring step, or -1 where nobody does. The grids are built
only from ``ringattn.ring.schedule`` (``step_blocks``, ``window_step_blocks``, ``active_steps``,
``packed_step_blocks``, ``zigzag_chunks``) and ``ringattn.packed_shard_info``: the same functions the ring runs.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from ringattn.ring import schedule  # noqa: E402

# Okabe-Ito colours (readable with colour-blindness), one per rank; white: not computed.
RANK_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]


def _local_to_global(rank: int, world_size: int, seq_len: int, *, sharding: str, causal: bool, windowed: bool):
    """Global position of each local token of ``rank`` (the order ``shard_sequence`` gives)."""
    if schedule.chunks_per_rank(causal or windowed, sharding) == 2:
        chunk = seq_len // (2 * world_size)
        return np.concatenate([np.arange(g * chunk, (g + 1) * chunk) for g in schedule.zigzag_chunks(rank, world_size)])
    chunk = seq_len // world_size
    return np.arange(rank * chunk, (rank + 1) * chunk)


def _mark(grid, rank, rows, cols, causal, band):
    """Mark the entries of one block (local rows x local columns) that its mask keeps."""
    a = np.arange(len(rows))[:, None]
    b = np.arange(len(cols))[None, :]
    if band is not None:
        keep = (b - a >= band[0]) & (b - a <= band[1])
    elif causal:
        keep = b <= a
    else:
        keep = np.ones((len(rows), len(cols)), dtype=bool)
    sub = grid[np.ix_(rows, cols)]
    if (sub[keep] != -1).any():
        raise AssertionError("a score entry is computed twice")
    sub[keep] = rank
    grid[np.ix_(rows, cols)] = sub


def dense_grid(world_size: int, seq_len: int, *, sharding: str = "zigzag", causal: bool = True, window=None):
    """``(steps, seq_len, seq_len)`` grid of the dense ring (see the module docstring) and the steps taken."""
    windowed = window is not None and tuple(window) != (-1, -1)
    n = schedule.chunks_per_rank(causal or windowed, sharding)
    chunk = seq_len // (world_size * n)

    def blocks_of(rank, step):
        if windowed:
            return schedule.window_step_blocks(
                rank, step, world_size, causal=causal, sharding=sharding, chunk=chunk, window=tuple(window)
            )
        return schedule.step_blocks(rank, step, world_size, causal=causal, sharding=sharding)

    grid = np.full((world_size, seq_len, seq_len), -1, dtype=np.int64)
    for step in range(world_size):
        for rank in range(world_size):
            src = schedule.source_rank(rank, step, world_size)
            mine = _local_to_global(rank, world_size, seq_len, sharding=sharding, causal=causal, windowed=windowed)
            theirs = _local_to_global(src, world_size, seq_len, sharding=sharding, causal=causal, windowed=windowed)
            for block in blocks_of(rank, step):
                rows = mine[block.q_lo * chunk : block.q_hi * chunk]
                cols = theirs[block.k_lo * chunk : block.k_hi * chunk]
                _mark(grid[step], rank, rows, cols, block.causal, block.band)
    return grid, schedule.active_steps(world_size, blocks_of)


def packed_grid(lengths: list[int], world_size: int, *, causal: bool = True):
    """``(steps, T, T)`` grid of the packed ring over documents of ``lengths`` (packed token positions)."""
    import torch

    import ringattn

    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    total = int(cu_seqlens[-1])
    slots = [ringattn.packed_shard_info(cu_seqlens, r, world_size).token_index.numpy() for r in range(world_size)]
    grid = np.full((world_size, total, total), -1, dtype=np.int64)
    for step in range(world_size):
        for rank in range(world_size):
            src = schedule.source_rank(rank, step, world_size)
            for block in schedule.packed_step_blocks(lengths, rank, step, world_size, causal=causal):
                for qs, ql, ks, kl in zip(block.q_start, block.q_len, block.k_start, block.k_len, strict=True):
                    rows, cols = slots[rank][qs : qs + ql], slots[src][ks : ks + kl]
                    if (rows < 0).any() or (cols < 0).any():
                        raise AssertionError("a block reaches a padding slot")
                    _mark(grid[step], rank, rows, cols, block.causal, None)
    return grid, slots


def _owner_strip(world_size: int, seq_len: int, holder) -> np.ndarray:
    strip = np.full(seq_len, -1, dtype=np.int64)
    for rank in range(world_size):
        strip[holder(rank)] = rank
    return strip


def _panel_image(grid_step: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, int]:
    """One step's scores with the owner strips: keys' owners above, queries' owners left; returns it and the margin."""
    size = len(owners)
    strip, gap = max(2, size // 16), max(1, size // 64)
    margin = strip + gap
    image = np.full((size + margin, size + margin), -1, dtype=np.int64)
    image[:strip, margin:] = owners[None, :]
    image[margin:, :strip] = owners[:, None]
    image[margin:, margin:] = grid_step
    return image, margin


def _draw(path: Path, grid, owners, world_size: int, title: str, taken=None, boundaries=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    steps, size = grid.shape[0], grid.shape[1]
    cols = min(steps, 2)
    rows = -(-steps // cols)
    cmap = ListedColormap(["#ffffff", *RANK_COLOURS[:world_size]])
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows + 1.0), squeeze=False, layout="constrained")
    for step in range(rows * cols):
        ax = axes[step // cols, step % cols]
        if step >= steps:
            ax.axis("off")
            continue
        image, margin = _panel_image(grid[step], owners)
        extent = (-margin - 0.5, size - 0.5, size - 0.5, -margin - 0.5)
        ax.imshow(image + 1, cmap=cmap, vmin=0, vmax=world_size, interpolation="nearest", extent=extent)
        ax.add_patch(Rectangle((-0.5, -0.5), size, size, fill=False, edgecolor="#333333", lw=0.8, clip_on=False))
        for b in boundaries:
            ax.hlines(b - 0.5, -0.5, size - 0.5, color="#777777", lw=0.5)
            ax.vlines(b - 0.5, -0.5, size - 0.5, color="#777777", lw=0.5)
        for side in ax.spines.values():
            side.set_visible(False)
        ticks = [t for t in range(0, size + 1, max(8, size // 8)) if t < size]
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=8, length=2)
        ax.set_xlabel("key position (strip: rank holding it)", fontsize=9)
        ax.set_ylabel("query position (strip: rank holding it)", fontsize=9)
        label = "its own key/values" if step == 0 else f"the key/values of rank r-{step}"
        skipped = taken is not None and step not in taken
        ax.set_title(f"step {step}: rank r holds {label}" + ("\n(step not taken)" if skipped else ""), fontsize=10)
    handles = [Patch(color=RANK_COLOURS[r], label=f"rank {r}") for r in range(world_size)]
    handles.append(Patch(facecolor="#ffffff", edgecolor="#999999", label="not computed"))
    fig.legend(handles=handles, loc="outside lower center", ncol=world_size + 1, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    if not path.exists() or path.read_bytes() != buffer.getvalue():  # unchanged: left alone (`mkdocs serve`)
        path.write_bytes(buffer.getvalue())


def main(out_dir: str | Path = ROOT / "docs" / "img") -> list[Path]:
    """Write every figure into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    w, s = 4, 64  # zigzag: 2W = 8 chunks of 8 tokens; contiguous: W = 4 chunks of 16
    for sharding in ("zigzag", "contiguous"):
        grid, _ = dense_grid(w, s, sharding=sharding)
        holder = lambda r, sharding=sharding: _local_to_global(  # noqa: E731
            r, w, s, sharding=sharding, causal=True, windowed=False
        )
        n = 2 * w if sharding == "zigzag" else w
        path = out / f"{sharding}_schedule.png"
        title = (
            f"Causal ring, W = {w}, S = {s}, sharding={sharding!r}\n"
            f"who computes which scores at each step (lines: the {n} chunks of {s // n} tokens)"
        )
        _draw(path, grid, _owner_strip(w, s, holder), w, title, boundaries=list(range(s // n, s, s // n)))
        paths.append(path)

    w, s, window = 4, 128, (15, 0)  # chunks of 16 tokens, each token sees the 16 last ones
    grid, taken = dense_grid(w, s, sharding="zigzag", window=window)
    holder = lambda r: _local_to_global(r, w, s, sharding="zigzag", causal=True, windowed=True)  # noqa: E731
    path = out / "window_schedule.png"
    title = f"Zigzag ring, W = {w}, S = {s}, window={window} (each token sees the 16 last)\nsteps taken: {taken}"
    _draw(path, grid, _owner_strip(w, s, holder), w, title, taken=taken, boundaries=list(range(16, s, 16)))
    paths.append(path)

    lengths, w = [24, 5, 21, 14], 2
    grid, slots = packed_grid(lengths, w)
    owners = np.full(sum(lengths), -1, dtype=np.int64)
    for rank, index in enumerate(slots):
        owners[index[index >= 0]] = rank
    path = out / "packed_schedule.png"
    title = (
        f"Packed ring, W = {w}, documents of lengths {lengths}\n"
        f"(lines: document boundaries; each document cut into 2W = {2 * w} chunks)"
    )
    _draw(path, grid, owners, w, title, boundaries=list(np.cumsum(lengths)[:-1]))
    paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main(*sys.argv[1:]):
        print(p)
