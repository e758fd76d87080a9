"""``bgn-task``: run a task suite, or sweep it (``bgn-task bench``).

``bgn-task <task> [shortcuts] [LightningCLI args]`` parses the task's default config (packaged as
``tasks.configs``) with LightningCLI (``run=False``), fits, tests the best (or last) checkpoint
and writes ``<output>/results.json`` (:mod:`tasks.runner.run`). Shortcut flags are rewritten to
LightningCLI arguments before parsing, so ``--config``, ``--print_config`` and ``--trainer.* /
--model.* / --data.*`` work as in any LightningCLI; a later argument overrides an earlier one.
``--debug`` (anywhere) shows the traceback of any error instead of its one-line summary.

Tasks follow the task contract (:mod:`tasks.common.contract`): ``tasks/<task>/__init__.py``
exports ``TASK``. Tasks are imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from tasks.common.contract import Task

__all__ = [
    "SHORTCUTS",
    "UsageError",
    "available_tasks",
    "load_task",
    "main",
    "translate_shortcuts",
]

PROG = "bgn-task"
# Known suites first, in the paper's order; any other package under tasks/ is listed after them.
_TASK_ORDER = ("classification", "fsl", "adversarial", "uda", "nas")
_NOT_TASKS = frozenset({"common", "configs", "runner"})

SHORTCUTS: dict[str, str] = {
    "--norm": "--model.norm",
    "--groups": "--model.groups",
    "--batch-size": "--data.batch_size",
    "--data": "--data.dataset",
    "--data-dir": "--data.data_dir",
    "--max-epochs": "--trainer.max_epochs",
    "--seed": "--seed_everything",
    "--output": "--trainer.default_root_dir",
    "--accelerator": "--trainer.accelerator",
    "--devices": "--trainer.devices",
    "--bad-images": "--bad_images",
}
"""Shortcut flag -> LightningCLI argument (each takes one value)."""

FLAG_SHORTCUTS: dict[str, tuple[str, str]] = {
    "--download": ("--data.download", "true"),
    "--sync-norm": ("--sync_norm", "true"),
    "--check-data": ("--check_data", "true"),
    "--overwrite": ("--overwrite", "true"),
    "--resume": ("--resume", "true"),
}
"""Value-less shortcut flags -> (LightningCLI argument, value)."""

log = logging.getLogger("tasks")


def available_tasks() -> list[str]:
    """Task suites installed under ``tasks/`` (packages other than ``common``, ``configs``, ``runner``)."""
    import tasks

    found = {m.name for m in pkgutil.iter_modules(tasks.__path__) if m.ispkg and m.name not in _NOT_TASKS}
    return [t for t in _TASK_ORDER if t in found] + sorted(found - set(_TASK_ORDER))


def load_task(name: str) -> Task:
    """Import ``tasks.<name>`` and return its contract, ``TASK``.

    Raises:
        UsageError: for an unknown task.
        TypeError: for a task package that does not export a :class:`~tasks.common.contract.Task`
            named ``TASK`` (a bug in the task, not a user error).
    """
    from tasks.common.contract import Task

    names = available_tasks()
    if name not in names:
        raise UsageError(f"unknown task {name!r}; choose from: {', '.join([*names, 'bench'])}")
    task = getattr(importlib.import_module(f"tasks.{name}"), "TASK", None)
    if not isinstance(task, Task) or task.name != name:
        raise TypeError(f"tasks.{name} must export TASK = Task(name={name!r}, ...) (tasks.common.contract)")
    return task


def translate_shortcuts(
    argv: Sequence[str],
    extra: Mapping[str, str] | None = None,
    extra_flags: Mapping[str, tuple[str, str]] | None = None,
) -> list[str]:
    """Rewrite the shortcut flags (:data:`SHORTCUTS`, ``--download``) into LightningCLI arguments.

    Both ``--flag value`` and ``--flag=value`` are accepted; everything else is passed through.

    Args:
        argv: the run's arguments.
        extra: a task's own value shortcuts (:attr:`Task.shortcuts <tasks.common.contract.Task>`).
        extra_flags: a task's own value-less shortcuts (flag -> (argument, value)).

    Raises:
        UsageError: when a shortcut that needs a value is last.
    """
    shortcuts = {**SHORTCUTS, **(extra or {})}
    flags = {**FLAG_SHORTCUTS, **(extra_flags or {})}
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag == "--trainer.callbacks" and not (value if eq else "").lstrip().startswith(("[", "{")):
            # One callback class (e.g. bgn_lightning.NormSwap) joins the task's own callbacks
            # (checkpointing, LR monitor) instead of replacing them: jsonargparse's list append.
            if not eq:
                if i + 1 >= len(args) or args[i + 1].lstrip().startswith(("[", "{")):
                    out.append(arg)
                    i += 1
                    continue
                i += 1
                value = args[i]
            out.append(f"--trainer.callbacks+={value}")
        elif flag in shortcuts:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{flag} needs a value")
                i += 1
                value = args[i]
            out += [shortcuts[flag], value]
        elif flag in flags:
            target, default = flags[flag]
            out += [target, value if eq else default]
        else:
            out.append(arg)
        i += 1
    return out


BUILTIN_NORMS = ("bn", "bgn", "gn", "ln", "in", "pn", "none")
"""The registry's own names, for ``--help`` without importing torch (a test keeps them in sync)."""


def usage() -> str:
    """The top-level help: tasks, norms, shortcuts and the bench command."""
    tasks = available_tasks()
    return "\n".join(
        [
            f"usage: {PROG} <task> [--norm NAME] [--groups G|auto] [--batch-size N] [--data NAME]",
            "                [--data-dir PATH] [--download] [--max-epochs E] [--seed S] [--output DIR]",
            "                [--accelerator A] [--devices D] [--threads T] [--config FILE] [--print_config]",
            "                [--check-data] [--bad-images stop|skip] [--overwrite | --resume] [--debug]",
            "                [task shortcuts] [--trainer.* / --model.* / --data.* ...]",
            f"       {PROG} bench --task TASK --norms a,b --batch-sizes 2,4 --seeds 0,1 [--vary KEY=V1,V2]",
            "                [--metrics M1,M2] [--max-epochs E] [--output DIR] [--config GRID.yaml]",
            "                [--jobs J]",
            "                [-- extra run args]",
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


def main(argv: Sequence[str] | None = None) -> int:
    """``bgn-task`` entry point; returns the exit code (2 for usage errors).

    ``--debug`` anywhere before a ``--`` shows the full traceback of any error.
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
        if command == "bench":
            from .bench import bench_main

            return bench_main(rest, debug=debug)
        from .run import run_task

        task = load_task(command)
        args = translate_shortcuts(rest, task.shortcuts, task.flags)
        return run_task(task, args, command=[PROG, command, *rest])
    except KeyboardInterrupt:
        again = "re-run the same command to resume" if command == "bench" else "nothing was written"
        print(f"{PROG}: interrupted; {again}", file=sys.stderr)
        return 130
    except UsageError as err:
        if debug:
            traceback.print_exception(err.__cause__ or err)
        hint = " (--debug shows the traceback)" if err.debug_hint and not debug else ""
        print(f"{PROG}: error: {err}{hint}", file=sys.stderr)
        return 2


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
