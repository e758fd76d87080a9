"""The attacks of the adversarial suite: torchattacks' PGD, FGSM, fast FGSM and AutoAttack, norm-aware.

Every attack here is a ``torchattacks`` attack patched by :func:`bgn_lightning.norm_aware_attack`
and run by :func:`perturb` inside :func:`bgn_lightning.norm_mode`, so that every registry norm
layer (BN, BGN, GN, LN, IN, PN alike, found by :func:`bgn_lightning.is_norm_layer`) is in the
chosen mode while the attack runs and every module gets its mode back afterwards, also when the
attack raises. Inputs and adversarial examples are pixels in [0, 1]; the model normalises inside.

Per-dataset defaults (:data:`ATTACK_DEFAULTS`): the L-infinity radius ``eps``, the PGD step and
the number of PGD steps used for training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

import bgn_lightning
from bgn_lightning import norm_aware_attack
from tasks.common.settings import SettingsGroup
from tasks.common.validate import check_choice, check_int

__all__ = [
    "ATTACK_DEFAULTS",
    "ATTACK_NORM_MODES",
    "DEFAULT_CURVE_FRACTIONS",
    "EVAL_ATTACKS",
    "TRAIN_ATTACKS",
    "AttackDefaults",
    "AttackSettings",
    "attack_defaults",
    "build_attack",
    "check_eps",
    "check_steps",
    "eval_step_size",
    "perturb",
]

NormMode = Literal["eval", "train"]
ATTACK_NORM_MODES: tuple[str, ...] = ("eval", "train")
"""``attack_norm_mode`` values: the mode of every norm layer while a training attack runs."""
TRAIN_ATTACKS: tuple[str, ...] = ("pgd", "fgsm", "none")
"""``train_attack`` values: Madry's PGD, FGSM with a random start (fast AT), no attack (undefended)."""
EVAL_ATTACKS: tuple[str, ...] = ("pgd", "fgsm", "ffgsm", "autoattack")
"""Names :func:`build_attack` takes (``ffgsm``: FGSM from a random start, torchattacks' ``FFGSM``)."""
DEFAULT_CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.5, 2.0)
"""Radii of the default robustness curve, as multiples of ``eps`` (beside 0 and ``eps``)."""


@dataclass(frozen=True)
class AttackDefaults:
    """A dataset's attack settings (L-infinity, pixels in [0, 1]).

    Attributes:
        eps: radius of the L-infinity ball.
        step_size: PGD step (``alpha``) for training.
        train_steps: PGD steps for training.
    """

    eps: float
    step_size: float
    train_steps: int


_CIFAR = AttackDefaults(8 / 255, 2 / 255, 7)  # Madry et al. 2018, CIFAR-10: 7 steps of 2/255
_MNIST = AttackDefaults(0.3, 0.01, 40)  # Madry et al. 2018, MNIST: 40 steps of 0.01
ATTACK_DEFAULTS: dict[str, AttackDefaults] = {
    # 8x8 digits: at eps 0.15 PGD-20 takes an undefended small CNN from 100 % clean to ~2 %
    # accuracy (at 0.1 it still has ~42 %; docs/adversarial.md has the measurement); 7 steps of
    # 0.04 cross the ball (0.28 >= 2 eps), as Madry's 7 steps of 2/255 do at 8/255 on CIFAR.
    "digits": AttackDefaults(0.15, 0.04, 7),
    "mnist": _MNIST,
    "usps": _MNIST,
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    "svhn": _CIFAR,
    "imagefolder": _CIFAR,
}
"""Per-dataset defaults: CIFAR-style ``8/255, 2/255, 7`` for colour images, MNIST's ``0.3, 0.01, 40``."""


@dataclass(frozen=True)
class AttackSettings(SettingsGroup):
    """The attacks of an :class:`~tasks.adversarial.module.AdversarialModule`: how it trains and is
    evaluated (config keys ``model.attack.*``; the flat ``model.eps``... of earlier versions are
    still read).

    ``eps``, ``step_size``, ``train_steps``, ``fast_step_size`` and ``curve_eps`` may be ``None``
    (the dataset's default, :meth:`resolved`).

    Attributes:
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
    """

    KEY = "attack"

    train_attack: str = "pgd"
    eps: float | None = None
    step_size: float | None = None
    train_steps: int | None = None
    random_start: bool = True
    fast_step_size: float | None = None
    clean_weight: float = 0.0
    attack_norm_mode: NormMode = "train"
    eval_steps: int = 20
    val_steps: int = 10
    curve_eps: list[float] | None = None
    pgd100: bool = False
    autoattack: bool = False

    def resolved(self, dataset: str) -> AttackSettings:
        """These settings checked, with ``dataset``'s defaults (:func:`attack_defaults`) for the
        radius, steps and curve left at ``None``; ``curve_eps`` sorted, without 0 and ``eps``.

        Raises:
            ValueError: for a radius or step outside [0, 1], a step count < 1, an unknown attack
                or ``attack_norm_mode``, a ``clean_weight`` outside [0, 1], or a dataset without
                defaults where one is needed.
        """
        check_choice("train_attack", self.train_attack, TRAIN_ATTACKS)
        if self.attack_norm_mode not in ATTACK_NORM_MODES:
            modes = ", ".join(ATTACK_NORM_MODES)
            raise ValueError(f"attack_norm_mode must be one of: {modes}; got {self.attack_norm_mode!r}")
        given = (self.eps, self.step_size, self.train_steps)
        defaults = attack_defaults(dataset) if None in given else None
        eps = check_eps("eps", defaults.eps if self.eps is None else self.eps)
        step = defaults.step_size if self.step_size is None else self.step_size
        steps = defaults.train_steps if self.train_steps is None else self.train_steps
        fast = min(1.0, 1.25 * eps) if self.fast_step_size is None else self.fast_step_size
        if isinstance(self.clean_weight, bool) or not 0.0 <= self.clean_weight <= 1.0:
            raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight!r}")
        curve = self.curve_eps
        if curve is None:
            curve = [f * eps for f in DEFAULT_CURVE_FRACTIONS if f * eps <= 1.0]
        return replace(
            self,
            eps=eps,
            step_size=check_eps("step_size", step),
            train_steps=check_steps("train_steps", steps),
            fast_step_size=check_eps("fast_step_size", fast),
            eval_steps=check_steps("eval_steps", self.eval_steps),
            val_steps=check_steps("val_steps", self.val_steps),
            curve_eps=sorted({check_eps("curve_eps", e) for e in curve} - {0.0, eps}),
        )


