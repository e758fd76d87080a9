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
from tasks.common.optim import Schedule, SGDSettings
from tasks.common.training import grad_enabled
from tasks.common.validate import check_choice

from .attacks import (
    ATTACK_NORM_MODES,
    TRAIN_ATTACKS,
    NormMode,
    attack_defaults,
    build_attack,
    check_eps,
    check_steps,
    eval_step_size,
    perturb,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "CHECKPOINT_TASK_KEY",
    "DEFAULT_CURVE_FRACTIONS",
    "AdversarialModule",
    "Normalize",
]

CHECKPOINT_TASK_KEY = "bgn_task"
"""Key of the task name in this module's checkpoints (``--eval-only`` refuses other tasks')."""
ARCHITECTURE_KEYS = ("norm", "groups", "norm_kwargs", "backbone", "num_classes", "in_channels", "mean", "std")
"""Init arguments that define the network: ``--eval-only`` takes them from the checkpoint."""
DEFAULT_CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.5, 2.0)
"""Radii of the default robustness curve, as multiples of ``eps`` (beside 0 and ``eps``)."""


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


class AdversarialModule(pl.LightningModule):
    """Adversarial training (Madry et al. 2018; fast FGSM, Wong et al. 2020) with any registry norm.

    The network is ``Normalize(mean, std)`` followed by a shared backbone whose every norm layer
    is ``norm``; inputs are pixels in [0, 1] (the DataModule runs with ``normalize=False``).

    **Training.** Each batch is replaced by adversarial examples from torchattacks
    (``train_attack``): ``pgd`` (``PGD``: ``train_steps`` steps of ``step_size`` within the
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
    ``lr * B / base_batch_size``, linear warm-up, then ``lr_schedule``.

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
            (:data:`tasks.adversarial.attacks.ATTACK_DEFAULTS`) for ``eps``, ``step_size`` and
            ``train_steps`` left at ``None``.
        train_attack: ``pgd``, ``fgsm`` (with random start) or ``none``.
        eps: L-infinity radius of training and evaluation, in [0, 1].
        step_size: PGD step for training, in [0, 1].
        train_steps: PGD steps for training (>= 1).
        random_start: PGD (training and evaluation) starts at a random point of the ball.
        fast_step_size: the ``fgsm`` training step (``None``: ``1.25 * eps``, Wong et al.).
        clean_weight: weight of the clean loss in [0, 1] (0: adversarial examples only).
        attack_norm_mode: ``train`` or ``eval``: the mode of every norm layer while the training
            attack runs.
        eval_steps: PGD steps of ``test/pgd_acc`` and of the curve (20: PGD-20).
        val_steps: PGD steps of ``val/pgd_acc``.
        curve_eps: radii of the robustness curve beside 0 and ``eps`` (``None``: 0.25, 0.5,
            0.75, 1.5 and 2 times ``eps``, those <= 1; ``[]``: no curve).
        pgd100: also report ``test/pgd100_acc`` (PGD-100).
        autoattack: also report ``test/autoattack_acc`` (torchattacks' standard AutoAttack; slow).
        lr, base_batch_size, global_batch_size, momentum, nesterov, weight_decay, warmup_epochs,
            lr_schedule, milestones, gamma: the SGD + linear-rule settings, one checked group
            (:class:`tasks.common.optim.SGDSettings`, held as :attr:`sgd`).
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
        train_attack: str = "pgd",
        eps: float | None = None,
        step_size: float | None = None,
        train_steps: int | None = None,
        random_start: bool = True,
        fast_step_size: float | None = None,
        clean_weight: float = 0.0,
        attack_norm_mode: NormMode = "train",
        eval_steps: int = 20,
        val_steps: int = 10,
        curve_eps: list[float] | None = None,
        pgd100: bool = False,
        autoattack: bool = False,
        lr: float = 0.1,
        base_batch_size: int = 32,
        global_batch_size: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 1.0,
        lr_schedule: Schedule = "cosine",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_factory(norm, groups, norm_kwargs)
        check_choice("train_attack", train_attack, TRAIN_ATTACKS)
        if attack_norm_mode not in ATTACK_NORM_MODES:
            raise ValueError(
                f"attack_norm_mode must be one of: {', '.join(ATTACK_NORM_MODES)}; got {attack_norm_mode!r}"
            )
        defaults = attack_defaults(dataset) if None in (eps, step_size, train_steps) else None
        self.eps = check_eps("eps", defaults.eps if eps is None else eps)
        self.step_size = check_eps("step_size", defaults.step_size if step_size is None else step_size)
        self.train_steps = check_steps(
            "train_steps", defaults.train_steps if train_steps is None else train_steps
        )
        self.fast_step_size = check_eps(
            "fast_step_size", min(1.0, 1.25 * self.eps) if fast_step_size is None else fast_step_size
        )
        self.eval_steps = check_steps("eval_steps", eval_steps)
        self.val_steps = check_steps("val_steps", val_steps)
        if isinstance(clean_weight, bool) or not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must be in [0, 1], got {clean_weight!r}")
        if curve_eps is None:
            curve_eps = [f * self.eps for f in DEFAULT_CURVE_FRACTIONS if f * self.eps <= 1.0]
        self.curve_eps = sorted({check_eps("curve_eps", e) for e in curve_eps} - {0.0, self.eps})
        self.sgd = SGDSettings.of(locals())
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
        names += ["pgd100_acc"] * self.hparams.pgd100 + ["autoattack_acc"] * self.hparams.autoattack
        return names + [self.curve_key(e) for e in self.curve_eps]

    @staticmethod
    def curve_key(eps: float) -> str:
        """The metric name (without ``test/``) of the curve's PGD accuracy at radius ``eps``."""
        return f"pgd_acc_eps{eps:.4g}"

    def curve(self, metrics: dict[str, float]) -> dict[str, list[float]]:
        """The robustness curve from a test's metrics: ``{"eps": [...], "pgd_acc": [...]}``, eps ascending.

        Radius 0 is the clean accuracy and ``eps`` the PGD accuracy; points missing from
        ``metrics`` are left out.
        """
        keys = {0.0: "test/clean_acc", self.eps: "test/pgd_acc"}
        keys.update({e: f"test/{self.curve_key(e)}" for e in self.curve_eps})
        points = sorted((e, float(metrics[k])) for e, k in keys.items() if k in metrics)
        return {"eps": [e for e, _ in points], "pgd_acc": [a for _, a in points]}

    @property
    def attack_settings(self) -> dict[str, Any]:
        """The resolved attack settings (the per-dataset defaults filled in), for ``results.json``."""
        hp = self.hparams
        return {
            "train_attack": hp.train_attack,
            "eps": self.eps,
            "step_size": self.step_size,
            "train_steps": self.train_steps,
            "fast_step_size": self.fast_step_size,
            "random_start": hp.random_start,
            "clean_weight": hp.clean_weight,
            "attack_norm_mode": hp.attack_norm_mode,
            "eval_steps": self.eval_steps,
            "eval_step_size": eval_step_size(self.eps, self.eval_steps, self.eps, self.step_size),
            "val_steps": self.val_steps,
            "curve_eps": self.curve_eps,
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
            step = self.fast_step_size if name == "ffgsm" else self.step_size
        else:
            step = eval_step_size(eps, steps, self.eps, self.step_size)
        return build_attack(
            self, name, eps, step, steps, self.hparams.random_start, norm_mode, self.hparams.num_classes
        )

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The adversarial (optionally mixed with the clean) cross-entropy of one batch."""
        x, y = batch
        hp = self.hparams
        if hp.train_attack == "none":
            x_adv = x
        else:
            name, steps = ("pgd", self.train_steps) if hp.train_attack == "pgd" else ("ffgsm", 1)
            mode = hp.attack_norm_mode
            x_adv = perturb(self.attack(name, self.eps, steps, norm_mode=mode), self, x, y, norm_mode=mode)
        logits = self(x_adv)
        loss = F.cross_entropy(logits, y)
        if hp.clean_weight > 0:
            loss = (1.0 - hp.clean_weight) * loss + hp.clean_weight * F.cross_entropy(self(x), y)
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
            return {"pgd_acc": self.attack("pgd", self.eps, self.val_steps)}
        attacks = {
            "fgsm_acc": self.attack("fgsm", self.eps),
            "pgd_acc": self.attack("pgd", self.eps, self.eval_steps),
        }
        if self.hparams.pgd100:
            attacks["pgd100_acc"] = self.attack("pgd", self.eps, 100)
        if self.hparams.autoattack:
            attacks["autoattack_acc"] = self.attack("autoattack", self.eps)
        for e in self.curve_eps:
            attacks[self.curve_key(e)] = self.attack("pgd", e, self.eval_steps)
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
        """Mark the checkpoint as the adversarial task's (``--eval-only`` checks it)."""
        checkpoint[CHECKPOINT_TASK_KEY] = "adversarial"

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD on the linearly scaled rate with a per-step warm-up + decay schedule."""
        return self.sgd.configure(self)


def _devices_of(device: torch.device) -> list[int]:
    """CUDA device indices whose random state a fork should save (none on CPU)."""
    return [device.index or 0] if device.type == "cuda" else []
