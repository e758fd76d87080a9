"""One ``bgn-task <task>`` run: LightningCLI from the task's default config, fit, test, ``results.json``.

The task's :class:`~tasks.common.contract.Task` supplies the classes, argument links and default
config; :class:`~tasks.runner.task_cli.TaskCLI` parses, checks early (one line and exit code 2
before anything is built), claims the output folder and builds the trainer; this module drives
the run (:func:`run_task`) through a :class:`Run`, which a multi-stage task hook drives too, and
writes ``results.json``.
"""

from __future__ import annotations

import copy
import importlib.resources
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.errors import UserError

from . import PROG, log
from .checks import check_config_files
from .folders import discard

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    from tasks.common.contract import Task

__all__ = ["Run", "default_config", "run_task"]


def default_config(task: Task) -> Path | None:
    """The packaged ``configs/<task.config>``, or ``None`` when the task ships none."""
    path = Path(str(importlib.resources.files("tasks.configs") / str(task.config)))
    return path if path.is_file() else None


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
        self.options: dict[str, Any] = {o.name: cli.config.get(o.name) for o in task.options}
        self.output = Path(cli.config.trainer.default_root_dir)
        self.model: LightningModule = cli.model
        self.datamodule: LightningDataModule = cli.datamodule
        self.trainer: Trainer = cli.trainer
        self.metrics: dict[str, float] = {}
        self.checkpoint: str | None = None
        self.checkpoint_info: dict[str, int | None] = {"epoch": None, "step": None}
        self.times = {"fit_time_s": 0.0, "test_time_s": 0.0}
        self.resume_from: Path | None = cli.resume_from
        self.norm: str | None = None
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
        norm_batch_size = self.config.get("norm_batch_size")
        if norm_batch_size is not None:
            _apply_norm_batch_size(model, norm_batch_size, self.config["model"].get("norm"))
        if trainer.world_size > 1 and trainer.is_global_zero:
            synced = self.config.get("sync_norm") and norm_batch_size is None
            hint = "" if synced else " (--sync-norm pools BGN's statistics over all of them)"
            how = "synchronised" if synced else "per device"
            if norm_batch_size is not None:
                how = f"per run of {norm_batch_size} samples (--norm-batch-size; nothing synchronised)"
                hint = ""
            log.info("norm statistics: %s across %d processes%s", how, trainer.world_size, hint)
        resume = self.resume_from if trainer is self.cli.trainer else None
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=None if resume is None else str(resume))
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
        trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
        self.times["test_time_s"] += time.perf_counter() - start
        tested = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if trainer.is_global_zero:
            _print_table(tested)
        metrics.update(tested)
        self.model, self.trainer, self.checkpoint = model, trainer, checkpoint
        return metrics

    def make_trainer(self, stage: str, **overrides: Any) -> Trainer:
        """A new Trainer from the run's ``trainer`` config with ``overrides`` (trainer init
        arguments, e.g. ``max_epochs``), writing under ``<output>/<stage>``."""
        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint

        from .task_cli import loggers

        root = self.output / stage
        kwargs = copy.deepcopy(self._trainer_init)
        kwargs.update(overrides)
        kwargs["default_root_dir"] = str(root)
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = loggers(root)
        for callback in kwargs.get("callbacks") or []:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = str(root / "checkpoints")
        return Trainer(**kwargs)


def _print_table(metrics: dict[str, float]) -> None:
    """The test metrics, one table (Lightning's repeats every metric under each test dataloader)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("Test metric", "Value")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


def _apply_norm_batch_size(model: LightningModule, norm_batch_size: int, norm: str | None) -> None:
    """``--norm-batch-size``: set it on every norm layer with batch statistics (torch's BatchNorm
    becomes its ghost variant, sharing parameters); one log line where no layer uses batch statistics."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from bgn_lightning.layers import NormBatchSize

    if not any(isinstance(m, (NormBatchSize, _BatchNorm)) for m in model.modules()):
        log.info("%s: --norm-batch-size %d has no effect: no norm layer of this model uses batch statistics "
                 "(--norm %s)", PROG, norm_batch_size, norm)
        return
    from bgn_lightning import set_norm_batch_size

    set_norm_batch_size(model, norm_batch_size)


def _norm_swap(trainer: Trainer) -> Any:
    """The trainer's :class:`bgn_lightning.NormSwap` callback, if the user added one."""
    from bgn_lightning import NormSwap

    return next((c for c in trainer.callbacks if isinstance(c, NormSwap)), None)


