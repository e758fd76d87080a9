"""Batch Group Normalization (BGN) for PyTorch Lightning.

Public API: the BGN op and layers, the normalization registry, model conversion, the
:class:`NormSwap` Lightning callback and helpers that make other tools (torchattacks, Lightning's
SWA) treat BGN as a norm layer.

``from bgn_lightning import BatchGroupNorm2d`` imports torch and nothing else: the names that need
Lightning (:class:`NormSwap`, :class:`NormAwareSWA`, :class:`BGNSync`) are imported on first use,
and torchattacks and timm only where they are used. Where to start reading the code:
``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _lightning
from ._ext import cpu_kernels_available
from ._triton import cuda_kernels_available
from .convert import ConversionReport, convert_norm_layer, convert_norms, register_norm_adapter
from .functional import auto_num_groups, batch_group_norm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, set_norm_batch_size
from .interop import keeps_running_stats, norm_aware_attack, norm_mode, set_norm_mode
from .layers import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
)
from .norm_act import NormAct
from .registry import available_norms, build_norm, is_norm_layer, norm_layer, register_norm
from .sync import SyncBatchGroupNorm, convert_sync_batchgroupnorm, revert_sync_batchgroupnorm

if TYPE_CHECKING:
    from .callback import NormSwap
    from .layer_sync import BGNSync
    from .swa import NormAwareSWA

__version__ = "0.1.0"

_LAZY = {"NormSwap": ".callback", "NormAwareSWA": ".swa", "BGNSync": ".layer_sync"}
"""Public names whose modules import Lightning: imported when first used."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


# A checkpoint written with NormSwap names its instantiator; Lightning only calls it if allowed.
_lightning.allow_instantiator(_lightning.INSTANTIATOR)

__all__ = [
    "BGNSync",
    "BatchGroupNorm",
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "ConversionReport",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "NormAct",
    "NormAwareSWA",
    "NormSwap",
    "PositionalNorm",
    "SyncBatchGroupNorm",
    "auto_num_groups",
    "available_norms",
    "batch_group_norm",
    "build_norm",
    "convert_norm_layer",
    "convert_norms",
    "convert_sync_batchgroupnorm",
    "cpu_kernels_available",
    "cuda_kernels_available",
    "is_norm_layer",
    "keeps_running_stats",
    "norm_aware_attack",
    "norm_layer",
    "norm_mode",
    "register_norm",
    "register_norm_adapter",
    "revert_sync_batchgroupnorm",
    "set_norm_batch_size",
    "set_norm_mode",
]
