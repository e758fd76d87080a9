"""Batch Group Normalization from native PyTorch ops: a closed-form backward, float32 statistics.

The ``"native"`` backend of :mod:`bgn_lightning._backends` (start reading there): traced calls
(``torch.compile``, ``torch.func``), synchronized BGN off CUDA, float64 on CUDA, and wherever the
fused C++ (:mod:`bgn_lightning._ext`) or Triton (:mod:`bgn_lightning._triton`) kernels are
unavailable; the Triton kernels and synchronized BGN also reuse its composite and closed-form
backward pieces.

Private; :func:`bgn_lightning.functional.batch_group_norm` is the public entry point and does the
validation. Notation: ``x`` is ``(N, C, *S)``, ``D = C * prod(S)``, ``G`` groups of ``L = D / G``
contiguous features each, ``x_hat`` the normalized input, ``w`` and ``b`` the channel affine.

**Cells.** The op works on *cells*, the coarsest split of the ``D`` features in which every cell
lies inside one group and one channel; ``x`` seen as ``(N, cells, D / cells)`` is a batch-norm
input whose channels are the cells. If ``G`` divides ``C`` the cells are the channels and the
kernels run on ``x`` itself, in its own memory format (channels-last included); if ``C`` divides
``G`` the cells are the groups; otherwise groups straddle channels and cells are chunks of
``gcd(L, prod(S))`` features. Per-group and per-channel vectors map to cells by repeating entries.
Layouts other than "cells are channels" work on a contiguous copy of a channels-last input.

**Forward.** Per-sample, per-group moments come from the native group-norm kernel (one stable
pass), pooled over ``N`` by the law of total variance; channels-last inputs use the native
batch-norm statistics kernel per channel, pooled over the channels of each group. Statistics are
float32 at least, whatever the input dtype (autocast). Normalize and affine are one native
eval-mode batch-norm pass over the cells (a broadcast ``addcmul`` on channels-last inputs, where
that kernel is faster): ``O(G + C)`` extra work, no activation-sized temporary.

**Backward.** With ``k1 = rstd * mean_g(w * dy)`` and ``k2 = rstd * mean_g(w * dy * x_hat)`` over
the ``N * L`` values of each group, ``dx = rstd * w * dy - k1 - x_hat * k2``. One native eval-mode
batch-norm backward gives the per-cell sums of ``dy`` and ``dy * x_hat``: the bias and weight
gradients (summed to channels) and, pooled per group, ``k1`` and ``k2``. Then ``-k1 - x_hat * k2``
is one eval-mode batch-norm pass on the ``(N, G, L)`` view and ``rstd * w * dy`` is added by an
in-place ``addcmul``. Autograd keeps the input and ``O(G + C)`` statistics, as BatchNorm does.
A double backward (``create_graph=True``, e.g. MAML) and ``torch.compile`` take a composite path
of differentiable ops instead.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._shared import channels_last, memory_format, needs_grad

__all__ = [
    "batch_group_norm_eval",
    "batch_group_norm_train",
    "cast",
    "cell_affine",
    "chunked_batch_group_norm",
    "closed_form_backward",
    "composite_batch_group_norm",
    "composite_only",
    "compute_dtype",
    "contiguous_for_cells",
    "group_moments",
    "group_table",
    "layout",
    "normalize",
    "repeat_cells",
]

_aten = torch.ops.aten
_ACCUMULATE = (torch.float32, torch.float64)


class Layout(NamedTuple):
    """How ``G`` groups and ``C`` channels tile the ``D`` features into cells."""

    cells: int
    cells_per_group: int
    cells_per_channel: int
    channels_are_cells: bool  # G divides C: the kernels run on x itself, any memory format


def layout(num_channels: int, spatial: int, num_groups: int) -> Layout:
    """The cell layout for ``C = num_channels``, ``prod(S) = spatial`` and ``G = num_groups``."""
    if num_channels % num_groups == 0:
        return Layout(num_channels, num_channels // num_groups, 1, True)
    group_size = num_channels * spatial // num_groups
    cells = num_channels * spatial // math.gcd(group_size, spatial)
    return Layout(cells, cells // num_groups, cells // num_channels, False)


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def composite_only() -> bool:
    """Whether this call must use plain differentiable ops (no custom autograd function, no memo).

    True while ``torch.compile`` traces (inductor fuses the composite ops) and inside ``torch.func``
    transforms (``grad``, ``vmap``, ``jacrev``, ...), which cannot see through custom autograd
    functions, Python's or C++'s.
    """
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float32 at least."""
    return t.dtype if t.dtype in _ACCUMULATE else torch.float32


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (itself when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cells(t: Tensor, lay: Layout) -> Tensor:
    """``t`` as the batch-norm input ``(N, cells, D / cells)``; ``t`` itself if cells are channels."""
    return t if lay.channels_are_cells else t.reshape(t.shape[0], lay.cells, -1)


def repeat_cells(t: Tensor, repeats: int) -> Tensor:
    """Repeat every entry along the last dim ``repeats`` times (group or channel -> cells)."""
    return t if repeats == 1 else t.repeat_interleave(repeats, dim=-1)


def cell_affine(t: Tensor | None, lay: Layout, dtype: torch.dtype) -> Tensor | None:
    """A per-channel weight or bias repeated per cell, in ``dtype`` (``None`` stays ``None``)."""
    return None if t is None else repeat_cells(cast(t, dtype), lay.cells_per_channel)


def _pool(t: Tensor, size: int) -> Tensor:
    """Sum consecutive runs of ``size`` entries along the last dim (cells -> group or channel)."""
    if size == 1:
        return t
    return t.view(*t.shape[:-1], -1, size).sum(-1)


def contiguous_for_cells(x: Tensor, lay: Layout) -> tuple[Tensor, torch.memory_format | None]:
    """``x`` in a layout the cells view can use, and the memory format to give the output back."""
    if lay.channels_are_cells or x.is_contiguous():
        return x, None
    fmt = memory_format(x)
    return x.contiguous(), None if fmt == torch.contiguous_format else fmt


def _bshape(t: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector over ``t``."""
    return (-1,) + (1,) * (t.dim() - 2)


def _batch_norm_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """The native eval-mode batch norm (``F.batch_norm`` without its Python wrapper)."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


def group_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group mean and biased variance of ``x`` over the batch, in float32 at least.

    Contiguous inputs: the native group-norm kernel gives every sample's moments of its ``L``
    values per group in one stable pass, pooled over ``N`` (equal counts) by the law of total
    variance. Channels-last inputs with ``G`` dividing ``C``: the native batch-norm statistics
    kernel gives per-channel moments, pooled over the ``C / G`` channels of each group.

    Args:
        x: ``(N, C, *S)`` input, ``N >= 1``; ``num_groups`` must be valid for it.
        num_groups: ``G``.

    Returns:
        ``(mean, var)``, each of shape ``(G,)``.
    """
    n, c = x.shape[0], x.shape[1]
    x = cast(x, compute_dtype(x))
    if c % num_groups == 0 and channels_last(x):
        mean, within = _aten.batch_norm_update_stats(x, None, None, 0.0)
        if c == num_groups:
            return mean, within
        mean, within = mean.view(num_groups, -1), within.view(num_groups, -1)
        mu = mean.mean(1, keepdim=True)
        dev = mean - mu
        return mu.view(num_groups), within.addcmul_(dev, dev).mean(1)
    spatial = _spatial(x)
    if c % num_groups == 0:
        _, mean, rstd = _aten.native_group_norm(x, None, None, n, c, spatial, num_groups, 0.0)
    else:
        size = c * spatial // num_groups
        _, mean, rstd = _aten.native_group_norm(
            x.reshape(n, num_groups, size), None, None, n, num_groups, size, num_groups, 0.0
        )
    # eps = 0: rstd = 1 / sqrt(var) exactly (inf for a constant group, whose variance is 0).
    within = rstd.pow_(-2)
    if n == 1:
        return mean.view(num_groups), within.view(num_groups)
    mu = mean.mean(0)
    dev = mean - mu
    return mu, within.addcmul_(dev, dev).mean(0)


def group_table(mean: Tensor, var: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per-group ``(mean, var, rstd)`` as one ``(3, G)`` tensor."""
    var = cast(var, dtype)
    return torch.stack((cast(mean, dtype), var, (var + eps).rsqrt_()))


def normalize(x: Tensor, cells: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
               lay: Layout) -> Tensor:
    """``(x - mean) * rstd * weight + bias`` per cell in one native pass (no autograd graph).

    ``cells`` is the per-cell ``(mean, var, rstd)`` table; ``weight`` and ``bias`` are per cell.
    The output has the dtype and memory format of ``x``.
    """
    mean, var, rstd = cells.unbind(0)
    if channels_last(x):  # cells are channels here
        scale = rstd if weight is None else rstd * weight
        shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        shape = _bshape(x)
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=torch.empty_like(x))
    y = _batch_norm_eval(_cells(x, lay), mean, var, weight, bias, eps)
    # Not a view: autograd forbids in-place ops (ReLU(inplace=True)) on views made in a Function.
    return y if lay.channels_are_cells else _aten._unsafe_view(y, x.shape)


# id(running_var) -> (weakref, key, value): eval-mode per-cell tensors, dropped with the buffer.
_EVAL_CACHE: dict[int, tuple[weakref.ref, tuple[Any, ...], tuple[Tensor | None, ...]]] = {}


def _memoized(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, repeat_affine: bool,
    key: tuple[Any, ...], build: Callable[[], tuple[Tensor | None, ...]],
) -> tuple[Tensor | None, ...]:
    """``build()``, memoized on the running-statistics buffers for eval mode.

    Eval mode reuses the same buffers call after call, and on small inputs recomputing their
    per-cell copies (a few small ops) costs more than the normalization itself. An entry is
    reused only while the buffers (and weight and bias, when ``build`` uses them) keep their
    identity and version counter, so any in-place update, reload or ``resize_`` invalidates it;
    weight and bias that need a gradient, inference tensors and traced (compiled) calls are
    never memoized.
    """
    if composite_only() or var.is_inference() or mean.is_inference() or (
        repeat_affine and needs_grad(weight, bias)
    ):
        return build()
    key += (id(mean), mean._version, var._version, torch.is_inference_mode_enabled())
    if repeat_affine:
        key += tuple(None if t is None else (id(t), t._version) for t in (weight, bias))
    var_id = id(var)
    entry = _EVAL_CACHE.get(var_id)
    if entry is None or entry[1] != key or entry[0]() is not var:
        entry = (weakref.ref(var, lambda _: _EVAL_CACHE.pop(var_id, None)), key, build())
        _EVAL_CACHE[var_id] = entry
    return entry[2]


def _eval_cells(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, lay: Layout, dtype: torch.dtype
) -> tuple[Tensor | None, ...]:
    """Per-cell running mean and variance, weight and bias (memoized, see :func:`_memoized`)."""
    repeat_affine = lay.cells_per_channel > 1

    def build() -> tuple[Tensor | None, ...]:
        stats = repeat_cells(torch.stack((cast(mean, dtype), cast(var, dtype))), lay.cells_per_group)
        if not repeat_affine:
            return stats[0], stats[1]
        return stats[0], stats[1], cell_affine(weight, lay, dtype), cell_affine(bias, lay, dtype)

    cells = _memoized(mean, var, weight, bias, repeat_affine,
                      ("cells", lay.cells_per_group, lay.cells_per_channel, dtype), build)
    return cells if repeat_affine else (cells[0], cells[1], weight, bias)


def _eval_split_channels(
    x: Tensor, num_groups: int, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval mode for ``G = k * C`` on a channels-last input, without copies.

    ``x`` viewed as ``(N, C, k, prod(S) / k)`` is a channels-last view; one broadcast ``addcmul``
    with a ``(C, k)`` scale and shift writes the channels-last output.
    """
    n, c = x.shape[0], x.shape[1]
    dtype = compute_dtype(x)

    def build() -> tuple[Tensor, ...]:
        scale = (cast(var, dtype) + eps).rsqrt_().view(c, -1)
        if weight is not None:
            scale = scale * cast(weight, dtype)[:, None]
        shift = cast(mean, dtype).view(c, -1) * scale
        shift = shift.neg_() if bias is None else shift.neg_().add_(cast(bias, dtype)[:, None])
        return scale[..., None], shift[..., None]

    scale, shift = _memoized(mean, var, weight, bias, True, ("split", dtype, eps), build)
    grid = (n, c, num_groups // c, -1)
    if needs_grad(x, scale, shift):
        return torch.addcmul(shift, x.reshape(grid), scale).view(x.shape).contiguous(
            memory_format=memory_format(x))
    out = torch.empty_like(x)
    torch.addcmul(shift, x.view(grid), scale, out=out.view(grid))
    return out


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
    if not lay.channels_are_cells and num_groups % x.shape[1] == 0 and channels_last(x):
        return _eval_split_channels(x, num_groups, mean, var, weight, bias, eps)
    xc, fmt = (x, None) if lay.channels_are_cells else contiguous_for_cells(x, lay)
    cell_mean, cell_var, cell_weight, cell_bias = _eval_cells(mean, var, weight, bias, lay, compute_dtype(x))
    y = _batch_norm_eval(_cells(xc, lay), cell_mean, cell_var, cell_weight, cell_bias, eps)
    if lay.channels_are_cells:
        return y
    y = y.view(x.shape)
    return y if fmt is None else y.contiguous(memory_format=fmt)


class _BatchGroupNormFunction(torch.autograd.Function):
    """Training-mode BGN given the batch statistics of ``x``, with the closed-form backward.

    ``table`` is the per-group ``(mean, var, rstd)`` of ``x`` (:func:`group_moments`): the backward
    accounts for its dependence on ``x`` and returns no gradient for it.
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
    ) -> Tensor:
        lay = layout(x.shape[1], _spatial(x), num_groups)
        cells = repeat_cells(table, lay.cells_per_group)
        cell_weight = cell_affine(weight, lay, table.dtype)
        ctx.num_groups, ctx.eps, ctx.layout = num_groups, eps, lay
        ctx.save_for_backward(x, weight, bias, table, cells, cell_weight)
        return normalize(x, cells, cell_weight, cell_affine(bias, lay, table.dtype), eps, lay)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, table, cells, cell_weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            dx, dw, db = _composite_backward(ctx, x, weight, bias, dy)
        else:
            dx, dw, db = closed_form_backward(ctx.layout, ctx.num_groups, ctx.eps, x, table, cells,
                                              cell_weight, dy, needs_x)
        return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None,
                None, None, None)


