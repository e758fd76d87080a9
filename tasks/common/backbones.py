"""Backbones whose every norm layer comes from one ``norm_layer`` factory.

Every network here takes ``norm_layer``, a ``num_features -> nn.Module`` factory (torchvision's
``norm_layer=`` convention; build one from a registry name with
:func:`tasks.common.norms.norm_factory` or :func:`bgn_lightning.norm_layer`), never a hard-coded
``nn.BatchNorm2d``. Every network has a ``feature_dim`` attribute (features before the classifier)
and, as in timm, ``num_classes=0`` builds it **features-only**: the classifier is ``nn.Identity``
and the output is the ``(N, feature_dim)`` pooled features (a DANN feature extractor, a DARTS stem).

========== ================================================================ ===============
name       network                                                          inputs
========== ================================================================ ===============
small_cnn  3 stages of conv-norm-ReLU (x2, x2, x1), max-pool, global pool    8-32 px
resnet20   CIFAR ResNet (He et al. 2016, Sec. 4.2), 3 x 3 basic blocks        32 px
resnet32   same, 3 x 5 blocks                                                32 px
resnet56   same, 3 x 9 blocks                                                32 px
preact18   PreAct ResNet-18 (He et al. 2016b; the adversarial-training model) 32 px
resnet18   torchvision ResNet-18 (``norm_layer=``)                           >= 64 px
resnet50   torchvision ResNet-50 (``norm_layer=``)                           >= 64 px
========== ================================================================ ===============

:func:`conv4` is the few-shot Conv-4 feature extractor (no classifier head).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from .norms import NormFactory, norm_factory
from .validate import check_choice, check_int

__all__ = [
    "CifarResNet",
    "PreActResNet18",
    "available_backbones",
    "build_backbone",
    "conv4",
    "small_cnn",
    "torchvision_resnet",
]


def _default_norm() -> NormFactory:
    return norm_factory("bgn")


def _conv_norm(c_in: int, c_out: int, make_norm: NormFactory) -> list[nn.Module]:
    """``conv3x3 -> norm``; the conv has a bias only when the "norm" is an identity (norm ``none``)."""
    norm = make_norm(c_out)
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=isinstance(norm, nn.Identity)), norm]


def _head(features: int, num_classes: int) -> nn.Module:
    """The classifier, or ``nn.Identity`` for ``num_classes=0`` (features only, timm's convention)."""
    return nn.Linear(features, num_classes) if num_classes else nn.Identity()


def _check_positive(fn: str, allow_zero: tuple[str, ...] = (), **values: int) -> None:
    for arg, value in values.items():
        check_int(arg, value, minimum=0 if arg in allow_zero else 1, owner=fn)


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) init for convs, as torchvision's ResNets; norm layers keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv4(
    norm_layer: NormFactory | None = None, in_channels: int = 1, hidden: int = 64, depth: int = 4
) -> nn.Sequential:
    """The standard few-shot Conv-4 feature extractor (Vinyals et al. 2016; Finn et al. 2017).

    ``depth`` blocks of ``conv3x3(hidden) -> norm -> ReLU -> maxpool2``, then ``Flatten``. For
    84x84 inputs and the defaults the output has ``hidden * 5 * 5 = 1600`` features; for 28x28
    inputs ``hidden * 1 * 1 = 64``.

    Args:
        norm_layer: ``num_features -> norm layer`` (default: BGN with auto-G).
        in_channels: input channels (1 for Omniglot, 3 for miniImageNet).
        hidden: channels of every conv layer.
        depth: number of blocks.

    Raises:
        ValueError: for a non-positive ``in_channels``, ``hidden`` or ``depth``.
    """
    _check_positive("conv4", in_channels=in_channels, hidden=hidden, depth=depth)
    make_norm = norm_layer or _default_norm()
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(depth):
        layers += [*_conv_norm(channels, hidden, make_norm), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = hidden
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class SmallCNN(nn.Sequential):
    """A small VGG-style CNN for 8-32 px inputs (digits, MNIST, CIFAR, SVHN); see :func:`small_cnn`."""

    feature_dim: int


def small_cnn(
    num_classes: int, in_channels: int = 3, norm_layer: NormFactory | None = None, width: int = 32
) -> SmallCNN:
    """A small VGG-style CNN for 8-32 px inputs (digits, MNIST, CIFAR, SVHN).

    Stages of ``[conv3x3 -> norm -> ReLU] x 2`` with ``width`` and ``2 * width`` channels, each
    followed by a 2x2 max-pool, then ``conv3x3(4 * width) -> norm -> ReLU``, global average
    pooling and a linear classifier (``feature_dim = 4 * width`` features). An 8x8 input reaches
    the last conv at 2x2, so instance and positional norms still see more than one value.

    Args:
        num_classes: classifier outputs; 0 for features only.
        in_channels: input channels.
        norm_layer: ``num_features -> norm layer`` (default: BGN with auto-G).
        width: channels of the first stage.

    Raises:
        ValueError: for a negative ``num_classes`` or a non-positive size.
    """
    _check_positive("small_cnn", ("num_classes",), num_classes=num_classes, in_channels=in_channels,
                    width=width)
    make_norm = norm_layer or _default_norm()

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [*_conv_norm(c_in, c_out, make_norm), nn.ReLU(inplace=True)]

    w1, w2, w3 = width, 2 * width, 4 * width
    net = SmallCNN(
        *block(in_channels, w1), *block(w1, w1), nn.MaxPool2d(2),
        *block(w1, w2), *block(w2, w2), nn.MaxPool2d(2),
        *block(w2, w3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), _head(w3, num_classes),
    )  # fmt: skip
    net.feature_dim = w3
    _init_weights(net)
    return net


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Sec. 4.2): 16/32/64 channels, n blocks each.

    Built from torchvision's ``BasicBlock`` with the given norm; shortcuts that change shape
    are ``conv1x1 -> norm`` projections (option B). ``feature_dim`` is 64.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs; 0 for features only.
        in_channels: input channels.
        norm_layer: ``num_features -> norm layer`` (default: BGN with auto-G).

    Raises:
        ValueError: when ``depth`` is not ``6n + 2`` with ``n >= 1``, or for a bad size.
    """

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, norm_layer: NormFactory | None = None
    ) -> None:
        super().__init__()
        _check_positive("CifarResNet", ("num_classes",), num_classes=num_classes, in_channels=in_channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1 (20, 32, 56), got {depth!r}")
        blocks = (depth - 2) // 6
        make_norm = norm_layer or _default_norm()
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
        self.feature_dim = channels
        self.fc = _head(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` (or features ``(N, 64)``) for images ``(N, in_channels, H, W)``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class _PreActBlock(nn.Module):
    """norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv3x3, identity or 1x1-conv shortcut (pre-activation)."""

    def __init__(self, c_in: int, c_out: int, stride: int, make_norm: NormFactory) -> None:
        super().__init__()
        self.bn1, self.bn2 = make_norm(c_in), make_norm(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.bn2(out).relu())
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs (He et al. 2016b), the standard adversarial-training model.

    4 stages of 2 pre-activation blocks with 64/128/256/512 channels (Madry et al.'s and Rice et
    al.'s CIFAR-10 model). ``feature_dim`` is 512.

    Args:
        num_classes: classifier outputs; 0 for features only.
        in_channels: input channels.
        norm_layer: ``num_features -> norm layer`` (default: BGN with auto-G).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, norm_layer: NormFactory | None = None) -> None:
        super().__init__()
        _check_positive("PreActResNet18", ("num_classes",), num_classes=num_classes, in_channels=in_channels)
        make_norm = norm_layer or _default_norm()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(_PreActBlock(channels, width, 2 if i > 0 and j == 0 else 1, make_norm))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = make_norm(channels)
        self.feature_dim = channels
        self.fc = _head(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` (or features ``(N, 512)``) for images ``(N, in_channels, H, W)``."""
        out = self.final_norm(self.blocks(self.stem(x))).relu()
        return self.fc(out.mean(dim=(2, 3)))


