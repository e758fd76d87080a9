"""``bgn-task``: run a task suite, or sweep norms x batch sizes (``bgn-task bench``).

``bgn-task <task> [shortcuts] [LightningCLI args]`` parses ``configs/<task>.yaml`` (packaged as
``tasks.configs``) as the default config with LightningCLI (``run=False``), fits, tests the best
(or last) checkpoint and writes ``<output>/results.json``
(:mod:`tasks.common.results`). Shortcut flags are rewritten to LightningCLI arguments before
parsing, so ``--config``, ``--print_config`` and ``--trainer.* / --model.* / --data.*`` work as
in any LightningCLI; a later argument overrides an earlier one.

Task packages follow the task contract: ``tasks/<task>/__init__.py`` exports ``MODEL_CLASS`` and
``DATAMODULE_CLASS`` and optionally ``ARGUMENT_LINKS`` (``(source, target)`` pairs such as
``("data.num_classes", "model.num_classes")``, applied when the classes are instantiated).
Tasks are imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import logging
import pkgutil
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "SHORTCUTS",
    "UsageError",
    "available_tasks",
    "bench_main",
    "main",
    "run_task",
    "translate_shortcuts",
]

PROG = "bgn-task"
# Known suites first, in the paper's order; any other package under tasks/ is listed after them.
_TASK_ORDER = ("classification", "fsl", "adversarial", "uda", "nas")
_NOT_TASKS = frozenset({"common", "configs"})

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
}
"""Shortcut flag -> LightningCLI argument (each takes one value)."""

FLAG_SHORTCUTS: dict[str, tuple[str, str]] = {"--download": ("--data.download", "true")}
"""Value-less shortcut flags -> (LightningCLI argument, value)."""

log = logging.getLogger("tasks")


class UsageError(Exception):
    """A bad task, norm, dataset or config value: reported as one line on stderr, exit code 2."""


def available_tasks() -> list[str]:
    """Task suites installed under ``tasks/`` (packages other than ``common`` and ``configs``)."""
    import tasks

    found = {m.name for m in pkgutil.iter_modules(tasks.__path__) if m.ispkg and m.name not in _NOT_TASKS}
    return [t for t in _TASK_ORDER if t in found] + sorted(found - set(_TASK_ORDER))


def load_task(task: str) -> ModuleType:
    """Import ``tasks.<task>`` and check that it exports the contract's classes.

    Raises:
        UsageError: for an unknown task, or a package that does not export ``MODEL_CLASS`` and
            ``DATAMODULE_CLASS`` yet.
    """
    tasks = available_tasks()
    if task not in tasks:
        raise UsageError(f"unknown task {task!r}; choose from: {', '.join([*tasks, 'bench'])}")
    module = importlib.import_module(f"tasks.{task}")
    if not all(hasattr(module, name) for name in ("MODEL_CLASS", "DATAMODULE_CLASS")):
        raise UsageError(
            f"task {task!r} is not installed: tasks.{task} does not export MODEL_CLASS and DATAMODULE_CLASS"
        )
    return module


def default_config(task: str) -> Path | None:
    """The packaged ``configs/<task>.yaml``, or ``None`` when the task ships none."""
    path = Path(str(importlib.resources.files("tasks.configs") / f"{task}.yaml"))
    return path if path.is_file() else None


def translate_shortcuts(argv: Sequence[str]) -> list[str]:
    """Rewrite the shortcut flags (:data:`SHORTCUTS`, ``--download``) into LightningCLI arguments.

    Both ``--flag value`` and ``--flag=value`` are accepted; everything else is passed through.

    Raises:
        UsageError: when a shortcut that needs a value is last.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in SHORTCUTS:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{flag} needs a value")
                i += 1
                value = args[i]
            out += [SHORTCUTS[flag], value]
        elif flag in FLAG_SHORTCUTS:
            target, default = FLAG_SHORTCUTS[flag]
            out += [target, value if eq else default]
        else:
            out.append(arg)
        i += 1
    return out


