"""Sweep reports: ``results.csv``, ``results.md`` (mean ± spread per row x batch size) and a plot.

Works on ``results.json`` records of any task, for the metrics the task declares
(:class:`tasks.common.contract.Metric`): one table per metric (the primary one first) and one
panel per metric in ``accuracy_vs_batch_size.png``. The columns are the batch size ``B`` or, for a
sweep of ``--norm-batch-sizes``, the norm batch size ``b`` (:data:`COLUMNS`); a run without a norm
batch size (a norm without batch statistics) then counts in every ``b`` column. Rows are the norms,
split by the values of the sweep's extra axes (``bgn, method=dann``). The spread is the standard
deviation over seeds (``ddof=1``) when a cell has two or more runs, else the run's own 95 %
confidence half-width when the metric has one (few-shot episodes), else nothing. The best mean per
column, by the metric's direction, is in bold.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.common.contract import Metric
from tasks.common.plots import series_style, set_value_axis

__all__ = [
    "COLUMNS",
    "CellSummary",
    "flatten_record",
    "markdown_table",
    "plot_heatmap",
    "plot_metrics",
    "summarize",
    "within_noise",
    "write_csv",
    "write_report",
]

CSV_FILE, MD_FILE, PLOT_FILE = "results.csv", "results.md", "accuracy_vs_batch_size.png"
_FIRST_COLUMNS = (
    "task", "dataset", "row", "norm", "groups", "batch_size", "norm_batch_size", "seed", "epochs",
    "global_step", "wall_time_s",
)  # fmt: skip

Row = tuple[str, int]
"""``(row label, column value)``: the batch size, or the norm batch size."""

COLUMNS = {
    "batch_size": ("B", "batch size B (per device)"),
    "norm_batch_size": ("b", "norm batch size b (samples per set of statistics)"),
}
"""Record key of a report's columns -> (symbol in headers, axis label)."""


@dataclass(frozen=True)
class CellSummary:
    """One metric of one (row, batch size) over its runs, in the metric's shown unit.

    Attributes:
        mean: mean value.
        spread: std over seeds, or the single run's 95 % CI half-width, or ``None``.
        spread_kind: ``std``, ``ci95`` or ``None``.
        n: number of runs.
    """

    mean: float
    spread: float | None
    spread_kind: str | None
    n: int

    def text(self) -> str:
        """``"97.22 ± 0.31"`` (or just the mean when there is no spread)."""
        return f"{self.mean:.2f}" + (f" ± {self.spread:.2f}" if self.spread is not None else "")


def flatten_record(record: dict[str, Any], row: str | None = None) -> dict[str, Any]:
    """One CSV row: identifying fields, then every metric (``test/acc`` -> column ``test/acc``)."""
    out = {key: record.get(key) for key in _FIRST_COLUMNS}
    out["row"] = row if row is not None else record.get("norm")
    out.update(record.get("metrics", {}))
    return out


