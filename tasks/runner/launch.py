"""``bgn-task bench --launcher submitit``: a grid's cells as the jobs of one submitit job array.

`submitit <https://github.com/facebookincubator/submitit>`_'s ``AutoExecutor`` submits every cell
that has no current result as a job of one array: to SLURM where ``srun`` exists, to its local
executor (one process per job, all started at once) elsewhere, or runs them inside the bench
(``debug``); ``--cluster`` forces one. Each job runs the cell's exact ``bgn-task`` argument list
(:meth:`Grid.run_argv <tasks.runner.sweep.Grid.run_argv>`, what the local pool runs) into the same
output tree, so the skip and re-run rules, the argument hash and the report are the local pool's.

A submitted cell holds ``job.json`` (:data:`JOB_FILE`: job id, cluster, host, submission time, its
argument hash and log). Re-running the same command collects the finished cells, reports the
failed ones (their recorded error and the tail of their log), submits again the cells whose job
ended without a result or an error (killed, timed out, lost with its node; with ``--resume`` from
the checkpoint it left, if any) and never submits a cell whose job is queued or running. The
bench returns once submitted; ``--wait`` blocks until every job has ended. While a bench submits
into (or waits on, or runs) an output folder it holds ``<output>/.bench.lock`` (:data:`LOCK_FILE`,
its pid and host); another bench there is refused.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.errors import UsageError
from tasks.common.results import RESULTS_FILE
from tasks.common.validate import check_int

from . import PROG
from .failure import RunFailure
from .folders import last_checkpoint
from .job import run_cell_job
from .sweep import RUN_LOG, CellOutcome, Entry, Grid, args_hash, finished_record, start_cell

if TYPE_CHECKING:
    from types import ModuleType

    from .sweep import Cell

__all__ = [
    "CLUSTERS",
    "JOB_FILE",
    "LOCK_FILE",
    "LOG_DIR",
    "Resources",
    "add_launcher_arguments",
    "claim_grid",
    "import_submitit",
    "launch_grid",
    "make_executor",
    "output_lock",
    "parse_slurm",
]

JOB_FILE = "job.json"
LOCK_FILE = ".bench.lock"
LOG_DIR = "submitit"
"""submitit's folder under the sweep's output: ``<output>/submitit/<job id>/`` holds each job's
pickles and its log (``<job id>_0_log.out``; the run's own log is the cell's ``run.log``)."""
CLUSTERS = ("local", "slurm", "debug")
_POLL_S = {"slurm": 30.0, "local": 0.5, "debug": 0.0}
_TAIL_LINES = 5
_SUBMITIT_FLAGS = {
    "cluster": "--cluster",
    "gpus_per_cell": "--gpus-per-cell",
    "cpus_per_cell": "--cpus-per-cell",
    "nodes_per_cell": "--nodes-per-cell",
    "timeout_min": "--timeout-min",
    "partition": "--partition",
    "array_parallelism": "--array-parallelism",
    "slurm": "--slurm",
    "wait": "--wait",
    "retry_failed": "--retry-failed",
}


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench``'s ``--launcher`` and the cluster options (:class:`Resources`)."""
    group = parser.add_argument_group("cluster (--launcher submitit; docs/scale.md)")
    group.add_argument(
        "--launcher", choices=("local", "submitit"), default="local",
        help="local: this machine's process pool (--jobs); submitit: one job per cell, one job array "
        "(default local)",
    )  # fmt: skip
    group.add_argument(
        "--cluster", choices=CLUSTERS,
        help="submitit's executor (default: slurm where srun exists, else local; debug runs the jobs "
        "inside the bench)",
    )  # fmt: skip
    group.add_argument("--gpus-per-cell", type=int, help="GPUs per node of each cell's job (default 0)")
    group.add_argument("--cpus-per-cell", type=int, help="CPUs per task; also the run's --threads")
    group.add_argument(
        "--nodes-per-cell", type=int,
        help="nodes per cell (SLURM; > 1 adds --trainer.num_nodes to each run, default 1)",
    )  # fmt: skip
    group.add_argument("--timeout-min", type=int, help="time limit of each job in minutes (default 240)")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--array-parallelism", type=int, help="SLURM: jobs of the array running at once")
    group.add_argument(
        "--slurm", action="append", metavar="KEY=VALUE",
        help="another parameter of submitit's SlurmExecutor, e.g. qos=high, constraint=volta32gb, "
        "mem_per_gpu=40G (repeatable)",
    )  # fmt: skip
    group.add_argument(
        "--wait", action="store_true", help="block until every job has ended, then write the report"
    )
    group.add_argument(
        "--retry-failed", action="store_true",
        help="submit again the cells whose run failed with an error (default: report them)",
    )  # fmt: skip


