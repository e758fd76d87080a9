"""DANN's pieces (Ganin & Lempitsky 2015): gradient reversal, its schedules, the domain discriminator, AdaBN.

* :class:`GradientReversal` / :func:`grad_reverse`: identity forward, ``-coeff * grad`` backward.
* :func:`grl_coefficient`: the warm-start ``λ(p) = 2 / (1 + exp(-gamma p)) - 1`` (gamma = 10).
* :func:`annealed_lr_factor`: the learning-rate factor ``(1 + alpha p)^-beta`` (alpha = 10, beta = 0.75).
* :class:`DomainDiscriminator`: two hidden layers with registry 1-D norms, one logit.
* :func:`adapt_norm_statistics`: AdaBN (Li et al. 2016): recompute the running statistics of
  every norm layer (:func:`bgn_lightning.is_norm_layer`: BN and BGN alike) on target data.
* :func:`domain_probe_accuracy`: how separable two sets of features are, by a fresh classifier
  scored on held-out halves (the proxy-A-distance protocol of Ben-David et al. / Ganin et al.).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgn_lightning import keeps_running_stats, norm_mode
from tasks.common.norms import NormFactory
from tasks.common.validate import check_int

__all__ = [
    "DomainDiscriminator",
    "GradientReversal",
    "adapt_norm_statistics",
    "annealed_lr_factor",
    "domain_probe_accuracy",
    "grad_reverse",
    "grl_coefficient",
    "norm_statistics",
]


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; the gradient times ``-coeff`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        """``x`` unchanged (a view, so autograd records this node)."""
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        """``-coeff * grad`` for ``x``; nothing for ``coeff``."""
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """:class:`GradientReversal` applied to ``x`` with coefficient ``coeff`` (>= 0).

    Raises:
        ValueError: for a negative ``coeff``.
    """
    if coeff < 0:
        raise ValueError(f"grad_reverse: coeff must be >= 0, got {coeff!r}")
    return GradientReversal.apply(x, float(coeff))


def _check_progress(who: str, progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"{who}: progress must be in [0, 1], got {progress!r}")


def grl_coefficient(progress: float, gamma: float = 10.0, high: float = 1.0) -> float:
    """DANN's warm start ``high * (2 / (1 + exp(-gamma * p)) - 1)``: 0 at ``p = 0``, ``0.9999 high`` at 1.

    Args:
        progress: training progress ``p`` in [0, 1] (optimizer steps done / total).
        gamma: steepness (10 in the paper).
        high: the limit (1 in the paper).

    Raises:
        ValueError: for ``progress`` outside [0, 1].
    """
    _check_progress("grl_coefficient", progress)
    return high * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


def annealed_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN's learning-rate factor ``(1 + alpha * p)^-beta``: 1 at ``p = 0``, ``0.166`` at ``p = 1``.

    Raises:
        ValueError: for ``progress`` outside [0, 1].
    """
    _check_progress("annealed_lr_factor", progress)
    return (1.0 + alpha * progress) ** (-beta)


