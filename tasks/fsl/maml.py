"""Model-Agnostic Meta-Learning (Finn et al., 2017) on ``learn2learn.algorithms.MAML``.

:class:`MAML` is what :class:`~tasks.fsl.module.FewShotModule` runs for ``algorithm="maml"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.common.training import grad_enabled

from .l2l import learn2learn

__all__ = ["MAML", "maml_episode"]


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


class MAML:
    """The MAML algorithm of a few-shot module: learn2learn's ``MAML`` around backbone + linear head.

    The norm runs in MAML's usual transductive mode: ``track_running_stats=False`` is passed to the
    registry (norms without running statistics ignore it), so the support set and the query set
    are each normalized with their own batch statistics, in training and at meta-test alike;
    ``norm_kwargs`` can override it. Evaluation adapts too (first-order, ``eval_adapt_steps``).
    """

    network_name = "learner"
    """The module attribute the network is stored as (checkpoint keys ``learner.*``)."""
    has_head = True

    def __init__(self, hparams: Any) -> None:
        self.hparams = hparams
        self.lazy_state_ready = False

    def norm_kwargs(self, configured: dict[str, Any]) -> dict[str, Any]:
        """Transductive norms unless configured otherwise."""
        return {"track_running_stats": False, **configured}

    def build(self, backbone: nn.Module, head: nn.Module | None) -> nn.Module:
        """learn2learn's ``MAML`` around the backbone and its linear head."""
        hp = self.hparams
        return learn2learn().algorithms.MAML(nn.Sequential(backbone, head), lr=hp.adapt_lr,
                                             first_order=hp.first_order)

    def logits(self, learner: Any, support: Tensor, support_labels: Tensor, query: Tensor,
               ids: Tensor, training: bool) -> Tensor:
        """Adapt a clone on the support set, then classify the queries."""
        hp = self.hparams
        if not self.lazy_state_ready:
            # Lazy layer state (BGN's auto-G) must be fixed on the meta-parameters, not on a clone
            # that is thrown away after the episode: one no-grad forward on a support set does it.
            with torch.no_grad():
                learner(support)
            self.lazy_state_ready = True
        if training:
            return maml_episode(learner, support, support_labels, query, hp.adapt_steps)
        # Evaluation adapts too: leave Lightning's inference mode and adapt first-order.
        with grad_enabled():
            support, query = support.clone(), query.clone()
            logits = maml_episode(learner, support, support_labels.clone(), query, hp.eval_adapt_steps,
                                  first_order=True)
        return logits.detach()

    def new_pass(self) -> None:
        """Nothing is cached across episodes."""
