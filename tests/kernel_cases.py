"""Scaffolding shared by the kernel tests (the C++ CPU kernels and the Triton kernels, with and
without ghost batches): the layouts both serve, their test ids, and one forward + backward on
fresh leaves."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Layout = tuple[tuple[int, ...], int, str]
"""``(shape, G, memory)``: an input shape, its group count and how it is laid out in memory."""

# G | C, G = k * C, groups straddling channels (G and C do not divide each other, G | C*prod(S)),
# (N, C), 3-D and 5-D inputs, N = 1, G = 1, G = C; contiguous, channels-last (3d) and
# non-contiguous inputs ("sliced": every other element of the last dim; "transposed": dims 1 and -1
# swapped, so C is innermost without being channels-last).
LAYOUTS: list[Layout] = [
    ((4, 8, 3, 3), 2, "contiguous"),
    ((4, 8, 3, 3), 2, "channels_last"),
    ((4, 8, 3, 3), 2, "sliced"),
    ((4, 8, 3, 3), 8, "channels_last"),
    ((3, 4, 4, 4), 8, "contiguous"),
    ((3, 4, 4, 4), 16, "channels_last"),
    ((3, 6, 4, 4), 4, "contiguous"),
    ((3, 6, 4, 4), 4, "channels_last"),
    ((3, 6, 4, 4), 4, "transposed"),
    ((5, 12), 4, "contiguous"),
    ((4, 6, 10), 3, "contiguous"),
    ((4, 6, 10), 12, "sliced"),
    ((2, 4, 3, 2, 2), 2, "channels_last"),
    ((2, 4, 3, 2, 2), 24, "channels_last"),
    ((2, 6, 2, 2, 2), 4, "channels_last"),
    ((1, 6, 3, 3), 3, "contiguous"),
    ((2, 6, 3, 3), 1, "channels_last"),
]
"""The layouts every kernel suite checks (each adds its own)."""


def layout_ids(layouts: Sequence[Layout]) -> list[str]:
    """Test ids of ``layouts``: ``4x8x3x3-G2-contiguous``."""
    return [f"{'x'.join(map(str, s))}-G{g}-{m}" for s, g, m in layouts]


def channels_last_format(dim: int) -> torch.memory_format:
    """The channels-last memory format of a ``dim``-D tensor (4-D or 5-D)."""
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def leaf(t: Tensor | None) -> Tensor | None:
    """A detached copy of ``t`` that requires grad (``None`` stays ``None``)."""
    return None if t is None else t.detach().clone().requires_grad_()


def run_backward(
    fn: Callable[[Tensor, Tensor | None, Tensor | None], Tensor],
    x: Tensor,
    dy: Tensor,
    w: Tensor | None,
    b: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``fn(x, w, b)`` on fresh leaves, then backward ``dy``: ``(y, dx, dw, db)``."""
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, None if w is None else w.grad, None if b is None else b.grad


def assert_same_format(out: Tensor, x: Tensor) -> None:
    """Channels-last in, channels-last out; anything else gives a contiguous output."""
    fmt = channels_last_format(x.dim())
    if x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()
    else:
        assert out.is_contiguous()


class KernelSpy:
    """Kernels (the C++ module, or :class:`~bgn_lightning._triton.TritonKernels`), counting the
    ``train`` and ``eval`` calls that reach them."""

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        self.calls: Counter[str] = Counter(train=0, eval=0)

    def train(self, *args: Any) -> Any:
        """The kernels' ``train``, counted."""
        self.calls["train"] += 1
        return self.kernels.train(*args)

    def eval(self, *args: Any) -> Any:
        """The kernels' ``eval``, counted."""
        self.calls["eval"] += 1
        return self.kernels.eval(*args)
