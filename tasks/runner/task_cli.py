"""The LightningCLI of a ``bgn-task <task>`` run (:class:`TaskCLI`) and the trainer it builds.

:mod:`tasks.runner.run` builds one :class:`TaskCLI` per run (``run=False``) and drives its model,
DataModule and Trainer. Subclass it to change how a run is parsed or its trainer is set up.
Imports Lightning: import it lazily from code that must stay cheap to import.
"""

from __future__ import annotations

import sys
from argparse import SUPPRESS
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from tasks.common.errors import UsageError, UserError
from tasks.common.images import POLICY
from tasks.common.progress import LogProgress
from tasks.common.validate import check_int

from . import PROG
from .checks import check_config, check_norm_batch_size, check_options, did_you_mean
from .folders import claim_output, last_checkpoint, run_entries
from .shortcuts import FLAG_SHORTCUTS, SHORTCUTS, log_moved

if TYPE_CHECKING:
    from tasks.common.contract import Task
    from tasks.common.settings import MovedKey

__all__ = ["LateRichSummary", "LateSummary", "ProgressBar", "TaskCLI", "TaskParser", "loggers"]


class TaskParser(LightningArgumentParser):
    """LightningCLI's parser, reading a config file's moved keys at their new places.

    :attr:`moved` (the task's :attr:`~tasks.common.contract.Task.moved_keys`) are parser
    arguments of their own, hidden from ``--help`` and from every dump (``--print_config``, the
    saved ``config.yaml``, ``results.json``): a bad value is named by the key the file wrote. As
    each config file is loaded (the task's default config, each ``--config``), its old keys move
    to their new places, unless the file sets those too; a later file or flag still overrides an
    earlier one, whichever place it writes; a group's own file (``--model FILE``) likewise. One log
    line per file names what moved. Relies on jsonargparse (4.53) loading every config file's
    content through ``_load_config_parser_mode`` and a group's file through ``_apply_actions`` with
    the group as ``parent_key`` (``tests/test_settings.py`` checks both: files with flat keys run
    and print as nested).
    """

    moved: tuple[MovedKey, ...] = ()
    """The keys to move (set by :meth:`TaskCLI.add_arguments_to_parser`)."""

    def _load_config_parser_mode(self, content: str, path: Any = "", *args: Any, **kwargs: Any) -> Namespace:
        cfg = super()._load_config_parser_mode(content, path, *args, **kwargs)
        return self._move(cfg, "", str(path) or "a config file")

    def _apply_actions(self, cfg: Namespace | dict[str, Any], parent_key: str = "", *args: Any,
                       **kwargs: Any) -> Namespace:
        # A group's own config file (``--model FILE``) is loaded here, its keys relative to the group.
        if parent_key and any(m.old.startswith(f"{parent_key}.") for m in self.moved):
            cfg = self._move(Namespace(cfg) if isinstance(cfg, dict) else cfg, f"{parent_key}.",
                             f"--{parent_key} FILE")
        return super()._apply_actions(cfg, parent_key, *args, **kwargs)

    def _move(self, cfg: Namespace, prefix: str, where: str) -> Namespace:
        """``cfg`` (keys relative to ``prefix``) with its old keys at their new places, unless it
        sets those too; one log line names what moved."""
        read = []
        for moved in self.moved:
            if not moved.old.startswith(prefix) or not moved.new.startswith(prefix):
                continue
            old, new = moved.old[len(prefix):], moved.new[len(prefix):]
            if old in cfg:
                value = cfg.pop(old)
                if new not in cfg:
                    cfg[new] = value
                read.append((moved.old, moved.new))
        log_moved(read, where)
        return cfg


