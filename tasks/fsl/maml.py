"""Model-Agnostic Meta-Learning (Finn et al., 2017) on ``learn2learn.algorithms.MAML``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["maml_episode"]


def maml_episode(
    maml: Any,
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    steps: int,
    first_order: bool | None = None,
) -> Tensor:
    """Adapt a clone of ``maml`` on the support set, then return its query logits.

    Args:
        maml: a ``learn2learn.algorithms.MAML`` wrapper around the classifier.
        support: support images, ``(ways * shots, C, H, W)``.
        support_labels: ``(ways * shots,)`` in ``0..ways-1``.
        query: query images.
        steps: inner-loop gradient steps (each at ``maml.lr``).
        first_order: override the wrapper's setting (evaluation adapts first-order: no meta-gradient
            is needed there).

    The clone's fast weights are differentiable functions of the meta-parameters (second-order
    MAML unless ``first_order``); the meta-parameters themselves are never modified.
    """
    learner = maml.clone(first_order=first_order)
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(support), support_labels))
    return learner(query)
