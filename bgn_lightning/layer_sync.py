"""``BGNSync``: the Lightning plugin for synchronized BGN statistics under DDP.

Lightning's own ``Trainer(sync_batchnorm=True)`` is the ``TorchSyncBatchNorm`` layer-sync plugin
(``lightning/pytorch/plugins/layer_sync.py``), which converts only ``_BatchNorm`` layers; this is
its counterpart for :class:`~bgn_lightning.BatchGroupNorm`. It is a ``LayerSync`` of
``lightning.pytorch`` and, when that copy of Lightning is imported, of ``pytorch_lightning`` too.
"""

from __future__ import annotations

from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
from torch import nn

from . import _lightning
from .sync import ProcessGroup, convert_sync_batchgroupnorm, revert_sync_batchgroupnorm

__all__ = ["BGNSync"]


class BGNSync(LayerSync):
    """Lightning plugin: synchronized BGN statistics under DDP.

    ``Trainer(strategy="ddp", plugins=[BGNSync()])`` converts every BatchGroupNorm of the model to
    :class:`SyncBatchGroupNorm` before DDP wraps it (and back after fitting), as
    ``Trainer(sync_batchnorm=True)`` does for BatchNorm — which leaves BatchGroupNorm alone, and
    which Lightning does not combine with another layer-sync plugin: for models that keep BatchNorm
    layers too, ``BGNSync(batchnorm=True)`` also converts those to ``torch.nn.SyncBatchNorm``.

    Args:
        process_group: the group to synchronize over (default: the whole world).
        batchnorm: also synchronize torch's BatchNorm layers (``torch.nn.SyncBatchNorm``, CUDA only).
    """

    def __init__(self, process_group: ProcessGroup | None = None, batchnorm: bool = False) -> None:
        _lightning.register_layer_sync(type(self))  # also a pytorch_lightning LayerSync, if imported
        self.process_group = process_group
        self.batchnorm = batchnorm

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert the model's BatchGroupNorm (and, if asked, BatchNorm) layers to synchronized ones."""
        model = convert_sync_batchgroupnorm(model, self.process_group)
        if self.batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, self.process_group)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Convert the synchronized layers back."""
        if self.batchnorm:
            model = TorchSyncBatchNorm().revert(model)
        return revert_sync_batchgroupnorm(model)