def _norms() -> list[str]:
    from bgn_lightning import available_norms

    return available_norms()


def _shortcut_help() -> str:
    return (
        "Shortcuts: --norm NAME, --groups G|auto, --batch-size N, --data NAME, --data-dir PATH, "
        "--download, --max-epochs E, --seed S, --output DIR, --accelerator A, --devices D. "
        "--threads T sets torch's CPU threads (1 is fastest for small models on a busy CPU)."
    )


def usage() -> str:
    """The top-level help: tasks, norms, shortcuts and the bench command."""
    tasks = available_tasks()
    return "\n".join(
        [
            f"usage: {PROG} <task> [--norm NAME] [--groups G|auto] [--batch-size N] [--data NAME]",
            "                [--data-dir PATH] [--download] [--max-epochs E] [--seed S] [--output DIR]",
            "                [--accelerator A] [--devices D] [--threads T] [--config FILE] [--print_config]",
            "                [--trainer.* / --model.* / --data.* ...]",
            f"       {PROG} bench --task TASK --norms a,b --batch-sizes 2,4 --seeds 0,1 [--max-epochs E]",
            "                [--output DIR] [--config GRID.yaml] [--jobs J] [-- extra run args]",
            "",
            "Fit, test the best checkpoint and write <output>/results.json; bench sweeps a grid and writes",
            "results.csv, results.md and accuracy_vs_batch_size.png.",
            "",
            f"tasks: {', '.join(tasks)}",
            f"norms: {', '.join(_norms())}",
            "",
            f"'{PROG} <task> --help' lists every option of a task; '{PROG} bench --help' the sweep's.",
        ]
    )


def _check_choices(config: Any, datasets: Sequence[str] | None) -> None:
    """Check ``model.norm`` against the registry and ``data.dataset`` against the task's names.

    Raises:
        UsageError: listing the valid choices.
    """
    norm, norms = config.model.get("norm"), _norms()
    if norm is not None and norm not in norms:
        raise UsageError(f"unknown norm {norm!r}; choose from: {', '.join(norms)}")
    dataset = config.data.get("dataset")
    if datasets is not None and dataset is not None and dataset not in datasets:
        raise UsageError(f"unknown dataset {dataset!r}; choose from: {', '.join(datasets)}")


def _make_cli_class(task: str, links: Sequence[tuple[str, str]], datasets: Sequence[str] | None) -> type:
    """A LightningCLI subclass for ``task`` (built lazily: importing Lightning is slow).

    Args:
        task: task name (for the default output directory).
        links: ``(source, target)`` argument links applied at instantiation.
        datasets: the task's dataset names (the DataModule's ``DATASETS``), if it declares them.
    """
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    class TaskCLI(LightningCLI):
        """LightningCLI with the task's links, early name checks, default output dir and loggers."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--threads",
                type=int | None,
                default=None,
                help="torch intra-op CPU threads (null: torch's default, one per core). Small models on a "
                "busy CPU run fastest with 1.",
            )
            for source, target in links:
                parser.link_arguments(source, target, apply_on="instantiate")

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            # LightningCLI warns when args are given while sys.argv is set; here both are ours.
            self.config = parser.parse_args(args)
            _check_choices(self.config, datasets)

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            if cfg.get("threads") is not None:
                if cfg.threads < 1:
                    raise UsageError(f"--threads must be a positive int or null, got {cfg.threads}")
                import torch

                torch.set_num_threads(cfg.threads)
            norm = cfg.model.get("norm")
            if cfg.trainer.get("default_root_dir") is None:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                name = f"{stamp}-{norm}-bs{cfg.data.get('batch_size')}-seed{cfg.get('seed_everything')}"
                cfg.trainer.default_root_dir = str(Path("outputs") / task / name)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, FileNotFoundError) as err:  # bad dataset name, bad init value
                raise UsageError(str(err).splitlines()[0]) from err

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            root = Path(self.config.trainer.default_root_dir)
            if self.config_init.trainer.get("logger") in (None, True):
                kwargs["logger"] = [
                    CSVLogger(root, name="", version="csv"),
                    TensorBoardLogger(root, name="", version="tensorboard"),
                ]
            trainer = super().instantiate_trainer(**kwargs)
            for checkpoint in trainer.checkpoint_callbacks:  # <output>/checkpoints, not inside a logger's dir
                if checkpoint.dirpath is None:
                    checkpoint.dirpath = str(root / "checkpoints")
            return trainer

    return TaskCLI


def _checkpoint_to_test(trainer: Trainer) -> str | None:
    """The best checkpoint when one is monitored, else the last saved; ``None``: in-memory weights."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.monitor and callback.best_model_path:
        return callback.best_model_path
    return callback.last_model_path or callback.best_model_path or None


