"""The NAS LightningModules: DARTS' search (manual optimization of weights and alpha), the derived network."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.func import functional_call
from torch.optim import Optimizer

from tasks.common.metrics import classification_metrics
from tasks.common.norms import check_norm_args, norm_factory
from tasks.common.settings import SettingsCheckpoints, SettingsGroup
from tasks.common.validate import check_choice, check_int

from .genotype import Genotype, entropy
from .networks import EvalNetwork, SearchNetwork
from .ops import DARTS_OPS, OPS

__all__ = ["STAGES", "DartsEvalModule", "DartsSearchModule", "RetrainSettings", "SearchSettings"]

STAGES = ("search", "eval", "search+eval")
"""``--stage`` values: search only, retrain a given genotype, or both (the default)."""

ALPHAS_FILE = "search_alphas.jsonl"
"""Per-epoch softmax(alpha), its entropy and the genotype, one JSON object a line (search's root dir)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings(SettingsGroup):
    """The search's two optimisers: SGD on the supernet's weights, Adam on alpha.

    :class:`DartsSearchModule`'s ``search`` argument (config keys ``model.search.*``, beside
    ``model.retrain``; the flat ``model.lr``, ``model.arch_lr``... of earlier versions are still
    read), held as :attr:`DartsSearchModule.search`. The retraining stage (:class:`RetrainSettings`)
    has its own rate, schedule and weight decay but trains with this ``momentum`` and ``grad_clip``.

    Attributes:
        lr, lr_min: the weights' SGD rate, cosine-annealed from ``lr`` to ``lr_min`` over the
            search's epochs.
        momentum: SGD momentum (of the retraining too).
        weight_decay: weight decay of the weights (and of the unrolled step's virtual update).
        arch_lr, arch_betas, arch_weight_decay: Adam's rate, betas and weight decay of alpha.
        grad_clip: gradient-norm clip of the weight step (of the retraining too).
        unrolled: second-order (unrolled) alpha gradient instead of first order.

    Raises:
        ValueError: ``grad_clip must be > 0``.
    """

    KEY = "search"

    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    unrolled: bool = False

    def __post_init__(self) -> None:
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")


@dataclass(frozen=True)
class RetrainSettings(SettingsGroup):
    """The retraining stage's settings: the derived network and how it trains.

    :class:`DartsSearchModule`'s ``retrain`` argument (config keys ``model.retrain.*``; the flat
    ``model.eval_*`` keys and ``model.drop_path_prob`` of earlier versions are still read);
    ``results.json`` records it as ``retrain``, resolved (:meth:`resolved`).

    Attributes:
        norm, groups, norm_kwargs: the derived network's norm (affine; ``None``: the search's).
        channels, cells: its initial channels and cells.
        epochs: training epochs (``None``: the search's ``trainer.max_epochs``).
        batch_size: samples per batch (``None``: the search's ``data.batch_size``).
        lr, lr_min, weight_decay, drop_path_prob: SGD with cosine from ``lr`` to ``lr_min``,
            weight decay, final drop-path probability (ramped up linearly).
    """

    KEY = "retrain"
    FLAT_NAMES: ClassVar[Mapping[str, str]] = {
        "norm": "eval_norm", "groups": "eval_groups", "norm_kwargs": "eval_norm_kwargs",
        "channels": "eval_channels", "cells": "eval_cells", "epochs": "eval_epochs",
        "batch_size": "eval_batch_size", "lr": "eval_lr", "lr_min": "eval_lr_min",
        "weight_decay": "eval_weight_decay",
    }  # fmt: skip

    norm: str | None = None
    groups: int | str | None = None
    norm_kwargs: dict[str, Any] | None = None
    channels: int = 36
    cells: int = 20
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.025
    lr_min: float = 0.0
    weight_decay: float = 3e-4
    drop_path_prob: float = 0.2

    def inherit(self, norm: str, groups: int | str, norm_kwargs: dict[str, Any] | None) -> RetrainSettings:
        """These settings with the search's norm, groups and norm arguments where they are ``None``."""
        return replace(
            self,
            norm=self.norm or norm,
            groups=groups if self.groups is None else self.groups,
            norm_kwargs=norm_kwargs if self.norm_kwargs is None else self.norm_kwargs,
        )

    def resolved(self, max_epochs: int | None, batch_size: int) -> RetrainSettings:
        """These settings with ``epochs`` and ``batch_size`` filled in from the search's."""
        return replace(
            self,
            epochs=max_epochs if self.epochs is None else self.epochs,
            batch_size=batch_size if self.batch_size is None else self.batch_size,
        )


Batch = tuple[Tensor, Tensor]


def _check_ops(ops: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(DARTS_OPS if ops is None else ops)
    for name in names:
        check_choice("op", name, OPS)
    if len(set(names)) != len(names):
        raise ValueError(f"ops must be distinct, got {list(names)}")
    if not [n for n in names if n != "none"]:
        raise ValueError(f"ops must hold an op other than 'none', got {list(names)}")
    return names


def _check_norm_kwargs(norm_kwargs: Mapping[str, Any] | None, flag: str) -> None:
    if norm_kwargs is not None and "affine" in norm_kwargs:
        raise ValueError(
            f"{flag} must not set affine: the search network's cell norms are non-affine and the "
            f"derived network's affine, as in DARTS"
        )


def _sgd_cosine(
    params: Any, lr: float, lr_min: float, momentum: float, weight_decay: float, epochs: int
) -> tuple[Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs), eta_min=lr_min)


class DartsSearchModule(SettingsCheckpoints, pl.LightningModule):
    """DARTS' architecture search on a supernet whose every norm is the registry norm ``norm``.

    Each training batch is ``{"weights": (x, y), "arch": (x, y)}`` (:class:`NasDataModule`):

    1. alpha step: Adam (``arch_lr``, betas ``arch_betas``, ``arch_weight_decay``) on the arch
       half's loss, first order (the current weights) or, with ``unrolled``, DARTS' second
       order (the loss after one virtual SGD step of the weights, its Hessian-vector product by
       finite differences);
    2. weight step: SGD with momentum on the weight half, gradient norm clipped to ``grad_clip``,
       cosine-annealed from ``lr`` to ``lr_min`` over the search's epochs.

    These are the ``search`` settings group (:class:`SearchSettings`, held as :attr:`search`).

    Each optimizer only holds (and, through ``toggled_optimizer``, only computes gradients for)
    its own parameters. Logged: ``train/loss``, ``train/acc``, ``train/arch_loss``, the
    supernet's ``val/search_acc`` and ``test/search_acc`` (and ``*_loss``, ``*_acc_top5``) and,
    per epoch, ``alpha/entropy_{normal,reduce}`` (mean entropy of softmax(alpha) per edge, nats),
    ``alpha/{normal,reduce}/<op>`` (its mean weight over edges), the genotype (log line) and all
    of it in ``<default_root_dir>/search_alphas.jsonl``.

    ``retrain`` is the retraining stage's settings group (:class:`RetrainSettings`, held as
    :attr:`retrain` with the search's norm filled in): the derived network that the task's run
    hook retrains (:meth:`eval_module`), its epochs and batch size. What the hook does is the task's
    run options ``--stage`` and ``--genotype`` (:data:`tasks.nas.pipeline.OPTIONS`), not this
    model's.

    Args:
        norm: registry norm of the search (non-affine in cells, affine in the stem).
        groups: ``num_groups`` of the search's norms.
        norm_kwargs: extra arguments of every norm (not ``affine``: the space decides it).
        num_classes: classifier outputs (linked from the DataModule).
        in_channels: image channels (linked from the DataModule).
        ops: the op set, the columns of alpha (``None``: DARTS' eight).
        channels: initial channels of the supernet.
        cells: supernet cells (two reduce).
        nodes: intermediate nodes per cell.
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.
        search: the search's optimisers (:class:`SearchSettings`: ``lr``, ``lr_min``, ``momentum``,
            ``weight_decay``, ``arch_lr``, ``arch_betas``, ``arch_weight_decay``, ``grad_clip``,
            ``unrolled``).
        retrain: the derived network and its retraining (:class:`RetrainSettings`; its norm
            ``None``: the search's).

    Raises:
        ValueError: for an unknown op or a bad norm argument.
    """

    def __init__(
        self,
        norm: str = "bgn",
        groups: int | str = "auto",
        norm_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        ops: list[str] | None = None,
        channels: int = 16,
        cells: int = 8,
        nodes: int = 4,
        stem_multiplier: int = 3,
        search: SearchSettings = SearchSettings(),
        retrain: RetrainSettings = RetrainSettings(),
    ) -> None:
        super().__init__()
        self.space_ops = _check_ops(ops)
        _check_norm_kwargs(norm_kwargs, "norm_kwargs")
        _check_norm_kwargs(retrain.norm_kwargs, "retrain.norm_kwargs")
        norm_layer = norm_factory(norm, groups, norm_kwargs)
        self.retrain = retrain.inherit(norm, groups, norm_kwargs)
        check_norm_args(self.retrain.norm, self.retrain.groups, self.retrain.norm_kwargs)
        for name, value in (("retrain.epochs", retrain.epochs), ("retrain.batch_size", retrain.batch_size)):
            check_int(name, value, optional=True)
        if not 0.0 <= retrain.drop_path_prob < 1.0:
            raise ValueError(f"retrain.drop_path_prob must be in [0, 1), got {retrain.drop_path_prob!r}")
        self.search = search
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = SearchNetwork(
            num_classes, in_channels, channels, cells, nodes, self.space_ops, norm_layer, stem_multiplier
        )
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/search_")
        self.test_metrics = classification_metrics(num_classes, "test/search_")

    def forward(self, x: Tensor) -> Tensor:
        """Supernet logits."""
        return self.net(x)

    def genotype(self) -> Genotype:
        """The genotype derived from the current alpha (top-2 non-``none`` inputs per node)."""
        return self.net.genotype()

    def eval_module(self, genotype: Genotype) -> DartsEvalModule:
        """The derived network of ``genotype`` with the :attr:`retrain` settings, to retrain."""
        hp, settings, search = self.hparams, self.retrain, self.search
        return DartsEvalModule(
            genotype=genotype.to_dict(),
            ops=list(self.space_ops),
            norm=settings.norm,
            groups=settings.groups,
            norm_kwargs=settings.norm_kwargs,
            num_classes=hp.num_classes,
            in_channels=hp.in_channels,
            channels=settings.channels,
            cells=settings.cells,
            stem_multiplier=hp.stem_multiplier,
            lr=settings.lr,
            lr_min=settings.lr_min,
            momentum=search.momentum,
            weight_decay=settings.weight_decay,
            grad_clip=search.grad_clip,
            drop_path_prob=settings.drop_path_prob,
            search_norm=hp.norm,
        )

    # -- the two optimizers ---------------------------------------------------------------------
    def configure_optimizers(self) -> tuple[list[Optimizer], list[Any]]:
        """``[SGD(weights), Adam(alpha)]`` and the weights' cosine schedule (per epoch): :attr:`search`."""
        search = self.search
        weights, scheduler = _sgd_cosine(
            self.net.weight_parameters(), search.lr, search.lr_min, search.momentum, search.weight_decay,
            self.trainer.max_epochs or 1,
        )  # fmt: skip
        arch = torch.optim.Adam(
            self.net.arch_parameters(),
            lr=search.arch_lr,
            betas=tuple(search.arch_betas),
            weight_decay=search.arch_weight_decay,
        )
        return [weights, arch], [scheduler]

    def training_step(self, batch: Mapping[str, Batch], batch_idx: int) -> None:
        """One alpha step on the arch half, then one weight step on the weight half."""
        weight_opt, arch_opt = self.optimizers()  # type: ignore[misc]
        (xw, yw), (xa, ya) = batch["weights"], batch["arch"]
        if self.search.unrolled:
            arch_opt.zero_grad()
            arch_loss = self._unrolled_arch_grads(xw, yw, xa, ya, weight_opt.param_groups[0]["lr"])
            arch_opt.step()
        else:
            with self.toggled_optimizer(arch_opt):
                arch_opt.zero_grad()
                arch_loss = F.cross_entropy(self.net(xa), ya)
                self.manual_backward(arch_loss)
                arch_opt.step()
        with self.toggled_optimizer(weight_opt):
            weight_opt.zero_grad()
            logits = self.net(xw)
            loss = F.cross_entropy(logits, yw)
            self.manual_backward(loss)
            self.clip_gradients(
                weight_opt, gradient_clip_val=self.search.grad_clip, gradient_clip_algorithm="norm"
            )
            weight_opt.step()
        self.train_metrics.update(logits.detach(), yw)
        n = len(yw)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/arch_loss", arch_loss.detach(), on_step=False, on_epoch=True, batch_size=len(ya))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)

    def _unrolled_arch_grads(self, xw: Tensor, yw: Tensor, xa: Tensor, ya: Tensor, eta: float) -> Tensor:
        """Set alpha's ``.grad`` to DARTS' second-order gradient; returns the unrolled arch loss.

        ``w' = w - eta (grad_w L_w(w, alpha) + weight_decay w)``; then
        ``grad = grad_a L_a(w', alpha) - eta (grad_a L_w(w+, alpha) - grad_a L_w(w-, alpha)) / 2r``
        with ``w+- = w +- r grad_w' L_a(w', alpha)`` and ``r = 0.01 / |grad_w' L_a|`` (DARTS'
        finite-difference Hessian-vector product; its momentum term is left out).
        """
        net, wd = self.net, self.search.weight_decay
        arch = net.arch_parameters()
        arch_ids = {id(a) for a in arch}
        params = {n: p for n, p in net.named_parameters() if id(p) not in arch_ids}
        loss_w = F.cross_entropy(net(xw), yw)
        grads = torch.autograd.grad(loss_w, list(params.values()))
        unrolled = {
            n: (p - eta * (g + wd * p)).detach().requires_grad_()
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
        arch_loss = F.cross_entropy(functional_call(net, unrolled, (xa,)), ya)
        d_arch = torch.autograd.grad(arch_loss, arch, retain_graph=True)
        d_w = torch.autograd.grad(arch_loss, list(unrolled.values()))
        r = 1e-2 / torch.cat([v.flatten() for v in d_w]).norm().clamp_min(1e-12)

        def arch_grad(sign: float) -> tuple[Tensor, ...]:
            shifted = {n: p.detach() + sign * r * v for (n, p), v in zip(params.items(), d_w, strict=True)}
            return torch.autograd.grad(F.cross_entropy(functional_call(net, shifted, (xw,)), yw), arch)

        plus, minus = arch_grad(1.0), arch_grad(-1.0)
        for a, g, gp, gm in zip(arch, d_arch, plus, minus, strict=True):
            a.grad = g - eta * (gp - gm) / (2 * r)
        return arch_loss.detach()

    def on_train_epoch_end(self) -> None:
        """Step the weights' schedule; log softmax(alpha), its entropy and the genotype."""
        self.lr_schedulers().step()  # type: ignore[union-attr]
        weights = {k: w.detach().cpu() for k, w in self.net.arch_weights().items()}
        for kind, w in weights.items():
            self.log(f"alpha/entropy_{kind}", entropy(w))
            for op, mean in zip(self.space_ops, w.mean(dim=0).tolist(), strict=True):
                self.log(f"alpha/{kind}/{op}", mean)
        genotype = self.genotype()
        rank_zero_info(f"nas search epoch {self.current_epoch}: {genotype}")
        if self.trainer.is_global_zero:
            record = {
                "epoch": self.current_epoch,
                "genotype": genotype.to_dict(),
                "entropy": {k: float(entropy(w)) for k, w in weights.items()},
                "ops": list(self.space_ops),
                "softmax": {
                    k: [[round(v, 5) for v in row] for row in w.tolist()] for k, w in weights.items()
                },
            }
            path = Path(self.trainer.default_root_dir) / ALPHAS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    # -- evaluation of the supernet -------------------------------------------------------------
    def _eval_step(self, batch: Batch, stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, y)
        self.log(f"{stage}/search_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=len(y))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Supernet loss and accuracy on one validation batch."""
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Supernet loss and accuracy on one test batch."""
        self._eval_step(batch, "test")


class DartsEvalModule(pl.LightningModule):
    """The derived network of a genotype, retrained from scratch with affine registry norms.

    SGD with momentum, cosine from ``lr`` to ``lr_min`` over the trainer's epochs, gradient norm
    clipped to ``grad_clip``, drop path ramped linearly to ``drop_path_prob`` (DARTS' CIFAR
    protocol, without its auxiliary head and cutout). Logs ``train/loss``, ``train/acc``,
    ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``, ``test/acc_top5``.

    Args:
        genotype: the genotype's JSON form (:meth:`Genotype.to_dict`).
        ops: the space's ops (the genotype may only use these).
        norm: registry norm of every norm layer (affine).
        groups: their ``num_groups``.
        norm_kwargs: their extra arguments (not ``affine``).
        num_classes: classifier outputs.
        in_channels: image channels.
        channels: initial channels.
        cells: cells (two reduce).
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.
        lr: initial learning rate.
        lr_min: final learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        grad_clip: gradient-norm clip.
        drop_path_prob: final drop-path probability.
        search_norm: the norm the genotype was searched with (recorded only).

    Raises:
        ValueError: for a genotype outside ``ops`` or a bad norm argument.
    """

    def __init__(
        self,
        genotype: dict[str, Any],
        ops: list[str] | None = None,
        norm: str = "bgn",
        groups: int | str = "auto",
        norm_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 36,
        cells: int = 20,
        stem_multiplier: int = 3,
        lr: float = 0.025,
        lr_min: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 3e-4,
        grad_clip: float = 5.0,
        drop_path_prob: float = 0.2,
        search_norm: str | None = None,
    ) -> None:
        super().__init__()
        _check_norm_kwargs(norm_kwargs, "norm_kwargs")
        norm_layer = norm_factory(norm, groups, norm_kwargs)
        self.genotype = Genotype.from_dict(genotype, _check_ops(ops))
        self.save_hyperparameters()
        self.net = EvalNetwork(
            self.genotype, num_classes, in_channels, channels, cells, norm_layer, stem_multiplier
        )
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.net(x)

    def _step(self, batch: Batch, stage: str) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), y)
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not train, batch_size=len(y))
        return loss

    def on_train_epoch_start(self) -> None:
        """Drop path at ``drop_path_prob * epoch / max_epochs`` (DARTS' ramp)."""
        epochs = max(1, self.trainer.max_epochs or 1)
        self.net.drop_prob = self.hparams.drop_path_prob * self.current_epoch / epochs

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Cross-entropy on one batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and accuracy on one validation batch."""
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and accuracy on one test batch."""
        self._step(batch, "test")

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm to ``grad_clip`` (DARTS), whatever the trainer's clipping setting."""
        self.clip_gradients(
            optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with momentum and a per-epoch cosine schedule."""
        hp = self.hparams
        optimizer, scheduler = _sgd_cosine(
            self.parameters(), hp.lr, hp.lr_min, hp.momentum, hp.weight_decay, self.trainer.max_epochs or 1
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
