"""Run a grid of ``bgn-task`` runs (norms x batch sizes x seeds x the task's axes), resumably.

Each cell runs ``bgn-task <task> --norm N --batch-size B --seed S [--<axis> V ...] --output <cell>``
in its own process, writing ``<output>/<task>/<norm>[/<axis>=<V>...]/bs<B>/seed<S>/results.json``,
its log ``run.log`` and ``bench_args.json``: the cell's full argument list and its hash. A cell
whose ``results.json`` exists **with the same hash** is skipped, so re-running a killed sweep
resumes it; one whose arguments changed (other epochs, extra run arguments, another config) runs
again, and the old cell is kept beside it as ``seed<S>.previous-<hash>``; the leftovers of an
interrupted cell (no ``results.json``) are removed and the cell runs again.

Cells run in processes forked from a ``forkserver`` that has imported torch, Lightning and the
task once: a crash (or an out-of-memory kill) takes down only its cell, and the ~10 s import
cost is not paid per run. A run ends itself when the bench process is killed. ``jobs > 1``
runs cells concurrently, each with ``threads`` intra-op threads.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.contract import check_axis
from tasks.common.results import RESULTS_FILE, read_results
from tasks.common.validate import check_int

from . import log
from .failure import RunFailure

__all__ = [
    "Cell",
    "CellOutcome",
    "Grid",
    "args_hash",
    "finished_record",
    "format_outcome",
    "parse_epochs",
    "parse_list",
    "run_grid",
    "start_cell",
]


RUN_LOG = "run.log"
ARGS_FILE = "bench_args.json"
_NOT_HASHED = frozenset(
    {"--output", "--threads", "--trainer.enable_progress_bar", "--trainer.enable_model_summary"}
)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a norm, a batch size, a seed, a value of each extra axis and a norm batch
    size (``None``: the whole batch)."""

    norm: str
    batch_size: int
    seed: int
    variant: tuple[tuple[str, str], ...] = ()
    norm_batch_size: int | None = None

    def directory(self, root: Path, task: str) -> Path:
        """``<root>/<task>/<norm>[/<axis>=<value>...]/bs<B>[-nb<b>]/seed<S>``."""
        path = root / task / self.norm
        for key, value in self.variant:
            path = path / f"{key.split('.')[-1]}={value}"
        batch = f"bs{self.batch_size}"
        if self.norm_batch_size is not None:
            batch += f"-nb{self.norm_batch_size}"
        return path / batch / f"seed{self.seed}"

    @property
    def row(self) -> str:
        """The report row it belongs to: the norm, and its axis values (``bgn, method=dann``)."""
        return ", ".join([self.norm, *(f"{k.split('.')[-1]}={v}" for k, v in self.variant)])


@dataclass(frozen=True)
class CellOutcome:
    """What happened to a cell: ``status`` is ``done``, ``skipped``, ``failed`` or ``queued`` (its
    cluster job, :mod:`tasks.runner.launch`, is queued or running).

    ``note`` says why a cell with results ran again (its arguments changed); ``failure`` is the
    error a failed run recorded in its cell (``None``: it recorded none, e.g. it was killed).
    """

    cell: Cell
    status: str
    directory: Path
    seconds: float = 0.0
    returncode: int = 0
    record: dict[str, Any] | None = None
    note: str = ""
    failure: RunFailure | None = None


