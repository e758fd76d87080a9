"""Which implementation of BGN runs a call, and why: the one kernel interface.

Start reading here to see how a BGN call runs. :func:`bgn_lightning.functional.batch_group_norm`
(and the layers, through it) validates the input, then :func:`select` picks a :class:`Backend`
and says why in a short reason; the backend normalizes. There are three:

* ``"cpp"``: the fused C++ CPU kernels (:mod:`bgn_lightning._ext`, ``csrc/batch_group_norm_cpu.cpp``),
  every ``G`` on CPU;
* ``"triton"``: the fused Triton kernels on CUDA (:mod:`bgn_lightning._triton`);
* ``"native"``: native PyTorch ops (:mod:`bgn_lightning._autograd`), everywhere else: traced calls
  (``torch.compile``, ``torch.func``), other devices, kernels switched off or unavailable, and
  ``G = C`` in float32 on CUDA, which is BatchNorm and runs cuDNN's batch norm.

Every backend has the same two calls, keyword-only: ``train`` (batch statistics, autograd-aware,
updates the running statistics when given) and ``eval`` (given statistics). A fused backend whose
Triton kernel fails to compile switches the Triton kernels off for the process (one warning) and
finishes the call on the native ops. Synchronized BGN (:mod:`bgn_lightning.sync`) asks
:func:`select` too (``synchronized=True``) and drives the Triton kernels' finer passes around its
collectives itself. Helpers the backends share live in :mod:`bgn_lightning._shared`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import batch_group_norm_eval, batch_group_norm_train, chunked_batch_group_norm, composite_only
from ._ext import cpu_kernels, cpu_kernels_reason
from ._shared import needs_grad, update_running, update_running_chunks
from ._triton import KernelFailure, TritonKernels, cuda_kernels, disable

__all__ = ["NATIVE", "Backend", "FusedBackend", "NativeBackend", "Selection", "fused_kernels", "select"]


class Backend(Protocol):
    """One implementation of BGN's two modes; the caller has validated the input and ``num_groups``."""

    name: str
    """``"cpp"``, ``"triton"`` or ``"native"``."""
    kernels: Any
    """The raw fused kernels (the C++ module, :class:`~bgn_lightning._triton.TritonKernels`) or ``None``."""

    def train(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
              running_mean: Tensor | None, running_var: Tensor | None, factor: float,
              chunk: int | None = None, running_average: bool = False) -> Tensor:
        """Training-mode BGN with the batch statistics of ``x`` (more than one value per group).

        Args:
            x: ``(N, C, *S)`` input.
            num_groups: ``G``, valid for ``x``.
            weight: per-channel scale ``(C,)`` or ``None``.
            bias: per-channel shift ``(C,)`` or ``None``.
            eps: added to the variance.
            running_mean: ``(G,)`` buffer lerped towards the batch mean in place, or ``None``.
            running_var: ``(G,)`` buffer lerped towards the unbiased batch variance, or ``None``.
            factor: the lerp factor (momentum, or ``1 / num_batches_tracked``).
            chunk: ghost batches: every ``chunk`` consecutive samples (the last chunk may be
                smaller) are normalized with their own statistics; ``None`` or ``chunk >= N``: the
                whole batch (more than one value per group in every chunk).
            running_average: with chunks, lerp the running statistics towards the mean over chunks
                of each chunk's statistics instead of towards chunk 0's.

        Returns:
            The output, in ``x``'s dtype and memory format.
        """
        ...

    def eval(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
             running_mean: Tensor, running_var: Tensor) -> Tensor:
        """Eval-mode BGN: normalize ``x`` with the given per-group statistics.

        The arguments are :meth:`train`'s, except that ``running_mean`` and ``running_var`` are the
        ``(G,)`` statistics to normalize with (not updated). Returns the output, in ``x``'s dtype and
        memory format.
        """
        ...


class Selection(NamedTuple):
    """The backend that runs a call and a short reason why, for logs and results."""

    backend: Backend
    reason: str


