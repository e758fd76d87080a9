"""The classification LightningModule: a registry-norm backbone, SGD with the linear-scaling rule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor

from tasks.common.backbones import build_backbone
from tasks.common.metrics import classification_metrics
from tasks.common.norms import norm_factory
from tasks.common.optim import SGDSettings
from tasks.common.settings import SettingsCheckpoints

__all__ = ["ClassificationModule"]


class ClassificationModule(SettingsCheckpoints, pl.LightningModule):
    """Image classifier whose every norm layer is the registry norm ``norm``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_top5``,
    ``test/loss``, ``test/acc``, ``test/acc_top5`` per epoch (accuracies as fractions, via
    torchmetrics).

    **Learning-rate rule** (Goyal et al. 2017, as in the GN and BGN papers; the ``sgd`` settings
    group, config keys ``model.sgd.*``): SGD with momentum;
    the rate is ``lr * B / base_batch_size`` where ``B`` is the global batch size (per-device
    batch x devices x gradient accumulation), ramped up linearly over the first
    ``warmup_epochs`` epochs (per optimizer step), then decayed by ``lr_schedule`` (``cosine``
    to 0, or ``multistep``: x ``gamma`` at each fraction of training in ``milestones``). Weight
    decay applies to conv and linear weights, not to norm affines and biases.

    Args:
        norm: registry norm name for every norm layer.
        groups: ``num_groups`` for every norm layer (int or ``"auto"``).
        backbone: a :func:`tasks.common.backbones.available_backbones` name.
        num_classes: classifier outputs (the CLI links it from the DataModule).
        in_channels: input channels (the CLI links it from the DataModule).
        sgd: the SGD + linear-rule settings (:class:`tasks.common.optim.SGDSettings`: ``lr``,
            ``base_batch_size``, ``warmup_epochs``, ``lr_schedule``...), held as :attr:`sgd`.
        label_smoothing: cross-entropy label smoothing.
        norm_kwargs: extra keyword arguments for every norm layer (e.g. ``momentum``).
    """

    def __init__(
        self,
        norm: str = "bgn",
        groups: int | str = "auto",
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        sgd: SGDSettings = SGDSettings(),
        label_smoothing: float = 0.0,
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_factory(norm, groups, norm_kwargs)
        self.sgd = sgd
        self.save_hyperparameters()
        self.net = build_backbone(backbone, num_classes, in_channels, norm_layer)
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(y))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch (batch statistics in the norm layers)."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracies on one validation batch."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracies on one test batch."""
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD on the linearly scaled rate with a per-step warm-up + decay schedule."""
        return self.sgd.configure(self)