class DomainDiscriminator(nn.Sequential):
    """The domain classifier: ``Linear -> norm -> ReLU`` twice, then one logit (source = 1, target = 0).

    As the reference library's ``DomainDiscriminator``; its norm layers come from the registry
    (1-D variants, ``norm_layer``).

    Args:
        in_features: feature width.
        hidden: width of the two hidden layers.
        norm_layer: ``num_features -> nn.Module`` (e.g. ``norm_factory(norm, dim=1)``).

    Raises:
        ValueError: for a non-positive width.
    """

    def __init__(self, in_features: int, hidden: int, norm_layer: NormFactory) -> None:
        check_int("in_features", in_features, owner="DomainDiscriminator")
        check_int("hidden", hidden, owner="DomainDiscriminator")
        super().__init__(
            nn.Linear(in_features, hidden), norm_layer(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), norm_layer(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, features: Tensor) -> Tensor:
        """Domain logits ``(N,)`` for features ``(N, in_features)``."""
        return super().forward(features).squeeze(-1)


def norm_statistics(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the running statistics (``running_*``, ``num_batches_tracked``) of the norm layers."""
    return {
        f"{name}.{buffer}": value.detach().clone()
        for name, module in model.named_modules()
        if keeps_running_stats(module)
        for buffer, value in module.named_buffers(recurse=False)
        if value is not None
    }


@torch.no_grad()
def adapt_norm_statistics(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None
) -> int:
    """AdaBN: replace the running statistics of every norm layer of ``model`` by those of ``batches``.

    Every module that :func:`bgn_lightning.is_norm_layer` recognises and that keeps running
    statistics (BatchNorm, BatchGroupNorm, InstanceNorm with ``track_running_stats``...) is reset
    and, with ``momentum=None`` (a cumulative average), put in training mode for one pass over
    ``batches``; every other module stays in its mode, no parameter changes, and each layer's
    momentum and every module's mode are restored afterwards.

    Args:
        model: the model to adapt.
        batches: inputs, e.g. a DataLoader of target-domain images.
        forward: how to run one batch through ``model`` (default ``model(batch)``).

    Returns:
        The number of batches seen.

    Raises:
        ValueError: when ``batches`` is empty (the statistics would be left reset).
    """
    layers = [m for m in model.modules() if keeps_running_stats(m)]
    momenta = [m.momentum for m in layers]
    seen = 0
    try:
        with norm_mode(model, train=True):
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None
            for batch in batches:
                (forward or model)(batch)
                seen += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not seen:
        raise ValueError("adapt_norm_statistics: no batches to estimate the statistics from")
    return seen


def domain_probe_accuracy(
    source: Tensor, target: Tensor, *, hidden: int = 256, steps: int = 300, lr: float = 0.01, seed: int = 0
) -> float:
    """Balanced accuracy of a fresh classifier at telling ``source`` from ``target`` features.

    Each domain's rows are split at random into two halves; a new MLP (``Linear -> ReLU -> Linear``,
    ``hidden`` wide, no norm layer: it has no statistics of its own to erase a shift) is trained
    full-batch with Adam for ``steps`` steps on one half of both domains (features standardised
    with that half's mean and std, the two domains weighted equally) and scored on the other half;
    the result is the mean of the two folds' balanced accuracies (0.5: the features do not tell
    the domains apart, 1.0: they separate perfectly). It depends only on the features and
    ``seed`` (the global random state is left untouched), not on any discriminator trained with
    the model.

    Args:
        source: ``(N_s, D)`` features of one domain.
        target: ``(N_t, D)`` features of the other.
        hidden: the probe's hidden width.
        steps: full-batch Adam steps per fold.
        lr: Adam's rate.
        seed: seeds the split and the probe's initialisation.

    Raises:
        ValueError: when a domain has fewer than 2 rows or the widths differ.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"domain_probe_accuracy: need (N, D) features of one width, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")  # fmt: skip
    if len(source) < 2 or len(target) < 2:
        raise ValueError("domain_probe_accuracy: each domain needs at least 2 rows (one per half)")
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    # a test loop runs under inference mode: train the probe outside it, on plain copies
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        halves = []
        for features in (source.detach().float().cpu().clone(), target.detach().float().cpu().clone()):
            order = torch.randperm(len(features), generator=generator)
            halves.append((features[order[: len(order) // 2]], features[order[len(order) // 2 :]]))
        torch.manual_seed(seed)
        for fold in (0, 1):
            fit = [half[fold] for half in halves]
            held = [half[1 - fold] for half in halves]
            accuracies.append(_fit_and_score_probe(fit, held, hidden, steps, lr))
    return sum(accuracies) / len(accuracies)


def _fit_and_score_probe(fit: list[Tensor], held: list[Tensor], hidden: int, steps: int, lr: float) -> float:
    """Train a probe on ``fit`` (domain 0 = label 1, domain 1 = label 0), balanced accuracy on ``held``."""
    x = torch.cat(fit)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    probe = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    labels = torch.cat([torch.ones(len(fit[0])), torch.zeros(len(fit[1]))])
    weight = torch.cat([torch.full((len(part),), 0.5 / len(part)) for part in fit])  # half per domain
    for _ in range(steps):
        optimizer.zero_grad()
        logits = probe((x - mean) / std).squeeze(-1)
        F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum").backward()
        optimizer.step()
    with torch.no_grad():
        hits = [((probe((h - mean) / std).squeeze(-1) > 0) == bool(label)).float().mean()
                for h, label in zip(held, (1, 0), strict=True)]  # fmt: skip
    return float(sum(hits) / len(hits))
