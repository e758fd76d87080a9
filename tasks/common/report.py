"""Sweep reports: ``results.csv``, ``results.md`` (mean ± spread per norm x batch size) and a plot.

Works on ``results.json`` records of any task. The reported metric is ``test/acc`` (a fraction,
shown in percent); the spread is the standard deviation over seeds (``ddof=1``) when a cell has
two or more runs, else the run's own 95 % confidence half-width ``test/acc_ci95`` when the task
logs one (few-shot episodes), else nothing.
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

__all__ = [
    "CellSummary",
    "flatten_record",
    "markdown_table",
    "plot_accuracy",
    "summarize",
    "write_csv",
    "write_report",
]

METRIC = "test/acc"
CI_METRIC = "test/acc_ci95"
CSV_FILE, MD_FILE, PLOT_FILE = "results.csv", "results.md", "accuracy_vs_batch_size.png"
_FIRST_COLUMNS = (
    "task", "dataset", "norm", "groups", "batch_size", "seed", "epochs", "global_step", "wall_time_s",
)  # fmt: skip


@dataclass(frozen=True)
class CellSummary:
    """``test/acc`` of one (norm, batch size) over its runs, in percent.

    Attributes:
        mean: mean accuracy (%).
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


def flatten_record(record: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: identifying fields, then every metric (``test/acc`` -> column ``test/acc``)."""
    row = {key: record.get(key) for key in _FIRST_COLUMNS}
    row.update(record.get("metrics", {}))
    return row


def write_csv(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write one row per run; metric columns are the union over runs, sorted."""
    rows = [flatten_record(r) for r in records]
    metric_columns = sorted({k for row in rows for k in row} - set(_FIRST_COLUMNS))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*_FIRST_COLUMNS, *metric_columns])
        writer.writeheader()
        writer.writerows(rows)
    return path


def summarize(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int], CellSummary]:
    """Group runs by (norm, batch size) and summarise ``test/acc`` (see the module docstring)."""
    groups: dict[tuple[str, int], list[dict[str, float]]] = {}
    for record in records:
        metrics = record.get("metrics", {})
        if METRIC in metrics and math.isfinite(metrics[METRIC]):
            groups.setdefault((record["norm"], int(record["batch_size"])), []).append(metrics)
    out = {}
    for key, runs in groups.items():
        accs = [100.0 * m[METRIC] for m in runs]
        if len(accs) >= 2:
            out[key] = CellSummary(statistics.fmean(accs), statistics.stdev(accs), "std", len(accs))
        elif CI_METRIC in runs[0]:
            out[key] = CellSummary(accs[0], 100.0 * runs[0][CI_METRIC], "ci95", 1)
        else:
            out[key] = CellSummary(accs[0], None, None, 1)
    return out


def markdown_table(
    summary: dict[tuple[str, int], CellSummary], norms: Sequence[str], batch_sizes: Sequence[int]
) -> str:
    """Rows = norms, columns = batch sizes, cells ``mean ± spread``; the best mean per column in bold."""
    header = "| norm | " + " | ".join(f"B = {b}" for b in batch_sizes) + " |"
    lines = [header, "|---|" + "---:|" * len(batch_sizes)]
    best = {}
    for b in batch_sizes:
        means = [summary[(n, b)].mean for n in norms if (n, b) in summary]
        best[b] = max(means) if means else None
    full = max((s.n for s in summary.values()), default=1)
    for n in norms:
        cells = []
        for b in batch_sizes:
            s = summary.get((n, b))
            if s is None:
                cells.append("-")
            else:
                text = s.text() + (f" (n={s.n})" if s.n < full else "")
                cells.append(f"**{text}**" if best[b] is not None and math.isclose(s.mean, best[b]) else text)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(
    summary: dict[tuple[str, int], CellSummary],
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    path: Path,
    title: str,
) -> Path:
    """Test accuracy vs batch size (log2 axis), one line per norm with its spread as error bars."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n in norms:
        points = [(b, summary[(n, b)]) for b in batch_sizes if (n, b) in summary]
        if not points:
            continue
        xs = [b for b, _ in points]
        ys = [s.mean for _, s in points]
        errs = [s.spread or 0.0 for _, s in points]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size (per device)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="norm", fontsize="small")
    fig.savefig(path, dpi=150)
    return path


def write_report(
    records: Sequence[dict[str, Any]],
    output: Path,
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    title: str,
    command: str | None = None,
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``accuracy_vs_batch_size.png`` into ``output``.

    Args:
        records: ``results.json`` records of the sweep.
        output: directory for the three files.
        norms: row order of the table (and legend order).
        batch_sizes: column order.
        title: heading of the note and the plot.
        command: the command that made the sweep, quoted in the note.

    Returns:
        ``{"csv": path, "md": path, "png": path}``.
    """
    output.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    kinds = {s.spread_kind for s in summary.values()}
    seeds = sorted({r.get("seed") for r in records}, key=str)
    spread = {
        frozenset(): "one run per cell",
        frozenset({"std"}): f"mean ± std over seeds ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        frozenset({"ci95"}): "one run per cell ± its 95 % confidence half-width",
    }.get(frozenset(kinds - {None}), "mean ± std over seeds, or ± the 95 % CI half-width of single runs")
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"Test top-1 accuracy (%), {spread}; best mean per batch size in **bold**; "
        f"(n=k) marks cells with fewer runs. {len(records)} runs.",
        "",
        markdown_table(summary, norms, batch_sizes),
        "",
    ]
    md = output / MD_FILE
    md.write_text("\n".join(lines).rstrip() + "\n")
    return {
        "csv": write_csv(records, output / CSV_FILE),
        "md": md,
        "png": plot_accuracy(summary, norms, batch_sizes, output / PLOT_FILE, title),
    }
