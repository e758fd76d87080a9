"""One look for every plot of a run and of a sweep: a norm keeps its colour, ties stay visible,
and a y-axis shows the seed spread and says its range.

* :func:`norm_colour`: a fixed colour per registry norm (``bgn`` is always red, ``bn`` always
  blue, ...), in ``accuracy_vs_batch_size.png``, ``robustness_curve.png`` and any other plot; a
  row of a sweep with extra axes (``bgn, method=dann``) has its norm's colour and its own line
  style and marker.
* :func:`series_style`: colour, marker, line style and a small x-offset per series, so lines with
  the same values (ties) are drawn side by side instead of one hiding the other.
* :func:`set_value_axis`: y-limits that hold every mean ± spread with a minimum span (5 points
  for percentages), so noise does not look like an effect; the label says the range shown.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["NORM_COLOURS", "norm_colour", "norm_of", "series_style", "set_value_axis"]

NORM_COLOURS: dict[str, str] = {
    "bn": "#1f77b4",  # blue
    "bgn": "#d62728",  # red
    "gn": "#2ca02c",  # green
    "ln": "#9467bd",  # purple
    "in": "#8c564b",  # brown
    "pn": "#e377c2",  # pink
    "none": "#7f7f7f",  # grey
}
"""The registry norms' colours (matplotlib's tab10)."""

_OTHER_COLOURS = ("#ff7f0e", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def norm_of(row: str) -> str:
    """The norm of a row label: ``"bgn, method=dann"`` -> ``"bgn"``."""
    return row.split(",", 1)[0].strip()


def norm_colour(row: str) -> str:
    """The colour of ``row``'s norm: fixed for the registry's norms, a stable pick for any other."""
    norm = norm_of(row)
    return NORM_COLOURS.get(norm) or _OTHER_COLOURS[zlib.crc32(norm.encode()) % len(_OTHER_COLOURS)]


def series_style(rows: Sequence[str], row: str, spacing: float) -> tuple[dict[str, Any], float]:
    """Matplotlib keywords for ``row`` among ``rows`` and its x-offset.

    Args:
        rows: every series of the plot, in legend order.
        row: this series.
        spacing: the x-offset between neighbouring series (the caller picks it for its axis; for a
            log axis it is an exponent step).

    Returns:
        ``(kwargs, offset)``: ``color`` (its norm's), ``marker``, ``linestyle`` (the k-th row of
        the same norm gets the k-th style) and ``label``; the offset centres the series on the
        true x (series ``i`` of ``n`` is shifted by ``(i - (n - 1) / 2) * spacing``).
    """
    i = list(rows).index(row)
    same_norm = [r for r in rows if norm_of(r) == norm_of(row)]
    style = {
        "color": norm_colour(row),
        "marker": _MARKERS[i % len(_MARKERS)],
        "linestyle": _LINESTYLES[same_norm.index(row) % len(_LINESTYLES)],
        "label": row,
    }
    return style, (i - (len(rows) - 1) / 2) * spacing


def set_value_axis(ax: Any, lows: Sequence[float], highs: Sequence[float], label: str, percent: bool) -> None:
    """Y-limits holding every ``[low, high]`` (mean ± spread), at least 5 points wide for percentages.

    The label gets the range shown, e.g. ``top-1 accuracy (%) [axis 90-100]``, so a zoomed axis
    is never read as one from 0.
    """
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 5.0 if percent else abs(hi) * 0.05 or 1.0)
    middle = (lo + hi) / 2
    lo, hi = middle - 0.55 * span, middle + 0.55 * span
    if percent:
        lo, hi = max(lo, 0.0), min(hi, 100.0)
        if hi - lo < span:  # pushed against 0 or 100: keep the span on the other side
            lo, hi = (0.0, span * 1.1) if lo == 0.0 else (100.0 - span * 1.1, 100.0)
    ax.set_ylim(lo, hi)
    ax.set_ylabel(f"{label} [axis {lo:.3g}-{hi:.3g}]")