def write_csv(rows: Iterable[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Write one line per run (``(row label, record)`` pairs); metric columns are the union, sorted."""
    lines = [flatten_record(record, row) for row, record in rows]
    metric_columns = sorted({k for line in lines for k in line} - set(_FIRST_COLUMNS))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*_FIRST_COLUMNS, *metric_columns])
        writer.writeheader()
        writer.writerows(lines)
    return path


def summarize(
    rows: Iterable[tuple[str, dict[str, Any]]],
    metric: Metric,
    column: str = "batch_size",
    columns: Sequence[int] = (),
) -> dict[Row, CellSummary]:
    """Group ``(row label, record)`` pairs by (row, column value) and summarise ``metric``.

    ``column`` is the record key of the columns (:data:`COLUMNS`); with ``"norm_batch_size"``, a
    record without one (a norm without batch statistics) counts in each of ``columns``.
    """
    groups: dict[Row, list[dict[str, float]]] = {}
    for row, record in rows:
        metrics = record.get("metrics", {})
        if metric.name in metrics and math.isfinite(metrics[metric.name]):
            value = record.get(column)
            for key in (columns if value is None and column == "norm_batch_size" else [value]):
                groups.setdefault((row, int(key)), []).append(metrics)
    out = {}
    for key, runs in groups.items():
        values = [metric.shown(m[metric.name]) for m in runs]
        if len(values) >= 2:
            out[key] = CellSummary(statistics.fmean(values), statistics.stdev(values), "std", len(values))
        elif metric.ci is not None and metric.ci in runs[0]:
            out[key] = CellSummary(values[0], metric.shown(runs[0][metric.ci]), "ci95", 1)
        else:
            out[key] = CellSummary(values[0], None, None, 1)
    return out


def within_noise(a: CellSummary, b: CellSummary) -> bool | None:
    """Whether the difference of two cells is within noise; ``None`` where the runs cannot tell.

    Two or more runs each: Welch's t-test does not reject equal means at p < 0.05. Single runs with
    a 95 % confidence half-width (few-shot episodes): the intervals overlap.
    """
    if a.spread_kind == b.spread_kind == "std" and a.spread is not None and b.spread is not None:
        if a.spread == 0 and b.spread == 0:
            return math.isclose(a.mean, b.mean)
        from scipy.stats import ttest_ind_from_stats

        test = ttest_ind_from_stats(a.mean, a.spread, a.n, b.mean, b.spread, b.n, equal_var=False)
        return bool(test.pvalue >= 0.05)
    if a.spread_kind == b.spread_kind == "ci95" and a.spread is not None and b.spread is not None:
        return abs(a.mean - b.mean) <= a.spread + b.spread
    return None


NOISE_MARK = "≈"
NOISE_LEGEND = (
    f"{NOISE_MARK}: not distinguishable from the column's best (Welch's t-test over seeds, p ≥ 0.05; "
    f"overlapping 95 % intervals for single episodic runs)"
)


def markdown_table(
    summary: dict[Row, CellSummary], rows: Sequence[str], batch_sizes: Sequence[int], metric: Metric,
    column: str = "batch_size", marks: bool = False,
) -> str:
    """Rows x columns (batch sizes, or norm batch sizes), cells ``mean ± spread``; the best mean per
    column (by direction) in bold; with ``marks``, cells within noise of it marked
    :data:`NOISE_MARK` (:func:`within_noise`)."""
    symbol = COLUMNS[column][0]
    header = "| norm | " + " | ".join(f"{symbol} = {b}" for b in batch_sizes) + " |"
    lines = [header, "|---|" + "---:|" * len(batch_sizes)]
    best: dict[int, float | None] = {}
    for b in batch_sizes:
        means = [summary[(r, b)].mean for r in rows if (r, b) in summary]
        best[b] = (max if metric.direction == "max" else min)(means) if means else None
    full = max((s.n for s in summary.values()), default=1)
    for r in rows:
        cells = []
        for b in batch_sizes:
            s = summary.get((r, b))
            if s is None:
                cells.append("-")
                continue
            text = s.text() + (f" (n={s.n})" if s.n < full else "")
            if best[b] is not None and math.isclose(s.mean, best[b]):
                cells.append(f"**{text}**")
                continue
            leader = next(summary[(o, b)] for o in rows
                          if (o, b) in summary and summary[(o, b)].mean == best[b])
            cells.append(f"{text} {NOISE_MARK}" if marks and within_noise(s, leader) else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(
    summaries: Sequence[tuple[Metric, dict[Row, CellSummary]]],
    rows: Sequence[str],
    batch_sizes: Sequence[int],
    path: Path,
    title: str,
    column: str = "batch_size",
) -> Path:
    """One panel per metric: value vs batch size, or norm batch size (log2 axis), one line per row
    with error bars.

    Each norm has its colour (:mod:`tasks.common.plots`), series sit side by side so ties stay
    visible, and the y-axis holds every mean ± spread and says its range.
    """
    panels = len(summaries)
    fig = Figure(figsize=(6.4 * min(panels, 3), 4.2 * math.ceil(panels / 3)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (metric, summary) in enumerate(summaries):
        ax = fig.add_subplot(math.ceil(panels / 3), min(panels, 3), i + 1)
        shown = [r for r in rows if any((r, b) in summary for b in batch_sizes)]
        for r in shown:
            points = [(b, summary[(r, b)]) for b in batch_sizes if (r, b) in summary]
            style, offset = series_style(shown, r, spacing=0.04)  # side by side: ties stay visible
            ax.errorbar([b * 2**offset for b, _ in points], [s.mean for _, s in points],
                        yerr=[s.spread or 0.0 for _, s in points], capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
        ax.set_xlabel(COLUMNS[column][1])
        if summary:
            cells = list(summary.values())
            set_value_axis(ax, [c.mean - (c.spread or 0.0) for c in cells],
                           [c.mean + (c.spread or 0.0) for c in cells], metric.heading, metric.unit == "%")
        else:
            ax.set_ylabel(metric.heading)
        ax.set_title(metric.label if panels > 1 else title, fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(title="norm", fontsize="small")
    if panels > 1:
        fig.suptitle(title)
    fig.savefig(path, dpi=150)
    return path


def plot_heatmap(
    values: dict[tuple[int, int], float], rows: Sequence[int], columns: Sequence[int], path: Path, title: str,
    row_label: str, column_label: str, value_label: str,
) -> Path:
    """A heat map of ``values[(row, column)]`` (e.g. values per statistic x norm batch size -> accuracy),
    each cell annotated; missing cells stay blank."""
    import numpy as np

    grid = np.full((len(rows), len(columns)), np.nan)
    for (r, c), v in values.items():
        grid[rows.index(r), columns.index(c)] = v
    fig = Figure(figsize=(max(6.4, 1.2 * len(columns) + 2.5), 0.55 * len(rows) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=value_label)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize="medium")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize="small",
                    color="black" if v > middle else "white")
    fig.savefig(path, dpi=150)
    return path


def _spread_text(summary: dict[Row, CellSummary], seeds: Sequence[Any]) -> str:
    kinds = frozenset({s.spread_kind for s in summary.values()} - {None})
    return {
        frozenset(): "one run per cell",
        frozenset({"std"}): f"mean ± std over seeds ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        frozenset({"ci95"}): "one run per cell ± its 95 % confidence half-width",
    }.get(kinds, "mean ± std over seeds, or ± the 95 % CI half-width of single runs")


def write_report(
    rows: Sequence[tuple[str, dict[str, Any]]],
    output: Path,
    metrics: Sequence[Metric],
    row_order: Sequence[str],
    batch_sizes: Sequence[int],
    title: str,
    command: str | None = None,
    column: str = "batch_size",
    note: str | None = None,
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``accuracy_vs_batch_size.png`` into ``output``.

    Args:
        rows: ``(row label, results.json record)`` of every run of the sweep (one setting only).
        output: directory for the three files.
        metrics: the task's metrics, the primary one first; one table and one panel each.
        row_order: table row (and legend) order.
        batch_sizes: column order (batch sizes, or norm batch sizes).
        title: heading of the note and the plot.
        command: the command that made the sweep, quoted in the note.
        column: the record key of the columns, ``batch_size`` or ``norm_batch_size`` (:data:`COLUMNS`).
        note: a paragraph under the command (e.g. the fixed batch size of a norm batch size sweep).

    Returns:
        ``{"csv": path, "md": path, "png": path}``.
    """
    output.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r.get("seed") for _, r in rows}, key=str)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if note:
        lines += [note, ""]
    summaries = [(m, summarize(rows, m, column, batch_sizes)) for m in metrics]
    per = COLUMNS[column][1].split(" (")[0]
    for i, (metric, summary) in enumerate(summaries):
        best = "highest" if metric.direction == "max" else "lowest"
        lines += [
            f"## {metric.heading}: `{metric.name}`" + (" (primary)" if i == 0 else ""),
            "",
            f"{_spread_text(summary, seeds)}; {best} mean per {per} in **bold**; (n=k) marks cells "
            f"with fewer runs. {len(rows)} runs.",
            "",
            markdown_table(summary, row_order, batch_sizes, metric, column),
            "",
        ]
    md = output / MD_FILE
    md.write_text("\n".join(lines).rstrip() + "\n")
    return {
        "csv": write_csv(rows, output / CSV_FILE),
        "md": md,
        "png": plot_metrics(summaries, row_order, batch_sizes, output / PLOT_FILE, title, column),
    }
