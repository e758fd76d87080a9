"""Fitting BGN's group rule to a sweep: the number of values per statistic ``V`` that scores best.

A sweep of ``--vary model.norm_kwargs={values_per_statistic: V}`` at several norm batch sizes ``b``
gives accuracy as a function of ``log2 V`` per ``b``. Per ``b`` this fits a parabola in ``log2 V``
through the measured means (least squares; at least three values of ``V``) and reads off its peak,
clipped to the swept range (a parabola opening upwards, i.e. no interior optimum, gives the best
measured ``V`` instead). A rule "every statistic pools about ``V*`` values" is supported by the data
when the peaks of the columns agree; :func:`fit_values_per_statistic` returns one
:class:`VFit` per column so the report can say whether they do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["VFit", "fit_lines", "fit_values_per_statistic"]


@dataclass(frozen=True)
class VFit:
    """The fitted optimum of one column (one ``b``) of a values-per-statistic sweep.

    Attributes:
        column: the column's ``b`` (or ``B``).
        best_measured: the swept ``V`` with the highest mean.
        best_score: that mean.
        peak: the parabola's peak in ``V`` (clipped to the swept range), or ``None`` with fewer
            than three points or without an interior maximum.
        points: how many values of ``V`` the column has.
    """

    column: int
    best_measured: int
    best_score: float
    peak: float | None
    points: int


def fit_values_per_statistic(values: Mapping[tuple[int, int], float]) -> list[VFit]:
    """One :class:`VFit` per column of ``values[(V, column)] -> score``, columns ascending."""
    import numpy as np

    fits = []
    for column in sorted({c for _, c in values}):
        points = sorted((v, s) for (v, c), s in values.items() if c == column and math.isfinite(s))
        if not points:
            continue
        best_v, best_s = max(points, key=lambda p: p[1])
        peak = None
        if len(points) >= 3:
            x = np.log2([v for v, _ in points])
            a, b, _ = np.polyfit(x, [s for _, s in points], 2)
            if a < 0:
                peak = float(2 ** min(max(-b / (2 * a), x.min()), x.max()))
        fits.append(VFit(column, best_v, best_s, peak, len(points)))
    return fits


def fit_lines(fits: Sequence[VFit], symbol: str) -> list[str]:
    """Markdown lines stating each column's fitted and best measured ``V``, and their spread."""
    if not fits:
        return []
    lines = ["Fitted values per statistic (a parabola in log2 V through each column's means; its peak, "
             "clipped to the swept range):", ""]
    for fit in fits:
        if fit.peak is not None:
            peak = f"peak V ≈ {fit.peak:,.0f}"
        else:
            peak = "too few values of V to fit" if fit.points < 3 else "no interior peak"
        lines.append(f"- {symbol} = {fit.column}: {peak}; best measured V = {fit.best_measured:,} "
                     f"({fit.best_score:.2f}; {fit.points} of V swept)")
    peaks = [f.peak for f in fits if f.peak is not None]
    if len(peaks) >= 2:
        spread = math.log2(max(peaks) / min(peaks))
        lines += ["", f"The peaks span {spread:.1f} octaves of V across {symbol} "
                      f"(geometric mean V ≈ {math.prod(peaks) ** (1 / len(peaks)):,.0f})."]
    return [*lines, ""]
