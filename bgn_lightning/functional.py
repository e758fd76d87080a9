"""Batch Group Normalization as a pure function.

Input ``x`` has shape ``(N, C, *S)``. With ``D = C * prod(S)`` and ``G`` groups (``G`` divides
``D``), ``x`` is viewed as ``(N, G, D / G)``: group ``g`` is the g-th contiguous chunk of the
flattened ``(C, *S)`` vector. Each group is normalized with the mean and biased variance of its
``N * D / G`` values across the whole batch, then a per-channel affine transform is applied.

This is where a newcomer starts reading: :func:`batch_group_norm` validates its input, then
:func:`bgn_lightning._backends.select` picks the implementation that runs it and says why. On CPU
that is fused C++ kernels (``csrc/batch_group_norm_cpu.cpp``, built on first use by
:mod:`bgn_lightning._ext`); on CUDA fused Triton kernels (:mod:`bgn_lightning._triton`; ``G = C`` in
float32 is BatchNorm and runs cuDNN's batch norm); elsewhere, or where the kernels are unavailable
or switched off, native PyTorch ops (:mod:`bgn_lightning._autograd`). All have a closed-form
backward and float32 statistics under autocast; ``docs/performance.md`` describes them and their
cost. The layers (:mod:`bgn_lightning.layers`) call the same dispatch after their own checks.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from ._backends import select
from ._shared import running_factor

__all__ = [
    "RunningStatsFrom",
    "auto_num_groups",
    "batch_group_norm",
    "check_norm_batch_size",
    "check_num_groups",
    "check_running_stats_from",
    "valid_num_groups",
]

RunningStatsFrom = Literal["first", "mean"]
"""With ghost batches, what the running statistics follow: chunk 0's statistics, or their mean over chunks."""


def check_norm_batch_size(norm_batch_size: object, where: str) -> None:
    """Raise ``ValueError`` unless ``norm_batch_size`` is ``None`` or a positive int."""
    if norm_batch_size is None:
        return
    if isinstance(norm_batch_size, bool) or not isinstance(norm_batch_size, int) or norm_batch_size < 1:
        raise ValueError(
            f"{where}: norm_batch_size must be a positive int (the samples each set of batch "
            f"statistics covers) or None (the whole batch), got {norm_batch_size!r}"
        )


def check_running_stats_from(running_stats_from: object, where: str) -> None:
    """Raise ``ValueError`` unless ``running_stats_from`` is ``"first"`` or ``"mean"``."""
    if running_stats_from not in ("first", "mean"):
        raise ValueError(
            f"{where}: running_stats_from must be 'first' (chunk 0's statistics, as DDP's buffer "
            f"broadcast keeps) or 'mean' (their mean over chunks), got {running_stats_from!r}"
        )


def check_num_groups(num_groups: int, num_channels: int, feature_numel: int, where: str) -> None:
    """Raise ``ValueError`` unless ``num_groups`` is a valid BGN group count.

    Args:
        num_groups: the group count ``G``.
        num_channels: ``C``.
        feature_numel: ``D = C * prod(S)`` of one sample.
        where: name of the layer or function, for the error message.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{where}: num_groups must be a positive int, got {num_groups!r}")
    if feature_numel % num_groups != 0:
        raise ValueError(
            f"{where}: num_groups={num_groups} must divide the per-sample feature size "
            f"D = C*prod(S) = {feature_numel} (C={num_channels})"
        )
    if num_groups > num_channels and num_groups % num_channels != 0:
        raise ValueError(
            f"{where}: num_groups={num_groups} > C={num_channels} requires num_groups to be a "
            f"multiple of C so that every group lies inside one channel"
        )


def batch_group_norm(
    x: Tensor,
    num_groups: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    norm_batch_size: int | None = None,
    running_stats_from: RunningStatsFrom = "first",
) -> Tensor:
    """Apply Batch Group Normalization to ``x`` of shape ``(N, C, *S)``.

    Args:
        x: input, at least 2-D.
        num_groups: ``G``; must divide ``D = C * prod(S)``; if ``G > C`` it must be a multiple of C.
        running_mean: ``(G,)`` buffer updated in place in training mode, used in eval mode.
        running_var: ``(G,)`` buffer (unbiased variance), as ``running_mean``.
        weight: per-channel scale ``(C,)`` or ``None``.
        bias: per-channel shift ``(C,)`` or ``None``.
        training: use batch statistics (and update the running ones) if True; otherwise use
            the running statistics when given, the batch statistics when not.
        momentum: running-average factor, as in :class:`torch.nn.BatchNorm2d`; ``None`` means a
            cumulative moving average (needs ``num_batches_tracked``, already incremented).
        eps: added to the variance for numerical stability.
        num_batches_tracked: counter used when ``momentum`` is ``None``.
        norm_batch_size: ``b``, ghost batches (training only): the batch is normalized as runs of
            ``b`` consecutive samples, each with its own statistics (the last run has ``N mod b``
            samples when ``b`` does not divide ``N``), as ``N / b`` devices with ``b`` samples each
            compute without synchronized statistics. ``None`` or ``b >= N``: the whole batch.
        running_stats_from: with ghost batches, the running statistics follow the first run's
            statistics (``"first"``, what DDP's buffer broadcast keeps: the first device's) or
            their mean over runs (``"mean"``).

    Returns:
        A tensor shaped like ``x``, with its dtype and memory format (channels-last stays
        channels-last). Statistics are computed in float32 at least, so bfloat16/float16 inputs
        (autocast) are normalized with float32 statistics; the running buffers keep their dtype.

    Raises:
        ValueError: for a wrong rank, an invalid ``num_groups`` or ``norm_batch_size``, or a single
            value per statistic in training.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_group_norm: expected input of shape (N, C, *S), got {tuple(x.shape)}")
    feature_numel = math.prod(x.shape[1:])
    check_num_groups(num_groups, x.shape[1], feature_numel, "batch_group_norm")
    check_norm_batch_size(norm_batch_size, "batch_group_norm")
    check_running_stats_from(running_stats_from, "batch_group_norm")
    return _batch_group_norm(x, num_groups=num_groups, feature_numel=feature_numel, running_mean=running_mean,
                             running_var=running_var, weight=weight, bias=bias, training=training,
                             momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
                             where="batch_group_norm", chunk=norm_batch_size,
                             running_average=running_stats_from == "mean")