class NativeBackend:
    """BGN from native PyTorch ops (:mod:`bgn_lightning._autograd`); ``G = C`` is torch's batch norm."""

    name = "native"
    kernels = None

    def __repr__(self) -> str:
        return "NativeBackend()"

    def train(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
              running_mean: Tensor | None, running_var: Tensor | None, factor: float,
              chunk: int | None = None, running_average: bool = False) -> Tensor:
        """See :meth:`Backend.train`."""
        if chunk is not None and chunk < x.shape[0]:
            y, mean, var, counts = chunked_batch_group_norm(x, num_groups, weight, bias, eps, chunk)
            if running_mean is not None and running_var is not None:
                update_running_chunks(running_mean, running_var, mean, var, counts=counts, factor=factor,
                                      average=running_average)
            return y
        if num_groups == x.shape[1] and x.dtype in (torch.float32, torch.float64):
            # G = C is BatchNorm: the native kernel, running statistics included.
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, eps)
        y, mean, var = batch_group_norm_train(x, num_groups, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            update_running(running_mean, running_var, mean, var, count=x.numel() // num_groups, factor=factor)
        return y

    def eval(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
             running_mean: Tensor, running_var: Tensor) -> Tensor:
        """See :meth:`Backend.eval`."""
        if num_groups == x.shape[1] and x.dtype == running_mean.dtype:
            return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                    torch.backends.cudnn.enabled)
        return batch_group_norm_eval(x, num_groups, running_mean, running_var, weight, bias, eps)


NATIVE = NativeBackend()


class FusedBackend:
    """The fused kernels (C++ or Triton, the same positional interface), native ops if one fails.

    Only Triton kernels fail at run time (:class:`~bgn_lightning._triton.KernelFailure`: a kernel
    that does not compile); the call then finishes on :data:`NATIVE`, without updating the running
    statistics a second time.
    """

    def __init__(self, kernels: Any, name: str) -> None:
        self.kernels = kernels
        self.name = name

    def __repr__(self) -> str:
        return f"FusedBackend({self.name!r})"

    def train(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
              running_mean: Tensor | None, running_var: Tensor | None, factor: float,
              chunk: int | None = None, running_average: bool = False) -> Tensor:
        """See :meth:`Backend.train`."""
        try:
            return self.kernels.train(x, weight, bias, num_groups, eps, running_mean, running_var, factor,
                                      chunk or 0, running_average)
        except KernelFailure as err:
            disable(err)
            if err.running_updated:
                running_mean = running_var = None
        return NATIVE.train(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                            running_mean=running_mean, running_var=running_var, factor=factor,
                            chunk=chunk, running_average=running_average)

    def eval(self, x: Tensor, *, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
             running_mean: Tensor, running_var: Tensor) -> Tensor:
        """See :meth:`Backend.eval`."""
        try:
            return self.kernels.eval(x, weight, bias, num_groups, eps, running_mean, running_var)
        except KernelFailure as err:
            disable(err)
        return NATIVE.eval(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                           running_mean=running_mean, running_var=running_var)


_TRACED = Selection(NATIVE, "traced by torch.compile or torch.func: composite native ops")
_EVAL_GRAD = Selection(NATIVE, "eval mode with a gradient: the fused eval kernels are not differentiable")
_BATCH_NORM = "G = C in float32 on CUDA is BatchNorm: cuDNN's batch norm"
_SYNC_CPU = "synchronized BGN off CUDA: native ops around the collectives"


def fused_kernels(x: Tensor, *, num_groups: int, synchronized: bool = False,
                  tensors: tuple[Tensor | None, ...] = (), chunked: bool = False) -> tuple[Any, str]:
    """The raw fused kernels that serve ``x`` (``None`` if none do), and why.

    Args:
        x: the input.
        num_groups: ``G``.
        synchronized: for synchronized BGN, which runs only the Triton kernels' passes.
        tensors: the parameters and buffers of the call (the Triton kernels need them on ``x``'s device).
        chunked: ghost batches (``norm_batch_size``): cuDNN's batch norm cannot serve ``G = C``.
    """
    if x.is_cpu:  # not x.device.type: building a device costs more than the rest of select
        if synchronized:
            return None, _SYNC_CPU
        return cpu_kernels(), cpu_kernels_reason()
    if not (synchronized or chunked) and num_groups == x.shape[1] and x.dtype == torch.float32:
        return None, _BATCH_NORM
    return cuda_kernels(x, *tensors)


@functools.lru_cache(maxsize=8)
def _fused_selection(kernels: Any, reason: str) -> Selection:
    """The selection of these kernels, made once (``select`` runs on every call)."""
    name = "triton" if isinstance(kernels, TritonKernels) else "cpp"
    return Selection(FusedBackend(kernels, name), reason)


def select(x: Tensor, *, num_groups: int, training: bool, weight: Tensor | None = None,
           bias: Tensor | None = None, running_mean: Tensor | None = None, running_var: Tensor | None = None,
           synchronized: bool = False, chunked: bool = False) -> Selection:
    """The backend that runs this call of BGN, and a short reason why.

    Args:
        x: the input, ``(N, C, *S)``.
        num_groups: ``G``, valid for ``x``.
        training: batch statistics (``Backend.train``) rather than given ones (``Backend.eval``).
        weight: the call's per-channel scale, or ``None``.
        bias: the call's per-channel shift, or ``None``.
        running_mean: the call's running mean, or ``None``.
        running_var: the call's running variance, or ``None``.
        synchronized: for :mod:`bgn_lightning.sync`, which uses the Triton kernels' passes
            (``backend.kernels``) and runs its own custom autograd function even when traced.
        chunked: a training call with ghost batches (``norm_batch_size`` below the batch).

    Returns:
        ``(backend, reason)``; ``backend.name`` is ``"cpp"``, ``"triton"`` or ``"native"``.
    """
    if not synchronized and composite_only():
        return _TRACED
    kernels, reason = fused_kernels(x, num_groups=num_groups, synchronized=synchronized,
                                    tensors=(weight, bias, running_mean, running_var), chunked=chunked)
    if kernels is None:
        return Selection(NATIVE, reason)
    if not training and needs_grad(x, weight, bias):
        return _EVAL_GRAD
    return _fused_selection(kernels, reason)
