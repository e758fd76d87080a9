"""Progress lines when stdout is not a terminal (cluster jobs, ``> log``): epoch, step, loss, rate, ETA."""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.common.progress import LogProgress, format_duration
from tasks.runner import task_cli


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_log_progress_writes_a_line_every_n_steps(caplog) -> None:
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 2, (20,))), batch_size=4)
    progress = LogProgress(every_n_steps=2, every_s=3600)
    trainer = pl.Trainer(max_epochs=2, callbacks=[progress], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tasks"):
        trainer.fit(_Tiny(), loader, loader)
        trainer.validate(_Tiny(), loader, verbose=False)  # after fit: not "train epoch 3/2"
        trainer.test(_Tiny(), loader, verbose=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks"]
    train = [line for line in lines if line.startswith("train epoch")]
    assert re.fullmatch(r"train epoch 1/2 step 2/5: loss \d\.\d{4}, [\d.]+ (it/s|s/it), ETA \S+", train[0])
    assert [line.split(":")[0].removeprefix("train epoch ") for line in train] == [
        "1/2 step 2/5", "1/2 step 4/5", "1/2 step 5/5", "1/2 done",
        "2/2 step 2/5", "2/2 step 4/5", "2/2 step 5/5", "2/2 done",
    ]  # fmt: skip
    assert "ETA" not in train[2] and train[3].startswith("train epoch 1/2 done: val/acc=")
    validated = [line.split("=")[0] for line in lines if line.startswith("validate done")]
    assert validated == ["validate done: val/acc"]
    test = [line.split(":")[0] for line in lines if line.startswith("test")]
    assert test == ["test step 2/5", "test step 4/5"]


def test_the_runner_logs_progress_lines_when_stdout_is_not_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(task_cli._progress_bar(), LogProgress)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert type(task_cli._progress_bar()).__name__ == "ProgressBar"  # Lightning's rich bar, on a terminal


@pytest.mark.parametrize(("seconds", "shown"), [(4.4, "4s"), (65, "1m05s"), (3725, "1h02m")])
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
