"""Fast Batch Group Normalization: native kernels, a closed-form backward, float32 statistics.

Private; :func:`bgn_lightning.functional.batch_group_norm` is the public entry point and does the
validation. Notation: ``x`` is ``(N, C, *S)``, ``D = C * prod(S)``, ``G`` groups of ``L = D / G``
contiguous features each.

**Cells.** The op works on *cells*, the coarsest split of the ``D`` features in which every cell
lies inside one group and one channel; ``x`` seen as ``(N, cells, D / cells)`` is a batch-norm
input whose channels are the cells. If ``G`` divides ``C`` the cells are the channels and every
kernel runs on ``x`` itself, in its own memory format (channels-last included); if ``C`` divides
``G`` they are the groups; otherwise groups straddle channels and cells are chunks of
``gcd(L, prod(S))`` features. Per-group and per-channel vectors map to cells by repeating entries.

**Forward.** The per-sample, per-group moments come from the native group-norm kernel (one
stable pass); BGN's batch moments are their pool over ``N`` by the law of total variance, in
float32 at least whatever the input dtype (autocast). Normalize and affine are one native
eval-mode batch-norm pass on the cells with the group statistics and channel affine repeated per
cell: ``O(G + C)`` extra work, no activation-sized temporary.

**Backward.** One native eval-mode batch-norm backward gives the per-cell sums of ``dy`` and
``dy * x_hat`` (the weight and bias gradients, summed to channels). The input gradient is
``dx = rstd * w * dy - k1 - x_hat * k2``, with ``k1``, ``k2`` per group from those sums pooled
over the cells of each group: one more eval-mode batch-norm pass for ``-k1 - x_hat * k2`` and an
in-place ``addcmul`` for ``rstd * w * dy``. Autograd keeps the input and ``O(G + C)`` statistics,
as BatchNorm does. A double backward (``create_graph=True``, e.g. MAML) and ``torch.compile``
take a composite path of differentiable ops instead.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_group_norm_eval", "batch_group_norm_train", "composite_batch_group_norm", "group_moments"]

_aten = torch.ops.aten
_ACCUMULATE = (torch.float32, torch.float64)


class Layout(NamedTuple):
    """How ``G`` groups and ``C`` channels tile the ``D`` features into cells."""

    cells: int
    cells_per_group: int
    cells_per_channel: int
    channels_are_cells: bool  # G divides C: the kernels run on x itself, any memory format


@lru_cache(maxsize=1024)
def layout(num_channels: int, spatial: int, num_groups: int) -> Layout:
    """The cell layout for ``C = num_channels``, ``prod(S) = spatial`` and ``G = num_groups``."""
    if num_channels % num_groups == 0:
        return Layout(num_channels, num_channels // num_groups, 1, True)
    group_size = num_channels * spatial // num_groups
    cells = num_channels * spatial // math.gcd(group_size, spatial)
    return Layout(cells, cells // num_groups, cells // num_channels, False)


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _compute_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _ACCUMULATE else torch.float32


def _cells(t: Tensor, lay: Layout) -> Tensor:
    """``t`` as the batch-norm input ``(N, cells, D / cells)``; ``t`` itself if cells are channels."""
    return t if lay.channels_are_cells else t.reshape(t.shape[0], lay.cells, -1)


def _repeat(t: Tensor, repeats: int) -> Tensor:
    """Repeat every entry along the last dim ``repeats`` times (group or channel -> cells)."""
    if repeats == 1:
        return t
    return t.unsqueeze(-1).expand(*t.shape, repeats).contiguous().view(*t.shape[:-1], -1)


def _pool(t: Tensor, size: int) -> Tensor:
    """Sum consecutive runs of ``size`` entries along the last dim (cells -> group or channel)."""
    if size == 1:
        return t
    return t.view(*t.shape[:-1], -1, size).sum(-1)


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def group_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group mean and biased variance of ``x`` over the batch, in float32 at least.

    The native group-norm kernel gives every sample's moments of its ``L`` values per group in
    one stable pass; pooling them over ``N`` (equal counts) with the law of total variance gives
    the moments of the ``N * L`` values of each group.

    Args:
        x: ``(N, C, *S)`` input, ``N >= 1``; ``num_groups`` must be valid for it.
        num_groups: ``G``.

    Returns:
        ``(mean, var)``, each of shape ``(G,)``.
    """
    n, c = x.shape[0], x.shape[1]
    spatial = _spatial(x)
    x = _to(x, _compute_dtype(x))
    if c % num_groups == 0:
        _, mean, rstd = _aten.native_group_norm(x, None, None, n, c, spatial, num_groups, 0.0)
    else:
        size = c * spatial // num_groups
        _, mean, rstd = _aten.native_group_norm(
            x.reshape(n, num_groups, size), None, None, n, num_groups, size, num_groups, 0.0
        )
    # eps = 0: rstd = 1 / sqrt(var) exactly (inf for a constant group, whose variance is 0).
    within = rstd.pow(-2)
    if n == 1:
        return mean[0], within[0]
    mu = mean.mean(0)
    dev = mean - mu
    return mu, within.addcmul_(dev, dev).mean(0)


def _cell_stats(mean: Tensor, var: Tensor, lay: Layout, dtype: torch.dtype) -> Tensor:
    """Group mean and variance repeated per cell, ``(2, cells)``."""
    return _repeat(_to(torch.stack((mean, var)), dtype), lay.cells_per_group)