class TaskCLI(LightningCLI):
    """LightningCLI for one task: its links, the runner's options and early checks, the default
    output folder (claimed, :func:`~tasks.runner.folders.claim_output`), loggers and progress.

    Like any LightningCLI it parses (and, with ``run=False``, instantiates) in ``__init__``.

    Args:
        task: the task's contract.
        *args: LightningCLI's arguments (``model_class``, ``datamodule_class``...).
        claims: once the output folder is claimed, ``(folder, entries it held)`` (``None`` when it
            did not exist) is appended, so a run that stops on a user error can remove what it
            created (:func:`~tasks.runner.folders.discard`).
        **kwargs: LightningCLI's keyword arguments.
    """

    def __init__(
        self, task: Task, *args: Any, claims: list[tuple[Path, list[str] | None]] | None = None, **kwargs: Any
    ) -> None:
        self.task = task
        self.claims = [] if claims is None else claims
        self.resume_from: Path | None = None
        kwargs.setdefault("parser_class", TaskParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The runner's own options (``--threads``, ``--sync_norm``, ``--bad_images``...) and the
        task's argument links."""
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
            "--norm_batch_size",
            type=int | None,
            default=None,
            help="ghost batches: in training, every norm with batch statistics (bn, bgn) normalises each "
            "run of this many samples with their own statistics, as that many images per device "
            "would without --sync-norm; the optimiser (and its learning rate) still uses --batch-size "
            "(shortcut --norm-batch-size; null: the whole batch)",
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
        for option in self.task.options:
            shortcut = f" (shortcut {option.flag})" if option.flag != option.argument else ""
            parser.add_argument(option.argument, type=option.type, default=option.default,
                                help=f"{option.help}{shortcut}")  # fmt: skip
        for moved in self.task.moved_keys:  # read from config files at the old place: TaskParser
            parser.add_argument(f"--{moved.old}", type=moved.type, default=SUPPRESS, help=SUPPRESS)
        if isinstance(parser, TaskParser):
            parser.moved = self.task.moved_keys
        for source, target in self.task.links:
            parser.link_arguments(source, target, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (not ``sys.argv``); a parse error or a bad early value is one line.

        Raises:
            UserError: naming the bad argument (with a "did you mean" hint for a typo).
        """
        task = self.task
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:  # unknown key, bad type, ...: the message, not the usage
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            shortcuts = [*SHORTCUTS, *FLAG_SHORTCUTS, *task.all_shortcuts, *task.all_flags]
            hint = did_you_mean(message, [*parser._option_string_actions, *shortcuts])
            raise UsageError(f"{message}{hint} ('{PROG} {task.name} --help' lists the options)") from err
        check_config(self.config, getattr(task.datamodule_class, "DATASETS", None))
        check_norm_batch_size(self.config, getattr(task.datamodule_class, "BATCH_OF_SAMPLES", True))
        check_options(task, self.config)

    def before_instantiate_classes(self) -> None:
        """Apply ``--threads`` and ``--bad_images``, default and claim the output folder."""
        cfg = self.config
        if cfg.get("threads") is not None:
            check_int("--threads", cfg.threads, expected="a positive int or null")
            torch.set_num_threads(cfg.threads)
        if cfg.trainer.get("default_root_dir") is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            name = (
                f"{stamp}-{cfg.model.get('norm')}-bs{cfg.data.get('batch_size')}"
                f"-seed{cfg.get('seed_everything')}"
            )
            cfg.trainer.default_root_dir = str(Path("outputs") / self.task.name / name)
        POLICY.set(cfg.bad_images, cfg.check_data)
        root = Path(cfg.trainer.default_root_dir)
        if rank_zero_only.rank == 0:
            self.resume_from = claim_output(root, overwrite=cfg.overwrite, resume=cfg.resume)
            self.claims.append((root, run_entries(root) if root.exists() else None))
        else:  # a DDP process Lightning launched: rank 0 claimed the folder
            self.resume_from = last_checkpoint(root) if cfg.resume else None

    def instantiate_classes(self) -> None:
        """Build model, DataModule and trainer; a bad init value (a ``ValueError``) or a missing
        file is a :class:`UsageError` whose line points at ``--debug``; any other error is a bug."""
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except (ValueError, FileNotFoundError) as err:  # a bad init value, a missing file
            raise UsageError(str(err).splitlines()[0], debug_hint=True) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the run's loggers, the BGN sync plugin when asked, a progress bar (or
        progress lines) and the late model summary; checkpoints go under ``<output>/checkpoints``."""
        root = Path(self.config.trainer.default_root_dir)
        init = self.config_init.trainer
        if init.get("logger") in (None, True):
            kwargs["logger"] = loggers(root, resumed=self.resume_from is not None)
        if self.config.get("sync_norm"):
            kwargs["plugins"] = [*_as_list(init.get("plugins")), _sync_plugin(init)]
        callbacks = init.get("callbacks") or []
        if init.get("enable_progress_bar") is not False and not any(
            isinstance(c, LightningProgressBar) for c in callbacks
        ):
            init["callbacks"] = callbacks = [*callbacks, _progress_bar()]
        if init.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            rich = any(isinstance(c, RichProgressBar) for c in callbacks)
            init["callbacks"] = [*callbacks, LateRichSummary() if rich else LateSummary()]
        trainer = super().instantiate_trainer(**kwargs)
        _checkpoints_under(trainer, root)
        return trainer


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _sync_plugin(trainer_init: Any) -> Any:
    """``BGNSync``, also converting BatchNorm when the run is on GPUs (torch's SyncBatchNorm is CUDA-only)."""
    from bgn_lightning import BGNSync

    on_gpu = trainer_init.get("accelerator") in ("gpu", "cuda") or (
        trainer_init.get("accelerator") in (None, "auto") and torch.cuda.is_available()
    )
    return BGNSync(batchnorm=on_gpu)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num`` (which showed the logger dir's tail, "oard")."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The bar's metrics, less ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def _progress_bar() -> LightningProgressBar:
    """On a terminal, :class:`ProgressBar`; otherwise (a cluster job, ``> log``) a progress line every
    50 steps or 30 s (:class:`~tasks.common.progress.LogProgress`)."""
    return ProgressBar() if sys.stdout.isatty() else LogProgress()


class _ShownLate:
    """Shows Lightning's model summary after the sanity check instead of before it, so an error of
    the first forward (a ``--groups`` that does not fit) comes first."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing yet: the summary waits for training."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Show the summary (what the summary class does at fit start)."""
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]


class LateSummary(_ShownLate, ModelSummary):
    """Lightning's model summary, shown when training starts."""


class LateRichSummary(_ShownLate, RichModelSummary):
    """Lightning's rich model summary (beside the rich bar), shown when training starts."""


def loggers(root: Path, resumed: bool = False) -> list[Any]:
    """CSV and TensorBoard loggers writing ``<root>/csv`` and ``<root>/tensorboard``.

    A resumed run logs its CSV to ``<root>/csv-resume<k>``: Lightning's CSV logger would delete
    the interrupted part's ``metrics.csv``. TensorBoard adds an event file beside the earlier ones.
    """
    csv, k = "csv", 1
    while resumed and (root / csv).exists():
        csv, k = f"csv-resume{k}", k + 1
    return [CSVLogger(root, name="", version=csv), TensorBoardLogger(root, name="", version="tensorboard")]


def _checkpoints_under(trainer: Trainer, root: Path) -> None:
    """``<root>/checkpoints``, not a logger's directory, for checkpoint callbacks without a dirpath."""
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(root / "checkpoints")