@dataclass
class Resources:
    """What each cell's job asks for, and how the bench submits it (``bench --launcher submitit``).

    Attributes:
        cluster: submitit's executor (:data:`CLUSTERS`); ``None``: what ``AutoExecutor`` detects.
        gpus_per_cell: GPUs per node of each job; more than one adds ``--devices`` to each run.
        cpus_per_cell: CPUs per task, also each run's ``--threads`` (``None``: the cluster's default
            CPUs, 1 thread).
        nodes_per_cell: nodes per job; more than one adds ``--trainer.num_nodes`` to each run.
        timeout_min: each job's time limit in minutes.
        partition: the SLURM partition.
        array_parallelism: jobs of the SLURM array running at once (``None``: submitit's default).
        slurm: other ``SlurmExecutor`` parameters (``--slurm KEY=VALUE``); they win over the above.
        wait: block until every job has ended.
        retry_failed: submit the cells whose run failed with an error again.
    """

    cluster: str | None = None
    gpus_per_cell: int = 0
    cpus_per_cell: int | None = None
    nodes_per_cell: int = 1
    timeout_min: int = 240
    partition: str | None = None
    array_parallelism: int | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    wait: bool = False
    retry_failed: bool = False

    def __post_init__(self) -> None:
        check_int("--gpus-per-cell", self.gpus_per_cell, minimum=0, expected="an int >= 0")
        check_int("--cpus-per-cell", self.cpus_per_cell, optional=True, expected="a positive int")
        check_int("--nodes-per-cell", self.nodes_per_cell)
        check_int("--timeout-min", self.timeout_min)
        check_int("--array-parallelism", self.array_parallelism, optional=True, expected="a positive int")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Resources | None:
        """The resources of ``bench``'s parsed arguments; ``None`` for ``--launcher local``.

        Raises:
            UsageError: a cluster option with ``--launcher local``, ``--jobs`` with ``submitit``,
                a malformed or unknown ``--slurm`` key, or submitit not installed.
            TaskConfigError: a count that is not a positive int.
        """
        given = [flag for name, flag in _SUBMITIT_FLAGS.items() if getattr(args, name) not in (None, False)]
        if args.launcher == "local":
            if given:
                raise UsageError(f"bench: {given[0]} needs --launcher submitit")
            return None
        if args.jobs is not None:
            raise UsageError(
                "bench: --jobs sizes the local pool; with --launcher submitit every cell is a job "
                "(--array-parallelism caps how many run at once on SLURM)"
            )
        names = ("cluster", "gpus_per_cell", "cpus_per_cell", "nodes_per_cell", "timeout_min", "partition",
                 "array_parallelism", "wait", "retry_failed")  # fmt: skip
        given_values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        return cls(**given_values, slurm=parse_slurm(args.slurm or []))

    def apply(self, grid: Grid) -> None:
        """Make ``grid``'s runs fit the jobs: ``--threads`` = CPUs per cell (1 by default),
        ``--devices`` = GPUs per cell when more than one, ``--trainer.num_nodes`` for a multi-node
        cell (Lightning finds the processes of the job itself)."""
        grid.threads = grid.threads or self.cpus_per_cell or 1
        if self.gpus_per_cell > 1:
            grid.run_args = [*grid.run_args, "--devices", str(self.gpus_per_cell)]
        if self.nodes_per_cell > 1:
            grid.run_args = [*grid.run_args, "--trainer.num_nodes", str(self.nodes_per_cell)]

    def resolve_cluster(self) -> str:
        """The executor that runs the jobs: :attr:`cluster`, else what ``AutoExecutor`` detects.

        Raises:
            UsageError: SLURM asked for where there is none; several nodes or more GPUs than
                there are on the local machine.
        """
        submitit = import_submitit()
        cluster = self.cluster or submitit.AutoExecutor.which()
        if cluster == "slurm" and submitit.SlurmExecutor.affinity() < 0:
            raise UsageError("bench: --cluster slurm: no SLURM on this machine (srun is not on the PATH)")
        if cluster != "slurm":
            if self.nodes_per_cell > 1:
                raise UsageError(
                    f"bench: --nodes-per-cell {self.nodes_per_cell} needs SLURM; the {cluster} cluster "
                    "is this one machine"
                )
            if self.gpus_per_cell:
                import torch

                found = torch.cuda.device_count()
                if found < self.gpus_per_cell:
                    raise UsageError(
                        f"bench: --gpus-per-cell {self.gpus_per_cell}: the {cluster} cluster (this "
                        f"machine) has {found} GPU{'s' if found != 1 else ''}"
                    )
        return cluster


