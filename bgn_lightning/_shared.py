"""Helpers every BGN backend shares: memory formats, env switches, load-once, running statistics.

Private, and imports nothing of the project, so that the native path (:mod:`bgn_lightning._autograd`),
the C++ CPU kernels (:mod:`bgn_lightning._ext`) and the Triton kernels (:mod:`bgn_lightning._triton`)
can all use it. The dispatch between them is :func:`bgn_lightning._backends.select`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["LoadOnce", "channels_last", "memory_format", "needs_grad", "running_factor", "switched_off",
           "update_running", "update_running_chunks"]

T = TypeVar("T")


def channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plainly contiguous)."""
    if x.dim() == 4:
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format that gives a tensor ``x``'s layout back (contiguous unless channels-last)."""
    if not channels_last(x):
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and a tensor that requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    # A plain loop: this runs on every call, and any() over a generator costs twice as much.
    for t in tensors:  # noqa: SIM110
        if t is not None and t.requires_grad:
            return True
    return False


def switched_off(env_var: str) -> bool:
    """Whether the environment switches a backend off (``0``, ``false``, ``no`` or ``off``)."""
    return os.environ.get(env_var, "1").strip().lower() in ("0", "false", "no", "off")


class LoadOnce(Generic[T]):
    """A backend's kernels, loaded on first use, once per process even under threads.

    ``load`` returns the kernels (``None`` where they are unavailable) and a short reason saying
    why they are or are not there, which :func:`bgn_lightning._backends.select` reports.
    """

    def __init__(self, load: Callable[[], tuple[T | None, str]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._loaded = False
        self._value: T | None = None
        self.reason = "not loaded yet"

    def get(self) -> T | None:
        """The kernels, loading them on the first call; ``None`` where they are unavailable."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._value, self.reason = self._load()
                    self._loaded = True
        return self._value

    def set(self, value: T | None, reason: str) -> str:
        """Replace the kernels (``None`` switches the backend off) and return the previous reason."""
        with self._lock:
            previous = self.reason
            self._value, self.reason, self._loaded = value, reason, True
        return previous


def running_factor(momentum: float | None, num_batches_tracked: Tensor | None, where: str) -> float:
    """The lerp factor of the running statistics: ``momentum``, or ``1 / num_batches_tracked``."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(f"{where}: momentum=None needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked)


def update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, *, count: int,
                   factor: float) -> None:
    """Lerp the running statistics towards a batch's mean and unbiased variance, as BatchNorm does.

    Args:
        running_mean: ``(G,)`` buffer, updated in place (it keeps its dtype).
        running_var: ``(G,)`` buffer of unbiased variances, as ``running_mean``.
        mean: the batch's per-group mean.
        var: the batch's per-group biased variance.
        count: values per group the batch statistics pooled (``n`` of the ``n / (n - 1)`` correction).
        factor: the lerp factor (:func:`running_factor`).
    """
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            torch._foreach_lerp_([running_mean, running_var], [mean, unbiased], factor)
        else:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)


def update_running_chunks(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, *,
                          counts: list[int], factor: float, average: bool) -> None:
    """:func:`update_running` from per-chunk statistics (ghost batches).

    Args:
        running_mean: ``(G,)`` buffer, updated in place.
        running_var: ``(G,)`` buffer of unbiased variances, updated in place.
        mean: ``(K, G)`` per-chunk means.
        var: ``(K, G)`` per-chunk biased variances.
        counts: values per group in each of the ``K`` chunks.
        factor: the lerp factor.
        average: lerp towards the mean over chunks of each chunk's mean and unbiased variance;
            otherwise towards chunk 0's (the first device's statistics, which DDP's buffer
            broadcast keeps).
    """
    if not average:
        update_running(running_mean, running_var, mean[0], var[0], count=counts[0], factor=factor)
        return
    with torch.no_grad():
        correction = torch.tensor([c / (c - 1) for c in counts], dtype=var.dtype, device=var.device)
        unbiased = (var * correction[:, None]).mean(0)
        running_mean.lerp_(mean.mean(0).to(running_mean.dtype), factor)
        running_var.lerp_(unbiased.to(running_var.dtype), factor)