def _batch_group_norm(
    x: Tensor,
    *,
    num_groups: int,
    feature_numel: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    where: str,
    chunk: int | None = None,
    running_average: bool = False,
) -> Tensor:
    """:func:`batch_group_norm` for callers that already checked the rank, ``num_groups`` and ``chunk``.

    ``feature_numel`` is ``D = C * prod(S)``; ``where`` names the caller in error messages;
    ``chunk`` is the norm batch size (training only), ``running_average`` its ``"mean"`` mode.
    """
    if not (training or running_mean is None or running_var is None):
        backend = select(x, num_groups=num_groups, training=False, weight=weight, bias=bias,
                         running_mean=running_mean, running_var=running_var).backend
        return backend.eval(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                            running_mean=running_mean, running_var=running_var)
    n = x.shape[0]
    if chunk is not None and chunk >= n:
        chunk = None
    smallest = n if chunk is None else min(chunk, n - (-(-n // chunk) - 1) * chunk)
    count = smallest * (feature_numel // num_groups)
    if count <= 1:
        runs = "" if chunk is None else (
            f" and norm_batch_size={chunk} (the smallest run has {smallest} sample)")
        raise ValueError(
            f"{where}: expected more than 1 value per statistic in training, got "
            f"input {tuple(x.shape)} with num_groups={num_groups}{runs} ({count} value per group)"
        )
    update = training and running_mean is not None and running_var is not None
    backend = select(x, num_groups=num_groups, training=True, weight=weight, bias=bias,
                     running_mean=running_mean, running_var=running_var, chunked=chunk is not None).backend
    return backend.train(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                         running_mean=running_mean if update else None,
                         running_var=running_var if update else None,
                         factor=running_factor(momentum, num_batches_tracked, where) if update else 0.0,
                         chunk=chunk, running_average=running_average)


def valid_num_groups(num_channels: int, feature_numel: int) -> list[int]:
    """All group counts the auto rule may pick: divisors of C, and multiples of C dividing D."""
    divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
    spatial = feature_numel // num_channels
    multiples = [num_channels * k for k in range(2, spatial + 1) if spatial % k == 0]
    return divisors + multiples


def auto_num_groups(
    batch_size: int, num_channels: int, feature_numel: int, reference_batch_size: int = 32,
    values_per_statistic: int | None = None,
) -> int:
    """Pick ``G`` so each statistic sees about as many values as BatchNorm at a reference batch.

    The target is ``C * batch_size / reference_batch_size``: at ``batch_size ==
    reference_batch_size`` that is ``G = C`` (BatchNorm's statistics); smaller batches pool
    channels together, larger ones split channels by position. The valid ``G`` (see
    :func:`valid_num_groups`) closest to the target on a log scale is returned, ties going to
    the smaller ``G``; a ``G`` that would leave one value per statistic is never picked.

    Args:
        batch_size: ``N`` of the batch that fixes ``G``.
        num_channels: ``C``.
        feature_numel: ``D = C * prod(S)``.
        reference_batch_size: the batch size whose BatchNorm statistics BGN imitates.
        values_per_statistic: instead, the number of values ``V`` each statistic should pool, the
            same in every layer: the target is then ``G = batch_size * D / V`` (the rule a sweep of
            ``V`` fits; ``docs/ghost_batches.md``).
    """
    if reference_batch_size < 1:
        raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
    if values_per_statistic is not None and values_per_statistic < 2:
        raise ValueError(f"values_per_statistic must be >= 2, got {values_per_statistic}")
    if values_per_statistic is None:
        target = num_channels * batch_size / reference_batch_size
    else:
        target = max(batch_size * feature_numel / values_per_statistic, 1.0)
    candidates = [g for g in valid_num_groups(num_channels, feature_numel)
                  if batch_size * feature_numel // g > 1]
    if not candidates:
        raise ValueError(
            f"auto num_groups: no group count gives more than 1 value per statistic for "
            f"N={batch_size}, C={num_channels}, D={feature_numel}"
        )
    return min(candidates, key=lambda g: (abs(math.log(g / target)), g))
