"""Lightning's Stochastic Weight Averaging for every norm layer that keeps running statistics."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging

from .interop import keeps_running_stats

__all__ = ["NormAwareSWA"]


class NormAwareSWA(StochasticWeightAveraging):
    """Lightning's ``StochasticWeightAveraging`` whose statistics pass covers every norm layer.

    After the last epoch, Lightning's SWA copies the averaged weights into the model and runs
    one extra epoch without optimizer steps in which the running statistics are reset and
    recomputed for the averaged weights (``momentum=None``: a cumulative average over the
    epoch) — but only for ``_BatchNorm`` layers. :class:`BatchGroupNorm` (not a ``_BatchNorm``
    by design), InstanceNorm with ``track_running_stats=True`` and users' norm layers keep
    statistics collected with other weights, and a model whose only such layers are BGN gets
    no extra epoch at all.

    This subclass does for every module that :func:`bgn_lightning.is_norm_layer` recognises
    and that keeps running statistics (a ``running_mean`` tensor, a ``momentum`` attribute and
    a ``reset_running_stats()`` method) what Lightning does for BatchNorm; layers built with
    ``track_running_stats=False`` are skipped. It also keeps the averaged weights through that
    epoch: Lightning skips ``backward`` and ``zero_grad`` there but still calls
    ``optimizer.step()`` on its last batch, with the gradients left from the last training
    step, so the model would end with weights that are neither the average nor the ones the
    statistics were computed for. Arguments, checkpoint state and everything else are
    :class:`lightning.pytorch.callbacks.StochasticWeightAveraging`'s.

    Example::

        trainer = pl.Trainer(max_epochs=20, callbacks=[NormAwareSWA(swa_lrs=0.05, swa_epoch_start=15)])
    """

    @staticmethod
    def pl_module_contains_batch_norm(pl_module: pl.LightningModule) -> bool:
        """Whether ``pl_module`` has a norm layer whose running statistics need recomputing."""
        return any(keeps_running_stats(module) for module in pl_module.modules())

    def reset_batch_norm_and_save_state(self, pl_module: pl.LightningModule) -> None:
        """Start the statistics epoch: reset the running statistics of every such norm layer.

        Called by Lightning when the averaged weights have been copied into ``pl_module``. Each
        layer's statistics are reset and its momentum set to ``None`` (a cumulative average);
        the momenta are saved in ``self.momenta`` and put back by ``reset_momenta()`` at the
        end of training, as in Lightning. The gradients are dropped (``grad = None``), so the
        optimizer step Lightning still takes at the end of this epoch leaves the weights alone.
        """
        pl_module.zero_grad(set_to_none=True)
        self.momenta = {}
        for module in pl_module.modules():
            if keeps_running_stats(module):
                module.reset_running_stats()
                self.momenta[module] = module.momentum
                module.momentum = None