def torchvision_resnet(
    arch: str, num_classes: int, in_channels: int = 3, norm_layer: NormFactory | None = None
) -> nn.Module:
    """A torchvision ImageNet ResNet (randomly initialised) with the given norm layers.

    ``feature_dim`` is the width before ``fc`` (512 for ResNet-18, 2048 for ResNet-50).

    Args:
        arch: a ``torchvision.models`` ResNet builder name, e.g. ``resnet18`` or ``resnet50``.
        num_classes: classifier outputs; 0 for features only.
        in_channels: input channels; the stem conv is rebuilt when it is not 3.
        norm_layer: ``num_features -> norm layer`` (default: BGN with auto-G).

    Raises:
        ValueError: for an unknown ``arch`` or a bad size.
    """
    known = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    check_choice("arch", arch, known, owner="torchvision_resnet")
    _check_positive("torchvision_resnet", ("num_classes",), num_classes=num_classes, in_channels=in_channels)
    builder = getattr(torchvision.models, arch)
    net = builder(weights=None, num_classes=max(num_classes, 1), norm_layer=norm_layer or _default_norm())
    net.feature_dim = net.fc.in_features
    if not num_classes:
        net.fc = nn.Identity()
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet32": lambda **kw: CifarResNet(32, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "preact18": PreActResNet18,
    "resnet18": lambda **kw: torchvision_resnet("resnet18", **kw),
    "resnet50": lambda **kw: torchvision_resnet("resnet50", **kw),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return list(_BACKBONES)


def build_backbone(
    name: str, num_classes: int, in_channels: int = 3, norm_layer: NormFactory | None = None
) -> nn.Module:
    """Build the network ``name`` (see :func:`available_backbones`) with ``norm_layer`` norm layers.

    Args:
        name: backbone name.
        num_classes: classifier outputs; 0 for a features-only network (output ``(N, feature_dim)``).
        in_channels: input channels.
        norm_layer: ``num_features -> norm layer``, e.g. ``norm_factory("bgn", groups=8)``
            (default: BGN with auto-G).

    Returns:
        The network; its ``feature_dim`` attribute is the width of the features the classifier sees.

    Raises:
        ValueError: for an unknown backbone name or a bad size.
    """
    check_choice("backbone", name, _BACKBONES)
    return _BACKBONES[name](num_classes=num_classes, in_channels=in_channels, norm_layer=norm_layer)
