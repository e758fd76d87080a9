"""One ``bgn-task <task>`` run: LightningCLI from the task's default config, fit, test, ``results.json``.

The task's :class:`~tasks.common.contract.Task` supplies the classes, argument links and default
config; this module adds the project's shortcuts' early checks (norm arguments, dataset names:
one line and exit code 2 before anything is built), the default output directory, CSV and
TensorBoard loggers, and a :class:`Run` that a multi-stage task hook drives.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    from tasks.common.contract import Task

__all__ = ["Run", "default_config", "run_task"]

PROG = "bgn-task"
log = logging.getLogger("tasks")


def default_config(task: Task) -> Path | None:
    """The packaged ``configs/<task.config>``, or ``None`` when the task ships none."""
    path = Path(str(importlib.resources.files("tasks.configs") / str(task.config)))
    return path if path.is_file() else None


def check_config(config: Any, datasets: Sequence[str] | None) -> None:
    """The early checks: the shared norm arguments and ``data.dataset`` against the task's names.

    Raises:
        UsageError: naming the bad value and the valid choices.
    """
    from tasks.common.norms import check_norm_args

    model = config.model
    if model.get("norm") is not None:
        try:
            check_norm_args(model.get("norm"), model.get("groups", "auto"), model.get("norm_kwargs"))
        except ValueError as err:
            raise UsageError(str(err)) from None
    dataset = config.data.get("dataset")
    if datasets is not None and dataset is not None and dataset not in datasets:
        raise UsageError(f"unknown dataset {dataset!r}; choose from: {', '.join(datasets)}")


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config FILE`` exists and is valid YAML; else one line with the file and line.

    Raises:
        UsageError: ``--config FILE: no such file`` or ``FILE:LINE:COLUMN: <YAML problem>``.
    """
    import yaml

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag != "--config" or (not eq and i + 1 >= len(argv)):
            continue
        path = Path(value if eq else argv[i + 1])
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"{where}: invalid YAML: {problem}") from None


def _make_cli_class(task: Task) -> type:
    """A LightningCLI subclass for ``task`` (built lazily: importing Lightning is slow)."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    datasets = getattr(task.datamodule_class, "DATASETS", None)

    class TaskCLI(LightningCLI):
        """LightningCLI with the task's links, early checks, default output dir and loggers."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--threads",
                type=int | None,
                default=None,
                help="torch intra-op CPU threads (null: torch's default, one per core). Small models on a "
                "busy CPU run fastest with 1.",
            )
            parser.add_argument(
                "--sync_norm",
                type=bool,
                default=False,
                help="synchronise BGN (and, on GPUs, BatchNorm) statistics across processes: "
                "bgn_lightning.BGNSync (shortcut --sync-norm); otherwise each device normalises with "
                "its own batch",
            )
            for source, target in task.links:
                parser.link_arguments(source, target, apply_on="instantiate")

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            # LightningCLI warns when args are given while sys.argv is set; here both are ours.
            from jsonargparse import ArgumentError

            try:
                self.config = parser.parse_args(args)
            except ArgumentError as err:  # unknown key, bad type, ...: the message, not the usage
                message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
                raise UsageError(f"{message} ('{PROG} {task.name} --help' lists the options)") from err
            check_config(self.config, datasets)

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            if cfg.get("threads") is not None:
                if cfg.threads < 1:
                    raise UsageError(f"--threads must be a positive int or null, got {cfg.threads}")
                import torch

                torch.set_num_threads(cfg.threads)
            if cfg.trainer.get("default_root_dir") is None:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                name = (
                    f"{stamp}-{cfg.model.get('norm')}-bs{cfg.data.get('batch_size')}"
                    f"-seed{cfg.get('seed_everything')}"
                )
                cfg.trainer.default_root_dir = str(Path("outputs") / task.name / name)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError) as err:  # a bad init value, a missing dataset
                raise UsageError(str(err).splitlines()[0], debug_hint=True) from err

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            from lightning.pytorch.callbacks import ProgressBar

            root = Path(self.config.trainer.default_root_dir)
            init = self.config_init.trainer
            if init.get("logger") in (None, True):
                kwargs["logger"] = _loggers(root)
            if self.config.get("sync_norm"):
                kwargs["plugins"] = [*_as_list(init.get("plugins")), _sync_plugin(init)]
            callbacks = init.get("callbacks") or []
            if init.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                init["callbacks"] = [*callbacks, _progress_bar()]
            trainer = super().instantiate_trainer(**kwargs)
            _checkpoints_under(trainer, root)
            return trainer

    return TaskCLI


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _sync_plugin(trainer_init: Any) -> Any:
    """``BGNSync``, also converting BatchNorm when the run is on GPUs (torch's SyncBatchNorm is CUDA-only)."""
    import torch

    from bgn_lightning import BGNSync

    on_gpu = trainer_init.get("accelerator") in ("gpu", "cuda") or (
        trainer_init.get("accelerator") in (None, "auto") and torch.cuda.is_available()
    )
    return BGNSync(batchnorm=on_gpu)