def _cell_affine(t: Tensor | None, lay: Layout, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else _repeat(_to(t, dtype), lay.cells_per_channel)


def _normalize(
    x: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, lay: Layout
) -> Tensor:
    """One native eval-mode batch-norm pass over the cells; dtype and memory format of ``x``."""
    y = F.batch_norm(_cells(x, lay), stats[0], stats[1], weight, bias, False, 0.0, eps)
    return y if lay.channels_are_cells else y.view(x.shape)


def batch_group_norm_eval(
    x: Tensor,
    num_groups: int,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalize with given per-group statistics (eval mode); differentiable by native autograd."""
    lay = layout(x.shape[1], _spatial(x), num_groups)
    dtype = _compute_dtype(x)
    return _normalize(x, _cell_stats(mean, var, lay, dtype), _cell_affine(weight, lay, dtype),
                      _cell_affine(bias, lay, dtype), eps, lay)


class _BatchGroupNormFunction(torch.autograd.Function):
    """Training-mode BGN given the batch statistics of ``x``, with the closed-form backward.

    ``mean`` and ``var`` must be :func:`group_moments` of ``x``: the backward accounts for their
    dependence on ``x`` and returns no gradient for them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        num_groups: int,
        eps: float,
    ) -> Tensor:
        lay = layout(x.shape[1], _spatial(x), num_groups)
        dtype = _compute_dtype(x)
        stats = _cell_stats(mean, var, lay, dtype)
        cell_weight = _cell_affine(weight, lay, dtype)
        ctx.num_groups, ctx.eps, ctx.layout = num_groups, eps, lay
        ctx.save_for_backward(x, weight, bias, stats, cell_weight)
        y = _normalize(x, stats, cell_weight, _cell_affine(bias, lay, dtype), eps, lay)
        # When groups do not align with channels, y is a view of an intermediate; autograd forbids
        # in-place ops (ReLU(inplace=True)) on views made inside a Function. detach() aliases y
        # without a copy and without the view bookkeeping.
        return y.detach()

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, stats, cell_weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            dx, dw, db = _composite_backward(ctx, x, weight, bias, dy)
        else:
            dx, dw, db = _closed_form_backward(ctx.layout, ctx.num_groups, ctx.eps, x, stats, cell_weight,
                                               dy, needs_x)
        return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None,
                None, None, None, None)


def _closed_form_backward(
    lay: Layout,
    num_groups: int,
    eps: float,
    x: Tensor,
    stats: Tensor,
    cell_weight: Tensor | None,
    dy: Tensor,
    needs_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    dtype = stats.dtype
    x_cells = _cells(_to(x, dtype), lay)
    dy_cells = _cells(_to(dy, dtype), lay)
    mean, var = stats[0], stats[1]
    # Per cell: sum(dy * x_hat) and sum(dy) in one native pass.
    _, dy_xhat, dy_sum = _aten.native_batch_norm_backward(
        dy_cells, x_cells, None, mean, var, None, None, False, eps, [False, True, True]
    )
    grad_weight = _pool(dy_xhat, lay.cells_per_channel)
    grad_bias = _pool(dy_sum, lay.cells_per_channel)
    if not needs_x:
        return None, grad_weight, grad_bias
    # dx = rstd * w * dy - k1 - x_hat * k2 with k1 = rstd * mean_g(w * dy) and
    # k2 = rstd * mean_g(w * dy * x_hat) over the N * L values of each group.
    rstd = (var + eps).rsqrt_()
    sums = torch.stack((dy_sum, dy_xhat))
    scale = rstd
    if cell_weight is not None:
        sums = sums.mul_(cell_weight)
        scale = rstd * cell_weight
    group_size = x.shape[0] * (x[0].numel() // num_groups)
    neg_k = _repeat(_pool(sums, lay.cells_per_group), lay.cells_per_group).mul_(rstd * (-1.0 / group_size))
    dx = F.batch_norm(x_cells, mean, var, neg_k[1], neg_k[0], False, 0.0, eps)
    dx.addcmul_(dy_cells, scale.view((-1,) + (1,) * (dx.dim() - 2)))
    if not lay.channels_are_cells:
        dx = dx.view(x.shape)
    return _to(dx, x.dtype), grad_weight, grad_bias


def composite_batch_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BGN from differentiable ops (for ``torch.compile`` and double backward).

    Returns:
        ``(y, mean, var)``: the output and the per-group batch mean and biased variance.
    """
    n = x.shape[0]
    xg = x.reshape(n, num_groups, -1)
    acc = _to(xg, _compute_dtype(xg))
    var, mean = torch.var_mean(acc, dim=(0, 2), correction=0)
    y = ((acc - mean[:, None]) * torch.rsqrt(var + eps)[:, None]).view(x.shape)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype), mean, var


def _composite_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward through the composite graph, itself differentiable (``create_graph=True``)."""
    needs = ctx.needs_input_grad[:3]
    inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need]
    with torch.enable_grad():
        y, _, _ = composite_batch_group_norm(x, ctx.num_groups, weight, bias, ctx.eps)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    dx, dw, db = (next(grads) if need else None for need in needs)
    return dx, dw, db


def batch_group_norm_train(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BGN with batch statistics.

    Args:
        x: ``(N, C, *S)`` input with more than one value per group.
        num_groups: a valid ``G`` for ``x``.
        weight: per-channel scale or ``None``.
        bias: per-channel shift or ``None``.
        eps: added to the variance.

    Returns:
        ``(y, mean, var)``: the output (dtype and memory format of ``x``) and the per-group batch
        mean and biased variance (float32 at least), detached, for the running statistics.
    """
    if torch.compiler.is_compiling():
        y, mean, var = composite_batch_group_norm(x, num_groups, weight, bias, eps)
        return y, mean.detach(), var.detach()
    with torch.no_grad():
        mean, var = group_moments(x, num_groups)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        y = _BatchGroupNormFunction.apply(x, weight, bias, mean, var, num_groups, eps)
    else:
        y = batch_group_norm_eval(x, num_groups, mean, var, weight, bias, eps)
    return y, mean, var
