"""Batch Group Normalization with statistics shared across processes (DDP), gloo and NCCL alike.

:class:`SyncBatchGroupNorm` computes each group's training statistics over the union of the
batches of every process in a process group, so that ``W`` processes with batch ``b`` give the
same outputs, input gradients, summed weight/bias gradients and running statistics as one process
with batch ``W * b``. Forward gathers every process's per-group ``(count, mean, variance)`` and
pools them (Chan et al.'s parallel variance, stable, and right for uneven or empty batches); the
backward all-reduces the two per-group gradient sums. Weight and bias gradients stay local: DDP
averages them like any other parameter gradient. Outside ``torch.distributed`` (or with one
process, or in eval mode) it is exactly :class:`~bgn_lightning.BatchGroupNorm`.

Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU (gloo) as well as CUDA (NCCL). On CUDA the local
passes run on the fused Triton kernels (:mod:`bgn_lightning._triton`) on each side of the
collectives; on CPU, and where those kernels are unavailable, on native ops. Which one runs is
decided by :func:`bgn_lightning._backends.select` (``synchronized=True``), as for plain BGN.

Use :func:`convert_sync_batchgroupnorm` before wrapping the model in DDP, the Lightning plugin
``Trainer(strategy="ddp", plugins=[BGNSync()])`` (:mod:`bgn_lightning.layer_sync`), or
``NormSwap(..., sync=True)``. Only torch is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _autograd as ops
from . import _triton
from ._backends import select
from ._shared import memory_format, running_factor, update_running
from ._triton import KernelFailure, TritonKernels
from .functional import RunningStatsFrom, auto_num_groups
from .layers import BatchGroupNorm, NumGroups

__all__ = [
    "SyncBatchGroupNorm",
    "convert_sync_batchgroupnorm",
    "revert_sync_batchgroupnorm",
    "sync_batch_group_norm",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps the module importable without it


def _world_size(process_group: ProcessGroup | None) -> int:
    """Processes in the group, 1 when ``torch.distributed`` is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _gather(t: Tensor, process_group: ProcessGroup | None, world_size: int) -> Tensor:
    """Every process's ``t`` stacked along a new first dimension (all processes must call it)."""
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous(), group=process_group)
    return torch.stack(parts)


def _pooled_moments(local: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool per-process ``(count, mean, var)`` rows ``(W, 3, G)`` into global ``(count, mean, var)``.

    ``M2 = sum_i count_i * (var_i + (mean_i - mean)^2)``: no difference of large sums, so large
    means do not cancel; processes with an empty batch (count 0) contribute nothing.
    """
    counts, means, variances = local.unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp(min=1)
    dev = means - mean
    var = (counts * variances.addcmul(dev, dev)).sum(0) / total.clamp(min=1)
    return total, mean, var


class _SyncBatchGroupNormFunction(torch.autograd.Function):
    """Training-mode BGN with statistics pooled over a process group (forward and backward).

    ``kernels`` are the fused Triton kernels (CUDA) or ``None`` (native ops); ``x`` is laid out for
    them (:func:`bgn_lightning._triton.prepare`, :func:`bgn_lightning._autograd.contiguous_for_cells`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        table: Tensor,
        num_groups: int,
        eps: float,
        group_count: int,
        process_group: ProcessGroup | None,
        kernels: TritonKernels | None,
    ) -> Tensor:
        lay = ops.layout(x.shape[1], math.prod(x.shape[2:]), num_groups)
        ctx.num_groups, ctx.eps, ctx.layout = num_groups, eps, lay
        ctx.group_count, ctx.process_group = group_count, process_group
        ctx.save_for_backward(x, weight, table)
        if x.shape[0] == 0:
            ctx.kernels = kernels
            return torch.empty_like(x)
        if kernels is not None:
            try:
                ctx.kernels = kernels
                return kernels.normalize(x, table, weight, bias)
            except KernelFailure as err:
                _triton.disable(err)
        ctx.kernels = None
        xc, fmt = ops.contiguous_for_cells(x, lay)
        cells = ops.repeat_cells(table, lay.cells_per_group)
        cell_weight, cell_bias = (ops.cell_affine(t, lay, table.dtype) for t in (weight, bias))
        y = ops.normalize(xc, cells, cell_weight, cell_bias, eps, lay)
        return y if fmt is None else y.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "SyncBatchGroupNorm: double backward (create_graph=True) is not supported; use "
                "BatchGroupNorm (revert_sync_batchgroupnorm) for higher-order gradients"
            )
        x, weight, table = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]

        def all_reduce(t: Tensor) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.process_group)

        if x.shape[0] == 0:
            # Nothing local, but the peers wait for this process's (zero) sums.
            if needs_x:
                all_reduce(torch.zeros(2, ctx.num_groups, dtype=table.dtype, device=table.device))
            zeros = torch.zeros(x.shape[1], dtype=table.dtype, device=x.device)
            dx, dw, db = torch.zeros_like(x), zeros, zeros
        elif ctx.kernels is not None:
            dx, dw, db = _fused_backward(ctx, x, weight, table, dy, all_reduce)
        else:
            dx, dw, db = _native_backward(ctx, x, weight, table, dy, needs_x, all_reduce)
        return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None,
                None, None, None, None, None, None)