def _progress_bar() -> Any:
    """Lightning's rich progress bar without ``v_num`` (which showed the logger dir's tail, "oard")."""
    from lightning.pytorch.callbacks import RichProgressBar

    class ProgressBar(RichProgressBar):
        def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return ProgressBar()


def _loggers(root: Path) -> list[Any]:
    """CSV and TensorBoard loggers writing ``<root>/csv`` and ``<root>/tensorboard``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    return [CSVLogger(root, name="", version="csv"), TensorBoardLogger(root, name="", version="tensorboard")]


def _checkpoints_under(trainer: Trainer, root: Path) -> None:
    """``<root>/checkpoints``, not a logger's directory, for checkpoint callbacks without a dirpath."""
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(root / "checkpoints")


def _checkpoint_to_test(trainer: Trainer) -> str | None:
    """The best checkpoint when one is monitored, else the last saved; ``None``: in-memory weights."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.monitor and callback.best_model_path:
        return callback.best_model_path
    return callback.last_model_path or callback.best_model_path or None


class Run:
    """One run of a task: what :attr:`Task.run <tasks.common.contract.Task.run>` hooks drive.

    Implements :class:`tasks.common.contract.TaskRun`. The default flow is one
    :meth:`fit_and_test` of the CLI's model, trainer and DataModule.
    """

    def __init__(self, task: Task, cli: Any) -> None:
        self.task = task
        self.cli = cli
        self.config: dict[str, Any] = _plain_config(cli)
        self.output = Path(cli.config.trainer.default_root_dir)
        self.model: LightningModule = cli.model
        self.datamodule: LightningDataModule = cli.datamodule
        self.trainer: Trainer = cli.trainer
        self.metrics: dict[str, float] = {}
        self.checkpoint: str | None = None
        self.checkpoint_info: dict[str, int | None] = {"epoch": None, "step": None}
        self.times = {"fit_time_s": 0.0, "test_time_s": 0.0}
        # The trainer's init arguments before any fit: make_trainer() builds later stages from copies.
        self._trainer_init = copy.deepcopy(dict(cli.config_init.trainer))

    def fit_and_test(
        self, model: LightningModule, trainer: Trainer, datamodule: LightningDataModule | None = None
    ) -> dict[str, float]:
        """Fit, test the best (or last) checkpoint; its ``val/*`` and ``test/*`` metrics.

        When fit validated and a checkpoint is tested, that checkpoint is validated again before
        testing, so ``val/*`` describe the tested weights (not the last epoch's); its epoch and step
        go to :attr:`checkpoint_info`. Also records ``model``, ``trainer`` and the tested checkpoint
        as the run's final ones.
        """
        import torch

        from tasks.common.norms import GroupCountCheck

        datamodule = datamodule or self.datamodule
        if not any(isinstance(c, GroupCountCheck) for c in trainer.callbacks):
            trainer.callbacks.append(GroupCountCheck())
        if trainer.world_size > 1 and trainer.is_global_zero:
            synced = self.config.get("sync_norm")
            hint = "" if synced else " (--sync-norm pools BGN's statistics over all of them)"
            how = "synchronised" if synced else "per device"
            log.info("norm statistics: %s across %d processes%s", how, trainer.world_size, hint)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        self.times["fit_time_s"] += time.perf_counter() - start
        checkpoint = _checkpoint_to_test(trainer)
        validated = any(k.startswith("val/") for k in trainer.callback_metrics)
        metrics: dict[str, float] = {}
        callback = trainer.checkpoint_callback
        if callback is not None and callback.monitor and callback.best_model_score is not None:
            metrics[f"{callback.monitor}_best"] = float(callback.best_model_score)
        start = time.perf_counter()
        if checkpoint is not None:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
            self.checkpoint_info = {"epoch": saved.get("epoch"), "step": saved.get("global_step")}
            if validated:  # the tested weights' own validation metrics
                trainer.validate(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint)
        self.times["test_time_s"] += time.perf_counter() - start
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        self.model, self.trainer, self.checkpoint = model, trainer, checkpoint
        return metrics

    def make_trainer(self, stage: str) -> Trainer:
        """A new Trainer from the run's ``trainer`` config, writing under ``<output>/<stage>``."""
        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint

        root = self.output / stage
        kwargs = copy.deepcopy(self._trainer_init)
        kwargs["default_root_dir"] = str(root)
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = _loggers(root)
        for callback in kwargs.get("callbacks") or []:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = str(root / "checkpoints")
        return Trainer(**kwargs)


def _norm_swap(trainer: Trainer) -> Any:
    """The trainer's :class:`bgn_lightning.NormSwap` callback, if the user added one."""
    from bgn_lightning import NormSwap

    return next((c for c in trainer.callbacks if isinstance(c, NormSwap)), None)


def _plain_config(cli: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what ``--print_config`` would show)."""
    import yaml

    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_validation=True))


def _shortcut_help() -> str:
    return (
        "Shortcuts: --norm NAME, --groups G|auto, --batch-size N, --data NAME, --data-dir PATH, "
        "--download, --sync-norm, --max-epochs E, --seed S, --output DIR, --accelerator A, --devices D. "
        "--threads T sets torch's CPU threads (1 is fastest for small models on a busy CPU)."
    )


def run_task(task: Task, argv: Sequence[str], command: Sequence[str]) -> int:
    """Parse, fit, test and write ``results.json`` for ``task``; the exit code.

    Args:
        task: the task's contract.
        argv: LightningCLI arguments (shortcuts already translated).
        command: the command line as the user gave it (recorded in ``results.json``).

    Raises:
        UsageError: for a bad norm, dataset, init value or a setting the data cannot serve.
    """
    from bgn_lightning import available_norms
    from tasks.common.data import DatasetNotFoundError, TaskConfigError
    from tasks.common.results import results_record, write_results

    start = time.perf_counter()
    check_config_files(argv)
    config = default_config(task)
    description = (
        f"{PROG} {task.name}: fit, test the best checkpoint, write <output>/results.json. "
        f"Norms: {', '.join(available_norms())}. Metrics: {', '.join(m.name for m in task.metrics)}. "
    )
    cli = _make_cli_class(task)(
        model_class=task.model_class,
        datamodule_class=task.datamodule_class,
        args=list(argv),
        run=False,
        parser_kwargs={
            "exit_on_error": False,
            "prog": f"{PROG} {task.name}",
            "description": description + _shortcut_help(),
            "default_config_files": [str(config)] if config else [],
        },
        save_config_kwargs={"overwrite": True},
    )
    run = Run(task, cli)
    if run.config.get("optimizer") is not None:
        log.info("%s %s: --optimizer replaces the task's optimizer and learning-rate rule", PROG, task.name)
    try:
        if task.run is not None:
            task.run(run)
        else:
            run.metrics = run.fit_and_test(run.model, run.trainer)
    except (DatasetNotFoundError, TaskConfigError) as err:
        raise UsageError(str(err)) from err
    extra = task.extra_results(run) if task.extra_results is not None else {}
    if run.trainer.is_global_zero:
        missing = [m.name for m in task.metrics if m.name not in run.metrics]
        if missing:
            log.warning("%s %s: the run did not log %s (declared by the task)", PROG, task.name, missing)
        swap = _norm_swap(run.trainer)
        if swap is not None:  # the norm that ran is the swapped-in one; the config's is the source
            extra = {"norm_swap": {"from": run.config["model"].get("norm"), "to": swap.norm,
                                   "kwargs": swap.kwargs, "replaced": dict(swap.swapped)}, **extra}
        record = results_record(
            task=task.name,
            norm=swap.norm if swap is not None else None,
            config=run.config,
            metrics=run.metrics,
            model=run.model,
            epochs=run.trainer.current_epoch,
            global_step=run.trainer.global_step,
            checkpoint=run.checkpoint,
            checkpoint_epoch=run.checkpoint_info["epoch"],
            checkpoint_step=run.checkpoint_info["step"],
            times={"wall_time_s": time.perf_counter() - start, **run.times},
            command=list(command),
            hparams=dict(run.model.hparams),
            extra=extra,
        )
        path = write_results(run.output, record)
        shown = ", ".join(
            f"{m.name}={run.metrics[m.name]:.4f}" for m in task.metrics if m.name in run.metrics
        )
        log.info("%s %s: %s (%.1f s) -> %s", PROG, task.name, shown, record["wall_time_s"], path)
    return 0
