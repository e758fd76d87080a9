"""Backbones built from a registry norm name.

Every network here takes ``norm`` (a :func:`bgn_lightning.available_norms` name) and ``groups``
(``int`` or ``"auto"``, passed to the norm as ``num_groups``) and builds each normalization layer
through :func:`bgn_lightning.norm_layer` — never from a hard-coded ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from bgn_lightning import norm_layer

__all__ = ["conv4", "make_norm_layer"]

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
    for arg, value in (("in_channels", in_channels), ("hidden", hidden), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"conv4: {arg} must be a positive int, got {value!r}")
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