def _native_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, table: Tensor, dy: Tensor, needs_x: bool,
    all_reduce: Callable[[Tensor], Any],
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The closed-form backward of native ops (``x`` in any layout the kernels or the native ops use)."""
    lay = ctx.layout
    xc, fmt = ops.contiguous_for_cells(x, lay)
    dx, dw, db = ops.closed_form_backward(
        lay, ctx.num_groups, ctx.eps, xc, table, ops.repeat_cells(table, lay.cells_per_group),
        ops.cell_affine(weight, lay, table.dtype), dy if fmt is None else dy.contiguous(), needs_x,
        ctx.group_count, all_reduce)
    return (dx if dx is None or fmt is None else dx.contiguous(memory_format=fmt)), dw, db


def _fused_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, table: Tensor, dy: Tensor,
    all_reduce: Callable[[Tensor], Any],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The Triton kernels' backward around the all-reduce; native ops if a kernel fails.

    The collective runs exactly once either way: a kernel failing after it hands the reduced sums
    to the native backward instead of all-reducing again.
    """
    needs = tuple(ctx.needs_input_grad[:3])
    dy = dy.to(x.dtype).contiguous(memory_format=memory_format(x))
    dtypes = (table.dtype, table.dtype)  # as the native path's; autograd casts to the parameters' dtype
    try:
        return ctx.kernels.backward(x, weight, table, dy, ctx.num_groups, needs, dtypes, ctx.group_count,
                                    all_reduce)
    except KernelFailure as err:
        _triton.disable(err)
        if err.reduced is None:
            return _native_backward(ctx, x, weight, table, dy, needs[0], all_reduce)
        # The native sums are (sum(w * dy), sum(w * dy * x_hat)); the kernels' second one lacks rstd.
        reduced = torch.stack((err.reduced[0], err.reduced[1] * table[2])).to(table.dtype)
        return _native_backward(ctx, x, weight, table, dy, needs[0], lambda t: t.copy_(reduced))


