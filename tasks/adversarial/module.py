"""The adversarial-training LightningModule: Madry's PGD or fast FGSM training, robust evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from tasks.common.backbones import build_backbone
from tasks.common.norms import norm_factory
from tasks.common.optim import SGDSettings
from tasks.common.settings import SettingsCheckpoints
from tasks.common.training import grad_enabled

from .attacks import AttackSettings, NormMode, build_attack, eval_step_size, perturb

__all__ = [
    "ARCHITECTURE_KEYS",
    "CHECKPOINT_TASK_KEY",
    "AdversarialModule",
    "Normalize",
]

CHECKPOINT_TASK_KEY = "bgn_task"
"""Key of the task name in this module's checkpoints (``--eval-only`` refuses other tasks')."""
ARCHITECTURE_KEYS = ("norm", "groups", "norm_kwargs", "backbone", "num_classes", "in_channels", "mean", "std")
"""Init arguments that define the network: ``--eval-only`` takes them from the checkpoint."""


def _slot(name: str) -> str:
    """A metric's ``nn.ModuleDict`` key (module names cannot hold dots: ``pgd_acc_eps0.05``)."""
    return name.replace(".", "_")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: dataset normalisation inside the model, so attacks see pixels.

    Args:
        mean: per-channel mean.
        std: per-channel standard deviation (positive).

    Raises:
        ValueError: for lengths that differ or a non-positive std.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
            raise ValueError(
                f"Normalize: mean and std need one value per channel, std > 0; got {mean}, {std}"
            )
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Standardised ``x`` (``(N, C, H, W)`` pixels in [0, 1])."""
        return (x - self.mean) / self.std


class AdversarialModule(SettingsCheckpoints, pl.LightningModule):
    """Adversarial training (Madry et al. 2018; fast FGSM, Wong et al. 2020) with any registry norm.

    The network is ``Normalize(mean, std)`` followed by a shared backbone whose every norm layer
    is ``norm``; inputs are pixels in [0, 1] (the DataModule runs with ``normalize=False``).

    **Training.** Each batch is replaced by adversarial examples from torchattacks
    (``attack.train_attack``): ``pgd`` (``PGD``: ``train_steps`` steps of ``step_size`` within the
    L-infinity ball of radius ``eps``, from a random start when ``random_start``), ``fgsm``
    (``FFGSM``: one step of ``fast_step_size`` from a uniform random start, "fast" adversarial
    training) or ``none`` (an undefended model, the baseline). The loss is
    ``(1 - clean_weight) * CE(adversarial) + clean_weight * CE(clean)``. While the attack runs
    the model is in training mode and **every norm layer** (BN, BGN, GN, LN, IN, PN, found by
    :func:`bgn_lightning.is_norm_layer`) is in ``attack_norm_mode``: ``train`` normalises the
    attack's iterates with their batch statistics (and updates running statistics with them,
    as a model left in ``train()`` does in the reference PyTorch implementations); ``eval``
    normalises them with the running statistics and never updates them. Every module's mode is
    restored after the attack.

    **Evaluation** (model in eval mode, gradients enabled inside Lightning's inference-mode
    loops): ``clean_acc``; ``fgsm_acc`` (``FGSM`` at ``eps``); ``pgd_acc`` (``PGD``, ``eval_steps``
    = 20 steps, random start); opt-in ``pgd100_acc`` and ``autoattack_acc``; and the robustness
    curve ``pgd_acc_eps<e>`` (PGD at each radius of ``curve_eps``). A robust accuracy counts an
    example only if it is classified correctly both clean and attacked (as AutoAttack does), so
    it never exceeds the clean accuracy; only clean-correct examples are attacked. Evaluation
    steps: ``max(step_size, 2.5 eps / steps)``, scaled with the radius
    (:func:`tasks.adversarial.attacks.eval_step_size`). Validation logs ``val/clean_acc`` and
    ``val/pgd_acc`` (PGD with ``val_steps`` steps, the checkpoint's monitor).

    Logged keys: ``train/loss``, ``train/adv_acc``; ``val/clean_acc``, ``val/pgd_acc``;
    ``test/clean_acc``, ``test/fgsm_acc``, ``test/pgd_acc`` (+ opt-in keys and the curve), all
    accuracies as fractions in [0, 1].

    Testing a checkpoint without training is a run option of the task, not of this model
    (``--eval-only --ckpt PATH``: :func:`tasks.adversarial.hooks.run_adversarial`).

    Optimisation as in the classification suite: SGD with momentum, the linear-scaling rule
    ``lr * B / base_batch_size``, linear warm-up, then ``lr_schedule`` (the ``sgd`` group).

    Args:
        norm: registry norm name for every norm layer.
        groups: ``num_groups`` for every norm layer (int or ``"auto"``).
        backbone: a :func:`tasks.common.backbones.available_backbones` name (``small_cnn``;
            ``resnet20`` or ``preact18`` for CIFAR).
        num_classes: classifier outputs (linked from the DataModule).
        in_channels: input channels (linked from the DataModule).
        mean: per-channel normalisation mean (linked from the DataModule; ``None``: 0.5).
        std: per-channel normalisation std (linked from the DataModule; ``None``: 0.5).
        dataset: dataset name (linked from the DataModule); picks the attack defaults
            (:data:`tasks.adversarial.attacks.ATTACK_DEFAULTS`) for the radius and steps the
            ``attack`` group leaves at ``None``.
        attack: how the model is attacked in training and evaluation
            (:class:`tasks.adversarial.attacks.AttackSettings`), held resolved as :attr:`attacks`.
        sgd: the SGD + linear-rule settings (:class:`tasks.common.optim.SGDSettings`), held as
            :attr:`sgd`.
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: for a radius or step outside [0, 1], a step count < 1, an unknown attack
            or ``attack_norm_mode``, a ``clean_weight`` outside [0, 1], or bad norm arguments.
    """

    def __init__(
        self,
        norm: str = "bgn",
        groups: int | str = "auto",
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        dataset: str = "digits",
        attack: AttackSettings = AttackSettings(),
        sgd: SGDSettings = SGDSettings(),
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_factory(norm, groups, norm_kwargs)
        self.attacks = attack.resolved(dataset)
        self.sgd = sgd
        self.save_hyperparameters()
        channels = in_channels
        self.normalize = Normalize(mean or (0.5,) * channels, std or (0.5,) * channels)
        self.net = build_backbone(backbone, num_classes, in_channels, norm_layer)
        self.train_adv_acc = MeanMetric()
        self.val_acc = nn.ModuleDict({_slot(k): MeanMetric() for k in ("clean_acc", "pgd_acc")})
        self.test_acc = nn.ModuleDict({_slot(k): MeanMetric() for k in self.test_metric_names})

    # -- settings --------------------------------------------------------------------------------
    @property
    def test_metric_names(self) -> list[str]:
        """The ``test/`` accuracies this model reports (without the prefix), curve included."""
        names = ["clean_acc", "fgsm_acc", "pgd_acc"]
        names += ["pgd100_acc"] * self.attacks.pgd100 + ["autoattack_acc"] * self.attacks.autoattack
        return names + [self.curve_key(e) for e in self.attacks.curve_eps]

    @staticmethod
    def curve_key(eps: float) -> str:
        """The metric name (without ``test/``) of the curve's PGD accuracy at radius ``eps``."""
        return f"pgd_acc_eps{eps:.4g}"

    def curve(self, metrics: dict[str, float]) -> dict[str, list[float]]:
        """The robustness curve from a test's metrics: ``{"eps": [...], "pgd_acc": [...]}``, eps ascending.

        Radius 0 is the clean accuracy and ``eps`` the PGD accuracy; points missing from
        ``metrics`` are left out.
        """
        keys = {0.0: "test/clean_acc", self.attacks.eps: "test/pgd_acc"}
        keys.update({e: f"test/{self.curve_key(e)}" for e in self.attacks.curve_eps})
        points = sorted((e, float(metrics[k])) for e, k in keys.items() if k in metrics)
        return {"eps": [e for e, _ in points], "pgd_acc": [a for _, a in points]}

    @property
    def attack_settings(self) -> dict[str, Any]:
        """The resolved attack settings (the per-dataset defaults filled in), for ``results.json``."""
        a = self.attacks
        return {
            "train_attack": a.train_attack,
            "eps": a.eps,
            "step_size": a.step_size,
            "train_steps": a.train_steps,
            "fast_step_size": a.fast_step_size,
            "random_start": a.random_start,
            "clean_weight": a.clean_weight,
            "attack_norm_mode": a.attack_norm_mode,
            "eval_steps": a.eval_steps,
            "eval_step_size": eval_step_size(a.eps, a.eval_steps, a.eps, a.step_size),
            "val_steps": a.val_steps,
            "curve_eps": a.curve_eps,
        }

    # -- model -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for pixels ``(N, in_channels, H, W)`` in [0, 1]."""
        return self.net(self.normalize(x))

    def attack(self, name: str, eps: float, steps: int = 1, norm_mode: NormMode | None = None) -> Any:
        """A norm-aware torchattacks attack on this model at radius ``eps`` (see :mod:`.attacks`).

        Training attacks (``norm_mode`` set) use the training step sizes; evaluation attacks
        (``norm_mode=None``) use :func:`~tasks.adversarial.attacks.eval_step_size`.
        """
        if norm_mode is not None:
            step = self.attacks.fast_step_size if name == "ffgsm" else self.attacks.step_size
        else:
            step = eval_step_size(eps, steps, self.attacks.eps, self.attacks.step_size)
        return build_attack(
            self, name, eps, step, steps, self.attacks.random_start, norm_mode, self.hparams.num_classes
        )

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The adversarial (optionally mixed with the clean) cross-entropy of one batch."""
        x, y = batch
        settings = self.attacks
        if settings.train_attack == "none":
            x_adv = x
        else:
            name, steps = ("pgd", settings.train_steps) if settings.train_attack == "pgd" else ("ffgsm", 1)
            mode = settings.attack_norm_mode
            attack = self.attack(name, settings.eps, steps, norm_mode=mode)
            x_adv = perturb(attack, self, x, y, norm_mode=mode)
        logits = self(x_adv)
        loss = F.cross_entropy(logits, y)
        if settings.clean_weight > 0:
            loss = (1.0 - settings.clean_weight) * loss + settings.clean_weight * F.cross_entropy(self(x), y)
        self.train_adv_acc.update((logits.argmax(1) == y).float())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    # -- evaluation ------------------------------------------------------------------------------
    def _robust(self, attack: Any, x: Tensor, y: Tensor, clean_ok: Tensor) -> Tensor:
        """Per-example ``clean correct and attacked correct``; only clean-correct examples are attacked."""
        ok = torch.zeros_like(clean_ok)
        idx = clean_ok.nonzero().flatten()
        if len(idx):
            x_adv = perturb(attack, self, x[idx], y[idx])
            with torch.no_grad():
                ok[idx] = self(x_adv).argmax(1) == y[idx]
        return ok

    def _eval_attacks(self, stage: str) -> dict[str, Any]:
        """The attacks of a validation or test epoch, by metric name."""
        if stage == "val":
            return {"pgd_acc": self.attack("pgd", self.attacks.eps, self.attacks.val_steps)}
        attacks = {
            "fgsm_acc": self.attack("fgsm", self.attacks.eps),
            "pgd_acc": self.attack("pgd", self.attacks.eps, self.attacks.eval_steps),
        }
        if self.attacks.pgd100:
            attacks["pgd100_acc"] = self.attack("pgd", self.attacks.eps, 100)
        if self.attacks.autoattack:
            attacks["autoattack_acc"] = self.attack("autoattack", self.attacks.eps)
        for e in self.attacks.curve_eps:
            attacks[self.curve_key(e)] = self.attack("pgd", e, self.attacks.eval_steps)
        return attacks

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        metrics = self.val_acc if stage == "val" else self.test_acc
        with grad_enabled():
            x, y = batch[0].clone(), batch[1].clone()
            with torch.no_grad():
                clean_ok = self(x).argmax(1) == y
            results = {"clean_acc": clean_ok}
            for name, attack in self._eval_attacks(stage).items():
                results[name] = self._robust(attack, x, y, clean_ok)
        for name, ok in results.items():
            metric = metrics[_slot(name)]
            metric.update(ok.float())
            shown = name in ("clean_acc", "pgd_acc")
            self.log(
                f"{stage}/{name}", metric, on_epoch=True, on_step=False, batch_size=len(y), prog_bar=shown
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean and PGD (``val_steps``) accuracy of one validation batch."""
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean, FGSM, PGD-20 (+ opt-in PGD-100, AutoAttack) and curve accuracies of one test batch."""
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        """Seed the validation's attacks from the run's seed (see :meth:`on_test_epoch_start`)."""
        self._seed_attacks()

    def on_validation_epoch_end(self) -> None:
        """Put back the random state the validation's attacks were seeded over."""
        self._unseed_attacks()

    def on_test_epoch_start(self) -> None:
        """Seed the test's attacks (random starts) from the run's seed, so a re-test reproduces them.

        The global random state is saved and set to ``seed_everything``'s seed (plus the process
        rank); :meth:`on_test_epoch_end` puts the saved state back. A test of the same checkpoint
        with the same seed and test batches (``--eval-only --ckpt``) then draws the same random
        starts and reports the same numbers as the training run did. Validation does the same, so
        a checkpoint validated again scores what it scored when it was selected, and training's
        random stream does not depend on how often it validates.
        """
        self._seed_attacks()

    def on_test_epoch_end(self) -> None:
        """Put back the random state the test's attacks were seeded over."""
        self._unseed_attacks()

    def _seed_attacks(self) -> None:
        self._rng_fork = torch.random.fork_rng(devices=_devices_of(self.device))
        self._rng_fork.__enter__()
        torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.global_rank)

    def _unseed_attacks(self) -> None:
        fork, self._rng_fork = getattr(self, "_rng_fork", None), None
        if fork is not None:
            fork.__exit__(None, None, None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as the adversarial task's (``--eval-only`` checks it); settings as mappings."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_TASK_KEY] = "adversarial"

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD on the linearly scaled rate with a per-step warm-up + decay schedule."""
        return self.sgd.configure(self)


def _devices_of(device: torch.device) -> list[int]:
    """CUDA device indices whose random state a fork should save (none on CPU)."""
    return [device.index or 0] if device.type == "cuda" else []
