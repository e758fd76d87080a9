"""Ghost batches: the batch a norm's statistics see (``norm_batch_size``, b), apart from the batch.

The BGN paper's variable is *images per device*: with ``N / b`` devices holding ``b`` images each
and no synchronized statistics, every device normalizes its ``b`` images with their own
statistics while the optimizer steps on all ``N``. ``norm_batch_size=b`` reproduces that on one
device: in training, every run of ``b`` consecutive samples is normalized with its own statistics
(Hoffer et al. 2017 call this ghost batch normalization). The runs are one view of the batch and
one call of the same kernels, not a loop; a batch that ``b`` does not divide ends with a smaller
run, as the last device gets.

* :class:`~bgn_lightning.BatchGroupNorm` takes ``norm_batch_size`` itself (auto-``G`` follows ``b``).
* :class:`GhostBatchNorm1d` / ``2d`` / ``3d`` are torch's BatchNorm with ``norm_batch_size``
  (same parameters, buffers and state dict; the ghost-batch path is BGN's op with ``G = C``); the
  registry's ``bn`` builds them when ``norm_batch_size`` is given.
* :func:`set_norm_batch_size` sets ``b`` on every layer of a model that uses batch statistics.

Eval mode is unchanged (running statistics). The running statistics follow the first run's
statistics (``running_stats_from="first"``: what DDP with Lightning's default buffer broadcast
keeps, the first device's) or the mean over runs of each run's mean and unbiased variance
(``"mean"``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .functional import RunningStatsFrom, _batch_group_norm, check_norm_batch_size, check_running_stats_from
from .layers import NormBatchSize

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "set_norm_batch_size"]


class _GhostBatchNorm(NormBatchSize):
    """The ghost-batch forward shared by :class:`GhostBatchNorm1d` / ``2d`` / ``3d``."""

    num_features: int
    eps: float
    momentum: float | None
    training: bool
    track_running_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        """BatchNorm's forward; in training with ``b`` below the batch, per run of ``b`` samples."""
        b = self._norm_batch_size
        if not self.training or b is None or x.dim() < 2 or b >= x.shape[0]:
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        track = self.track_running_stats and self.running_mean is not None
        return _batch_group_norm(
            x,
            num_groups=x.shape[1],
            feature_numel=math.prod(x.shape[1:]),
            running_mean=self.running_mean if track else None,
            running_var=self.running_var if track else None,
            weight=self.weight,
            bias=self.bias,
            training=True,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            where=type(self).__name__,
            chunk=b,
            running_average=self.running_stats_from == "mean",
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ghost_repr()  # type: ignore[misc]


def _ghost_class(base: type[nn.modules.batchnorm._BatchNorm], dims: str) -> type[nn.Module]:
    doc = (f"``nn.{base.__name__}`` with ghost batches: ``norm_batch_size`` (b) samples per set of "
           f"training statistics ({dims} inputs).\n\n    Arguments are ``nn.{base.__name__}``'s, plus "
           f"the keyword-only ``norm_batch_size`` and ``running_stats_from`` (see "
           f":mod:`bgn_lightning.ghost`). Same parameters, buffers and state dict as ``nn.{base.__name__}``; "
           f"with ``norm_batch_size=None`` (or at least the batch) it is exactly that layer.\n    ")

    def __init__(self: Any, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 norm_batch_size: int | None = None, running_stats_from: RunningStatsFrom = "first",
                 **kwargs: Any) -> None:
        base.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine,
                      track_running_stats=track_running_stats, device=device, dtype=dtype, **kwargs)
        self._init_norm_batch_size(norm_batch_size, running_stats_from)

    name = "Ghost" + base.__name__
    return type(name, (_GhostBatchNorm, base), {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                                                 "__qualname__": name})


GhostBatchNorm1d = _ghost_class(nn.BatchNorm1d, "``(N, C)`` or ``(N, C, L)``")
GhostBatchNorm2d = _ghost_class(nn.BatchNorm2d, "``(N, C, H, W)``")
GhostBatchNorm3d = _ghost_class(nn.BatchNorm3d, "``(N, C, D, H, W)``")
_GHOST: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}


