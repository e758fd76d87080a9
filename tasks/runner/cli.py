"""``bgn-task``: run a task suite, or sweep it (``bgn-task bench``).

``bgn-task <task> [shortcuts] [LightningCLI args]`` parses the task's default config (packaged as
``tasks.configs``) with LightningCLI (``run=False``), fits, tests the best (or last) checkpoint
and writes ``<output>/results.json`` (:mod:`tasks.runner.run`). Shortcut flags are rewritten to
LightningCLI arguments before parsing, so ``--config``, ``--print_config`` and ``--trainer.* /
--model.* / --data.*`` work as in any LightningCLI; a later argument overrides an earlier one.
``--debug`` (anywhere) shows the traceback of any error instead of its one-line summary.

Tasks follow the task contract (:mod:`tasks.common.contract`) and are found by
:mod:`tasks.runner.discovery`; they are imported lazily, so importing this module stays cheap.
A :class:`~tasks.common.errors.UserError` is one line and exit code 2; any other error is a bug
and shows its traceback (exit code 1).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from tasks.common.errors import UsageError, UserError
from tasks.common.validate import check_choice

from . import PROG, discovery, log
from .failure import RunFailure
from .shortcuts import log_moved, translate_shortcuts

__all__ = ["BUILTIN_NORMS", "main", "usage"]


BUILTIN_NORMS = ("bn", "bgn", "gn", "ln", "in", "pn", "none")
"""The registry's own names, for ``--help`` without importing torch (a test keeps them in sync)."""


def usage() -> str:
    """The top-level help: tasks, norms, shortcuts and the bench command."""
    tasks = discovery.available_tasks()
    return "\n".join(
        [
            f"usage: {PROG} <task> [--norm NAME] [--groups G|auto] [--batch-size N] [--data NAME]",
            "                [--data-dir PATH] [--download] [--max-epochs E] [--seed S] [--output DIR]",
            "                [--accelerator A] [--devices D] [--threads T] [--config FILE] [--print_config]",
            "                [--check-data] [--bad-images stop|skip] [--overwrite | --resume] [--debug]",
            "                [task shortcuts] [--trainer.* / --model.* / --data.* ...]",
            f"       {PROG} bench --task TASK --norms a,b --batch-sizes 2,4 --seeds 0,1 [--vary KEY=V1,V2]",
            "                [--metrics M1,M2] [--max-epochs E] [--output DIR] [--config GRID.yaml]",
            "                [--jobs J | --launcher submitit [--cluster C] [--gpus-per-cell G] [--wait] ...]",
            "                [-- extra run args]",
            f"       {PROG} report DIR... [--output DIR]   (one report over bench folders)",
            "",
            "Fit, test the best checkpoint and write <output>/results.json; bench sweeps a grid and writes",
            "results.csv, results.md and accuracy_vs_batch_size.png with each of the task's metrics.",
            "",
            f"tasks: {', '.join(tasks)}",
            f"norms: {', '.join(BUILTIN_NORMS)} (and any registered with bgn_lightning.register_norm)",
            "",
            f"'{PROG} <task> --help' lists every option of a task; '{PROG} bench --help' the sweep's.",
        ]
    )


def main(argv: Sequence[str] | None = None, *, error_dir: Path | None = None) -> int:
    """``bgn-task`` entry point; returns the exit code (2 for user errors, 130 when interrupted).

    ``--debug`` anywhere before a ``--`` shows the full traceback of any error. Any error that is
    not a :class:`~tasks.common.errors.UserError` is a bug: it propagates (traceback, exit code 1).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        error_dir: where a failed run writes its error as ``error.json``
            (:class:`~tasks.runner.failure.RunFailure`; ``bgn-task bench`` passes the cell).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in own
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    _quiet_third_party()
    command, rest = argv[0], argv[1:]
    try:
        return _dispatch(command, rest, debug)
    except KeyboardInterrupt:
        again = "re-run the same command to resume" if command == "bench" else "nothing was written"
        failure = RunFailure("KeyboardInterrupt", f"interrupted; {again}", 130)
        print(f"{PROG}: {failure.message}", file=sys.stderr)
    except UserError as err:
        if debug:
            traceback.print_exception(err.__cause__ or err)
        failure = RunFailure.of(err, err.exit_code)
        hinted = isinstance(err, UsageError) and err.debug_hint and not debug
        hint = " (--debug shows the traceback)" if hinted else ""
        print(f"{PROG}: error: {failure.message}{hint}", file=sys.stderr)
    except BaseException as err:  # a bug: recorded, then its traceback
        if error_dir is not None and not isinstance(err, SystemExit):
            RunFailure.of(err, 1).write(error_dir)
        raise
    if error_dir is not None:
        failure.write(error_dir)
    return failure.exit_code


def _dispatch(command: str, rest: list[str], debug: bool) -> int:
    """Run ``bgn-task bench`` or ``bgn-task <task>``; the exit code."""
    if command == "bench":
        from .bench import bench_main

        return bench_main(rest, debug=debug, entry=main)
    if command == "report":
        from .paper_report import report_main

        return report_main(rest)
    from .run import run_task

    check_choice("task", command, [*discovery.available_tasks(), "bench", "report"])
    task = discovery.load_task(command)
    moved = {f"--{m.old}": f"--{m.new}" for m in task.moved_keys}
    flags = [arg.partition("=")[0] for arg in rest]
    log_moved([(flag, moved[flag]) for flag in flags if flag in moved], "command line")
    args = translate_shortcuts(rest, task.all_shortcuts, task.all_flags)
    return run_task(task, args, command=[PROG, command, *rest])


_NOISE = (
    "💡 Tip", "Seed set to", "Trainer already configured with model summary", "GPU available: False",
    "TPU available: False", "HPU available: False", "Loading `train_dataloader` to estimate",
)  # fmt: skip
"""Lightning log lines a run does without: its advertising tip (litlogger), the seed (results.json
has it), the note that the runner's own (later) model summary replaces its default, accelerators
that do not exist (a GPU that exists but is unused is still reported) and a data-loading note."""


class _DropNoise(logging.Filter):
    """Drops :data:`_NOISE` from Lightning's log, so a one-line error is not preceded by it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE)


def _quiet_third_party() -> None:
    """Keep every run's log to what matters: no Lightning noise, no torch-internal deprecation lines."""
    import warnings

    # Lightning's rank-zero messages go to the logger of whichever copy was imported last (each of
    # lightning.pytorch, lightning.fabric, pytorch_lightning, lightning_fabric sets it; learn2learn
    # imports pytorch_lightning), and seed_everything logs under its own module: filter them all.
    for package in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        for module in ("utilities.rank_zero", "utilities.seed"):
            logging.getLogger(f"{package}.{module}").addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


if __name__ == "__main__":
    raise SystemExit(main())
