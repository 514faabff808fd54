"""Results of ``ringattn bench``: one :class:`Row` per (case, provider), and the table / JSON / PNG views.

Every figure is read relative to figures of the same run (Note [bench timing] in ``_timing.py``): GB/s
next to the copy floor measured alongside, speedups over the naive eager formula, fresh-output time over
``out=`` time. Absolute times are printed but never stand alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from ._timing import median

__all__ = [
    "Row",
    "FLOOR",
    "BASELINE",
    "add_ratios",
    "format_table",
    "write_json",
    "write_png",
    "png_unavailable_reason",
]

FLOOR = "copy"  # provider name of the copy floor (Note [copy floor])
# "% floor" is left out below this many bytes moved: a smaller copy fits in cache and its time is call, launch and
# thread wake-up overhead (a 0.5 MB copy measured 5 us on one thread and 11 ms on two of a busy machine), not
# memory bandwidth, so a ratio to it says nothing about the merge.
FLOOR_MIN_BYTES = 16 << 20
BASELINE = "naive"  # provider name of the eager formula the speedups are relative to


@dataclasses.dataclass
class Row:
    """One provider timed on one case.

    ``series`` names the line a case belongs to in a size sweep (the case name without the swept size);
    ``fresh_of`` is set on an ``out=`` row to the name of the same backend's fresh-output provider.
    ``max_err`` is ``max |got - ref| / (1 + |ref|)`` over all outputs against the float64 reference, so it
    is below ``tol`` exactly when ``allclose(got, ref, atol=tol, rtol=tol)`` holds; None for the floor.
    ``timing`` says how a call was timed (Note [bench timing]): ``"host clock"`` (CPU), ``"cuda graph"``, or
    ``"cuda eager"`` (a CUDA provider that could not be captured: host overhead included).
    ``compile_s`` is the first call's time of a provider compiled on first use (``compiled``), kept out of
    ``seconds`` and of every ratio; None for the others.
    """

    case: str
    series: str
    nbytes: int
    provider: str
    seconds: list[float]
    backend: str | None = None
    max_err: float | None = None
    tol: float | None = None
    fresh_of: str | None = None
    timing: str = "host clock"
    compile_s: float | None = None
    median_s: float = 0.0
    gbps: float = 0.0
    pct_floor: float | None = None
    speedup_vs_naive: float | None = None
    fresh_over_out: float | None = None


def add_ratios(rows: Sequence[Row]) -> None:
    """Fill the derived fields of ``rows`` from the other rows of the same case."""
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows:
        row.median_s = median(row.seconds)
        row.gbps = row.nbytes / row.median_s / 1e9
        by_case.setdefault(row.case, {})[row.provider] = row
    for row in rows:
        peers = by_case[row.case]
        if FLOOR in peers and row.nbytes >= FLOOR_MIN_BYTES:
            row.pct_floor = 100.0 * peers[FLOOR].median_s / row.median_s
        if BASELINE in peers and row.provider != FLOOR:
            row.speedup_vs_naive = peers[BASELINE].median_s / row.median_s
        if row.fresh_of is not None and row.fresh_of in peers:
            row.fresh_over_out = peers[row.fresh_of].median_s / row.median_s


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width text table, one block of rows per case (``add_ratios`` must have run)."""
    header = ("provider", "backend", "median", "compile", "GB/s", "% floor", "x naive", "fresh/out", "max err", "tol")
    lines: list[list[str]] = []
    current = None
    for row in rows:
        if row.case != current:
            current = row.case
            lines.append([f"{row.case}  ({row.nbytes / 1e6:.1f} MB moved)"])
        lines.append(
            [
                row.provider,
                row.backend or "-",
                _fmt_time(row.median_s),
                "-" if row.compile_s is None else _fmt_time(row.compile_s),
                f"{row.gbps:.2f}",
                _fmt(row.pct_floor, ".0f"),
                _fmt(row.speedup_vs_naive, ".2f"),
                _fmt(row.fresh_over_out, ".2f"),
                _fmt(row.max_err, ".1e"),
                _fmt(row.tol, ".0e"),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines if len(line) > 1)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for line in lines:
        if len(line) == 1:
            out.append(line[0])
        else:
            out.append(
                "  ".join(
                    c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
                )
            )
    return "\n".join(out)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    """``{"meta": meta, "results": [row fields...]}``; non-finite floats are written as strings."""
    results = [{k: _json_safe(v) for k, v in dataclasses.asdict(row).items()} for row in rows]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
        f.write("\n")


def png_unavailable_reason() -> str | None:
    """Why ``write_png`` cannot run here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        return "--png needs matplotlib: pip install 'ringattn[bench]'"
    return None


def write_png(path: str, rows: Sequence[Row], title: str) -> None:
    """GB/s against bytes moved: one panel per series, one line per provider, the copy floor dashed."""
    # The object-oriented API with an explicit Agg canvas leaves matplotlib's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = list(dict.fromkeys(row.series for row in rows))
    cols = min(len(series), 2)
    nrows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(6 * cols, 4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(series):
        ax = fig.add_subplot(nrows, cols, i + 1)
        mine = [row for row in rows if row.series == name]
        for provider in dict.fromkeys(row.provider for row in mine):
            points = sorted((row.nbytes / 1e6, row.gbps) for row in mine if row.provider == provider)
            xs, ys = zip(*points, strict=True)
            style = {"linestyle": "--", "color": "black"} if provider == FLOOR else {}
            ax.plot(xs, ys, marker="o", label=f"{provider} (floor)" if provider == FLOOR else provider, **style)
        ax.set_xscale("log")
        ax.set_xlabel("MB moved (read + written)")
        ax.set_ylabel("effective GB/s")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