def run_task(task: str, argv: Sequence[str]) -> int:
    """Parse, fit, test and write ``results.json`` for ``task``; the exit code.

    Raises:
        UsageError: for an unknown task, norm, dataset or init value.
    """
    from tasks.common.data import DatasetNotFoundError, TaskConfigError
    from tasks.common.results import results_record, write_results

    module = load_task(task)
    start = time.perf_counter()
    command = [PROG, task, *argv]
    config = default_config(task)
    description = (
        f"{PROG} {task}: fit, test the best checkpoint, write <output>/results.json. "
        f"Norms: {', '.join(_norms())}. "
    )
    cli_class = _make_cli_class(
        task, getattr(module, "ARGUMENT_LINKS", ()), getattr(module.DATAMODULE_CLASS, "DATASETS", None)
    )
    cli = cli_class(
        model_class=module.MODEL_CLASS,
        datamodule_class=module.DATAMODULE_CLASS,
        args=translate_shortcuts(argv),
        run=False,
        parser_kwargs={
            "prog": f"{PROG} {task}",
            "description": description + _shortcut_help(),
            "default_config_files": [str(config)] if config else [],
        },
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    try:
        fit_start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_time = time.perf_counter() - fit_start
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        callback = trainer.checkpoint_callback
        if callback is not None and callback.monitor and callback.best_model_score is not None:
            metrics[f"{callback.monitor}_best"] = callback.best_model_score
        checkpoint = _checkpoint_to_test(trainer)
        test_start = time.perf_counter()
        trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint)
        test_time = time.perf_counter() - test_start
    except (DatasetNotFoundError, TaskConfigError) as err:
        raise UsageError(str(err)) from err
    metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    if trainer.is_global_zero:
        record = results_record(
            task=task,
            config=_plain_config(cli),
            metrics=metrics,
            model=model,
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            checkpoint=checkpoint,
            times={
                "wall_time_s": time.perf_counter() - start,
                "fit_time_s": fit_time,
                "test_time_s": test_time,
            },
            command=command,
            hparams=dict(model.hparams),
        )
        path = write_results(cli.config.trainer.default_root_dir, record)
        tested = sorted((k, float(v)) for k, v in metrics.items() if k.startswith("test/"))
        summary = ", ".join(f"{k}={v:.4f}" for k, v in tested)
        log.info("%s %s: %s (%.1f s) -> %s", PROG, task, summary, record["wall_time_s"], path)
    return 0