def sync_batch_group_norm(
    x: Tensor,
    *,
    num_groups: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    process_group: ProcessGroup | None = None,
    where: str = "sync_batch_group_norm",
) -> Tensor:
    """Training-mode Batch Group Normalization with statistics over every process of a group.

    Every process of ``process_group`` must call it (same ``num_groups`` and feature size),
    with any batch size, zero included. Checks are the caller's (the layer's), except that the
    pooled batch must hold more than one value per statistic.

    Args:
        x: ``(N, C, *S)`` local batch.
        num_groups: ``G``, valid for ``x``.
        running_mean: ``(G,)`` buffer updated in place with the global statistics, or ``None``.
        running_var: ``(G,)`` buffer (unbiased variance), as ``running_mean``.
        weight: per-channel scale or ``None``.
        bias: per-channel shift or ``None``.
        momentum: running-average factor; ``None`` for a cumulative average.
        eps: added to the variance.
        num_batches_tracked: counter (already incremented) for ``momentum=None``.
        process_group: the group to synchronize over (default: the whole world).
        where: name for error messages.

    Returns:
        The normalized local batch, shaped like ``x``.

    Raises:
        ValueError: if all processes together have a single value per statistic.
    """
    world_size = _world_size(process_group)
    n, c = x.shape[0], x.shape[1]
    feature_numel = math.prod(x.shape[1:])
    lay = ops.layout(c, feature_numel // c, num_groups)
    kernels = select(x, num_groups=num_groups, training=True, weight=weight, bias=bias,
                     running_mean=running_mean, running_var=running_var, synchronized=True).backend.kernels
    xc, fmt = (_triton.prepare(x)[0], None) if kernels is not None else ops.contiguous_for_cells(x, lay)
    dtype = ops.compute_dtype(x)
    with torch.no_grad():
        mean = var = torch.zeros(num_groups, dtype=dtype, device=x.device)
        if n and kernels is not None:
            try:
                mean, var, _ = kernels.moments(xc, num_groups, eps).unbind(0)
            except KernelFailure as err:
                _triton.disable(err)
                kernels = None
                xc, fmt = ops.contiguous_for_cells(x, lay)
        if n and kernels is None:
            mean, var = ops.group_moments(xc, num_groups)
        count = torch.full_like(mean, n * (feature_numel // num_groups))
        gathered = _gather(torch.stack((count, mean, var)), process_group, world_size)
        total, mean, var = _pooled_moments(gathered)
        group_count = int(total[0])
        if group_count <= 1:
            raise ValueError(
                f"{where}: expected more than 1 value per statistic in training over the "
                f"{world_size} processes, got {group_count} (local input {tuple(x.shape)}, "
                f"num_groups={num_groups})"
            )
        if running_mean is not None and running_var is not None:
            update_running(running_mean, running_var, mean, var, count=group_count,
                           factor=running_factor(momentum, num_batches_tracked, where))
        table = ops.group_table(mean, var, eps, dtype)
    y = _SyncBatchGroupNormFunction.apply(xc, weight, bias, table, num_groups, eps, group_count,
                                          process_group, kernels)
    return y if fmt is None else y.contiguous(memory_format=fmt)


class SyncBatchGroupNorm(BatchGroupNorm):
    """:class:`~bgn_lightning.BatchGroupNorm` with training statistics over a process group.

    Accepts ``(N, C, *S)`` inputs of any rank, like ``torch.nn.SyncBatchNorm``. In training
    mode under an initialized ``torch.distributed`` with more than one process, each group's
    mean and variance cover the batches of all processes (uneven and empty batches included),
    the running statistics are updated with them (identically on every process), and
    ``num_groups="auto"`` is fixed from the *global* batch size, so a run on ``W`` processes
    with batch ``b`` matches one process with batch ``W * b``. Otherwise it behaves exactly as
    :class:`~bgn_lightning.BatchGroupNorm`.

    With ``norm_batch_size`` set (ghost batches) nothing is synchronized: each run of
    ``norm_batch_size`` samples of the local batch has its own statistics, which is what that
    setting asks for (the per-device batch of the paper), so no collective is needed.

    Args:
        num_features: ``C``.
        num_groups: ``G`` or ``"auto"``.
        eps: added to the variance.
        momentum: running-statistics factor; ``None`` for a cumulative moving average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running statistics and use them in eval mode.
        reference_batch_size: the (global) batch size whose statistics auto-``G`` imitates.
        process_group: the group to synchronize over; ``None`` is the whole world.
        device: where to create parameters and buffers.
        dtype: their dtype.
        norm_batch_size: ghost batches, as in :class:`~bgn_lightning.BatchGroupNorm` (no collectives).
        running_stats_from: as in :class:`~bgn_lightning.BatchGroupNorm`.
        values_per_statistic: as in :class:`~bgn_lightning.BatchGroupNorm` (with the global batch).
    """

    _expected_dims = None

    def __init__(
        self,
        num_features: int,
        num_groups: NumGroups = "auto",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        reference_batch_size: int = 32,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm_batch_size: int | None = None,
        running_stats_from: RunningStatsFrom = "first",
        values_per_statistic: int | None = None,
    ) -> None:
        super().__init__(num_features, num_groups, eps, momentum, affine, track_running_stats,
                         reference_batch_size, device=device, dtype=dtype, norm_batch_size=norm_batch_size,
                         running_stats_from=running_stats_from, values_per_statistic=values_per_statistic)
        self.process_group = process_group
        # The BatchGroupNorm class this layer was converted from (for revert_sync_batchgroupnorm).
        self.original_class: type[BatchGroupNorm] = BatchGroupNorm

    def _synchronized(self) -> bool:
        # Ghost batches (norm_batch_size) ask for per-device statistics of b samples: no collective.
        return self.training and self.norm_batch_size is None and _world_size(self.process_group) > 1

    def fix_num_groups(self, batch_size: int, feature_numel: int) -> int:
        """Return ``G``, fixing it first (auto mode) from the batch size summed over processes."""
        if self.num_groups is None and self._synchronized():
            total = torch.tensor([batch_size], dtype=torch.long, device=self._buffer_device())
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
            batch_size = int(total)
            self._set_num_groups(auto_num_groups(batch_size, self.num_features, feature_numel,
                                                 self.reference_batch_size, self.values_per_statistic))
        return super().fix_num_groups(batch_size, feature_numel)

    def _buffer_device(self) -> torch.device:
        """The device collectives run on: where the layer lives (NCCL needs CUDA tensors)."""
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.device
        backend = dist.get_backend(self.process_group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _normalize(self, x: Tensor, num_groups: int, feature_numel: int, name: str) -> Tensor:
        if not self._synchronized():
            return super()._normalize(x, num_groups, feature_numel, name)
        return sync_batch_group_norm(
            x,
            num_groups=num_groups,
            running_mean=self.running_mean if self.track_running_stats else None,
            running_var=self.running_var if self.track_running_stats else None,
            weight=self.weight,
            bias=self.bias,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            process_group=self.process_group,
            where=name,
        )


def _rebuild(source: BatchGroupNorm, cls: type[BatchGroupNorm], *extra: Any) -> BatchGroupNorm:
    """A ``cls`` layer with ``source``'s settings, sharing its parameters, buffers, ``G`` and hooks.

    Nothing is copied, like torch's SyncBatchNorm conversion; ``extra`` follows the common
    constructor arguments (the process group of a ``SyncBatchGroupNorm``).
    """
    target = cls(
        source.num_features,
        "auto" if source.auto_groups else source.num_groups,
        source.eps,
        source.momentum,
        source.affine,
        source.track_running_stats,
        source.reference_batch_size,
        *extra,
    )
    target.norm_batch_size = source.norm_batch_size
    target.values_per_statistic = source.values_per_statistic
    target.running_stats_from = source.running_stats_from
    target.auto_groups = source.auto_groups
    target.num_groups = source.num_groups
    target.feature_numel = source.feature_numel
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats:
        target.running_mean = source.running_mean
        target.running_var = source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    for hook_id, hook in source._forward_pre_hooks.items():  # e.g. NormSwap's pending statistics
        target._forward_pre_hooks[hook_id] = hook
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchgroupnorm(module: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """Replace every :class:`~bgn_lightning.BatchGroupNorm` in ``module`` by a synchronized one.

    Parameters and buffers are shared with the replaced layers (the optimizer keeps working if
    it was built already), as are the chosen ``G``, pending forward pre-hooks and the train/eval
    mode. Call it before wrapping the model in ``DistributedDataParallel``. A
    :class:`SyncBatchGroupNorm` already in ``module`` is left as it is.

    Args:
        module: a layer or a model; converted in place where it is a container.
        process_group: the group to synchronize over (default: the whole world).

    Returns:
        ``module`` itself, or the new layer when ``module`` is a ``BatchGroupNorm``.
    """
    if isinstance(module, BatchGroupNorm) and not isinstance(module, SyncBatchGroupNorm):
        converted = _rebuild(module, SyncBatchGroupNorm, process_group)
        converted.original_class = type(module)
        return converted
    for name, child in module.named_children():
        new = convert_sync_batchgroupnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


def revert_sync_batchgroupnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchGroupNorm` in ``module`` back into the class it came from.

    Layers built as ``SyncBatchGroupNorm`` directly become :class:`~bgn_lightning.BatchGroupNorm`
    (any input rank). Parameters, buffers, ``G`` and hooks are shared, as in the conversion.

    Args:
        module: a layer or a model; converted in place where it is a container.

    Returns:
        ``module`` itself, or the new layer when ``module`` is a ``SyncBatchGroupNorm``.
    """
    if isinstance(module, SyncBatchGroupNorm):
        return _rebuild(module, module.original_class)
    for name, child in module.named_children():
        new = revert_sync_batchgroupnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