def _plain_config(cli: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what ``--print_config`` would show)."""
    import yaml

    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_validation=True))


def _kernel_path(model: LightningModule) -> str | None:
    """Which implementation the model's BGN layers ran on (``cpu: C++ kernels``, ``cuda: native ops``...).

    ``None`` for a model without BGN layers.
    """
    from bgn_lightning import BatchGroupNorm, cpu_kernels_available, cuda_kernels_available

    if not any(isinstance(m, BatchGroupNorm) for m in model.modules()):
        return None
    device = next(model.parameters()).device.type
    if device == "cpu" and cpu_kernels_available():
        return "cpu: C++ kernels"
    if device == "cuda" and cuda_kernels_available():
        return "cuda: Triton kernels"
    return f"{device}: native ops"


def _distributed(trainer: Trainer, config: dict[str, Any]) -> dict[str, Any]:
    """The run's processes for ``results.json``: world size, nodes, devices per node, the global
    batch, whether the norms' statistics were synchronised and the cluster environment Lightning
    detected (torchrun's, SLURM's, or its own launcher's)."""
    per_device = (config.get("data") or {}).get("batch_size")
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "global_batch_size": per_device * trainer.world_size if isinstance(per_device, int) else None,
        "sync_norm": bool(config.get("sync_norm")),
        "cluster_environment": None if environment is None else type(environment).__name__,
    }


def _shortcut_help() -> str:
    return (
        "Shortcuts: --norm NAME, --groups G|auto, --batch-size N, --data NAME, --data-dir PATH, "
        "--download, --sync-norm, --check-data, --bad-images stop|skip, --max-epochs E, --seed S, "
        "--output DIR, --overwrite, --resume, --accelerator A, --devices D. "
        "--threads T sets torch's CPU threads (1 is fastest for small models on a busy CPU)."
    )


def run_task(task: Task, argv: Sequence[str], command: Sequence[str]) -> int:
    """Parse, fit, test and write ``results.json`` for ``task``; the exit code.

    Args:
        task: the task's contract.
        argv: LightningCLI arguments (shortcuts already translated).
        command: the command line as the user gave it (recorded in ``results.json``).

    Raises:
        UserError: for a bad norm, dataset, init value or a setting the data cannot serve, or an
            ``--output`` that holds another run (:func:`~tasks.runner.folders.claim_output`). A
            run that stops on one removes what it created in ``--output`` unless it saved a
            checkpoint.
    """
    start = time.perf_counter()
    check_config_files(argv)
    claims: list[tuple[Path, list[str] | None]] = []
    try:
        return _run(task, argv, command, start, claims)
    except UserError:
        for root, kept in claims:
            discard(root, kept)
        raise


def _run(
    task: Task,
    argv: Sequence[str],
    command: Sequence[str],
    start: float,
    claims: list[tuple[Path, list[str] | None]],
) -> int:
    from bgn_lightning import available_norms
    from tasks.common.images import POLICY
    from tasks.common.results import results_record, write_results

    from .task_cli import TaskCLI

    config = default_config(task)
    description = (
        f"{PROG} {task.name}: fit, test the best checkpoint, write <output>/results.json. "
        f"Norms: {', '.join(available_norms())}. Metrics: {', '.join(m.name for m in task.metrics)}. "
    )
    cli = TaskCLI(
        task,
        claims=claims,
        model_class=task.model_class,
        datamodule_class=task.datamodule_class,
        args=list(argv),
        run=False,
        parser_kwargs={
            "exit_on_error": False,
            "allow_abbrev": False,  # --model.trade_of is a typo, not --model.trade_off
            "prog": f"{PROG} {task.name}",
            "description": description + _shortcut_help(),
            "default_config_files": [str(config)] if config else [],
        },
        save_config_kwargs={"overwrite": True},
    )
    run = Run(task, cli)
    if run.config.get("optimizer") is not None:
        log.info("%s %s: --optimizer replaces the task's optimizer and learning-rate rule", PROG, task.name)
    if task.run is not None:
        task.run(run)
    else:
        run.metrics = run.fit_and_test(run.model, run.trainer)
    extra = task.extra_results(run) if task.extra_results is not None else {}
    extra = {"images": POLICY.record(), "bgn_kernels": _kernel_path(run.model), **extra}
    if run.trainer.is_global_zero:
        stage = run.options.get("stage")
        declared = [m for m in task.metrics if not m.stages or stage in m.stages]
        missing = [m.name for m in declared if m.name not in run.metrics]
        if missing:
            log.warning("%s %s: the run did not log %s (declared by the task)", PROG, task.name, missing)
        swap = _norm_swap(run.trainer)
        if swap is not None:  # the norm that ran is the swapped-in one; the config's is the source
            extra = {"norm_swap": {"from": run.config["model"].get("norm"), "to": swap.norm,
                                   "kwargs": swap.kwargs, "replaced": dict(swap.swapped)}, **extra}
        record = results_record(
            task=task.name,
            norm=swap.norm if swap is not None else run.norm,
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
            distributed=_distributed(run.trainer, run.config),
        )
        path = write_results(run.output, record)
        shown = ", ".join(
            f"{m.name}={run.metrics[m.name]:.4f}" for m in task.metrics if m.name in run.metrics
        )
        log.info("%s %s: %s (%.1f s) -> %s", PROG, task.name, shown, record["wall_time_s"], path)
    return 0
