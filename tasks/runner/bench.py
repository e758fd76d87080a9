"""``bgn-task bench``: sweep one task over norms x batch sizes x seeds (x its axes) and report it.

The task's contract supplies the metrics (one table and one plot panel each, the primary first)
and the extra axes it sweeps by default (:attr:`Task.bench_axes <tasks.common.contract.Task>`,
e.g. UDA's ``model.method``); ``--vary KEY=V1,V2`` replaces them, ``--vary none`` drops them.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tasks.common.contract import check_axis
from tasks.common.errors import UsageError
from tasks.common.validate import check_choice

from . import PROG, log
from .checks import did_you_mean
from .discovery import available_tasks, load_task

if TYPE_CHECKING:
    from tasks.common.contract import Metric, Task

    from .sweep import Entry

__all__ = ["bench_main", "parse_axes"]

_GRID_FLAGS = (
    "task",
    "norms",
    "batch_sizes",
    "norm_batch_sizes",
    "seeds",
    "vary",
    "metrics",
    "max_epochs",
    "output",
    "jobs",
    "threads",
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line) instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise the parse error as a :class:`UsageError`, with a "did you mean" hint."""
        hint = did_you_mean(message, list(self._option_string_actions))
        raise UsageError(f"bench: {message}{hint} ('{PROG} bench --help' lists the options)")


def _bench_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} bench",
        allow_abbrev=False,  # exact names only: --norm is a typo of --norms, not a prefix
        description=(
            "Run a grid of runs (norms x batch sizes x seeds x the task's axes) of one task, skipping "
            "runs whose results.json exists with the same arguments (re-running resumes a killed sweep; "
            "changed arguments re-run, the old cell is kept aside), then write results.csv, results.md "
            "(mean ± std per row x batch size for each of the task's metrics, best per column in bold) "
            "and accuracy_vs_batch_size.png into --output. Arguments after '--' go to every run."
        ),
        epilog=(
            "GRID.yaml keys: task, norms, batch_sizes, norm_batch_sizes, seeds, vary ({KEY: [values]}), "
            "metrics, max_epochs, output, jobs, threads, args (list of run arguments); command-line flags "
            "override them."
        ),
    )
    parser.add_argument("--config", type=Path, help="YAML grid file")
    parser.add_argument("--task", help="task suite")
    parser.add_argument("--norms", help="comma-separated registry norms, e.g. bn,bgn,gn,ln,in,pn")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 2,4,16,64")
    parser.add_argument(
        "--norm-batch-sizes",
        help="comma-separated norm batch sizes b (--norm-batch-size: samples per set of norm statistics, "
        "the paper's images per device), e.g. 1,2,4,8,32, at one --batch-sizes value; the tables and plots "
        "then show b (norms without batch statistics run once and appear in every b column)",
    )  # fmt: skip
    parser.add_argument("--seeds", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--vary", action="append", metavar="KEY=V1,V2",
        help="an extra axis, e.g. model.method=dann,source_only (repeatable; default: the task's own "
        "axes; 'none' for no extra axis)",
    )  # fmt: skip
    parser.add_argument("--metrics", help="comma-separated metrics to report (default: all the task's)")
    parser.add_argument(
        "--max-epochs", help="epochs per run, or per batch size as 2:3,64:15 (default: the task's config)"
    )
    parser.add_argument("--output", type=Path, help="sweep directory (default outputs/bench/<task>)")
    parser.add_argument("--jobs", type=int, help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default CPU count / jobs)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the grid and list each cell's command; run nothing"
    )
    from .launch import add_launcher_arguments

    add_launcher_arguments(parser)
    return parser