def import_submitit() -> ModuleType:
    """The ``submitit`` module.

    Raises:
        UsageError: when it is not installed.
    """
    try:
        import submitit
    except ImportError as err:
        raise UsageError(
            "bench --launcher submitit: the submitit package is not installed (bgn-lightning depends on "
            "it): pip install 'submitit>=1.5'"
        ) from err
    return submitit


def parse_slurm(items: Sequence[str]) -> dict[str, Any]:
    """``--slurm KEY=VALUE`` items -> ``SlurmExecutor`` parameters; a value is read as YAML
    (``time=60`` is an int, ``exclusive=true`` a bool, ``setup=[module load cuda]`` a list).

    Raises:
        UsageError: a malformed item, or a key ``SlurmExecutor`` does not take (with a hint).
    """
    import yaml

    known = sorted(import_submitit().SlurmExecutor._valid_parameters())
    parameters: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(f"bench: --slurm takes KEY=VALUE (e.g. qos=high), got {item!r}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(
                f"bench: --slurm {key}: not a parameter of submitit's SlurmExecutor{hint}; known: "
                f"{', '.join(known)}"
            )
        try:
            parameters[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            parameters[key] = text
    return parameters


def make_executor(grid: Grid, resources: Resources, cluster: str) -> Any:
    """submitit's ``AutoExecutor`` for ``grid``'s jobs, its parameters set from ``resources``.

    Logs go to ``<output>/submitit/<job id>/``. On SLURM each job has one task per GPU of a node
    (Lightning's ``SLURMEnvironment`` then finds every process); on the local cluster one task,
    and Lightning starts one process per device itself.

    Raises:
        UsageError: when submitit refuses a parameter (its message, as one line).
    """
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=grid.output / LOG_DIR / "%j", cluster=cluster)
    gpus = resources.gpus_per_cell
    parameters: dict[str, Any] = {
        "name": f"bgn-{grid.task}",
        "timeout_min": resources.timeout_min,
        "nodes": resources.nodes_per_cell,
        "tasks_per_node": max(1, gpus) if cluster == "slurm" else 1,
        "gpus_per_node": gpus or None,
        "cpus_per_task": resources.cpus_per_cell,
        "stderr_to_stdout": True,
        "slurm_partition": resources.partition,
        "slurm_array_parallelism": resources.array_parallelism,
        **{f"slurm_{k}": v for k, v in resources.slurm.items()},
    }
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError, AssertionError) as err:
        reason = " ".join(str(err).split("\n")[0].split())
        raise UsageError(f"bench: submitit refuses the job parameters: {reason}") from err
    return executor


