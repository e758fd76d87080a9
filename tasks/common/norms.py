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

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bgn_lightning import BatchGroupNorm, available_norms, build_norm, norm_layer
from bgn_lightning.functional import check_num_groups, valid_num_groups

from .errors import TaskConfigError
from .validate import check_choice, check_int

__all__ = ["GroupCountCheck", "NormFactory", "check_norm_args", "norm_factory"]

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
    check_choice("norm", norm, available_norms())
    if groups != "auto":
        check_int("groups", groups, expected="a positive int or 'auto'")
    if norm_kwargs is not None and not isinstance(norm_kwargs, Mapping):
        raise ValueError(f"norm_kwargs must be a mapping of layer arguments, got {norm_kwargs!r}")
    kwargs = dict(norm_kwargs or {})
    if "num_groups" in kwargs:
        raise ValueError("norm_kwargs must not set num_groups; use groups (--groups) instead")
    # a probe layer G fits (C = G): whether G fits the network's real layers shows when they are built
    probe_channels = groups if isinstance(groups, int) else _PROBE_CHANNELS
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


def _choices(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class GroupCountCheck(pl.Callback):
    """Check every BGN layer's explicit ``G`` against the shape it first sees, before any step.

    Whether ``G`` fits a layer depends on its input: ``G`` must divide ``D = C * prod(S)``, and be a
    multiple of ``C`` when larger than ``C``. The shapes are only known at the first forward, which
    is Lightning's sanity check or the first training batch; this callback (added by the runner)
    puts a one-shot pre-hook on each layer at ``on_fit_start``, so a ``--groups`` that does not fit
    ends the run there with one line naming the layer, ``C``, ``D`` and the valid choices
    (:class:`~tasks.common.errors.TaskConfigError`, exit code 2), instead of a traceback from inside
    the step. Auto-``G`` layers pick a valid ``G`` themselves and are not hooked.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook every BatchGroupNorm layer with a fixed ``G``."""
        for name, module in pl_module.named_modules():
            if isinstance(module, BatchGroupNorm) and not module.auto_groups:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        handles = self._handles

        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not isinstance(x, Tensor) or x.dim() < 2:
                return  # the layer's own checks name the problem
            channels, numel = x.shape[1], x[0].numel()
            try:
                check_num_groups(module.num_groups, channels, numel, name)
            except ValueError:
                spatial = "x".join(map(str, x.shape[2:])) or "1"
                raise TaskConfigError(
                    f"--groups {module.num_groups} does not fit layer {name!r} ({type(module).__name__}, "
                    f"C={channels}, D=C*{spatial}={numel}): G must divide D, and be a multiple of C when "
                    f"G > C; valid here: {_choices(valid_num_groups(channels, numel))}; or --groups auto"
                ) from None
            handle = next((h for h in handles if h.id in module._forward_pre_hooks), None)
            if handle is not None:
                handle.remove()

        return check

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks that never fired."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
