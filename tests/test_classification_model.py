"""ClassificationModule: registry norms, the linear-scaling + warm-up rule, checkpoint round trip."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from bgn_lightning import BatchGroupNorm2d, is_norm_layer
from tasks.classification import TASK
from tasks.classification.model import ClassificationModule
from tasks.common.optim import SGDSettings
from tasks.common.vision import VisionDataModule


class LrTrace(pl.Callback):
    """Learning rate seen by each optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(model: ClassificationModule, batch_size: int, **trainer_kwargs) -> tuple[pl.Trainer, LrTrace]:
    trace = LrTrace()
    kwargs = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1} | trainer_kwargs
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[trace], **kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=VisionDataModule("digits", batch_size=batch_size))
    return trainer, trace


def test_task_contract_exports() -> None:
    assert TASK.model_class is ClassificationModule and TASK.datamodule_class is VisionDataModule
    dm = VisionDataModule("digits")
    for source, target in TASK.links:
        assert hasattr(dm, source.split(".", 1)[1]) and target.startswith("model.")


@pytest.mark.parametrize("norm", ["bn", "bgn", "gn", "ln", "in", "pn", "none"])
def test_every_registry_norm_builds_the_backbone(norm: str) -> None:
    model = ClassificationModule(norm=norm, num_classes=10, in_channels=1)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert (len(norms) == 0) == (norm == "none")
    assert norm == "bn" or not any(isinstance(m, nn.BatchNorm2d) for m in norms)


def test_linear_scaling_with_linear_warmup(tmp_path) -> None:
    sgd = SGDSettings(lr=0.1, base_batch_size=32, warmup_epochs=1.0, lr_schedule="constant")
    model = ClassificationModule(norm="bgn", num_classes=10, in_channels=1, sgd=sgd)
    _, trace = _fit(model, batch_size=8, default_root_dir=tmp_path)
    peak = 0.1 * 8 / 32
    # 4 steps per epoch: the first epoch ramps linearly to the peak, the second stays there
    assert trace.lrs == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak, peak, peak, peak, peak])


def test_scaling_counts_gradient_accumulation_and_explicit_batch(tmp_path) -> None:
    model = ClassificationModule(norm="bn", num_classes=10, in_channels=1,
                                 sgd=SGDSettings(warmup_epochs=0, lr_schedule="constant"))  # fmt: skip
    _, trace = _fit(model, batch_size=4, accumulate_grad_batches=2, default_root_dir=tmp_path)
    assert trace.lrs[0] == pytest.approx(0.1 * 8 / 32)
    fixed = ClassificationModule(norm="bn", num_classes=10, in_channels=1, sgd=SGDSettings(
        warmup_epochs=0, lr_schedule="constant", global_batch_size=64))  # fmt: skip
    _, trace = _fit(fixed, batch_size=4, default_root_dir=tmp_path)
    assert trace.lrs[0] == pytest.approx(0.2)


def test_cosine_decays_to_zero_by_the_last_step(tmp_path) -> None:
    model = ClassificationModule(norm="gn", num_classes=10, in_channels=1, sgd=SGDSettings(warmup_epochs=0))
    trainer, trace = _fit(model, batch_size=8, max_epochs=3, default_root_dir=tmp_path)
    assert trace.lrs[0] == pytest.approx(0.025)
    assert all(a > b for a, b in zip(trace.lrs, trace.lrs[1:], strict=False))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_restores_auto_groups(tmp_path) -> None:
    model = ClassificationModule(norm="bgn", num_classes=10, in_channels=1)
    trainer, _ = _fit(model, batch_size=64, max_epochs=1, default_root_dir=tmp_path)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    groups = [m.num_groups for m in model.modules() if isinstance(m, BatchGroupNorm2d)]
    assert groups == [64, 64, 128, 128, 256]  # auto-G at batch 64: twice the channels
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    assert [m.num_groups for m in reloaded.modules() if isinstance(m, BatchGroupNorm2d)] == groups
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), model.eval()(x))


def test_bad_init_values() -> None:
    with pytest.raises(ValueError, match="groups must be a positive int or 'auto'"):
        ClassificationModule(groups="four")
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        ClassificationModule(sgd=SGDSettings(warmup_epochs=-1))


def test_the_sgd_settings_are_one_group_under_todays_keys() -> None:
    from tasks.adversarial import AdversarialModule

    sgd = SGDSettings(lr=0.05, warmup_epochs=0.5, lr_schedule="multistep", milestones=[0.5])
    model = ClassificationModule(sgd=sgd)
    assert model.sgd == SGDSettings.of(model.hparams) == SGDSettings(
        lr=0.05, warmup_epochs=0.5, lr_schedule="multistep", milestones=[0.5]
    )
    adversarial = AdversarialModule(sgd=SGDSettings(gamma=0.2))
    assert adversarial.sgd == SGDSettings(gamma=0.2), "the same group in both suites"
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        SGDSettings(warmup_epochs=-1)
