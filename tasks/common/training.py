"""Helpers that task LightningModules share: the global batch size, feature sizes, gradients at test.

* :func:`global_batch_size`: the ``B`` of the linear-scaling rule (per-device batch x devices x
  gradient accumulation).
* :func:`feature_dim`: output features of a network for one input shape, probed on a copy.
* :func:`grad_enabled`: a context in which autograd works inside Lightning's validation and test
  loops, which run under :func:`torch.inference_mode` (MAML's inner loop at meta-test, adversarial
  attacks at test time).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from lightning.pytorch import Trainer
from torch import nn

__all__ = ["feature_dim", "global_batch_size", "grad_enabled"]


def global_batch_size(trainer: Trainer, override: int | None = None) -> int:
    """``override``, else the DataModule's ``batch_size`` x devices x gradient accumulation.

    Raises:
        ValueError: when there is no ``override`` and the trainer's DataModule has no ``batch_size``.
    """
    if override is not None:
        return int(override)
    per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if per_device is None:
        raise ValueError(
            "global batch size: the trainer has no DataModule with a batch_size attribute; "
            "pass global_batch_size= explicitly"
        )
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def feature_dim(network: nn.Module, input_shape: Sequence[int]) -> int:
    """Features per sample that ``network`` outputs for inputs of ``input_shape`` (without the batch).

    Runs a no-grad forward of two zero inputs through an eval-mode **copy**: a forward may fix lazy
    layer state (BGN's auto-G) even in eval mode when a layer keeps no running statistics.
    """
    probe = copy.deepcopy(network).eval()
    with torch.no_grad():
        out = probe(torch.zeros(2, *input_shape))
    return int(out[0].numel())


@contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave inference mode and enable autograd, e.g. for an attack inside ``test_step``.

    Tensors created under inference mode (the batch Lightning hands to ``test_step``) cannot be
    saved for backward: clone them inside the context (``x = x.clone()``) before differentiating.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield
