"""The UDA LightningModule: DANN (or its source-only baseline) with any registry norm."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from bgn_lightning import norm_mode
from tasks.common.backbones import build_backbone
from tasks.common.norms import norm_factory
from tasks.common.optim import param_groups, scaled_lr
from tasks.common.settings import SettingsCheckpoints, SettingsGroup
from tasks.common.training import global_batch_size
from tasks.common.validate import check_choice, check_int

from .dann import (
    DomainDiscriminator,
    adapt_norm_statistics,
    annealed_lr_factor,
    domain_probe_accuracy,
    grad_reverse,
    grl_coefficient,
    norm_statistics,
)

__all__ = ["DOMAIN_MODES", "METHODS", "DANNModule", "DannSGDSettings"]

log = logging.getLogger(__name__)

METHODS = ("dann", "source_only")
DOMAIN_MODES = ("joint", "separate")
TARGET, SOURCE = 0, 1  # test dataloader indices, and the discriminator's domain labels (source = 1)


@dataclass(frozen=True)
class DannSGDSettings(SettingsGroup):
    """DANN's optimiser: SGD on the linearly scaled rate, annealed per step as ``(1 + alpha p)^-beta``.

    :class:`DANNModule`'s ``sgd`` argument (config keys ``model.sgd.lr``, ``model.sgd.lr_alpha``...,
    the same key as the other suites' SGD; the flat ``model.lr``... of earlier versions are still
    read, :mod:`tasks.common.settings`), held as :attr:`DANNModule.sgd`. Not
    :class:`tasks.common.optim.SGDSettings`: no warm-up and no cosine or step schedule, but DANN's
    annealing and a slower backbone. The loss's ``trade_off`` and the reversal's ``grl_gamma`` are
    the method's, not the optimiser's: they stay the model's own arguments.

    Attributes:
        lr: the heads' learning rate at ``base_batch_size`` (scaled linearly with the global batch size).
        base_batch_size: the batch size (per domain) ``lr`` is tuned for.
        global_batch_size: per-domain global batch of the scaling rule (``None``: from the trainer).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty on conv and linear weights (not on norm affines and biases).
        lr_alpha: alpha of the rate's annealing ``(1 + alpha p)^-beta`` (10).
        lr_beta: beta of the annealing (0.75).
        backbone_lr_mult: the backbone's rate relative to the heads' (0.1 for a pretrained backbone,
            as in the reference library's Office-31 protocol).

    Raises:
        ValueError: ``backbone_lr_mult must be > 0``.
    """

    KEY = "sgd"

    lr: float = 0.01
    base_batch_size: int = 32
    global_batch_size: int | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    lr_alpha: float = 10.0
    lr_beta: float = 0.75
    backbone_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.backbone_lr_mult <= 0:
            raise ValueError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult!r}")


class DANNModule(SettingsCheckpoints, pl.LightningModule):
    """Domain-adversarial training (DANN, Ganin & Lempitsky 2015) with registry norms everywhere.

    A features-only backbone (``build_backbone(name, num_classes=0)``), an optional bottleneck
    (``Linear -> norm -> ReLU``), a linear label classifier and a :class:`~tasks.uda.dann.DomainDiscriminator`
    behind a gradient-reversal layer. The discriminator always reads the concatenation of the
    source and target features (one set of batch statistics for its norms, whatever
    ``domain_mode`` the feature extractor uses), so its norms cannot standardise the shift away.
    Per step the loss is ``CE(source) + trade_off * domain BCE``; the reversal coefficient warms up
    as ``λ = 2 / (1 + exp(-10 p)) - 1`` and the rate anneals as ``lr · (1 + 10 p)^-0.75`` (``p``:
    optimizer steps done / total; a per-step ``LambdaLR``; the ``sgd`` group,
    :class:`DannSGDSettings`). The target's labels never reach a step: its training loader serves
    images only.

    * ``method="source_only"``: the same network and budget trained on source batches alone
      (``domain_mode`` does not change its trunk's forward). Its discriminator is a *probe*: it
      learns, on the same steps, to tell detached eval-mode features of the two domains apart
      (``train/domain_acc``).
    * ``domain_mode="joint"``: one forward of the concatenated source + target batch (the
      reference library's way: the norms' batch statistics mix both domains);
      ``"separate"``: one forward per domain (domain-specific batch statistics).
    * ``adabn=True``: before testing, the running statistics of every norm layer (BN, BGN, any
      :func:`bgn_lightning.is_norm_layer` with running statistics) are re-estimated on the
      target's training images (AdaBN); the target is tested with them and the source with the
      trained ones.

    Test metrics: ``test/target_acc`` (target test set), ``test/source_acc`` (source test set),
    ``test/domain_acc`` (how separable the two test sets' features are, by a fresh probe:
    :func:`~tasks.uda.dann.domain_probe_accuracy`, trained and scored on held-out halves of the
    features the classifier reads, so neither the adversary's state nor any norm statistics of the
    discriminator enter it; 0.5 is domain-invariant features). All as fractions.

    Args:
        norm: registry norm of every norm layer.
        groups: ``num_groups`` of every norm layer (int or ``"auto"``).
        norm_kwargs: extra norm-layer arguments.
        method: ``dann`` or ``source_only``.
        domain_mode: ``joint`` or ``separate``.
        adabn: re-estimate the norm statistics on the target before testing.
        backbone: a :func:`tasks.common.backbones.available_backbones` name.
        num_classes: classes (the CLI links it from the DataModule).
        in_channels: input channels (linked from the DataModule).
        head_norm: registry norm of the bottleneck and the discriminator (``None``: ``norm``, with
            ``groups``); instance norm has no (N, C) variant, so ``--norm in`` needs one.
        bottleneck_dim: width of the bottleneck (0: the classifier reads the backbone's features).
        discriminator_hidden: width of the discriminator's hidden layers.
        trade_off: weight of the domain loss.
        grl_gamma: steepness of the reversal coefficient's warm start (10).
        backbone_weights: a state-dict file (e.g. torchvision's ImageNet ResNet-50) loaded into the
            backbone; tensors whose shape differs (a BGN layer's G running statistics, the classifier)
            are skipped and logged. ``None``: trained from scratch.
        sgd: the optimiser (:class:`DannSGDSettings`: ``lr``, ``base_batch_size``, ``lr_alpha``,
            ``backbone_lr_mult``...), held as :attr:`sgd`.
    """

    def __init__(
        self,
        norm: str = "bgn",
        groups: int | str = "auto",
        norm_kwargs: dict[str, Any] | None = None,
        method: str = "dann",
        domain_mode: str = "joint",
        adabn: bool = False,
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        head_norm: str | None = None,
        bottleneck_dim: int = 0,
        discriminator_hidden: int = 256,
        trade_off: float = 1.0,
        grl_gamma: float = 10.0,
        backbone_weights: str | None = None,
        sgd: DannSGDSettings = DannSGDSettings(),
    ) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        check_choice("domain mode", domain_mode, DOMAIN_MODES)
        check_int("num_classes", num_classes, minimum=2)
        check_int("bottleneck_dim", bottleneck_dim, minimum=0)
        check_int("discriminator_hidden", discriminator_hidden)
        if trade_off < 0:
            raise ValueError(f"trade_off must be >= 0, got {trade_off!r}")
        head = head_norm or norm
        if head == "in":
            raise ValueError(
                "head_norm 'in': instance norm normalises each channel over its positions and (N, C) "
                "features have none; set --model.head_norm (e.g. ln) for the bottleneck and discriminator"
            )
        self.sgd = sgd
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, 0, in_channels, norm_factory(norm, groups, norm_kwargs))
        if backbone_weights is not None:
            _load_matching(self.backbone, backbone_weights)
        head_layer = norm_factory(head, groups if head_norm is None else "auto", norm_kwargs, dim=1)
        width = bottleneck_dim or self.backbone.feature_dim
        self.bottleneck: nn.Module = nn.Identity()
        if bottleneck_dim:
            linear = nn.Linear(self.backbone.feature_dim, width)
            self.bottleneck = nn.Sequential(linear, head_layer(width), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(width, num_classes)
        self.discriminator = DomainDiscriminator(width, discriminator_hidden, head_layer)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_target_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_source_acc = MulticlassAccuracy(num_classes, average="micro")
        self._test_features: dict[int, list[Tensor]] = {}
        self._total_steps = 1
        self._stats: dict[int, dict[str, Tensor]] = {}
        self._stats_in_use: int | None = None

    # -- the network ------------------------------------------------------------------------------
    @property
    def heads(self) -> nn.ModuleList:
        """Everything trained at the full rate: bottleneck, classifier, discriminator."""
        return nn.ModuleList([self.bottleneck, self.classifier, self.discriminator])

    def features(self, x: Tensor) -> Tensor:
        """Features ``(N, width)`` the classifier and the discriminator read."""
        return self.bottleneck(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        return self.classifier(self.features(x))

    def _pair(self, fn: nn.Module | Any, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The feature extractor on both domains: one call on the concatenation (joint) or one each."""
        if self.hparams.domain_mode == "joint":
            return _joint(fn, source, target)
        return fn(source), fn(target)

    def _domain_loss(self, d_source: Tensor, d_target: Tensor) -> tuple[Tensor, Tensor]:
        """Mean of the two domains' BCE (source = 1, target = 0) and the discriminator's accuracy."""
        loss = 0.5 * (
            F.binary_cross_entropy_with_logits(d_source, torch.ones_like(d_source))
            + F.binary_cross_entropy_with_logits(d_target, torch.zeros_like(d_target))
        )
        acc = 0.5 * ((d_source > 0).float().mean() + (d_target <= 0).float().mean())
        return loss, acc.detach()

    @property
    def progress(self) -> float:
        """Training progress ``p`` in [0, 1]: optimizer steps done / the run's total."""
        return min(1.0, self.global_step / self._total_steps)

    # -- Lightning hooks --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Source cross-entropy + ``trade_off`` x domain BCE (through gradient reversal for DANN)."""
        hp = self.hparams
        x_source, y_source = batch["source"]
        x_target = batch["target"]  # images only: the target loader serves no labels
        if hp.method == "dann":
            coeff = grl_coefficient(self.progress, hp.grl_gamma)
            f_source, f_target = self._pair(self.features, x_source, x_target)
            logits = self.classifier(f_source)
            d_source, d_target = _joint(self.discriminator, grad_reverse(f_source, coeff),
                                        grad_reverse(f_target, coeff))  # fmt: skip
        else:
            coeff = 0.0
            logits = self(x_source)
            with torch.no_grad(), norm_mode(self.backbone, False), norm_mode(self.bottleneck, False):
                f_source, f_target = self.features(x_source), self.features(x_target)
            d_source, d_target = _joint(self.discriminator, f_source, f_target)
        cls_loss = F.cross_entropy(logits, y_source)
        domain_loss, domain_acc = self._domain_loss(d_source, d_target)
        loss = cls_loss + hp.trade_off * domain_loss
        self.train_acc.update(logits.detach(), y_source)
        n = len(y_source)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        parts = {"train/cls_loss": cls_loss, "train/domain_loss": domain_loss, "train/domain_acc": domain_acc}
        self.log_dict(parts, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/source_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/grl_coeff", coeff, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracy on the source's held-out images (no target label is used to select)."""
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val/source_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y))

    def on_test_start(self) -> None:
        """AdaBN (``adabn=True``): target statistics for the target test set, trained ones for the source."""
        self._stats, self._stats_in_use, self._test_features = {}, None, {}
        if not self.hparams.adabn:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "adapt_dataloader"):
            raise ValueError("adabn=True needs a DataModule with adapt_dataloader() (the target's images)")
        self._stats[SOURCE] = norm_statistics(self)
        adapt_norm_statistics(self, datamodule.adapt_dataloader(), self._adapt_forward)
        self._stats[TARGET] = norm_statistics(self)
        self._stats_in_use = TARGET

    def _adapt_forward(self, x: Tensor) -> None:
        features = self.features(x.to(self.device))
        self.discriminator(features)

    def _use_stats(self, domain: int) -> None:
        if self._stats and self._stats_in_use != domain:
            for name, value in self._stats[domain].items():
                self.get_buffer(name).copy_(value)
            self._stats_in_use = domain

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """With AdaBN, put in the running statistics of the batch's domain."""
        self._use_stats(dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accuracy on the target (dataloader 0) or source (1) test set; features kept for the probe."""
        x, y = batch
        features = self.features(x)
        logits = self.classifier(features)
        self._test_features.setdefault(dataloader_idx, []).append(features.detach().cpu())
        if dataloader_idx == TARGET:
            self.test_target_acc.update(logits, y)
            self.log("test/target_acc", self.test_target_acc, on_epoch=True, batch_size=len(y),
                     add_dataloader_idx=False)  # fmt: skip
        else:
            self.test_source_acc.update(logits, y)
            self.log("test/source_acc", self.test_source_acc, on_epoch=True, batch_size=len(y),
                     add_dataloader_idx=False)  # fmt: skip

    def on_test_epoch_end(self) -> None:
        """``test/domain_acc`` from a fresh probe on the two test sets' features; trained statistics back."""
        features = {domain: torch.cat(parts) for domain, parts in self._test_features.items()}
        self._test_features = {}
        if len(features) == 2:
            accuracy = domain_probe_accuracy(features[SOURCE], features[TARGET])
            self.log("test/domain_acc", accuracy)
        self._use_stats(SOURCE)
        self._stats, self._stats_in_use = {}, None

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD on the linearly scaled rate, annealed per step as ``(1 + alpha p)^-beta`` (:attr:`sgd`)."""
        sgd = self.sgd
        lr = scaled_lr(sgd.lr, global_batch_size(self.trainer, sgd.global_batch_size), sgd.base_batch_size)
        groups = []
        for part, mult in ((self.backbone, sgd.backbone_lr_mult), (self.heads, 1.0)):
            groups += [{**g, "lr": lr * mult} for g in param_groups(part, sgd.weight_decay)]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=sgd.momentum, nesterov=sgd.nesterov)
        self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        total = self._total_steps

        def factor(step: int) -> float:
            return annealed_lr_factor(min(1.0, step / total), sgd.lr_alpha, sgd.lr_beta)

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _joint(fn: nn.Module, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``fn`` on the concatenation of both domains (one set of batch statistics), split back."""
    out = fn(torch.cat([source, target]))
    return out[: len(source)], out[len(source) :]


def _load_matching(network: nn.Module, path: str) -> None:
    """Load the tensors of the state dict in ``path`` whose names and shapes match ``network``'s.

    Raises:
        ValueError: when the file shares no tensor with ``network`` (the wrong architecture).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = network.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError(f"backbone_weights {path!r}: no tensor matches the backbone's names and shapes")
    network.load_state_dict(matching, strict=False)
    skipped = sorted(set(own) - set(matching))
    log.info("backbone_weights %s: loaded %d tensors, kept %d as initialised: %s", path, len(matching),
             len(skipped), ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
