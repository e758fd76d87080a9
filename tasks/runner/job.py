"""What each job of ``bgn-task bench --launcher submitit`` runs: :func:`run_cell_job`.

submitit unpickles this function in every job, so its module imports nothing heavy: the run
itself (``bgn-task``'s main) imports torch and Lightning. :mod:`tasks.runner.launch` submits it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from . import PROG

__all__ = ["run_cell_job"]


def run_cell_job(entry: Callable[..., int], argv: list[str], log: str) -> int:
    """What each job runs: ``entry(argv)``, ``bgn-task`` with the cell's arguments; its exit code.

    The first process of the job (SLURM's rank 0, the only one elsewhere) writes the run's output
    to the cell's ``run.log`` and a failure to its ``error.json``, as a local cell does; the other
    processes of a multi-node cell log to submitit's per-task logs.

    Args:
        entry: ``bgn-task``'s entry point (:data:`~tasks.runner.sweep.Entry`).
        argv: the cell's ``bgn-task`` arguments.
        log: the cell's ``run.log`` (continued when ``argv`` resumes the run).
    """
    cell = Path(log).parent
    if int(os.environ.get("SLURM_PROCID", "0")) > 0:
        return entry(argv)
    with _output_to(Path(log), append="--resume" in argv):
        print(f"$ {PROG} {shlex.join(argv)}  [job {_job_id()}, pid {os.getpid()}]", flush=True)
        return entry(argv, error_dir=cell)


def _job_id() -> str:
    """This job's id as submitit names it (``4242_3`` in an array); ``debug`` inside the bench."""
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # no job environment: the debug executor runs the job in the bench
        return "debug"


@contextmanager
def _output_to(path: Path, append: bool = False) -> Iterator[None]:
    """Send this process's output to ``path`` (after what it holds with ``append``), then back: file
    descriptors 1 and 2 (C code, child processes) and ``sys.stdout``/``sys.stderr`` (which may not
    write to them, e.g. under pytest)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a" if append else "w", buffering=1) as stream:  # line-buffered: the log follows the run
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            with redirect_stdout(stream), redirect_stderr(stream):
                yield
        finally:
            for target, fd in zip((1, 2), saved, strict=True):
                os.dup2(fd, target)
                os.close(fd)
