"""LightningModule for few-shot learning: Prototypical Networks or MAML on a Conv-4 registry backbone."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from tasks.common.backbones import conv4
from tasks.common.errors import TaskConfigError
from tasks.common.norms import check_norm_args, norm_factory
from tasks.common.training import feature_dim
from tasks.common.validate import check_int

from .episodes import Episode
from .maml import MAML
from .protonet import ProtoNet

__all__ = ["FewShotModule", "mean_ci95"]

Algorithm = Literal["protonet", "maml"]
ALGORITHMS: dict[str, type[ProtoNet] | type[MAML]] = {"protonet": ProtoNet, "maml": MAML}
"""``algorithm`` -> what it adds to the module (:class:`~tasks.fsl.protonet.ProtoNet`,
:class:`~tasks.fsl.maml.MAML`): its network, its norm mode and its episode logits."""


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval, ``1.96 * std / sqrt(n)`` (sample std)."""
    values = values.double().flatten()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), 1.96 * float(values.std()) / math.sqrt(values.numel())


class FewShotModule(LightningModule):
    """Few-shot classifier: Prototypical Networks or MAML (learn2learn) on a Conv-4 backbone.

    The backbone is :func:`tasks.common.backbones.conv4` with its norm from the registry. For
    ``protonet`` the norm is used as configured (running statistics at evaluation, if it keeps
    them). For ``maml`` the norm runs in MAML's usual transductive mode: ``track_running_stats=False``
    is passed to the registry (norms without running statistics ignore it), so the support set and
    the query set are each normalized with their own batch statistics, in training and at
    meta-test alike; ``norm_kwargs`` can override it.

    Every batch is a meta-batch of episodes; each episode is forwarded on its own, so
    batch-statistics norms never mix episodes. ProtoNet evaluation embeds each image once per
    pass when the encoder is per-sample in eval mode (:class:`~tasks.fsl.protonet.EmbeddingCache`
    checks it), which makes the 600-episode protocol cheap. Test accuracy is the mean over the meta-test
    episodes, with the half-width of its 95 % confidence interval: ``test/acc`` and
    ``test/acc_ci95`` for the configured shots ``S`` (the ones it trains at), also as
    ``test/acc_{S}shot``; every other shot count ``K`` the datamodule evaluates tests the same
    S-shot-trained model and is named for it: ``test/acc_{K}shot_from_{S}shot`` (and ``_ci95``).

    Args:
        norm: registry norm name (``bn``, ``bgn``, ``gn``, ``ln``, ``in``, ``pn``, ``none``).
        groups: ``num_groups`` of every norm layer (int or ``"auto"``).
        algorithm: ``protonet`` or ``maml``.
        hidden: Conv-4 channels.
        depth: Conv-4 blocks.
        norm_kwargs: extra keyword arguments of every norm layer (``eps``, ``momentum``, ...).
        lr: meta-learning rate (Adam).
        weight_decay: Adam weight decay.
        lr_schedule: ``cosine`` (anneal to 0 over the run's optimizer steps) or ``constant``.
        adapt_lr: MAML inner-loop learning rate.
        adapt_steps: MAML inner-loop steps in meta-training.
        eval_adapt_steps: MAML inner-loop steps at validation and meta-test.
        first_order: first-order MAML (no second derivatives through the inner loop).
        in_channels: image channels; ``None`` takes it from the datamodule.
        input_size: image side length; ``None`` takes it from the datamodule (sizes MAML's head).
        num_classes: outputs of MAML's head; ``None`` takes the datamodule's ways.
    """

    def __init__(
        self,
        norm: str = "bgn",
        groups: int | str = "auto",
        algorithm: Algorithm = "protonet",
        hidden: int = 64,
        depth: int = 4,
        norm_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        adapt_lr: float = 0.4,
        adapt_steps: int = 1,
        eval_adapt_steps: int = 3,
        first_order: bool = False,
        in_channels: int | None = None,
        input_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{name}: algorithm must be 'protonet' or 'maml', got {algorithm!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"{name}: lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        for arg, value in (("adapt_steps", adapt_steps), ("eval_adapt_steps", eval_adapt_steps)):
            check_int(arg, value, minimum=0, owner=name)
        check_norm_args(norm, groups, norm_kwargs)
        self.save_hyperparameters()
        self.algo = ALGORITHMS[algorithm](self.hparams)
        self.test_acc = nn.ModuleDict()  # per shot count: per-episode accuracies
        self.test_loss = nn.ModuleDict()
        self._test_ways: dict[str, int] = {}  # "<K>shot" -> ways, in test dataloader order
        if in_channels and input_size and (not self.algo.has_head or num_classes):
            self._build(in_channels, input_size, num_classes)

    # -- model -------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module | None:
        """The network (``encoder`` for ProtoNet, ``learner`` for MAML); ``None`` until it is built."""
        return getattr(self, self.algo.network_name, None)

    def _build(self, in_channels: int, input_size: int, num_classes: int | None) -> None:
        hp = self.hparams
        norm_kwargs = self.algo.norm_kwargs(dict(hp.norm_kwargs or {}))
        backbone = conv4(norm_factory(hp.norm, hp.groups, norm_kwargs), in_channels=in_channels,
                         hidden=hp.hidden, depth=hp.depth)
        head = None
        if self.algo.has_head:
            head = nn.Linear(feature_dim(backbone, (in_channels, input_size, input_size)), num_classes)
        setattr(self, self.algo.network_name, self.algo.build(backbone, head))

    def configure_model(self) -> None:
        """Build the network from the datamodule's image shape and ways when not given.

        The resolved values are written into ``hparams``, so checkpoints rebuild the same network.
        """
        if self.network is not None:
            return
        hp = self.hparams
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError(
                f"{type(self).__name__}: without a datamodule, pass in_channels, input_size (and "
                f"num_classes for maml) to the model"
            )
        train_ways, eval_ways = datamodule.train_spec.ways, datamodule.eval_specs[0].ways
        if self.algo.has_head and hp.num_classes is None and train_ways != eval_ways:
            raise TaskConfigError(
                f"{type(self).__name__}: MAML's classifier head has one output per class, so training and "
                f"evaluation episodes need the same ways; got train_ways={train_ways}, ways={eval_ways} "
                f"(set data.train_ways to data.ways)"
            )
        resolved = {
            "in_channels": hp.in_channels or datamodule.in_channels,
            "input_size": hp.input_size or datamodule.image_size,
            "num_classes": hp.num_classes or (train_ways if self.algo.has_head else None),
        }
        self.hparams.update(resolved)
        self._build(resolved["in_channels"], resolved["input_size"], resolved["num_classes"])

    def configure_optimizers(self) -> Any:
        """Adam, optionally cosine-annealed per optimizer step over the whole run."""
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- episodes ----------------------------------------------------------------------------
    def _episode_logits(self, episode: Episode, training: bool) -> Tensor:
        ids = torch.cat([episode.support_ids, episode.query_ids])
        return self.algo.logits(self.network, episode.support, episode.support_labels, episode.query,
                                ids, training)

    def _episodes(self, batch: Episode, training: bool) -> tuple[Tensor, Tensor]:
        """Per-episode query losses and accuracies of a meta-batch."""
        losses, accs = [], []
        for episode in zip(*batch, strict=True):
            episode = Episode(*episode)
            logits = self._episode_logits(episode, training)
            losses.append(F.cross_entropy(logits, episode.query_labels))
            accs.append((logits.argmax(-1) == episode.query_labels).float().mean())
        return torch.stack(losses), torch.stack(accs)

    # -- Lightning steps ---------------------------------------------------------------------
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        """Mean query loss over the meta-batch of episodes."""
        losses, accs = self._episodes(batch, training=True)
        loss = losses.mean()
        n = len(losses)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/acc", accs.mean(), prog_bar=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        """A new evaluation pass: the network changed since the last one (ProtoNet's embedding cache)."""
        self.algo.new_pass()

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        """Query loss and accuracy, averaged over the validation episodes."""
        losses, accs = self._episodes(batch, training=False)
        n = len(losses)
        self.log("val/loss", losses.mean(), batch_size=n, sync_dist=True)
        self.log("val/acc", accs.mean(), prog_bar=True, batch_size=n, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        """Forget the previous test run's episodes and embeddings."""
        self.algo.new_pass()
        self.test_acc.clear()
        self.test_loss.clear()
        self._test_ways = {}

    def test_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Record every episode's accuracy and loss (one dataloader per shot count)."""
        losses, accs = self._episodes(batch, training=False)
        ways = int(batch.support_labels[0].max()) + 1
        key = f"{batch.support_labels.shape[1] // ways}shot"
        if key not in self.test_acc:
            self.test_acc[key] = CatMetric().to(self.device)
            self.test_loss[key] = CatMetric().to(self.device)
            self._test_ways[key] = ways
        self.test_acc[key].update(accs)
        self.test_loss[key].update(losses)

    def on_test_epoch_end(self) -> None:
        """Log mean accuracy and 95 % CI per shot count; the first loader's are ``test/acc(_ci95)``.

        The first loader is the configured shots, the ones the model trained at; any other shot
        count K is a test of that same model and is named so: ``test/acc_{K}shot_from_{S}shot``.
        """
        trained = next(iter(self._test_ways), "")
        for i, (key, ways) in enumerate(self._test_ways.items()):
            accs = self.test_acc[key].compute()
            acc, ci95 = mean_ci95(accs)
            loss = float(self.test_loss[key].compute().mean())
            name = key if key == trained else f"{key}_from_{trained}"
            metrics = {f"test/acc_{name}": acc, f"test/acc_{name}_ci95": ci95, f"test/loss_{name}": loss}
            if i == 0:
                metrics.update({"test/acc": acc, "test/acc_ci95": ci95, "test/loss": loss})
            self.log_dict(metrics)
            model = "" if key == trained else f" of the {trained[:-4]}-shot-trained model"
            rank_zero_info(
                f"fsl {self.hparams.algorithm} ({self.hparams.norm}): {ways}-way {key[:-4]}-shot accuracy"
                f"{model} {100 * acc:.2f} ± {100 * ci95:.2f} % (95 % CI over {accs.numel()} meta-test "
                "episodes)"
            )

