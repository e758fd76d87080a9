"""The norm arguments every task takes (``norm``, ``groups``, ``norm_kwargs``), checked in one place.

Every task's LightningModule accepts the same three init arguments, so ``--norm``, ``--groups`` and
``--model.norm_kwargs`` mean the same thing in every suite. :func:`check_norm_args` validates them
(the CLI calls it before anything is built, so a bad value is one line and exit code 2), and
:func:`norm_factory` turns them into the one ``num_features -> nn.Module`` factory that every
backbone takes (torchvision's ``norm_layer=`` convention).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from bgn_lightning import available_norms, build_norm, norm_layer

__all__ = ["NormFactory", "check_norm_args", "norm_factory"]

NormFactory = Callable[[int], nn.Module]
"""``num_features -> nn.Module``: what every backbone in :mod:`tasks.common.backbones` takes."""

_PROBE_CHANNELS = 64


def check_norm_args(norm: Any, groups: Any = "auto", norm_kwargs: Any = None) -> None:
    """Raise a one-line ``ValueError`` unless ``(norm, groups, norm_kwargs)`` can build a norm layer.

    Checks that ``norm`` is a registry name, ``groups`` is a positive int or ``"auto"``,
    ``norm_kwargs`` is a mapping (or ``None``), and that the registry accepts them together (e.g.
    ``bn`` has no groups to set, so ``groups=4`` is an error for it), by building one probe layer.
    Whether a given ``G`` fits a given layer's shape is only known once the network is built.

    Raises:
        ValueError: naming the bad value and what is accepted.
    """
    norms = available_norms()
    if not isinstance(norm, str) or norm not in norms:
        raise ValueError(f"unknown norm {norm!r}; choose from: {', '.join(norms)}")
    if groups != "auto" and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise ValueError(f"groups must be a positive int or 'auto', got {groups!r}")
    if norm_kwargs is not None and not isinstance(norm_kwargs, Mapping):
        raise ValueError(f"norm_kwargs must be a mapping of layer arguments, got {norm_kwargs!r}")
    kwargs = dict(norm_kwargs or {})
    if "num_groups" in kwargs:
        raise ValueError("norm_kwargs must not set num_groups; use groups (--groups) instead")
    probe_channels = groups if isinstance(groups, int) and groups > _PROBE_CHANNELS else _PROBE_CHANNELS
    try:
        build_norm(norm, probe_channels, dim=2, num_groups=groups, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--norm {norm} --groups {groups}: {str(err).splitlines()[0]}") from None


def norm_factory(
    norm: str, groups: int | str = "auto", norm_kwargs: Mapping[str, Any] | None = None, dim: int = 2
) -> NormFactory:
    """The ``num_features -> nn.Module`` factory of registry norm ``norm`` with ``num_groups=groups``.

    Args:
        norm: registry name (``bn``, ``bgn``, ``gn``, ``ln``, ``in``, ``pn``, ``none`` or a user's).
        groups: ``num_groups`` of every layer (``"auto"`` is accepted by every registry norm).
        norm_kwargs: extra layer arguments (``eps``, ``momentum``, ``track_running_stats``, ``affine``).
        dim: 1, 2 or 3: the layer variant (1 for features ``(N, C)``, e.g. a domain discriminator).

    Raises:
        ValueError: for arguments :func:`check_norm_args` rejects.
    """
    check_norm_args(norm, groups, norm_kwargs)
    return norm_layer(norm, dim=dim, num_groups=groups, **dict(norm_kwargs or {}))
