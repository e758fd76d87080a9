"""Learning-rate rule shared by the task suites: linear scaling with batch size, linear warm-up.

The rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; used by the GN and BGN papers):

* **Linear scaling**: ``lr = base_lr * batch_size / base_batch_size``. ``base_lr`` is the rate
  tuned at ``base_batch_size``; halving the batch halves the rate, so the expected update per
  sample seen stays the same and a fixed epoch budget is comparable across batch sizes.
* **Warm-up**: the rate grows linearly from ``lr / warmup_steps`` to ``lr`` over the first
  ``warmup_steps`` optimizer steps, then follows the schedule (cosine to 0, step decay by
  ``gamma`` at fractions of training, or constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from lightning.pytorch import LightningModule
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bgn_lightning import is_norm_layer

from .settings import SettingsGroup
from .validate import check_choice

__all__ = [
    "SGDSettings", "Schedule", "lr_multiplier", "param_groups", "scaled_lr", "sgd_with_lr_rule",
    "warmup_scheduler",
]  # fmt: skip

Schedule = Literal["cosine", "multistep", "constant"]


@dataclass(frozen=True)
class SGDSettings(SettingsGroup):
    """The SGD + linear-rule settings of a task's model, as one checked group.

    The suites that train with :func:`sgd_with_lr_rule` (classification, adversarial) take it as
    the init argument ``sgd`` (config keys ``model.sgd.lr``, ``model.sgd.warmup_epochs``...; the
    flat ``model.lr``... of earlier versions are still read, :mod:`tasks.common.settings`) and
    hold it as ``self.sgd``; ``configure_optimizers`` is ``self.sgd.configure(self)``.

    Attributes:
        lr: learning rate at ``base_batch_size``.
        base_batch_size: the batch size ``lr`` is tuned for.
        global_batch_size: ``B`` of the rule; ``None`` reads the DataModule's ``batch_size`` and
            multiplies it by the number of devices and the gradient accumulation.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty on conv and linear weights (not norm affines and biases).
        warmup_epochs: epochs of linear warm-up (fractions allowed; 0 for none).
        lr_schedule: ``cosine``, ``multistep`` or ``constant`` after warm-up.
        milestones: fractions of training at which ``multistep`` decays (``None``: 0.5, 0.75).
        gamma: ``multistep`` decay factor.

    Raises:
        ValueError: ``warmup_epochs must be >= 0``.
    """

    KEY = "sgd"

    lr: float = 0.1
    base_batch_size: int = 32
    global_batch_size: int | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    lr_schedule: Schedule = "cosine"
    milestones: list[float] | None = None
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")

    def configure(self, module: LightningModule) -> dict[str, Any]:
        """``module``'s ``configure_optimizers``: :func:`sgd_with_lr_rule` with these settings."""
        return sgd_with_lr_rule(module, **{f.name: getattr(self, f.name) for f in fields(self)})


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Linear scaling rule: ``base_lr * batch_size / base_batch_size``.

    Raises:
        ValueError: for a non-positive rate or batch size.
    """
    if base_lr <= 0:
        raise ValueError(f"scaled_lr: base_lr must be > 0, got {base_lr!r}")
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(
            f"scaled_lr: batch sizes must be >= 1, got batch_size={batch_size!r}, "
            f"base_batch_size={base_batch_size!r}"
        )
    return base_lr * batch_size / base_batch_size


def lr_multiplier(
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """``step -> factor`` applied to the (scaled) rate: linear warm-up, then ``schedule``.

    Args:
        warmup_steps: optimizer steps of linear warm-up (0 for none).
        total_steps: optimizer steps of the whole run.
        schedule: ``cosine`` (to 0 at ``total_steps``), ``multistep`` (times ``gamma`` at each
            fraction in ``milestones`` of ``total_steps``) or ``constant``.
        milestones: fractions of training in (0, 1) for ``multistep``.
        gamma: decay factor for ``multistep``.

    Raises:
        ValueError: for an unknown schedule, negative warm-up, ``total_steps < 1`` or
            milestones outside (0, 1).
    """
    check_choice("lr schedule", schedule, ("cosine", "multistep", "constant"))
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"lr_multiplier: need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )
    if any(not 0.0 < m < 1.0 for m in milestones):
        raise ValueError(f"lr_multiplier: milestones must be fractions in (0, 1), got {list(milestones)}")
    warmup = min(warmup_steps, total_steps)
    bounds = sorted(round(m * total_steps) for m in milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "multistep":
            return gamma ** sum(step >= b for b in bounds)
        return 1.0

    return factor


def warmup_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, **kwargs: Any) -> LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` with :func:`lr_multiplier`'s factor.

    ``kwargs`` go to :func:`lr_multiplier` (``schedule``, ``milestones``, ``gamma``).
    """
    return LambdaLR(optimizer, lr_multiplier(warmup_steps, total_steps, **kwargs))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: conv/linear weights with ``weight_decay``, norm affines and biases without.

    Decaying a norm layer's scale only fights the normalization (it is scale-invariant), so it is
    left out, as in the usual ResNet recipes. Norm layers are found with
    :func:`bgn_lightning.is_norm_layer`, which knows BGN, PN and the torch norms.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if is_norm_layer(module):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if id(p) in no_decay or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def sgd_with_lr_rule(
    module: LightningModule,
    lr: float,
    base_batch_size: int,
    global_batch_size: int | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 1.0,
    lr_schedule: Schedule = "cosine",
    milestones: Sequence[float] | None = None,
    gamma: float = 0.1,
) -> dict[str, Any]:
    """``configure_optimizers`` of the tasks that train with SGD and the linear-scaling rule.

    SGD (momentum, Nesterov) on :func:`param_groups` at ``lr * B / base_batch_size``, ``B`` the
    global batch size (:func:`tasks.common.training.global_batch_size`), with a per-step
    :func:`warmup_scheduler` of ``warmup_epochs`` epochs, then ``lr_schedule``.

    Args:
        module: the LightningModule (attached to its Trainer).
        lr: rate at ``base_batch_size``.
        base_batch_size: the batch size ``lr`` is tuned for.
        global_batch_size: ``B``; ``None`` reads the DataModule's batch size x devices x accumulation.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty on conv and linear weights (not norm affines and biases).
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        lr_schedule: ``cosine``, ``multistep`` or ``constant`` after warm-up.
        milestones: fractions of training at which ``multistep`` decays (default 0.5, 0.75).
        gamma: ``multistep`` decay factor.

    Returns:
        Lightning's ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
    """
    from .training import global_batch_size as batch_rule

    trainer = module.trainer
    optimizer = SGD(
        param_groups(module, weight_decay),
        lr=scaled_lr(lr, batch_rule(trainer, global_batch_size), base_batch_size),
        momentum=momentum,
        nesterov=nesterov,
    )
    total_steps = max(1, int(trainer.estimated_stepping_batches))
    # estimated_stepping_batches has set up the train dataloader, so its length is known
    per_epoch = max(1, -(-int(trainer.num_training_batches) // trainer.accumulate_grad_batches))
    scheduler = warmup_scheduler(
        optimizer,
        warmup_steps=round(warmup_epochs * per_epoch),
        total_steps=total_steps,
        schedule=lr_schedule,
        milestones=milestones or (0.5, 0.75),
        gamma=gamma,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
