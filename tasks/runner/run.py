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
from typing import TYPE_CHECKING, Any, Literal

from .errors import UsageError

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    from tasks.common.contract import Task

__all__ = ["Run", "claim_output", "default_config", "did_you_mean", "run_task"]

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


_BENCH_FILES = frozenset({"bench_args.json", "run.log"})
"""What ``bgn-task bench`` writes into a cell before its run starts (its own rules keep cells apart)."""


def _run_entries(root: Path) -> list[str]:
    """The entries of ``root`` a run (or anything else) put there, leaving out the bench's own files."""
    return sorted(p.name for p in root.iterdir() if p.name not in _BENCH_FILES) if root.is_dir() else []


def _last_checkpoint(root: Path) -> Path | None:
    """``<root>/checkpoints/last.ckpt`` if there, else the newest ``*.ckpt`` there; ``None``: none."""
    last = root / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    found = sorted((root / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def claim_output(root: Path, *, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Make sure a run may write into ``root``; the checkpoint to resume from with ``resume``.

    A run never writes into a folder that holds another run: ``root`` must not exist, be empty or
    hold only what ``bgn-task bench`` puts into its cells (``bench_args.json``, ``run.log``).
    ``overwrite`` moves a held folder aside to ``<root>.previous-<time>`` first; ``resume``
    continues an unfinished run (no ``results.json``) from its own ``<root>/checkpoints``.

    Raises:
        UsageError: naming the folder, what it holds and the way out.
    """
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output {root}: exists and is not a folder; choose another --output")
    held = _run_entries(root)
    if resume:
        if overwrite:
            raise UsageError(
                "--resume continues the run in --output and --overwrite moves it aside: pass one"
            )
        if (root / "results.json").is_file():
            raise UsageError(
                f"--resume: {root} holds a finished run (results.json); --overwrite runs it anew"
            )
        checkpoint = _last_checkpoint(root)
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint in {root / 'checkpoints'} to continue from")
        return checkpoint
    if not held:
        return None
    if overwrite:
        if Path.cwd().resolve().is_relative_to(root.resolve()):
            raise UsageError(
                f"--overwrite: {root} is (or holds) the working directory; choose another --output"
            )
        base = root.with_name(f"{root.name}.previous-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        aside, k = base, 1
        while aside.exists():
            k += 1
            aside = base.with_name(f"{base.name}-{k}")
        root.rename(aside)
        log.info("%s: moved the earlier run in %s aside to %s", PROG, root, aside)
        return None
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    how = "--overwrite moves it aside"
    if not (root / "results.json").is_file() and _last_checkpoint(root) is not None:
        how += ", --resume continues it from its last checkpoint"
    raise UsageError(f"--output {root} already holds a run ({shown}); {how}, or choose a fresh --output")


def _discard(root: Path, kept: Sequence[str] | None) -> None:
    """Remove what a run that stopped on a usage error created in ``root``: all but ``kept``.

    ``kept`` is ``None`` when the run created ``root`` itself: then an emptied ``root`` goes too.
    """
    import shutil

    if not root.is_dir() or _last_checkpoint(root) is not None:
        return  # trained weights are never thrown away
    for name in _run_entries(root):
        if name not in (kept or ()):
            path = root / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if kept is None and not any(root.iterdir()):
        root.rmdir()


def did_you_mean(message: str, options: Sequence[str]) -> str:
    """``"; did you mean --model.trade_off?"`` for the unrecognized arguments named in ``message``.

    ``options``: the names the parser knows. ``""`` when ``message`` names no unrecognized
    argument or none is close to a known one.
    """
    import difflib

    if "nrecognized arguments:" not in message:
        return ""
    known = sorted(set(options))
    given = message.split("nrecognized arguments:", 1)[1].split()
    close = [
        (flag, match[0])
        for flag in (arg.split("=", 1)[0] for arg in given if arg.startswith("--"))
        if (match := difflib.get_close_matches(flag, known, n=1, cutoff=0.75))
    ]
    if len(close) == 1:
        return f"; did you mean {close[0][1]}?"
    return f"; did you mean {', '.join(f'{m} for {f}' for f, m in close)}?" if close else ""


def _make_cli_class(task: Task, claims: list[tuple[Path, list[str] | None]]) -> type:
    """A LightningCLI subclass for ``task`` (built lazily: importing Lightning is slow).

    Once the output folder is claimed (:func:`claim_output`), ``(folder, entries it held)`` (``None``
    when it did not exist) is appended to ``claims``, so a run that stops on a usage error can
    remove what it created.
    """
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_only

    from tasks.common.images import POLICY

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
            parser.add_argument(
                "--bad_images",
                type=Literal["stop", "skip"],
                default="stop",
                help="an image file that cannot be read: stop the run with one line naming it (exit 2), or "
                "skip: leave every bad file out (one warning each; listed in results.json) "
                "(shortcut --bad-images)",
            )
            parser.add_argument(
                "--check_data",
                type=bool,
                default=False,
                help="decode every file of an image-folder dataset before training, so a bad one is found "
                "at set-up, not when first drawn (shortcut --check-data; --bad-images skip implies it)",
            )
            parser.add_argument(
                "--overwrite",
                type=bool,
                default=False,
                help="when --output holds an earlier run, move it aside to <output>.previous-<time> first "
                "(without it, such a run is refused)",
            )
            parser.add_argument(
                "--resume",
                type=bool,
                default=False,
                help="continue the unfinished run in --output from its last checkpoint "
                "(<output>/checkpoints): same command plus --resume",
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
                from .cli import FLAG_SHORTCUTS, SHORTCUTS

                shortcuts = [*SHORTCUTS, *FLAG_SHORTCUTS, *task.shortcuts, *task.flags]
                hint = did_you_mean(message, [*parser._option_string_actions, *shortcuts])
                raise UsageError(f"{message}{hint} ('{PROG} {task.name} --help' lists the options)") from err
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
            POLICY.set(cfg.bad_images, cfg.check_data)
            root = Path(cfg.trainer.default_root_dir)
            if rank_zero_only.rank == 0:
                self.resume_from = claim_output(root, overwrite=cfg.overwrite, resume=cfg.resume)
                claims.append((root, _run_entries(root) if root.exists() else None))
            else:  # a DDP process Lightning launched: rank 0 claimed the folder
                self.resume_from = _last_checkpoint(root) if cfg.resume else None

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError) as err:  # a bad init value, a missing dataset
                raise UsageError(str(err).splitlines()[0], debug_hint=True) from err

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar

            root = Path(self.config.trainer.default_root_dir)
            init = self.config_init.trainer
            if init.get("logger") in (None, True):
                kwargs["logger"] = _loggers(root, resumed=self.resume_from is not None)
            if self.config.get("sync_norm"):
                kwargs["plugins"] = [*_as_list(init.get("plugins")), _sync_plugin(init)]
            callbacks = init.get("callbacks") or []
            if init.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                init["callbacks"] = callbacks = [*callbacks, _progress_bar()]
            if init.get("enable_model_summary") is not False and not any(
                isinstance(c, ModelSummary) for c in callbacks
            ):
                rich = any(isinstance(c, RichProgressBar) for c in callbacks)
                init["callbacks"] = [*callbacks, _late_summary(rich)]
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
    """On a terminal, Lightning's rich progress bar without ``v_num`` (which showed the logger dir's
    tail, "oard"); otherwise (a cluster job, ``> log``) a progress line every 50 steps or 30 s
    (:class:`~tasks.common.progress.LogProgress`)."""
    import sys

    from lightning.pytorch.callbacks import RichProgressBar

    from tasks.common.progress import LogProgress

    if not sys.stdout.isatty():
        return LogProgress()

    class ProgressBar(RichProgressBar):
        def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return ProgressBar()


def _late_summary(rich: bool) -> Any:
    """Lightning's model summary (rich with the rich bar), shown after the sanity check instead of
    before it, so an error of the first forward (a ``--groups`` that does not fit) comes first."""
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

    class LateSummary(RichModelSummary if rich else ModelSummary):  # type: ignore[misc]
        def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            pass

        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            super().on_fit_start(trainer, pl_module)

    return LateSummary()


def _loggers(root: Path, resumed: bool = False) -> list[Any]:
    """CSV and TensorBoard loggers writing ``<root>/csv`` and ``<root>/tensorboard``.

    A resumed run logs its CSV to ``<root>/csv-resume<k>``: Lightning's CSV logger would delete
    the interrupted part's ``metrics.csv``. TensorBoard adds an event file beside the earlier ones.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv, k = "csv", 1
    while resumed and (root / csv).exists():
        csv, k = f"csv-resume{k}", k + 1
    return [CSVLogger(root, name="", version=csv), TensorBoardLogger(root, name="", version="tensorboard")]


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
        if trainer.world_size > 1 and trainer.is_global_zero:
            synced = self.config.get("sync_norm")
            hint = "" if synced else " (--sync-norm pools BGN's statistics over all of them)"
            how = "synchronised" if synced else "per device"
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


def _print_table(metrics: dict[str, float]) -> None:
    """The test metrics, one table (Lightning's repeats every metric under each test dataloader)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("Test metric", "Value")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


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


def _last_line(err: Exception) -> str:
    """An error's message; from a DataLoader worker (the worker's traceback first), its last line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err)
    name = f"{type(err).__module__}.{type(err).__name__}: "
    return lines[-1].removeprefix(name)


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
        UsageError: for a bad norm, dataset, init value or a setting the data cannot serve, or an
            ``--output`` that holds another run (:func:`claim_output`). A run that stops on one
            removes what it created in ``--output`` unless it saved a checkpoint.
    """
    start = time.perf_counter()
    check_config_files(argv)
    claims: list[tuple[Path, list[str] | None]] = []
    try:
        return _run(task, argv, command, start, claims)
    except UsageError:
        for root, kept in claims:
            _discard(root, kept)
        raise


def _run(
    task: Task,
    argv: Sequence[str],
    command: Sequence[str],
    start: float,
    claims: list[tuple[Path, list[str] | None]],
) -> int:
    from bgn_lightning import available_norms
    from tasks.common.errors import DatasetNotFoundError, TaskConfigError
    from tasks.common.images import POLICY
    from tasks.common.results import results_record, write_results

    config = default_config(task)
    description = (
        f"{PROG} {task.name}: fit, test the best checkpoint, write <output>/results.json. "
        f"Norms: {', '.join(available_norms())}. Metrics: {', '.join(m.name for m in task.metrics)}. "
    )
    cli = _make_cli_class(task, claims)(
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
    try:
        if task.run is not None:
            task.run(run)
        else:
            run.metrics = run.fit_and_test(run.model, run.trainer)
    except (DatasetNotFoundError, TaskConfigError) as err:
        raise UsageError(_last_line(err)) from err
    extra = task.extra_results(run) if task.extra_results is not None else {}
    extra = {"images": POLICY.record(), "bgn_kernels": _kernel_path(run.model), **extra}
    if run.trainer.is_global_zero:
        stage = run.config["model"].get("stage")
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
        )
        path = write_results(run.output, record)
        shown = ", ".join(
            f"{m.name}={run.metrics[m.name]:.4f}" for m in task.metrics if m.name in run.metrics
        )
        log.info("%s %s: %s (%.1f s) -> %s", PROG, task.name, shown, record["wall_time_s"], path)
    return 0