def closed_form_backward(
    lay: Layout,
    num_groups: int,
    eps: float,
    x: Tensor,
    table: Tensor,
    cells: Tensor,
    cell_weight: Tensor | None,
    dy: Tensor,
    needs_x: bool,
    group_count: int | None = None,
    all_reduce: Callable[[Tensor], Any] | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of training-mode BGN for ``x``, weight and bias (weight and bias ones are local).

    Args:
        lay: the cell layout.
        num_groups: ``G``.
        eps: the forward's ``eps``.
        x: the forward input (contiguous unless the cells are the channels).
        table: per-group ``(mean, var, rstd)`` the forward used.
        cells: ``table`` repeated per cell.
        cell_weight: the weight repeated per cell, or ``None``.
        dy: gradient of the output.
        needs_x: compute the input gradient.
        group_count: values per group the statistics pooled (default: this ``x``'s ``N * L``).
        all_reduce: in-place sum of the ``(2, G)`` group sums over processes (synchronized BGN).
    """
    dtype = table.dtype
    x_cells = _cells(cast(x, dtype), lay)
    dy_cells = _cells(cast(dy, dtype), lay)
    cell_mean, cell_var, cell_rstd = cells.unbind(0)
    # Per cell: sum(dy * x_hat) and sum(dy), in one native pass.
    _, dy_xhat, dy_sum = _aten.native_batch_norm_backward(
        dy_cells, x_cells, None, cell_mean, cell_var, None, None, False, eps, [False, True, True]
    )
    grad_weight = _pool(dy_xhat, lay.cells_per_channel)
    grad_bias = _pool(dy_sum, lay.cells_per_channel)
    if not needs_x:
        return None, grad_weight, grad_bias
    mean, var, rstd = table.unbind(0)
    sums = torch.stack((dy_sum, dy_xhat))
    if cell_weight is not None:
        sums.mul_(cell_weight)
        cell_rstd = cell_rstd * cell_weight
    sums = _pool(sums, lay.cells_per_group)
    if all_reduce is not None:
        all_reduce(sums)
    # (-k1, -k2) per group.
    count = x.numel() // num_groups if group_count is None else group_count
    neg_k1, neg_k2 = sums.mul_(rstd * (-1.0 / count)).unbind(0)
    if channels_last(x_cells):
        # -k1 - x_hat * k2 = x * beta + gamma per channel, one broadcast pass.
        beta = neg_k2 * rstd
        beta, gamma = repeat_cells(torch.stack((beta, torch.addcmul(neg_k1, mean, beta, value=-1))),
                              lay.cells_per_group).unbind(0)
        shape = _bshape(x_cells)
        dx = torch.addcmul(gamma.view(shape), x_cells, beta.view(shape))
    else:
        x_groups = x_cells.reshape(x.shape[0], num_groups, -1)
        dx = _batch_norm_eval(x_groups, mean, var, neg_k2, neg_k1, eps).view(x_cells.shape)
    dx.addcmul_(dy_cells, cell_rstd.view(_bshape(dx)))  # + rstd * w * dy
    return cast(dx.view(x.shape), x.dtype), grad_weight, grad_bias


def composite_batch_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BGN from differentiable ops (for ``torch.compile`` and double backward).

    Returns:
        ``(y, mean, var)``: the output and the per-group batch mean and biased variance.
    """
    n = x.shape[0]
    xg = x.reshape(n, num_groups, -1)
    acc = cast(xg, compute_dtype(xg))
    var, mean = torch.var_mean(acc, dim=(0, 2), correction=0)
    y = ((acc - mean[:, None]) * torch.rsqrt(var + eps)[:, None]).view(x.shape)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype), mean, var


def chunked_batch_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Training-mode BGN with ghost batches, from differentiable ops: every run of ``chunk``
    consecutive samples is normalized with its own per-group statistics.

    The chunks are one view of the batch, ``(N / chunk, chunk, G, L)``; when ``chunk`` does not
    divide ``N`` the last, smaller chunk is a second view (never a loop over chunks). Native autograd
    differentiates it (double backward and ``torch.compile`` included).

    Returns:
        ``(y, mean, var, counts)``: the output (``x``'s dtype and memory format), the ``(K, G)``
        per-chunk means and biased variances (float32 at least, detached) and the values per
        group of each of the ``K`` chunks.
    """
    n = x.shape[0]
    full = n // chunk * chunk
    acc = cast(x.reshape(n, num_groups, -1), compute_dtype(x))
    group_size = acc.shape[-1]
    pieces = [acc[:full].view(full // chunk, chunk, num_groups, group_size)] if full else []
    if full < n:  # the last device's smaller batch
        pieces.append(acc[full:].unsqueeze(0))
    outputs, means, variances = [], [], []
    for piece in pieces:  # at most two views: the full chunks, then the last one
        var, mean = torch.var_mean(piece, dim=(1, 3), correction=0, keepdim=True)
        outputs.append(((piece - mean) * torch.rsqrt(var + eps)).reshape(-1, num_groups, group_size))
        means.append(mean.view(-1, num_groups))
        variances.append(var.view(-1, num_groups))
    y = (torch.cat(outputs) if len(outputs) > 1 else outputs[0]).view(x.shape)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    counts = [chunk * group_size] * (full // chunk) + ([(n - full) * group_size] if full < n else [])
    mean, var = torch.cat(means).detach(), torch.cat(variances).detach()
    return y.to(x.dtype).contiguous(memory_format=memory_format(x)), mean, var, counts


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
    if composite_only():
        y, mean, var = composite_batch_group_norm(x, num_groups, weight, bias, eps)
        return y, mean.detach(), var.detach()
    lay = layout(x.shape[1], _spatial(x), num_groups)
    xc, fmt = contiguous_for_cells(x, lay)
    with torch.no_grad():
        mean, var = group_moments(xc, num_groups)
        table = group_table(mean, var, eps, mean.dtype)
    if needs_grad(x, weight, bias):
        y = _BatchGroupNormFunction.apply(xc, weight, bias, table, num_groups, eps)
    else:
        y = normalize(xc, repeat_cells(table, lay.cells_per_group), cell_affine(weight, lay, table.dtype),
                      cell_affine(bias, lay, table.dtype), eps, lay)
    return (y if fmt is None else y.contiguous(memory_format=fmt)), mean, var
