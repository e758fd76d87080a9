"""The DARTS operation set, each op from a registry norm: ``OPS[name](C_in, C_out, stride, affine, nl)``.

``norm_layer`` is a :func:`tasks.common.norms.norm_factory` factory; an op calls it as
``norm_layer(num_features, affine=affine)``, so one factory serves both the search network
(``affine=False`` inside every MixedOp and cell preprocessing, as DARTS) and the derived network
(``affine=True``). Every registry norm (bn, bgn, gn, ln, in, pn, none) accepts ``affine``.

Shapes (``H`` the input side): stride 1 keeps ``H``, stride 2 gives ``ceil(H / 2)`` for every op,
odd sides included (:class:`FactorizedReduce` pads its shifted path by one pixel, a no-op for even
sides, where it matches DARTS').
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.common.validate import check_choice

__all__ = [
    "DARTS_OPS",
    "OPS",
    "DilConv",
    "FactorizedReduce",
    "OpBuilder",
    "ReLUConvBN",
    "SepConv",
    "Zero",
    "build_op",
]

NormLayer = Callable[..., nn.Module]
"""``norm_layer(num_features, affine=bool) -> nn.Module`` (a registry factory)."""


def _norm(norm_layer: NormLayer, num_features: int, affine: bool) -> nn.Module:
    return norm_layer(num_features, affine=affine)


class ReLUConvBN(nn.Sequential):
    """ReLU, convolution, norm: DARTS' cell preprocessing (1x1), also when an op changes channels.

    Args:
        C_in: input channels.
        C_out: output channels.
        kernel_size: convolution kernel side.
        stride: convolution stride.
        padding: convolution padding.
        affine: learn the norm's per-channel affine.
        norm_layer: registry norm factory.
    """

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool,
        norm_layer: NormLayer,
    ) -> None:  # fmt: skip
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            _norm(norm_layer, C_out, affine),
        )


class DilConv(nn.Sequential):
    """ReLU, dilated depthwise convolution, pointwise convolution, norm.

    Args:
        C_in: input channels.
        C_out: output channels.
        kernel_size: depthwise kernel side.
        stride: depthwise stride.
        padding: depthwise padding.
        dilation: depthwise dilation.
        affine: learn the norm's per-channel affine.
        norm_layer: registry norm factory.
    """

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
        affine: bool, norm_layer: NormLayer,
    ) -> None:  # fmt: skip
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            _norm(norm_layer, C_out, affine),
        )


class SepConv(nn.Sequential):
    """Two stacked (ReLU, depthwise, pointwise, norm) blocks; the first carries the stride.

    Args:
        C_in: input channels.
        C_out: output channels.
        kernel_size: depthwise kernel side.
        stride: stride of the first depthwise convolution.
        padding: depthwise padding.
        affine: learn the norms' per-channel affine.
        norm_layer: registry norm factory.
    """

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool,
        norm_layer: NormLayer,
    ) -> None:  # fmt: skip
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine, norm_layer),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine, norm_layer),
        )


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (``C_out`` channels, side ``ceil(H / stride)``).

    Args:
        C_out: output channels.
        stride: 1 or 2.
    """

    def __init__(self, C_out: int, stride: int) -> None:
        super().__init__()
        self.C_out = C_out
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Zeros shaped like the op's output, on ``x``'s device and dtype."""
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.C_out, -(-h // s), -(-w // s))


class FactorizedReduce(nn.Module):
    """ReLU, two stride-2 1x1 convolutions on pixel grids offset by one, concatenated, norm.

    Halves the side (``ceil(H / 2)``) and maps ``C_in`` to ``C_out`` (even) channels.

    Args:
        C_in: input channels.
        C_out: output channels (even).
        affine: learn the norm's per-channel affine.
        norm_layer: registry norm factory.

    Raises:
        ValueError: for an odd ``C_out``.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool, norm_layer: NormLayer) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce: C_out must be even (two halves), got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.norm = _norm(norm_layer, C_out, affine)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_out, ceil(H / 2), ceil(W / 2))``."""
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.norm(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _pool(kind: str) -> Callable[[int, int, int, bool, NormLayer], nn.Module]:
    def build(C_in: int, C_out: int, stride: int, affine: bool, norm_layer: NormLayer) -> nn.Module:
        pool = (
            nn.MaxPool2d(3, stride=stride, padding=1)
            if kind == "max"
            else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        )
        if C_in == C_out:
            return pool
        return nn.Sequential(ReLUConvBN(C_in, C_out, 1, 1, 0, affine, norm_layer), pool)

    return build


def _skip(C_in: int, C_out: int, stride: int, affine: bool, norm_layer: NormLayer) -> nn.Module:
    if stride == 1 and C_in == C_out:
        return nn.Identity()
    if stride == 1:
        return ReLUConvBN(C_in, C_out, 1, 1, 0, affine, norm_layer)
    return FactorizedReduce(C_in, C_out, affine, norm_layer)


OpBuilder = Callable[[int, int, int, bool, NormLayer], nn.Module]
"""``(C_in, C_out, stride, affine, norm_layer) -> nn.Module``."""

OPS: dict[str, OpBuilder] = {
    "none": lambda C_in, C_out, stride, affine, norm_layer: Zero(C_out, stride),
    "max_pool_3x3": _pool("max"),
    "avg_pool_3x3": _pool("avg"),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda C_in, C_out, stride, affine, nl: SepConv(C_in, C_out, 3, stride, 1, affine, nl),
    "sep_conv_5x5": lambda C_in, C_out, stride, affine, nl: SepConv(C_in, C_out, 5, stride, 2, affine, nl),
    "dil_conv_3x3": lambda C_in, C_out, stride, affine, nl: DilConv(C_in, C_out, 3, stride, 2, 2, affine, nl),
    "dil_conv_5x5": lambda C_in, C_out, stride, affine, nl: DilConv(C_in, C_out, 5, stride, 4, 2, affine, nl),
}
"""DARTS' eight ops by name."""

DARTS_OPS: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
"""DARTS' primitives, in its order (the columns of alpha)."""


def build_op(name: str, C_in: int, C_out: int, stride: int, affine: bool, norm_layer: NormLayer) -> nn.Module:
    """``OPS[name](C_in, C_out, stride, affine, norm_layer)`` with a one-line error for a bad name/stride.

    Raises:
        ValueError: for an op not in :data:`OPS` or a stride other than 1 or 2.
    """
    check_choice("op", name, OPS)
    if stride not in (1, 2):
        raise ValueError(f"op {name}: stride must be 1 or 2, got {stride!r}")
    return OPS[name](C_in, C_out, stride, affine, norm_layer)
