"""Read ``bgn-task bench`` output folders back as suites of runs, for ``bgn-task report``.

A bench folder holds ``<task>/<norm>[/<axis>=<value>...]/bs<B>[-nb<b>]/seed<S>/`` cells, each with
``bench_args.json`` (the run's argument list) and, once it finished, ``results.json``
(:mod:`tasks.runner.sweep`). A cell kept aside because its arguments changed
(``seed<S>.previous-<hash>``, or an output moved aside by ``--overwrite``) is never read. Every
folder's cells of one task make one :class:`Suite`; the cells of a suite must share every setting
apart from what the grid sweeps (norm, batch size, norm batch size, seed, the axes in the path),
so that one table never mixes runs made differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.errors import UsageError
from tasks.common.results import RESULTS_FILE, read_results

from .sweep import ARGS_FILE

__all__ = ["Suite", "collect_suites"]

_CELL = re.compile(r"^bs(?P<batch>\d+)(?:-nb(?P<nb>\d+))?$")
_SEED = re.compile(r"^seed(?P<seed>\d+)$")
_SWEPT = ("--norm", "--batch-size", "--seed", "--norm-batch-size", "--output", "--threads")


@dataclass
class Suite:
    """The finished runs of one task from one or more bench folders.

    Attributes:
        task: the task suite.
        rows: ``(row label, results.json record)`` per finished cell; the label is the norm and
            the cell's axis values (``bgn, method=dann``), as in the bench's own report.
        row_order: labels in registry order of their norms (``bn``, ``bgn``, ``gn``...), then by name
            (numbers by value).
        column: ``norm_batch_size`` when any cell sets one (a sweep of b), else ``batch_size``.
        columns: the column values, ascending.
        settings: the shared argument list (the swept flags left out) that every cell ran with.
        folders: the bench folders the runs come from.
        missing: cells that have no ``results.json`` yet (queued, running or failed).
    """

    task: str
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    row_order: list[str] = field(default_factory=list)
    column: str = "batch_size"
    columns: list[int] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)


def _settings(argv: Sequence[str], axis_keys: Sequence[str]) -> list[str]:
    """``argv`` without the task name, the swept flags and the cell's axis flags."""
    out: list[str] = []
    args = list(argv[1:])
    i = 0
    while i < len(args):
        flag, eq, _ = args[i].partition("=")
        step = 1 if eq or i + 1 >= len(args) or args[i + 1].startswith("--") else 2
        name = flag.lstrip("-")
        if flag in _SWEPT or (flag.startswith("--") and name.split(".")[-1] in axis_keys):
            i += step
            continue
        out += args[i:i + step]
        i += step
    return out


def _cells(folder: Path) -> list[Path]:
    """The current cell folders under ``folder`` (``.previous-`` ones and their insides left out)."""
    return sorted(
        p.parent for p in folder.rglob(ARGS_FILE)
        if not any(".previous-" in part for part in p.relative_to(folder).parts)
    )


def _parse_cell(folder: Path, cell: Path) -> tuple[str, str, int, int | None]:
    """``(task, row label, batch size, norm batch size)`` from a cell's path under ``folder``."""
    parts = cell.relative_to(folder).parts
    match = _CELL.match(parts[-2]) if len(parts) >= 4 else None
    if match is None or _SEED.match(parts[-1]) is None:
        raise UsageError(f"report: {cell} is not a bench cell "
                         f"(<task>/<norm>[/<axis>=<value>]/bs<B>[-nb<b>]/seed<S>)")
    task, norm, axes = parts[0], parts[1], parts[2:-2]
    label = ", ".join([norm, *axes])
    nb = match.group("nb")
    return task, label, int(match.group("batch")), None if nb is None else int(nb)


def collect_suites(folders: Sequence[Path]) -> list[Suite]:
    """The suites in ``folders`` (one per task, in the order first met).

    Raises:
        UsageError: a folder that does not exist or holds no bench cells; a folder whose cells belong
            to more than one task; a cell whose recorded task differs from its folder's; runs of one
            suite made with different settings (named, with the first differing argument).
    """
    suites: dict[str, Suite] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"report: {folder}: no such folder")
        cells = _cells(folder)
        if not cells:
            raise UsageError(f"report: {folder} is not a bench output (no cell with {ARGS_FILE}; "
                             f"'bgn-task bench --output {folder}' makes one)")
        tasks = sorted({_parse_cell(folder, c)[0] for c in cells})
        if len(tasks) > 1:
            raise UsageError(f"report: {folder} mixes benches of tasks {', '.join(tasks)}; "
                             f"give one folder per bench")
        for cell in cells:
            _add_cell(suites, folder, cell)
    from bgn_lightning import available_norms

    order = {name: i for i, name in enumerate(available_norms())}
    for suite in suites.values():
        _check_columns(suite)
        suite.row_order.sort(key=lambda label: (order.get(label.split(", ")[0], len(order)), _natural(label)))
    return list(suites.values())


def _natural(label: str) -> list[Any]:
    """Sort key reading the numbers in a label as numbers (``V: 128`` before ``V: 1024``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _check_columns(suite: Suite) -> None:
    """Fix the suite's columns; a norm batch size sweep must hold one batch size and no whole-batch
    runs of a norm with batch statistics (those would fill every b column)."""
    from bgn_lightning.registry import uses_batch_statistics

    if suite.column == "norm_batch_size":
        batches = sorted({r.get("batch_size") for _, r in suite.rows})
        if len(batches) > 1:
            raise UsageError(f"report: the {suite.task} runs sweep the norm batch size b at several batch "
                             f"sizes {batches}; report each batch size separately")
        whole = sorted({r["norm"] for _, r in suite.rows
                        if r.get("norm_batch_size") is None and uses_batch_statistics(r["norm"])})
        if whole:
            raise UsageError(f"report: the {suite.task} runs mix a norm batch size sweep with whole-batch "
                             f"runs of {', '.join(whole)}; report them separately")
    suite.columns = sorted({int(r[suite.column]) for _, r in suite.rows if r.get(suite.column) is not None})


def _add_cell(suites: dict[str, Suite], folder: Path, cell: Path) -> None:
    task, label, _, nb = _parse_cell(folder, cell)
    suite = suites.setdefault(task, Suite(task))
    if folder not in suite.folders:
        suite.folders.append(folder)
    argv = json.loads((cell / ARGS_FILE).read_text())["argv"]
    settings = _settings(argv, [a.split("=", 1)[0] for a in label.split(", ")[1:]])
    if not suite.rows and not suite.missing:
        suite.settings = settings
    elif settings != suite.settings:
        raise UsageError(f"report: {cell} ran with other settings than the rest of the {task} runs "
                         f"({_first_difference(settings, suite.settings)}); report them separately")
    if nb is not None:
        suite.column = "norm_batch_size"
    if not (cell / RESULTS_FILE).is_file():
        suite.missing.append(cell)
        return
    try:
        record = read_results(cell)
    except (ValueError, OSError) as err:
        raise UsageError(f"report: {str(err).splitlines()[0]}") from err
    if record.get("task") != task:
        raise UsageError(f"report: {cell} holds a {record.get('task')} run inside a {task} bench")
    suite.rows.append((label, record))
    if label not in suite.row_order:
        suite.row_order.append(label)


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"{x!r} where the others have {y!r}"
    return f"arguments {a[len(b):] or b[len(a):]} in one and not the other"
