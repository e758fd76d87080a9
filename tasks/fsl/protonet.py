"""Prototypical Networks (Snell et al., 2017): class prototypes, distance logits, evaluation cache.

:class:`ProtoNet` is what :class:`~tasks.fsl.module.FewShotModule` runs for ``algorithm="protonet"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EmbeddingCache", "ProtoNet", "protonet_logits", "prototype_logits", "prototypes"]


def prototypes(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """The mean embedding of every class: ``(ways, D)`` from ``support (S, D)`` and ``labels (S,)``."""
    one_hot = F.one_hot(labels, ways).to(support.dtype)  # (S, ways)
    return (one_hot.t() @ support) / one_hot.sum(0).clamp_min(1).unsqueeze(1)


def prototype_logits(query: Tensor, protos: Tensor) -> Tensor:
    """Negative squared Euclidean distances ``(Q, ways)`` from every query to every prototype."""
    return -(query.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


def protonet_logits(embeddings: Tensor, support_labels: Tensor) -> Tensor:
    """Query logits of an episode from the embeddings of its support images followed by its queries.

    Support and query are embedded in one forward pass by the caller, so batch-statistics norms
    (bn, bgn in training) normalize an episode with the statistics of all its images, as in
    Snell et al.'s code.
    """
    n_support = len(support_labels)
    protos = prototypes(embeddings[:n_support], support_labels, int(support_labels.max()) + 1)
    return prototype_logits(embeddings[n_support:], protos)


class EmbeddingCache:
    """Embeddings of dataset images by id, reused across the episodes of one evaluation pass.

    A fixed encoder embeds every image of a 600-episode meta-test many times over; when its output
    for an image does not depend on the other images of the batch (every registry norm in eval
    mode with running statistics, or without batch statistics at all) each image is embedded once.
    Whether that holds is measured, not assumed: on the first episode the encoder runs on the
    whole episode and on its first two images alone, and the cache switches itself off if they
    disagree (e.g. norms with ``track_running_stats=False``).

    Create one per evaluation pass: the encoder must not change while it lives.
    """

    def __init__(self) -> None:
        self.table: dict[int, Tensor] = {}
        self.per_sample: bool | None = None

    def embed(self, encoder: nn.Module, images: Tensor, ids: Tensor) -> Tensor:
        """``encoder(images)``, computing only the images whose id is not cached yet."""
        if self.per_sample is None:
            full = encoder(images)
            alone = encoder(images[:2])
            self.per_sample = len(images) > 2 and torch.allclose(full[:2], alone, rtol=1e-3, atol=1e-4)
            if self.per_sample:
                self.table.update(zip(ids.tolist(), full, strict=True))
            return full
        if not self.per_sample:
            return encoder(images)
        keys = ids.tolist()
        missing = [i for i, key in enumerate(keys) if key not in self.table]
        if missing:
            self.table.update(zip((keys[i] for i in missing), encoder(images[missing]), strict=True))
        return torch.stack([self.table[key] for key in keys])


class ProtoNet:
    """The ProtoNet algorithm of a few-shot module: the backbone is the encoder.

    The norm is used as configured (running statistics at evaluation, if it keeps them).
    Evaluation embeds each image once per pass when the encoder is per-sample in eval mode
    (:class:`EmbeddingCache` checks it), which makes the 600-episode protocol cheap.
    """

    network_name = "encoder"
    """The module attribute the network is stored as (checkpoint keys ``encoder.*``)."""
    has_head = False

    def __init__(self, hparams: Any) -> None:
        self.cache = EmbeddingCache()

    def norm_kwargs(self, configured: dict[str, Any]) -> dict[str, Any]:
        """The norm arguments as configured."""
        return configured

    def build(self, backbone: nn.Module, head: nn.Module | None) -> nn.Module:
        """The encoder: the backbone itself."""
        return backbone

    def logits(self, encoder: nn.Module, support: Tensor, support_labels: Tensor, query: Tensor,
               ids: Tensor, training: bool) -> Tensor:
        """Query logits: support and query embedded in one forward (one episode, one batch)."""
        images = torch.cat([support, query])
        if training:
            return protonet_logits(encoder(images), support_labels)
        return protonet_logits(self.cache.embed(encoder, images, ids), support_labels)

    def new_pass(self) -> None:
        """A fresh embedding cache: the encoder changed since the last evaluation pass."""
        self.cache = EmbeddingCache()
