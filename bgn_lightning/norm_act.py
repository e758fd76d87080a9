"""A norm layer followed by the modules a fused norm-act layer applies after it.

Model zoos fuse the activation into the norm layer: timm's ``BatchNormAct2d`` is an
``nn.BatchNorm2d`` subclass whose ``forward`` is batch norm, then ``self.drop``, then
``self.act``. Replacing such a layer by a plain norm would drop the activation, so
:func:`bgn_lightning.convert_norms` replaces it by a :class:`NormAct` holding the new norm and the
*same* ``drop`` and ``act`` modules; ``timm.create_model(..., norm_layer=norm_layer("bgn"))`` builds
the same kind of module on timm's own norm-act path.

The norm stays a child module (``norm_act.norm``), so everything that looks for norm layers
(:func:`bgn_lightning.is_norm_layer`, :func:`bgn_lightning.set_norm_mode`, AdaBN,
:class:`bgn_lightning.NormAwareSWA`) finds it. Code written for the fused layer keeps working:
its attributes read through to the norm (``layer.weight``, ``layer.running_mean``,
``layer.eps``; timm's weight init zeroes ``block.bn3.weight``), assigning one of the norm's
parameters, buffers or hyper-parameters sets it on the norm, and loading a state dict written for
the fused layer (``bn1.weight`` instead of ``bn1.norm.weight``, e.g. timm's pretrained weights)
works. Its own state-dict keys have the ``norm.`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .registry import build_norm

__all__ = ["NormAct", "NormActLayer"]


class NormAct(nn.Module):
    """``act(drop(norm(x)))``: a norm layer and what a fused norm-act layer applies after it.

    Args:
        norm: the norm layer (any module; typically a registry norm).
        drop: applied after the norm (timm's ``drop_layer``, e.g. DropBlock); ``None`` for none.
        act: the activation; ``None`` for none.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        for name, module in (("norm", norm), ("drop", drop), ("act", act)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"NormAct: {name} must be an nn.Module or None, got {type(module).__name__}")
        self.norm = norm
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act
        self.register_load_state_dict_pre_hook(_accept_fused_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "norm" not in modules or name.startswith("__"):
                raise
            try:
                return getattr(modules["norm"], name)
            except AttributeError:
                raise AttributeError(
                    f"'{type(self).__name__}' object (wrapping {type(modules['norm']).__name__}) has no "
                    f"attribute {name!r}"
                ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        norm = self.__dict__.get("_modules", {}).get("norm")
        if norm is not None and name not in ("norm", "drop", "act", "training") and not name.startswith("_") \
                and (name in norm._parameters or name in norm._buffers or name in vars(norm)):
            setattr(norm, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))


def _accept_fused_keys(
    module: NormAct, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Map a fused layer's keys (``prefix + "weight"``) to the norm's (``prefix + "norm.weight"``)."""
    names = [*(n for n, _ in module.norm.named_parameters()), *(n for n, _ in module.norm.named_buffers())]
    for name in names:
        fused, nested = prefix + name, f"{prefix}norm.{name}"
        if fused in state_dict and nested not in state_dict:
            state_dict[nested] = state_dict.pop(fused)


class NormActLayer:
    """Builds a :class:`NormAct` from a registry name with timm's norm-act arguments.

    timm's models build their norm-act layers as ``layer(num_features, apply_act=..., act_layer=...,
    act_kwargs=..., inplace=..., drop_layer=..., **norm_kwargs)``; this class takes that call
    and returns ``NormAct(build_norm(norm, num_features, dim, **norm_kwargs), drop, act)``. It
    is what timm's ``get_norm_act_layer`` picks for :func:`bgn_lightning.norm_layer`'s factories
    (see :mod:`bgn_lightning._timm`); activations given by name (``"silu"``) are resolved with
    timm's ``create_act_layer``.
    """

    def __new__(
        cls,
        num_features: int,
        *,
        norm: str,
        dim: int = 2,
        apply_act: bool = True,
        act_layer: str | Callable[..., nn.Module] | None = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        **kwargs: Any,
    ) -> NormAct:
        act = None
        if apply_act and act_layer is not None:
            from timm.layers import create_act_layer

            act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})})
        drop = drop_layer() if drop_layer is not None else None
        return NormAct(build_norm(norm, num_features, dim, **kwargs), drop=drop, act=act)