def _process_alive(pid: int, name: str = "") -> bool:
    """Whether process ``pid`` runs (not a zombie) on this host and, where ``/proc`` says, is ``name``'s."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():  # no /proc: the signal test only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and name.encode() in command


@contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """Hold ``<root>/.bench.lock`` (this pid and host) while a bench writes into ``root``.

    A lock left by a bench that no longer runs on this host is taken over.

    Raises:
        UsageError: another bench holds it (its pid, host and start time; how to proceed).
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "since": _now(), "command": sys.argv}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
                pid, where = int(other["pid"]), str(other["host"])
            except (OSError, ValueError, KeyError, TypeError):
                other, pid, where = {}, -1, "?"
            if where == host and not _process_alive(pid):
                path.unlink(missing_ok=True)  # its bench is gone: a stale lock
                continue
            raise UsageError(
                f"bench: {root} is in use by another bench (pid {pid} on {where} since "
                f"{other.get('since', '?')}); wait for it to end, or remove {path} if it is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_job(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / JOB_FILE).read_text())
        return record if isinstance(record, dict) and "job_id" in record else None
    except (OSError, ValueError):
        return None


def _job_states(records: dict[Cell, dict[str, Any]], submitit: ModuleType) -> dict[Cell, str]:
    """Each recorded job's state: ``RUNNING``/``PENDING``/... while it is queued or running
    (:func:`_active`), anything else once it has ended.

    SLURM jobs are all registered before the first state query, so that submitit asks ``sacct``
    about them in one call; a local job is its controller process on the host that submitted it.
    """
    slurm = {
        cell: submitit.SlurmJob(folder=record["folder"], job_id=str(record["job_id"]))
        for cell, record in records.items()
        if record.get("cluster") == "slurm"
    }
    states: dict[Cell, str] = {}
    host = socket.gethostname()
    for cell, record in records.items():
        if cell in slurm:
            job = slurm[cell]
            states[cell] = "COMPLETED" if job.done() and job.state == "UNKNOWN" else job.state
        elif record.get("cluster") == "local":
            if record.get("host") != host:
                states[cell] = f"UNKNOWN (a local job of {record.get('host')})"
            else:
                alive = _process_alive(int(record["job_id"]), "submitit")
                states[cell] = "RUNNING" if alive else "ENDED"
        else:  # debug jobs ran inside their bench
            states[cell] = "ENDED"
    return states


def _active(state: str) -> bool:
    """Whether a job in ``state`` may still run: submitit's unfinished states and SLURM's other live
    ones; ``UNKNOWN`` (``sacct`` does not know it yet, or a local job of another host) counts, so
    that a cell is never submitted twice."""
    return state.split()[0].upper() in {
        "READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED",
        "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT",
    }  # fmt: skip


def _log_tail(directory: Path) -> list[str]:
    """The last lines of the cell's ``run.log``, else of its job's own log (a job that died early)."""
    record = _read_job(directory)
    for path in (directory / RUN_LOG, Path(record["log"]) if record and record.get("log") else None):
        if path is not None and path.is_file():
            lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-_TAIL_LINES:]
    return []


def _with_tail(line: str, tail: list[str]) -> str:
    return "\n".join([line, *(f"    | {t}" for t in tail)])


@dataclass(frozen=True)
class _Submit:
    """A cell to submit: why (``""`` for a new cell), the tail of its last job's log, and whether
    the run continues from the checkpoint its dead job left (``--resume``) instead of anew."""

    why: str = ""
    tail: tuple[str, ...] = ()
    resume: bool = False


