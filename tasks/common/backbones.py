"""Backbones built from a registry norm name.

Every network here takes ``norm`` (a :func:`bgn_lightning.available_norms` name) and ``groups``
(``int`` or ``"auto"``, passed to every norm layer as ``num_groups``) and builds each
normalization layer through :func:`bgn_lightning.norm_layer`, never from a hard-coded
``nn.BatchNorm2d``.

========== ================================================================ ===============
name       network                                                          inputs
========== ================================================================ ===============
small_cnn  3 stages of conv-norm-ReLU (x2, x2, x1), max-pool, global pool    8-32 px
resnet20   CIFAR ResNet (He et al. 2016, Sec. 4.2), 3 x 3 basic blocks        32 px
resnet32   same, 3 x 5 blocks                                                32 px
resnet56   same, 3 x 9 blocks                                                32 px
resnet18   torchvision ResNet-18 (``norm_layer=``)                           >= 64 px
resnet50   torchvision ResNet-50 (``norm_layer=``)                           >= 64 px
========== ================================================================ ===============

:func:`conv4` is the few-shot Conv-4 feature extractor (no classifier head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from bgn_lightning import norm_layer

__all__ = [
    "CifarResNet",
    "available_backbones",
    "build_backbone",
    "conv4",
    "make_norm_layer",
    "small_cnn",
    "torchvision_resnet",
]

NormFactory = Callable[[int], nn.Module]


def make_norm_layer(
    norm: str, groups: int | str = "auto", norm_kwargs: dict[str, Any] | None = None
) -> NormFactory:
    """A ``num_features -> nn.Module`` factory for the registry norm ``norm`` with ``num_groups=groups``.

    Args:
        norm: registry name (``bn``, ``bgn``, ``gn``, ``ln``, ``in``, ``pn``, ``none`` or a user's).
        groups: ``num_groups`` for every layer (``"auto"`` is accepted by every registry norm).
        norm_kwargs: extra keyword arguments for the layer (e.g. ``eps``, ``momentum``,
            ``track_running_stats``).

    Raises:
        ValueError: for an unknown norm name.
    """
    return norm_layer(norm, dim=2, num_groups=groups, **(norm_kwargs or {}))


def _conv_bias(norm: str) -> bool:
    """A conv followed by a norm layer has no use for a bias, except when the norm is ``none``."""
    return norm == "none"


def _check_positive(fn: str, **values: int) -> None:
    for arg, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {arg} must be a positive int, got {value!r}")


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) init for convs, as torchvision's ResNets; norm layers keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv4(
    norm: str = "bgn",
    groups: int | str = "auto",
    in_channels: int = 1,
    hidden: int = 64,
    depth: int = 4,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Sequential:
    """The standard few-shot Conv-4 feature extractor (Vinyals et al. 2016; Finn et al. 2017).

    ``depth`` blocks of ``conv3x3(hidden) -> norm -> ReLU -> maxpool2``, then ``Flatten``. For
    84x84 inputs and the defaults the output has ``hidden * 5 * 5 = 1600`` features; for 28x28
    inputs ``hidden * 1 * 1 = 64``.

    Args:
        norm: registry norm name.
        groups: ``num_groups`` for every norm layer (int or ``"auto"``).
        in_channels: input channels (1 for Omniglot, 3 for miniImageNet).
        hidden: channels of every conv layer.
        depth: number of blocks.
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: for an unknown norm, or a non-positive ``in_channels``, ``hidden`` or ``depth``.
    """
    _check_positive("conv4", in_channels=in_channels, hidden=hidden, depth=depth)
    make_norm = make_norm_layer(norm, groups, norm_kwargs)
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(depth):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1, bias=_conv_bias(norm)),
            make_norm(hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        channels = hidden
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bgn",
    groups: int | str = "auto",
    width: int = 32,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Sequential:
    """A small VGG-style CNN for 8-32 px inputs (digits, MNIST, CIFAR, SVHN).

    Stages of ``[conv3x3 -> norm -> ReLU] x 2`` with ``width`` and ``2 * width`` channels, each
    followed by a 2x2 max-pool, then ``conv3x3(4 * width) -> norm -> ReLU``, global average
    pooling and a linear classifier. An 8x8 input reaches the last conv at 2x2, so instance and
    positional norms still see more than one value.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: registry norm name.
        groups: ``num_groups`` for every norm layer.
        width: channels of the first stage.
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: for an unknown norm or a non-positive size.
    """
    _check_positive("small_cnn", num_classes=num_classes, in_channels=in_channels, width=width)
    make_norm = make_norm_layer(norm, groups, norm_kwargs)
    bias = _conv_bias(norm)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), make_norm(c_out), nn.ReLU(inplace=True)]

    w1, w2, w3 = width, 2 * width, 4 * width
    net = nn.Sequential(
        *block(in_channels, w1), *block(w1, w1), nn.MaxPool2d(2),
        *block(w1, w2), *block(w2, w2), nn.MaxPool2d(2),
        *block(w2, w3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes),
    )  # fmt: skip
    _init_weights(net)
    return net


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Sec. 4.2): 16/32/64 channels, n blocks each.

    Built from torchvision's ``BasicBlock`` with the registry norm; shortcuts that change shape
    are ``conv1x1 -> norm`` projections (option B).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: registry norm name.
        groups: ``num_groups`` for every norm layer.
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: when ``depth`` is not ``6n + 2`` with ``n >= 1``, or for an unknown norm.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        norm: str = "bgn",
        groups: int | str = "auto",
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_positive("CifarResNet", num_classes=num_classes, in_channels=in_channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1 (20, 32, 56), got {depth!r}")
        blocks = (depth - 2) // 6
        make_norm = make_norm_layer(norm, groups, norm_kwargs)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), make_norm(16), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = 16
        for i, width in enumerate((16, 32, 64)):
            layers: list[nn.Module] = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = None
                if stride != 1 or channels != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride=stride, bias=False), make_norm(width)
                    )
                layers.append(BasicBlock(channels, width, stride, downsample, norm_layer=make_norm))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def torchvision_resnet(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bgn",
    groups: int | str = "auto",
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A torchvision ImageNet ResNet (randomly initialised) whose norm layers come from the registry.

    Args:
        arch: a ``torchvision.models`` ResNet builder name, e.g. ``resnet18`` or ``resnet50``.
        num_classes: classifier outputs.
        in_channels: input channels; the stem conv is rebuilt when it is not 3.
        norm: registry norm name.
        groups: ``num_groups`` for every norm layer.
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: for an unknown ``arch`` or norm.
    """
    known = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    if arch not in known:
        raise ValueError(f"torchvision_resnet: unknown arch {arch!r}; choose from: {', '.join(known)}")
    _check_positive("torchvision_resnet", num_classes=num_classes, in_channels=in_channels)
    builder = getattr(torchvision.models, arch)
    make_norm = make_norm_layer(norm, groups, norm_kwargs)
    net = builder(weights=None, num_classes=num_classes, norm_layer=make_norm)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet32": lambda **kw: CifarResNet(32, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "resnet18": lambda **kw: torchvision_resnet("resnet18", **kw),
    "resnet50": lambda **kw: torchvision_resnet("resnet50", **kw),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return list(_BACKBONES)


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bgn",
    groups: int | str = "auto",
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build the classifier ``name`` (see :func:`available_backbones`) with registry norm layers.

    Args:
        name: backbone name.
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: registry norm name.
        groups: ``num_groups`` for every norm layer (int or ``"auto"``).
        norm_kwargs: extra keyword arguments for every norm layer.

    Raises:
        ValueError: for an unknown backbone or norm name.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from: {', '.join(_BACKBONES)}")
    return _BACKBONES[name](
        num_classes=num_classes, in_channels=in_channels, norm=norm, groups=groups, norm_kwargs=norm_kwargs
    )
