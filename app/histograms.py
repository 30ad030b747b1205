"""The Scores page's histograms as inline SVG: stacked bars of the pre-binned counts
(`chips_core.curation.selection.histograms`), drawn by the browser without a chart library.

The page used plotly for them; a browser's first plotly chart loads and compiles a 4.7 MB script (about a
second on the 2-core development machine), most of a first Scores load. These are a few hundred rectangles:
each bin's bar shows its selected pairs (green, below) and the others (grey, above), with its range and
counts as the bar's tooltip. Presentation only: the counts come from chips_core.
"""

from __future__ import annotations

import html
import math

import numpy as np

from chips_core.curation.selection import Histogram

SELECTED, NOT_SELECTED = "#2e7d32", "#b0bec5"
WIDTH, HEIGHT = 400, 210  # one chart's view box; it scales to its column's width
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 8, 44  # plot area margins inside the view box


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2 or 5 × 10^e apart) within [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def chart_svg(h: Histogram, title: str, x_title: str) -> str:
    """One histogram: `title` above, stacked bars, x ticks with `x_title`, y ticks titled 'pairs'."""
    centers = np.asarray(h.centers, np.float64)
    sel, other = np.asarray(h.selected, np.int64), np.asarray(h.not_selected, np.int64)
    total = sel + other
    width = float(centers[1] - centers[0]) if len(centers) > 1 else 1.0
    lo, hi = float(centers[0] - width / 2), float(centers[-1] + width / 2)
    y_max = max(int(total.max()) if len(total) else 0, 1)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + (v - lo) / (hi - lo) * pw

    def y(v: float) -> float:
        return TOP + ph - v / y_max * ph

    parts = []
    for yt in (t for t in nice_ticks(0, y_max, 4) if float(t).is_integer()):  # whole numbers of pairs
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(yt):.1f}" y2="{y(yt):.1f}" '
            'stroke="currentColor" stroke-opacity="0.12"/>'
            f'<text x="{LEFT - 6}" y="{y(yt) + 4:.1f}" text-anchor="end">{_fmt(yt)}</text>'
        )
    bar_w = pw / max(len(centers), 1)
    for i, c in enumerate(centers):
        if total[i] == 0:
            continue
        left = x(c - width / 2)
        tip = (
            f"{_fmt(c - width / 2)} to {_fmt(c + width / 2)}: {sel[i]:,} selected, {other[i]:,} not selected"
        )
        rects = "".join(
            f'<rect x="{left:.2f}" y="{y(top):.2f}" width="{bar_w:.2f}" height="{y(bottom) - y(top):.2f}" '
            f'fill="{colour}"/>'
            for bottom, top, colour in ((0, sel[i], SELECTED), (sel[i], total[i], NOT_SELECTED))
            if top > bottom
        )
        parts.append(f"<g><title>{tip}</title>{rects}</g>")
    for xt in nice_ticks(lo, hi, 5):
        parts.append(f'<text x="{x(xt):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_fmt(xt)}</text>')
    parts.append(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + ph}" y2="{TOP + ph}" stroke="currentColor" '
        'stroke-opacity="0.4"/>'
        f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_title)}</text>'
        f'<text transform="translate(12 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">pairs</text>'
    )
    counts = ",".join(map(str, sel)) + ";" + ",".join(map(str, other))
    summary = (  # what a screen reader says instead of the bars (their colours carry the selection)
        f"{title}: histogram of {int(total.sum()):,} pairs, {int(sel.sum()):,} of them selected, "
        f"{x_title} from {_fmt(lo)} to {_fmt(hi)}"
    )
    return (
        f'<figure class="chips-hist" data-column="{html.escape(x_title)}" data-counts="{counts}" '
        'style="margin:0">'
        f'<figcaption style="text-align:center;font-size:0.9rem">{html.escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{html.escape(summary)}" '
        f'style="font-size:12px;fill:currentColor;display:block">{"".join(parts)}</svg></figure>'
    )


def histograms_html(hists: dict[str, Histogram], titles: dict[str, str]) -> str:
    """Every histogram of `hists` (column → counts) in a two-column grid, titled by `titles`, with one
    legend below."""
    charts = "".join(chart_svg(hists[col], titles[col], col) for col in titles)
    swatch = (
        '<span style="display:inline-block;width:12px;height:12px;background:{};margin:0 6px 0 16px"></span>'
    )
    legend = (
        '<div style="text-align:center;font-size:0.85rem">'
        f"{swatch.format(SELECTED)}selected{swatch.format(NOT_SELECTED)}not selected</div>"
    )
    columns = "grid-template-columns:repeat(2, minmax(0, 1fr))"  # minmax: a chart never widens its column
    grid = f'<div style="display:grid;{columns};gap:12px 28px">{charts}</div>'
    return f'<div class="chips-histograms">{grid}{legend}</div>'