def attack_defaults(dataset: str) -> AttackDefaults:
    """The attack defaults of ``dataset``.

    Raises:
        ValueError: for a dataset without defaults (set ``eps``, ``step_size`` and ``train_steps``).
    """
    if dataset not in ATTACK_DEFAULTS:
        raise ValueError(
            f"no attack defaults for dataset {dataset!r} (known: {', '.join(ATTACK_DEFAULTS)}); "
            "set --model.attack.eps, --model.attack.step_size and --model.attack.train_steps"
        )
    return ATTACK_DEFAULTS[dataset]


def check_eps(name: str, value: object) -> float:
    """``value`` as a float, if it is an L-infinity radius or step in [0, 1] of [0, 1] pixels.

    Raises:
        ValueError: naming ``name``, the value and the rule.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (pixels are in [0, 1]), got {value!r}")
    return float(value)


def check_steps(name: str, value: object) -> int:
    """``value`` if it is a positive int.

    Raises:
        ValueError: naming ``name``, the value and the rule.
    """
    return check_int(name, value, expected="an int >= 1")


def eval_step_size(eps: float, steps: int, base_eps: float, base_step: float) -> float:
    """The PGD step of an evaluation attack of radius ``eps`` with ``steps`` steps.

    ``max(base_step, 2.5 * base_eps / steps) * eps / base_eps``: the training step, or Madry's
    ``2.5 eps / steps`` when the training step is too small to cross the ball in ``steps`` steps
    (MNIST's 0.01 in 20 steps), scaled with the radius (robustness curves).
    """
    if base_eps == 0.0:
        return base_step
    return max(base_step, 2.5 * base_eps / steps) * eps / base_eps


def build_attack(
    model: nn.Module,
    name: str,
    eps: float,
    step_size: float = 0.0,
    steps: int = 1,
    random_start: bool = True,
    norm_mode: NormMode | None = None,
    num_classes: int = 10,
    seed: int = 0,
) -> Attack:
    """A norm-aware torchattacks attack on ``model`` (inputs in [0, 1]).

    Args:
        model: the model, normalisation included.
        name: ``pgd`` (``PGD``), ``fgsm`` (``FGSM``), ``ffgsm`` (``FFGSM``: FGSM from a uniform
            random start with step ``step_size``, Wong et al. 2020) or ``autoattack``
            (``AutoAttack``, standard L-infinity version).
        eps: L-infinity radius.
        step_size: PGD / FFGSM step.
        steps: PGD steps.
        random_start: PGD starts at a uniformly random point of the ball.
        norm_mode: ``None``: the whole model in eval mode while attacking (evaluation);
            ``eval`` / ``train``: the model in training mode with every norm layer in that mode
            (adversarial training; see :func:`perturb`).
        num_classes: classes (AutoAttack's targeted attacks).
        seed: AutoAttack's seed.

    Raises:
        ValueError: for an unknown ``name`` or ``norm_mode``.
    """
    check_choice("attack", name, EVAL_ATTACKS)
    if name == "pgd":
        attack: Attack = torchattacks.PGD(
            model, eps=eps, alpha=step_size, steps=steps, random_start=random_start
        )
    elif name == "fgsm":
        attack = torchattacks.FGSM(model, eps=eps)
    elif name == "ffgsm":
        attack = torchattacks.FFGSM(model, eps=eps, alpha=step_size)
    else:  # autoattack
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, n_classes=num_classes, seed=seed)
    norm_aware_attack(attack)
    if norm_mode is not None:
        check_choice("attack_norm_mode", norm_mode, ATTACK_NORM_MODES)
        attack.set_model_training_mode(model_training=True, batchnorm_training=norm_mode == "train")
    return attack


def perturb(
    attack: Attack, model: nn.Module, x: Tensor, y: Tensor, norm_mode: NormMode | None = None
) -> Tensor:
    """Adversarial examples of ``(x, y)``, with every norm layer of ``model`` in ``norm_mode``.

    Runs ``attack`` inside :func:`bgn_lightning.norm_mode`: every
    :func:`~bgn_lightning.is_norm_layer` module is in training (``train``) or eval (``eval``)
    mode during the attack's forwards — in ``eval`` mode attack iterates never update running
    statistics — and every module of ``model`` has its previous mode afterwards, also when the
    attack raises. ``None`` (evaluation) puts the norm layers in eval mode (the attack puts the
    whole model there).
    """
    with bgn_lightning.norm_mode(model, train=norm_mode == "train"):
        return attack(x, y)