def parse_axes(task: Task, vary: Sequence[str] | dict[str, Any] | None) -> dict[str, list[str]]:
    """The sweep's extra axes: ``--vary`` items (or a YAML mapping), else the task's own.

    Each key must be an init argument of the task's model (``model.X``), DataModule (``data.X``)
    or of Lightning's ``Trainer`` (``trainer.X``).

    Raises:
        ValueError: for a malformed item or a key the task does not take (:func:`check_axis`).
    """
    if vary is None:
        axes = {k: list(v) for k, v in task.bench_axes.items()}
    elif isinstance(vary, dict):
        axes = {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in vary.items()}
    elif list(vary) == ["none"]:
        axes = {}
    else:
        axes = {}
        for item in vary:
            key, eq, values = item.partition("=")
            if not eq or not values.strip():
                raise ValueError(f"--vary takes KEY=V1,V2 (e.g. model.method=dann,source_only), got {item!r}")
            axes[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    from lightning.pytorch import Trainer

    owners = {"model": task.model_class, "data": task.datamodule_class, "trainer": Trainer}
    for key, values in axes.items():
        check_axis(key, values, owners)
    return axes


def _metrics(task: Task, names: str | Sequence[str] | None) -> list[Metric]:
    from .sweep import parse_list

    if names is None:
        return list(task.metrics)
    chosen = [task.metric(n) for n in parse_list(names, str)]
    if not chosen:
        raise ValueError("--metrics must name at least one metric")
    return chosen


def _norm_batch_note(grid: Any) -> str | None:
    """What a norm batch size sweep's columns mean, for the report; ``None`` for other sweeps."""
    if not grid.norm_batch_sizes:
        return None
    from bgn_lightning.registry import uses_batch_statistics

    note = (f"Every run steps the optimizer on batches of B = {grid.batch_sizes[0]} (the learning rate the "
            f"task sets for B); b is the number of samples each set of norm statistics covers "
            f"(--norm-batch-size: the images per device of a run without synchronised statistics).")
    flat = [n for n in grid.norms if not uses_batch_statistics(n)]
    if flat:
        note += (f" {', '.join(flat)} use no batch statistics: their runs (without b) are shown in every "
                 f"b column.")
    return note


def _read_grid_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise UsageError(f"cannot read grid file {str(path)!r}: {reason}") from err
    if not isinstance(spec, dict):
        raise UsageError(f"grid file {str(path)!r}: expected a mapping of grid keys")
    unknown = set(spec) - {*_GRID_FLAGS, "args"}
    if unknown:
        raise UsageError(
            f"grid file {str(path)!r}: unknown keys {sorted(unknown)}; known: "
            f"{', '.join([*_GRID_FLAGS, 'args'])}"
        )
    return spec


def bench_main(argv: Sequence[str], debug: bool = False, *, entry: Entry) -> int:
    """``bgn-task bench``: run the grid, then write the three reports; the exit code.

    Args:
        argv: the bench's arguments (run arguments after ``--``).
        debug: pass ``--debug`` on to every run (its traceback lands in the cell's ``run.log``).
        entry: what each cell runs: ``bgn-task``'s entry point (:data:`~tasks.runner.sweep.Entry`).

    Raises:
        UsageError: for a bad grid (unknown task, norm, metric or axis, empty lists, bad numbers
            or YAML); nothing is run or written then.
    """
    from bgn_lightning import available_norms

    from .launch import Resources, claim_grid, launch_grid
    from .report import write_report
    from .sweep import Grid, format_outcome, parse_epochs, parse_list, run_grid

    argv = list(argv)
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = _bench_parser().parse_args(own)
    spec: dict[str, Any] = _read_grid_file(args.config) if args.config is not None else {}
    spec.update({k: getattr(args, k) for k in _GRID_FLAGS if getattr(args, k) is not None})
    name = spec.get("task")
    try:
        task = load_task(check_choice("task", name, available_tasks()))
        norms = parse_list(spec.get("norms", ""), str)
        for norm in norms:
            check_choice("norm", norm, available_norms())
        metrics = _metrics(task, spec.get("metrics"))
        grid = Grid(
            task=name,
            norms=norms,
            batch_sizes=parse_list(spec.get("batch_sizes", ""), int),
            norm_batch_sizes=parse_list(spec.get("norm_batch_sizes") or "", int),
            seeds=parse_list(spec.get("seeds", "0"), int),
            output=Path(spec.get("output") or Path("outputs") / "bench" / name),
            axes=parse_axes(task, spec.get("vary")),
            max_epochs=parse_epochs(spec.get("max_epochs")),
            run_args=[str(a) for a in spec.get("args") or []] + run_args + (["--debug"] if debug else []),
            jobs=int(spec.get("jobs") or 1),
            threads=spec.get("threads"),
        )
        resources = Resources.from_args(args)  # None: the local pool
    except ValueError as err:
        raise UsageError(f"bench: {err}") from err
    if resources is not None:
        resources.apply(grid)
    cells = grid.cells()
    if args.dry_run:
        for cell in cells:
            print(shlex.join([PROG, *grid.run_argv(cell)]))
        log.info("%s bench: %d runs of %s (dry run: nothing ran)", PROG, len(cells), name)
        return 0
    log.info("%s bench: %d runs of %s -> %s", PROG, len(cells), name, grid.output)
    names = [m.name for m in metrics]
    if resources is not None:
        outcomes = launch_grid(grid, resources, log.info, names, entry=entry)
    else:
        with claim_grid(grid):
            outcomes = run_grid(grid, lambda i, n, o: log.info(format_outcome(i, n, o, names)), entry=entry)
    rows = [(o.cell.row, o.record) for o in outcomes if o.record is not None]
    failed = [o for o in outcomes if o.status == "failed"]
    if rows:
        dataset = rows[0][1].get("dataset") or "default data"
        paths = write_report(
            rows,
            grid.output,
            metrics,
            grid.rows(),
            grid.norm_batch_sizes or grid.batch_sizes,
            title=f"{name} on {dataset}: {metrics[0].label} vs "
            + (f"norm batch size b (B = {grid.batch_sizes[0]})" if grid.norm_batch_sizes else "batch size"),
            command=shlex.join([PROG, "bench", *argv]),
            column="norm_batch_size" if grid.norm_batch_sizes else "batch_size",
            note=_norm_batch_note(grid),
        )
        written = list(paths.values())
        if task.bench_outputs is not None:
            written += task.bench_outputs(rows, grid.output)
        log.info("wrote %s", ", ".join(str(p) for p in written))
    if failed:
        retry = "re-run the same command" + (" with --retry-failed" if resources is not None else "")
        log.info("%d of %d runs failed; %s to retry them", len(failed), len(cells), retry)
        return 1
    return 0
