"""``bgn-task report DIR...``: one report over any ``bgn-task bench`` folders, in the paper's shape.

Per suite (task): for each of its metrics, norms x batch size (or norm batch size b, for a sweep
of ``--norm-batch-sizes``) with the mean ± std over seeds (a single episodic run: its 95 %
confidence half-width), the best mean per column in bold and :data:`~tasks.runner.report.NOISE_MARK`
where a cell is within noise of it; one PNG of curves per suite; and, for a sweep of BGN's values per
statistic (``--vary model.norm_kwargs.values_per_statistic=...``), the b x values-per-statistic heat
map and the fitted best V per column (:mod:`tasks.runner.g_rule`). Everything goes into
``report.md``, ``report.csv`` and the PNGs beside them.
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tasks.common.contract import Metric
from tasks.common.errors import UsageError

from . import PROG, log
from .collect import Suite, collect_suites
from .discovery import load_task
from .g_rule import fit_lines, fit_values_per_statistic
from .report import (
    NOISE_LEGEND,
    CellSummary,
    Row,
    flatten_record,
    markdown_table,
    plot_heatmap,
    plot_metrics,
    summarize,
)

__all__ = ["report_main"]

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
_VPS = re.compile(r"values_per_statistic:\s*(\d+)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"report: {message} ('{PROG} report --help' lists the options)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} report",
        allow_abbrev=False,
        description="Read bgn-task bench output folders and write one report (report.md, report.csv and "
        "a PNG per suite): per suite and metric, norms x batch size (or norm batch size b) with mean ± std "
        "over seeds, the best per column in bold and a mark where a cell is within noise of it.",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="bench output folders")
    parser.add_argument("--output", type=Path, default=Path("outputs/report"), help="report folder")
    parser.add_argument("--title", default="bgn-lightning results", help="the report's heading")
    return parser


def report_main(argv: Sequence[str]) -> int:
    """``bgn-task report``: write the report; the exit code (2 for bad folders, via :class:`UsageError`)."""
    args = _parser().parse_args(list(argv))
    suites = collect_suites(args.folders)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    command = shlex.join([PROG, "report", *map(str, argv)])
    lines = [f"# {args.title}", "", "Command:", "", "```", command, "```", "", NOISE_LEGEND + ".", ""]
    csv_rows = []
    for suite in suites:
        lines += _suite_section(suite, output)
        csv_rows += [flatten_record(record, row) for row, record in suite.rows]
    (output / REPORT_MD).write_text("\n".join(lines).rstrip() + "\n")
    columns = list(dict.fromkeys(k for row in csv_rows for k in row))
    with (output / REPORT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(csv_rows)
    log.info("%s report: %d suites, %d runs -> %s", PROG, len(suites), len(csv_rows), output / REPORT_MD)
    return 0


def _suite_section(suite: Suite, output: Path) -> list[str]:
    """The Markdown of one suite; writes its PNG into ``output``."""
    task = load_task(suite.task)
    metrics = list(task.metrics)
    records = [r for _, r in suite.rows]
    dataset = _dataset_name(records[0]) if records else "default data"
    symbol = "b" if suite.column == "norm_batch_size" else "B"
    title = f"{suite.task} on {dataset}"
    lines = [f"## {title}", ""]
    if suite.column == "norm_batch_size" and records:
        lines += [f"Optimisation batch B = {records[0]['batch_size']} in every run; columns: the norm "
                  f"batch size b (samples per set of statistics). Norms without batch statistics fill every "
                  f"column.", ""]
    seeds = sorted({r.get("seed") for r in records}, key=str)
    folders = ", ".join(str(f) for f in suite.folders)
    lines += [f"{len(records)} runs (seeds {', '.join(map(str, seeds))}) from {folders}; shared arguments: "
              f"`{shlex.join(suite.settings)}`.", ""]
    if suite.missing:
        lines += [f"{len(suite.missing)} cells have no result yet (queued, running or failed).", ""]
    summaries = []
    for i, metric in enumerate(metrics):
        summary = summarize(suite.rows, metric, suite.column, suite.columns)
        if not summary:
            continue
        summaries.append((metric, summary))
        table = markdown_table(summary, suite.row_order, suite.columns, metric, suite.column, marks=True)
        lines += [f"### {metric.heading}: `{metric.name}`" + (" (primary)" if i == 0 else ""), "", table, ""]
    if summaries:
        png = plot_metrics(summaries, suite.row_order, suite.columns, output / f"{suite.task}.png",
                           f"{title}: vs {symbol}", suite.column)
        lines += [f"![{title}]({png.name})", ""]
        lines += _heatmap(suite, summaries[0], output, title, symbol)
    return lines


def _dataset_name(record: dict[str, Any]) -> str:
    """The run's dataset; an image folder is named by its folder (``imagefolder (cifar10)``)."""
    dataset = record.get("dataset") or "default data"
    data_dir = ((record.get("config") or {}).get("data") or {}).get("data_dir")
    return f"{dataset} ({Path(data_dir).name})" if dataset == "imagefolder" and data_dir else dataset


def _heatmap(suite: Suite, primary: tuple[Metric, dict[Row, CellSummary]], output: Path, title: str,
             symbol: str) -> list[str]:
    """The values-per-statistic x b (or B) heat map of BGN rows swept over ``values_per_statistic``."""
    metric, summary = primary
    by_label = {label: int(m.group(1)) for label in suite.row_order if (m := _VPS.search(label))}
    if len(set(by_label.values())) < 2:
        return []
    values = {(v, col): summary[(label, col)].mean for label, v in by_label.items() for col in suite.columns
              if (label, col) in summary}
    rows = sorted(set(by_label.values()))
    png = plot_heatmap(values, rows, list(suite.columns), output / f"{suite.task}_values_per_statistic.png",
                       f"{title}: BGN, {metric.heading}", "values per statistic V (G = b·D / V per layer)",
                       f"{symbol} ({'norm batch size' if symbol == 'b' else 'batch size'})", metric.heading)
    return [f"BGN with auto-G at a fixed number of values per statistic V: {metric.heading}.", "",
            f"![values per statistic]({png.name})", "", *fit_lines(fit_values_per_statistic(values), symbol)]