def args_hash(argv: Sequence[str]) -> str:
    """A short hash of a run's arguments, leaving out those that do not change its result."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--debug":
            continue
        if arg.split("=", 1)[0] in _NOT_HASHED:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:12]


def _stored_hash(directory: Path) -> str | None:
    try:
        return json.loads((directory / ARGS_FILE).read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Grid:
    """A sweep: every ``(norm, batch size, seed, axis values...)`` of one task.

    Attributes:
        task: task suite name.
        norms: registry norm names.
        batch_sizes: per-device batch sizes.
        seeds: ``seed_everything`` values.
        output: sweep root; cells live under ``<output>/<task>/``.
        axes: extra axes, LightningCLI key -> values (``{"model.method": ["dann", "source_only"]}``),
            each cell runs with ``--<key> <value>``.
        max_epochs: ``--max-epochs`` of every run, or a ``{batch size: epochs}`` mapping (e.g. to
            give large batches enough optimizer steps); ``None``: the task's default.
        run_args: extra ``bgn-task <task>`` arguments for every run (e.g. ``--data mnist``);
            the grid's own flags come after them and win.
        jobs: cells run at once.
        threads: torch intra-op threads per run, passed as ``--threads`` (``None``: CPU count // jobs).
        norm_batch_sizes: norm batch sizes ``b`` to sweep (``--norm-batch-size``) at the one batch
            size of ``batch_sizes``; norms without batch statistics run once, without ``b``. Empty:
            no such axis.
    """

    task: str
    norms: list[str]
    batch_sizes: list[int]
    seeds: list[int]
    output: Path
    axes: dict[str, list[str]] = field(default_factory=dict)
    max_epochs: int | dict[int, int] | None = None
    run_args: list[str] = field(default_factory=list)
    jobs: int = 1
    threads: int | None = None
    norm_batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        for name in ("norms", "batch_sizes", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"Grid: {name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"Grid: {name} has duplicates: {values}")
        for b in self.batch_sizes:
            check_int("batch sizes", b, owner="Grid", expected="positive ints")
        if isinstance(self.max_epochs, dict):
            missing = [b for b in self.batch_sizes if b not in self.max_epochs]
            if missing:
                raise ValueError(f"Grid: max_epochs has no entry for batch sizes {missing}")
        epochs = self.max_epochs.values() if isinstance(self.max_epochs, dict) else [self.max_epochs]
        for e in epochs:
            check_int("max_epochs", e, optional=True, owner="Grid", expected="positive ints")
        for key, values in self.axes.items():
            check_axis(key, values)
        self._check_norm_batch_sizes()
        check_int("jobs", self.jobs, owner="Grid")
        check_int("threads", self.threads, optional=True, owner="Grid")

    def _check_norm_batch_sizes(self) -> None:
        values = self.norm_batch_sizes
        if not values:
            return
        if len(set(values)) != len(values):
            raise ValueError(f"Grid: norm batch sizes has duplicates: {values}")
        for b in values:
            check_int("norm batch sizes", b, owner="Grid", expected="positive ints")
        if len(self.batch_sizes) != 1:
            raise ValueError(
                f"Grid: --norm-batch-sizes sweeps b at one batch size; got batch sizes {self.batch_sizes}"
            )
        too_large = [b for b in values if b > self.batch_sizes[0]]
        if too_large:
            raise ValueError(
                f"Grid: norm batch sizes {too_large} are larger than the batch size {self.batch_sizes[0]}"
            )

    def variants(self) -> list[tuple[tuple[str, str], ...]]:
        """Every combination of the extra axes' values (one empty variant without axes)."""
        combos: list[tuple[tuple[str, str], ...]] = [()]
        for key, values in self.axes.items():
            combos = [(*c, (key, str(v))) for c in combos for v in values]
        return combos

    def cells(self) -> list[Cell]:
        """All cells, norm-major (then axis values, batch size, norm batch size, seed).

        A norm without batch statistics runs once per setting, without a norm batch size (``b``
        would change nothing).
        """
        from bgn_lightning.registry import uses_batch_statistics

        cells = []
        for n in self.norms:
            norm_batch_sizes: list[int | None] = [None]
            if self.norm_batch_sizes and uses_batch_statistics(n):
                norm_batch_sizes = list(self.norm_batch_sizes)
            cells += [
                Cell(n, b, s, v, nb)
                for v in self.variants()
                for b in self.batch_sizes
                for nb in norm_batch_sizes
                for s in self.seeds
            ]
        return cells

    def rows(self) -> list[str]:
        """Report rows in grid order (:attr:`Cell.row`)."""
        return list(dict.fromkeys(c.row for c in self.cells()))

    def run_argv(self, cell: Cell) -> list[str]:
        """The ``bgn-task`` argument list of ``cell`` (without the program name)."""
        argv = [self.task, *self.run_args]
        argv += ["--norm", cell.norm, "--batch-size", str(cell.batch_size), "--seed", str(cell.seed)]
        if cell.norm_batch_size is not None:
            argv += ["--norm-batch-size", str(cell.norm_batch_size)]
        for key, value in cell.variant:
            argv += [f"--{key}", value]
        epochs = self.max_epochs
        if isinstance(epochs, dict):
            epochs = epochs[cell.batch_size]
        if epochs is not None:
            argv += ["--max-epochs", str(epochs)]
        argv += ["--output", str(cell.directory(self.output, self.task))]
        # run.log is not a terminal: the run logs a progress line every 50 steps or 30 s into it
        argv += ["--trainer.enable_model_summary", "false"]
        argv += ["--threads", str(self.threads_per_run())]
        return argv

    def threads_per_run(self) -> int:
        """``threads``, or the CPU count shared out among ``jobs``."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.jobs)


def _exit_when_gone(pid: int, poll_s: float = 1.0) -> None:
    """Thread target: end this process once process ``pid`` (the bench) no longer exists."""
    while True:
        time.sleep(poll_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(143)
        except PermissionError:  # exists, owned by someone else: not ours to judge
            pass


Entry = Callable[..., int]
"""The ``bgn-task`` entry point a cell runs: ``entry(argv, error_dir=cell) -> exit code``
(:func:`tasks.runner.cli.main`, passed in by the caller so that this module does not import the CLI)."""


def _run_in_child(entry: Entry, argv: list[str], log_path: str, bench_pid: int) -> None:
    """Process target: run ``entry(argv)`` with stdout and stderr sent to ``log_path``; a failed
    run records its error in the cell (:class:`~tasks.runner.failure.RunFailure`).

    The run ends itself when the bench process ``bench_pid`` is killed, so a killed sweep
    leaves no run behind (its cell has no results.json and runs again on resume).
    """
    cell = Path(log_path).parent
    threading.Thread(target=_exit_when_gone, args=(bench_pid,), daemon=True).start()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"$ bgn-task {shlex.join(argv)}  [pid {os.getpid()}]", flush=True)
    try:
        code = entry(argv, error_dir=cell)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _context(task: str) -> mp.context.BaseContext:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    preload = ["torch", "lightning.pytorch", "tasks.runner.cli", "tasks.runner.task_cli", f"tasks.{task}"]
    ctx.set_forkserver_preload(preload)
    return ctx


def run_grid(
    grid: Grid,
    on_outcome: Callable[[int, int, CellOutcome], None] | None = None,
    metrics: Sequence[str] = ("test/acc",),
    *,
    entry: Entry,
) -> list[CellOutcome]:
    """Run every cell of ``grid`` that has no ``results.json`` yet; return one outcome per cell.

    Args:
        grid: the sweep.
        on_outcome: called as ``on_outcome(index, total, outcome)`` when a cell finishes or is
            skipped (the CLI prints one line per run with it); ``None`` logs at INFO.
        metrics: the metrics the default ``on_outcome`` shows.
        entry: what each cell runs (:data:`Entry`), in its own process.
    """
    cells = grid.cells()
    total = len(cells)
    ctx = _context(grid.task)

    def log_line(index: int, total: int, outcome: CellOutcome) -> None:
        log.info(format_outcome(index, total, outcome, metrics))

    report = on_outcome or log_line
    outcomes: dict[Cell, CellOutcome] = {}
    lock = threading.Lock()

    def run(cell: Cell) -> CellOutcome:
        directory = cell.directory(grid.output, grid.task)
        argv = grid.run_argv(cell)
        digest = args_hash(argv)
        record = finished_record(directory, digest)
        if record is not None:
            outcome = CellOutcome(cell, "skipped", directory, record=record)
            with lock:
                outcomes[cell] = outcome
                report(len(outcomes), total, outcome)
            return outcome
        note = start_cell(directory, argv, digest)
        start = time.perf_counter()
        process = ctx.Process(target=_run_in_child, args=(entry, argv, str(directory / RUN_LOG), os.getpid()))
        process.start()
        process.join()
        seconds = time.perf_counter() - start
        code = process.exitcode if process.exitcode is not None else -1
        if code == 0 and (directory / RESULTS_FILE).is_file():
            outcome = CellOutcome(cell, "done", directory, seconds, 0, read_results(directory), note)
        else:
            failure = RunFailure.read(directory)
            outcome = CellOutcome(cell, "failed", directory, seconds, code or 1, note=note, failure=failure)
        with lock:
            outcomes[cell] = outcome
            report(len(outcomes), total, outcome)
        return outcome

    if grid.jobs == 1:
        for cell in cells:
            run(cell)
    else:
        with ThreadPoolExecutor(grid.jobs) as pool:
            list(pool.map(run, cells))
    return [outcomes[c] for c in cells]


def finished_record(directory: Path, digest: str) -> dict[str, Any] | None:
    """The ``results.json`` record of a cell that finished with the arguments hashed as ``digest``
    (:func:`args_hash`); ``None`` when it has none or ran with other arguments."""
    if (directory / RESULTS_FILE).is_file() and _stored_hash(directory) == digest:
        return read_results(directory)
    return None


def start_cell(directory: Path, argv: Sequence[str], digest: str) -> str:
    """Make ``directory`` ready for a fresh run of ``argv``: a finished cell with other arguments is
    kept aside, an interrupted one's leftovers are removed, ``bench_args.json`` is written.

    Returns:
        why a cell with results runs again (the line's note), or ``""``.
    """
    note = ""
    if (directory / RESULTS_FILE).is_file():
        kept = _keep_aside(directory, _stored_hash(directory) or "unknown")
        note = f"arguments changed since the stored result (kept in {kept.name}), re-running"
    elif directory.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / ARGS_FILE).write_text(json.dumps({"hash": digest, "argv": list(argv)}, indent=2) + "\n")
    return note


def _keep_aside(directory: Path, stored: str) -> Path:
    """Move a finished cell whose arguments changed to ``<dir>.previous-<hash>[-k]``; the new path."""
    target = directory.with_name(f"{directory.name}.previous-{stored}")
    k = 1
    while target.exists():
        k += 1
        target = directory.with_name(f"{directory.name}.previous-{stored}-{k}")
    directory.rename(target)
    return target


def format_outcome(
    index: int, total: int, outcome: CellOutcome, metrics: Sequence[str] = ("test/acc",)
) -> str:
    """One line per run: ``[ 3/72] bgn bs=2 seed=0: test/acc=0.9722 (41.2 s)``.

    Args:
        index: 1-based position among finished cells.
        total: number of cells.
        outcome: the cell's outcome.
        metrics: the metric keys to show (the task's declared metrics).
    """
    cell = outcome.cell
    nb = "" if cell.norm_batch_size is None else f" nb={cell.norm_batch_size}"
    head = f"[{index:>{len(str(total))}}/{total}] {cell.row} bs={cell.batch_size}{nb} seed={cell.seed}:"
    note = f" [{outcome.note}]" if outcome.note else ""
    if outcome.status == "failed":
        reason = f": {outcome.failure.message}" if outcome.failure is not None else ""
        return f"{head} FAILED (exit {outcome.returncode}){reason}, see {outcome.directory / RUN_LOG}{note}"
    values = (outcome.record or {}).get("metrics", {})
    shown = ", ".join(f"{k}={values[k]:.4f}" for k in metrics if k in values)
    if outcome.status == "skipped":
        return f"{head} {shown} (done before with the same arguments, skipped)"
    return f"{head} {shown} ({outcome.seconds:.1f} s){note}"


def parse_epochs(value: int | str | dict[Any, Any] | None) -> int | dict[int, int] | None:
    """``3``, ``"3"``, ``"2:3,64:15"`` or a YAML mapping ``{2: 3, 64: 15}`` -> epochs per run.

    Raises:
        ValueError: for anything else.
    """
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict):
        pairs = list(value.items())
    elif ":" in str(value):
        pairs = [item.split(":", 1) for item in str(value).split(",") if item.strip()]
    else:
        pairs = [(None, value)]
    try:
        parsed = {(None if b is None else int(b)): int(e) for b, e in pairs}
    except ValueError:
        raise ValueError(f"max epochs must be an int or 'batch:epochs,...' pairs, got {value!r}") from None
    return parsed.get(None, parsed)


def parse_list(value: str | Sequence[Any], kind: type = str) -> list[Any]:
    """``"a,b"`` or ``["a", "b"]`` (YAML) -> ``[kind(a), kind(b)]``.

    Raises:
        ValueError: when an item cannot be converted.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            out.append(kind(text))
        except ValueError:
            raise ValueError(f"expected a comma-separated list of {kind.__name__}, got {value!r}") from None
    return out
