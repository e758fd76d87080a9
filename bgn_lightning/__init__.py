"""Batch Group Normalization (BGN) for PyTorch Lightning.

Public API: the BGN op and layers, the normalization registry, model conversion, the
:class:`NormSwap` Lightning callback and helpers that make other tools (torchattacks, Lightning's
SWA) treat BGN as a norm layer.
"""

from ._ext import cpu_kernels_available
from ._triton import cuda_kernels_available
from .callback import NormSwap
from .convert import ConversionReport, convert_norm_layer, convert_norms, register_norm_adapter
from .functional import auto_num_groups, batch_group_norm
from .interop import NormAwareSWA, keeps_running_stats, norm_aware_attack, norm_mode, set_norm_mode
from .layers import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
)
from .norm_act import NormAct
from .registry import available_norms, build_norm, is_norm_layer, norm_layer, register_norm
from .sync import BGNSync, SyncBatchGroupNorm, convert_sync_batchgroupnorm, revert_sync_batchgroupnorm

__version__ = "0.1.0"

__all__ = [
    "BGNSync",
    "BatchGroupNorm",
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "ConversionReport",
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
    "set_norm_mode",
]
