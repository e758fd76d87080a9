"""Robustness curves (PGD accuracy vs L-infinity radius, one line per norm): CSV and PNG.

A run stores its curve in ``results.json`` (``robustness_curve``: ``{"eps": [...], "pgd_acc":
[...]}``, fractions) and writes ``robustness_curve.csv`` / ``.png`` beside it; ``bgn-task bench``
writes the same two files for the sweep: the mean ± std over seeds per row and batch size, one
panel per batch size.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.common.plots import series_style

__all__ = [
    "CURVE_CSV",
    "CURVE_PNG",
    "CurvePoint",
    "curve_points",
    "plot_curves",
    "sweep_curves",
    "write_curve_csv",
]

CURVE_CSV = "robustness_curve.csv"
CURVE_PNG = "robustness_curve.png"

CurvePoint = tuple[float, float, float | None, int]
"""``(eps, mean accuracy %, std % or None, number of runs)``."""


def curve_points(curves: Iterable[Mapping[str, list[float]]]) -> list[CurvePoint]:
    """Mean ± std (over runs) of the accuracy, in percent, at each radius any of ``curves`` has."""
    by_eps: dict[float, list[float]] = {}
    for curve in curves:
        for eps, acc in zip(curve["eps"], curve["pgd_acc"], strict=True):
            by_eps.setdefault(round(float(eps), 8), []).append(100.0 * float(acc))
    return [
        (eps, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))
        for eps, v in sorted(by_eps.items())
    ]


def write_curve_csv(series: Mapping[tuple[str, int], list[CurvePoint]], path: Path) -> Path:
    """One line per ``(row, batch size, eps)``: ``row, batch_size, eps, pgd_acc_pct, std_pct, runs``."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "batch_size", "eps", "pgd_acc_pct", "std_pct", "runs"])
        for (row, batch_size), points in series.items():
            for eps, mean, std, n in points:
                writer.writerow(
                    [row, batch_size, f"{eps:.6g}", f"{mean:.4f}", "" if std is None else f"{std:.4f}", n]
                )
    return path


def plot_curves(series: Mapping[tuple[str, int], list[CurvePoint]], path: Path, title: str) -> Path:
    """Accuracy (%) vs eps, one panel per batch size, one line (with std bars) per row.

    Each norm has the colour it has in every plot (:mod:`tasks.common.plots`); series sit side by
    side so ties stay visible; the y-axis is 0-100 (an attack can take accuracy anywhere).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({b for _, b in series})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4.5 * len(batch_sizes), 3.6), squeeze=False)
    rows = list(dict.fromkeys(row for row, _ in series))
    all_eps = [p[0] for points in series.values() for p in points]
    spacing = 0.008 * (max(all_eps) - min(all_eps)) if all_eps else 0.0
    for ax, batch_size in zip(axes[0], batch_sizes, strict=True):
        for (row, b), points in series.items():
            if b != batch_size:
                continue
            style, offset = series_style(rows, row, spacing)  # the norm's colour; side by side for ties
            ax.errorbar([p[0] + offset for p in points], [p[1] for p in points],
                        yerr=[p[2] or 0.0 for p in points], capsize=3, **style)  # fmt: skip
        ax.set_title(f"batch size {batch_size}")
        ax.set_xlabel("L-inf radius eps")
        ax.set_ylabel("PGD accuracy (%) [axis 0-100]")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_curves(rows: Iterable[tuple[str, dict[str, Any]]]) -> dict[tuple[str, int], list[CurvePoint]]:
    """The curves of a sweep's ``(row label, results record)`` pairs, per ``(row, batch size)``."""
    grouped: dict[tuple[str, int], list[Mapping[str, list[float]]]] = {}
    for row, record in rows:
        curve = record.get("robustness_curve")
        if curve and curve.get("eps"):
            grouped.setdefault((row, int(record["batch_size"])), []).append(curve)
    return {
        key: curve_points(curves)
        for key, curves in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    }