def _survey(grid: Grid, submitit: ModuleType, *, retry_failed: bool) -> dict[Cell, CellOutcome | _Submit]:
    """Each cell's state: an outcome (``done``/``skipped``, ``queued``, ``failed``), or a cell to submit."""
    cells = grid.cells()
    directories = {c: c.directory(grid.output, grid.task) for c in cells}
    records = {c: r for c in cells if (r := _read_job(directories[c])) is not None}
    states = _job_states(records, submitit)
    survey: dict[Cell, CellOutcome | _Submit] = {}
    for cell in cells:
        directory, record = directories[cell], records.get(cell)
        digest = args_hash(grid.run_argv(cell))
        job = f"job {record['job_id']}" if record else ""
        result = finished_record(directory, digest)
        if result is not None:  # its job may still be finishing: the result is there
            status, seconds = ("done", float(result.get("wall_time_s", 0.0))) if record else ("skipped", 0.0)
            survey[cell] = CellOutcome(cell, status, directory, seconds, record=result, note=job)
        elif record and _active(states[cell]):
            survey[cell] = CellOutcome(cell, "queued", directory, note=f"{job} {states[cell]}")
        elif record is None or record.get("hash") != digest or (directory / RESULTS_FILE).is_file():
            survey[cell] = _Submit()  # new, interrupted in the local pool, or its arguments changed
        elif (failure := RunFailure.read(directory)) is None:  # killed, timed out, lost with its node
            resume = last_checkpoint(directory) is not None
            why = f"{job} ended without a result ({states[cell]})"
            why += "; resumes from its last checkpoint" if resume else ""
            survey[cell] = _Submit(why, tuple(_log_tail(directory)), resume)
        elif retry_failed:
            survey[cell] = _Submit(f"its run failed in {job}: {failure.message}", tuple(_log_tail(directory)))
        else:
            survey[cell] = CellOutcome(
                cell, "failed", directory, returncode=failure.exit_code, failure=failure, note=job
            )
    return survey


def _format(index: int, total: int, outcome: CellOutcome, metrics: Sequence[str]) -> str:
    """A cell's line: :func:`~tasks.runner.sweep.format_outcome` (a failed run's with the tail of its
    log), or its job's state."""
    from .sweep import format_outcome

    if outcome.status == "failed":
        return _with_tail(format_outcome(index, total, outcome, metrics), _log_tail(outcome.directory))
    if outcome.status != "queued":
        return format_outcome(index, total, outcome, metrics)
    cell = outcome.cell
    head = f"[{index:>{len(str(total))}}/{total}] {cell.row} bs={cell.batch_size} seed={cell.seed}:"
    return f"{head} {outcome.note}"


def launch_grid(
    grid: Grid,
    resources: Resources,
    on_line: Callable[[str], None],
    metrics: Sequence[str],
    *,
    entry: Entry,
) -> list[CellOutcome]:
    """Submit every cell of ``grid`` that needs a run, as one job array; one outcome per cell.

    Cells with a current ``results.json`` are collected (``done``; ``skipped`` without a job);
    cells whose job is queued or running are left alone and, like the cells submitted now, are
    ``queued``; a cell whose run failed is ``failed`` (with ``resources.retry_failed``: submitted
    again); one whose job ended without a result or an error is submitted again. With
    ``resources.wait`` (always on the ``debug`` cluster), returns once every job has ended; a job
    that ended without a result then is ``failed``.

    Args:
        grid: the sweep (:meth:`Resources.apply` already applied).
        resources: the jobs' resources and the launch options.
        on_line: called with each cell's line, and the submission's summary.
        metrics: the metrics the lines show.
        entry: what each job runs (:data:`~tasks.runner.sweep.Entry`, ``bgn-task``'s main).

    Raises:
        UsageError: see :meth:`Resources.resolve_cluster`, :func:`make_executor`, :func:`output_lock`.
    """
    submitit = import_submitit()
    cluster = resources.resolve_cluster()
    cells = grid.cells()
    total = len(cells)
    with output_lock(grid.output):
        executor = make_executor(grid, resources, cluster)
        survey = _survey(grid, submitit, retry_failed=resources.retry_failed)
        outcomes = {c: s for c, s in survey.items() if isinstance(s, CellOutcome)}
        submit = {c: s for c, s in survey.items() if not isinstance(s, CellOutcome)}
        lines: dict[Cell, str] = {}
        for cell, plan in submit.items():
            argv = grid.run_argv(cell)
            changed = (
                ""
                if plan.resume
                else start_cell(cell.directory(grid.output, grid.task), argv, args_hash(argv))
            )
            note = "; ".join(n for n in (plan.why, changed) if n)
            lines[cell] = _with_tail(f" [{note}]" if note else "", list(plan.tail))
        jobs = _submit(executor, grid, submit, cluster, entry) if submit else []
        for cell, job in zip(submit, jobs, strict=True):
            directory = cell.directory(grid.output, grid.task)
            outcomes[cell] = CellOutcome(
                cell, "queued", directory, note=f"submitted as job {job.job_id}{lines[cell]}"
            )
        for index, cell in enumerate(cells, 1):
            on_line(_format(index, total, outcomes[cell], metrics))
        if jobs:
            ids = [str(j.job_id) for j in jobs]
            shown = ", ".join(ids) if len(ids) <= 6 else f"{ids[0]}, ..., {ids[-1]}"
            plural = "s" if len(jobs) > 1 else ""
            on_line(f"{PROG} bench: submitted {len(jobs)} job{plural} ({cluster}): {shown}; logs in "
                    f"{grid.output / LOG_DIR}")  # fmt: skip
        for job in jobs if cluster == "debug" else []:
            job.exception()  # runs it, in this process; a failed run is recorded in its cell
        queued = [c for c in cells if outcomes[c].status == "queued"]
        if queued and not resources.wait and cluster != "debug":
            on_line(f"{len(queued)} of {total} runs queued or running: re-run the same command to collect "
                    "them (--wait blocks until they end)")  # fmt: skip
            return [outcomes[c] for c in cells]
        while queued:
            time.sleep(_POLL_S[cluster])
            survey = _survey(grid, submitit, retry_failed=False)
            for index, cell in enumerate(cells, 1):
                state = survey[cell]
                if cell not in queued or (isinstance(state, CellOutcome) and state.status == "queued"):
                    continue
                if not isinstance(state, CellOutcome):  # ended without a result: not submitted again now
                    state = CellOutcome(
                        cell, "failed", outcomes[cell].directory, returncode=1, note=state.why
                    )
                outcomes[cell] = state
                on_line(_format(index, total, state, metrics))
            queued = [c for c in cells if outcomes[c].status == "queued"]
    return [outcomes[c] for c in cells]


