"""Progress as log lines, for runs whose output goes to a file (a cluster job, ``> log``).

Lightning's progress bars redraw one line of a terminal; written to a file they show nothing for
minutes (Rich) or fill it with carriage returns (tqdm). :class:`LogProgress` is a Lightning
:class:`~lightning.pytorch.callbacks.ProgressBar` that logs one plain line every ``every_n_steps``
batches or ``every_s`` seconds, whichever comes first, and one at the end of each epoch::

    train epoch 2/20 step 40/55: loss 0.4312, 12.3 it/s, ETA 1m32s
    test step 10/40: 3.1 it/s, ETA 10s

``bgn-task`` uses it instead of the bar when stdout is not a terminal.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from .validate import check_int

__all__ = ["LogProgress", "format_duration"]

log = logging.getLogger("tasks")


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LogProgress(ProgressBar):
    """A progress line every ``every_n_steps`` batches or ``every_s`` seconds (epoch, step, loss, rate, ETA).

    Args:
        every_n_steps: log at least every this many batches.
        every_s: log at least every this many seconds.
    """

    def __init__(self, every_n_steps: int = 50, every_s: float = 30.0) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, owner="LogProgress")
        if every_s <= 0:
            raise ValueError(f"LogProgress: every_s must be > 0, got {every_s!r}")
        self.every_n_steps = every_n_steps
        self.every_s = every_s
        self._enabled = True
        self._clocks: dict[str, list[float]] = {}  # stage -> [start, last line, batches done]

    def disable(self) -> None:
        """Log nothing (Lightning calls this on ranks other than zero)."""
        self._enabled = False

    def enable(self) -> None:
        """Log again."""
        self._enabled = True

    def _begin(self, stage: str) -> None:
        now = time.monotonic()
        self._clocks[stage] = [now, now, 0]

    def _step(
        self, stage: str, batch_idx: int, total: int | float, loss: float | None, final: bool = False
    ) -> None:
        clock = self._clocks.setdefault(stage, [time.monotonic(), time.monotonic(), 0])
        clock[2] += 1
        now = time.monotonic()
        due = final or (batch_idx + 1) % self.every_n_steps == 0 or now - clock[1] >= self.every_s
        if not (self._enabled and due):
            return
        clock[1] = now
        rate = clock[2] / max(now - clock[0], 1e-9)
        parts = [f"loss {loss:.4f}"] if loss is not None else []
        parts.append(f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
        remaining = self._remaining(stage, batch_idx, total)
        if remaining is not None and not final:
            parts.append(f"ETA {format_duration(remaining / rate)}")
        shown = f"{batch_idx + 1}/{total}" if math.isfinite(total) else f"{batch_idx + 1}"
        log.info("%s step %s: %s", self._where(stage), shown, ", ".join(parts))

    def _where(self, stage: str) -> str:
        if stage != "train":
            return stage
        epochs = self.trainer.max_epochs
        of = f"/{epochs}" if epochs is not None and epochs > 0 else ""
        return f"train epoch {self.trainer.current_epoch + 1}{of}"

    def _remaining(self, stage: str, batch_idx: int, total: int | float) -> float | None:
        """Batches left in this stage (for training: this epoch and the epochs after it)."""
        if not math.isfinite(total):
            return None
        left = total - batch_idx - 1
        epochs = self.trainer.max_epochs
        if stage == "train" and epochs is not None and epochs > 0:
            left += (epochs - self.trainer.current_epoch - 1) * total
        return left

    @staticmethod
    def _loss(outputs: Any, trainer: pl.Trainer) -> float | None:
        if isinstance(outputs, Mapping):
            outputs = outputs.get("loss")
        if isinstance(outputs, Tensor) and outputs.numel() == 1:
            return float(outputs)
        metrics = trainer.progress_bar_metrics
        key = next((k for k in metrics if "loss" in k), None)
        return float(metrics[key]) if key is not None else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._begin("train")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """A line every ``every_n_steps`` batches or ``every_s`` seconds, and at the epoch's last batch."""
        total = self.total_train_batches
        self._step("train", batch_idx, total, self._loss(outputs, trainer), final=batch_idx + 1 == total)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the validation clock."""
        self.reset_dataloader_idx_tracker()
        self._begin("validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """A line every ``every_n_steps`` batches or ``every_s`` seconds (not in the sanity check)."""
        if not trainer.sanity_checking:
            self.has_dataloader_changed(dataloader_idx)
            self._step("validate", batch_idx, self.total_val_batches_current_dataloader, None)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The validation metrics, in one line: named after the training epoch during ``fit``, plain
        ``validate`` in ``trainer.validate`` (which runs after fit, past the last epoch)."""
        if trainer.sanity_checking or not self._enabled:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if shown:
            values = ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
            where = self._where("train") if trainer.state.fn == TrainerFn.FITTING else "validate"
            log.info("%s done: %s", where, values)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the test clock."""
        self.reset_dataloader_idx_tracker()
        self._begin("test")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """A line every ``every_n_steps`` batches or ``every_s`` seconds."""
        self.has_dataloader_changed(dataloader_idx)
        self._step("test", batch_idx, self.total_test_batches_current_dataloader, None)