def _plain_config(cli: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what ``--print_config`` would show)."""
    import yaml

    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_validation=True))


_GRID_FLAGS = ("task", "norms", "batch_sizes", "seeds", "max_epochs", "output", "jobs", "threads")


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} bench",
        description=(
            "Run a grid of runs (norms x batch sizes x seeds) of one task, skipping runs whose "
            "results.json exists (re-running resumes a killed sweep), then write results.csv, "
            "results.md (mean ± std per norm x batch size, best per column in bold) and "
            "accuracy_vs_batch_size.png into --output. Arguments after '--' go to every run."
        ),
        epilog=(
            "GRID.yaml keys: task, norms, batch_sizes, seeds, max_epochs, output, jobs, threads, args "
            "(list of run arguments); command-line flags override them."
        ),
    )
    parser.add_argument("--config", type=Path, help="YAML grid file")
    parser.add_argument("--task", help="task suite")
    parser.add_argument("--norms", help="comma-separated registry norms, e.g. bn,bgn,gn,ln,in,pn")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 2,4,16,64")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--max-epochs", help="epochs per run, or per batch size as 2:3,64:15 (default: the task's config)"
    )
    parser.add_argument("--output", type=Path, help="sweep directory (default outputs/bench/<task>)")
    parser.add_argument("--jobs", type=int, help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default CPU count / jobs)")
    return parser


def bench_main(argv: Sequence[str]) -> int:
    """``bgn-task bench``: run the grid, then write the three reports; the exit code.

    Raises:
        UsageError: for a bad grid (unknown task or norm, empty lists, bad numbers or YAML).
    """
    import yaml

    from tasks.common.report import write_report
    from tasks.common.sweep import Grid, parse_epochs, parse_list, run_grid

    argv = list(argv)
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = _bench_parser().parse_args(own)
    spec: dict[str, Any] = {}
    if args.config is not None:
        try:
            spec = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            reason = str(err).splitlines()[0]
            raise UsageError(f"cannot read grid file {str(args.config)!r}: {reason}") from err
        if not isinstance(spec, dict):
            raise UsageError(f"grid file {str(args.config)!r}: expected a mapping of grid keys")
        unknown = set(spec) - {*_GRID_FLAGS, "args"}
        if unknown:
            raise UsageError(f"grid file {str(args.config)!r}: unknown keys {sorted(unknown)}")
    spec.update({k: getattr(args, k) for k in _GRID_FLAGS if getattr(args, k) is not None})
    task = spec.get("task")
    if task not in available_tasks():
        raise UsageError(f"bench: unknown task {task!r}; choose from: {', '.join(available_tasks())}")
    try:
        norms = parse_list(spec.get("norms", ""), str)
        unknown_norms = [n for n in norms if n not in _norms()]
        if unknown_norms:
            raise ValueError(f"unknown norm {unknown_norms[0]!r}; choose from: {', '.join(_norms())}")
        grid = Grid(
            task=task,
            norms=norms,
            batch_sizes=parse_list(spec.get("batch_sizes", ""), int),
            seeds=parse_list(spec.get("seeds", "0"), int),
            output=Path(spec.get("output") or Path("outputs") / "bench" / task),
            max_epochs=parse_epochs(spec.get("max_epochs")),
            run_args=[str(a) for a in spec.get("args") or []] + run_args,
            jobs=int(spec.get("jobs") or 1),
            threads=spec.get("threads"),
        )
    except ValueError as err:
        raise UsageError(f"bench: {err}") from err
    cells = grid.cells()
    log.info("%s bench: %d runs of %s -> %s", PROG, len(cells), task, grid.output)
    outcomes = run_grid(grid)
    records = [o.record for o in outcomes if o.record is not None]
    failed = [o for o in outcomes if o.status == "failed"]
    if records:
        dataset = records[0].get("dataset") or "default data"
        paths = write_report(
            records,
            grid.output,
            grid.norms,
            grid.batch_sizes,
            title=f"{task} on {dataset}: test accuracy vs batch size",
            command=shlex.join([PROG, "bench", *argv]),
        )
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if failed:
        log.info("%d of %d runs failed; re-run the same command to retry them", len(failed), len(cells))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``bgn-task`` entry point; returns the exit code (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    command, rest = argv[0], argv[1:]
    try:
        if command == "bench":
            return bench_main(rest)
        return run_task(command, rest)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