def _submit(executor: Any, grid: Grid, plans: dict[Cell, _Submit], cluster: str, entry: Entry) -> list[Any]:
    """Submit the cells of ``plans`` as one job array and record each job in its cell's ``job.json``.

    A resumed cell runs its arguments plus ``--resume``; its argument hash stays that of the grid's.
    """
    cells = list(plans)
    directories = [c.directory(grid.output, grid.task) for c in cells]
    argvs = [[*grid.run_argv(c), *(["--resume"] if plans[c].resume else [])] for c in cells]
    logs = [str(d / RUN_LOG) for d in directories]
    jobs = executor.map_array(run_cell_job, [entry] * len(cells), argvs, logs)
    submitted, host = _now(), socket.gethostname()
    for cell, directory, job in zip(cells, directories, jobs, strict=True):
        record = {
            "job_id": str(job.job_id),
            "cluster": cluster,
            "host": host,
            "submitted": submitted,
            "hash": args_hash(grid.run_argv(cell)),
            "log": str(job.paths.stdout),
            "folder": str((grid.output / LOG_DIR / "%j").absolute()),
        }
        (directory / JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return jobs


@contextmanager
def claim_grid(grid: Grid) -> Iterator[None]:
    """Hold ``grid``'s output folder for the local pool: its lock (:func:`output_lock`), refusing
    cells whose cluster job is still queued or running (the pool would run them a second time).

    Raises:
        UsageError: another bench holds the folder, or a cell's job is queued or running.
    """
    with output_lock(grid.output):
        directories = {c: c.directory(grid.output, grid.task) for c in grid.cells()}
        records = {  # a cell with results: its job, if still there, is finishing
            c: r
            for c, d in directories.items()
            if not (d / RESULTS_FILE).is_file() and (r := _read_job(d)) is not None
        }
        if records:
            states = _job_states(records, import_submitit())
            busy = [c for c, s in states.items() if _active(s)]
            if busy:
                cell = busy[0]
                raise UsageError(
                    f"bench: {len(busy)} cell(s) have a cluster job queued or running (e.g. "
                    f"{directories[cell]}: job {records[cell]['job_id']} {states[cell]}); re-run with "
                    "--launcher submitit to collect them, or cancel them first"
                )
        yield