def _to_ghost(layer: nn.modules.batchnorm._BatchNorm, norm_batch_size: int | None,
              running_stats_from: RunningStatsFrom) -> nn.Module:
    """A ghost copy of torch's BatchNorm ``layer`` sharing its parameters, buffers and hooks."""
    new = _GHOST[type(layer)](layer.num_features, layer.eps, layer.momentum, layer.affine,
                              layer.track_running_stats, norm_batch_size=norm_batch_size,
                              running_stats_from=running_stats_from)
    for key, value in [*layer._parameters.items(), *layer._buffers.items()]:
        setattr(new, key, value)
    new._forward_pre_hooks.update(layer._forward_pre_hooks)
    new._forward_hooks.update(layer._forward_hooks)
    new.train(layer.training)
    return new


def set_norm_batch_size(module: nn.Module, norm_batch_size: int | None,
                        running_stats_from: RunningStatsFrom = "first") -> nn.Module:
    """Make every norm layer of ``module`` that uses batch statistics use ``norm_batch_size``.

    :class:`~bgn_lightning.BatchGroupNorm` layers (synchronized ones included) and the ghost
    BatchNorms are set in place; torch's ``BatchNorm1d/2d/3d`` are replaced by
    :class:`GhostBatchNorm1d` / ``2d`` / ``3d`` sharing their parameters, buffers and hooks (as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: an optimizer built before still holds
    the same parameters; use the returned module when ``module`` is itself such a layer). Layers without
    batch statistics (GroupNorm, LayerNorm, InstanceNorm, PositionalNorm) are left alone: ``b``
    has no effect there. ``None`` goes back to whole-batch statistics.

    Args:
        module: the model.
        norm_batch_size: ``b``, a positive int, or ``None``.
        running_stats_from: ``"first"`` or ``"mean"`` (see :mod:`bgn_lightning.ghost`).

    Returns:
        ``module`` (or its replacement when it is itself a torch BatchNorm).

    Raises:
        ValueError: for a bad ``norm_batch_size`` or ``running_stats_from``, or a batch-statistics
            layer this cannot set ``b`` on (``SyncBatchNorm``, fused layers such as timm's
            ``BatchNormAct2d``: convert those with
            ``convert_norms(model, "bn", norm_batch_size=b)`` or to ``"bgn"`` first), named with its path,
            before anything is changed.
    """
    check_norm_batch_size(norm_batch_size, "set_norm_batch_size")
    check_running_stats_from(running_stats_from, "set_norm_batch_size")
    refused = [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, NormBatchSize)
               and type(m) not in _GHOST]
    if refused:
        raise ValueError(
            f"set_norm_batch_size: cannot give these batch-statistics layers a norm_batch_size: "
            f"{', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}; convert them first, e.g. "
            f"convert_norms(model, 'bn', norm_batch_size=b) or convert_norms(model, 'bgn')"
        )
    if type(module) in _GHOST:
        return _to_ghost(module, norm_batch_size, running_stats_from)
    ghosts: dict[int, nn.Module] = {}  # a layer shared by several parents stays shared
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _GHOST:
                if id(child) not in ghosts:
                    ghosts[id(child)] = _to_ghost(child, norm_batch_size, running_stats_from)
                setattr(parent, name, ghosts[id(child)])
    found = 0
    for layer in module.modules():
        if isinstance(layer, NormBatchSize):
            layer.norm_batch_size = norm_batch_size
            layer.running_stats_from = running_stats_from
            found += 1
    if found == 0 and norm_batch_size is not None:
        warnings.warn(f"set_norm_batch_size: no layer of this {type(module).__name__} uses batch "
                      f"statistics; norm_batch_size={norm_batch_size} has no effect", UserWarning,
                      stacklevel=2)
    return module
