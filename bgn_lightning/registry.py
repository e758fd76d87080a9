"""Normalization registry: one name per norm layer, 1-D/2-D/3-D variants by ``dim``.

====== =========================================== ==============================================
name   2-D layer                                   notes
====== =========================================== ==============================================
bn     ``nn.BatchNorm2d``                          :class:`GhostBatchNorm2d` with ``norm_batch_size``
bgn    :class:`BatchGroupNorm2d`                   ``num_groups`` int or ``"auto"`` (default)
gn     ``nn.GroupNorm``                            ``"auto"``: 32 groups reduced to a divisor of C
ln     ``nn.GroupNorm(1, C)``                      LayerNorm over (C, *S), per-channel affine
in     ``nn.InstanceNorm2d(affine=True)``
pn     :class:`PositionalNorm`                     normalize over C at each position
none   ``nn.Identity``
====== =========================================== ==============================================

Users add their own layers with :func:`register_norm`; every backbone in ``tasks/`` is built
from a registry name through :func:`build_norm` or :func:`norm_layer`.

``norm_batch_size`` (ghost batches, :mod:`bgn_lightning.ghost`) applies to the norms that use batch
statistics, ``bn`` and ``bgn``; the others (``gn``, ``ln``, ``in``, ``pn``, ``none``) accept it with
one warning that it has no effect there, so a sweep over norms x ``norm_batch_size`` runs. A user's
norm takes it by accepting a ``norm_batch_size`` argument (and ``running_stats_from``); one that does
not is an error when ``norm_batch_size`` is set, since the registry cannot tell whether it uses batch
statistics.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .layers import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
)

__all__ = [
    "RegistryNorm",
    "available_norms",
    "build_norm",
    "is_norm_layer",
    "norm_layer",
    "register_norm",
    "uses_batch_statistics",
]

NormFactory = Callable[..., nn.Module]
"""``factory(num_features, dim, **kwargs) -> nn.Module``."""

F = TypeVar("F", bound=NormFactory)

_REGISTRY: dict[str, NormFactory] = {}
_NORM_TYPES: set[type[nn.Module]] = {
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, Lazy variants
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    BatchGroupNorm,
    PositionalNorm,
}


def register_norm(
    name: str, *, overwrite: bool = False, norm_types: Iterable[type[nn.Module]] = ()
) -> Callable[[F], F]:
    """Decorator registering ``factory(num_features, dim, **kwargs) -> nn.Module`` as ``name``.

    A decorated ``nn.Module`` subclass is called as ``cls(num_features, **kwargs)`` (``dim`` is
    dropped). A factory that takes neither ``num_groups`` nor ``**kwargs`` still works in sweeps:
    ``num_groups="auto"`` and ``track_running_stats`` are dropped for it (an explicit int
    ``num_groups`` is a ``ValueError``), as for the registry's norms without groups.

    Which modules :func:`is_norm_layer` recognises is decided by class, never by what a factory
    happens to return:

    * the registry's own layers and torch's norm layers are always recognised;
    * a decorated class is recognised from then on (and so are its subclasses);
    * a decorated factory *function* adds no type: what it returns counts as a norm layer only
      if its class is already recognised (e.g. a function returning ``nn.GroupNorm`` or a
      registered class). Name the classes of the layers it builds in ``norm_types`` to have
      them recognised too.

    Recognised types are never forgotten (``overwrite=True`` replaces only the factory).

    Args:
        name: the registry name.
        overwrite: replace a factory already registered as ``name`` instead of raising.
        norm_types: extra ``nn.Module`` subclasses that :func:`is_norm_layer` should recognise,
            typically the classes a factory function builds.

    Raises:
        ValueError: for an empty or non-str ``name``, or (when applied) a ``name`` already
            registered without ``overwrite=True``.
        TypeError: for a ``norm_types`` entry that is not an ``nn.Module`` subclass.

    Example::

        @register_norm("my_norm")
        class MyNorm(nn.Module):
            def __init__(self, num_features: int, eps: float = 1e-5): ...

        @register_norm("my_nd_norm", norm_types=(MyNdNorm,))   # a function: name its class
        def my_nd_norm(num_features: int, dim: int, **kwargs) -> nn.Module:
            return MyNdNorm(num_features, spatial_dims=dim, **kwargs)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_norm: name must be a non-empty str, got {name!r}")
    types = tuple(norm_types)
    for norm_type in types:
        if not (isinstance(norm_type, type) and issubclass(norm_type, nn.Module)):
            raise TypeError(
                f"register_norm({name!r}): norm_types entries must be nn.Module subclasses, "
                f"got {norm_type!r}"
            )

    def decorator(factory: F) -> F:
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"register_norm: {name!r} is already registered; pass overwrite=True to replace it"
            )
        if isinstance(factory, type) and issubclass(factory, nn.Module):
            cls = factory
            _NORM_TYPES.add(cls)
            _REGISTRY[name] = _shared_args_adapter(
                name, cls, lambda num_features, dim, **kw: cls(num_features, **kw)
            )
        else:
            _REGISTRY[name] = _shared_args_adapter(name, factory, factory)
        _NORM_TYPES.update(types)
        return factory

    return decorator


_SHARED_ARGS = ("num_groups", "track_running_stats", "norm_batch_size", "running_stats_from")


def _shared_args_adapter(name: str, declared: Callable[..., Any], call: NormFactory) -> NormFactory:
    """Let a user's factory ignore the arguments sweeps pass to every norm, if it does not take them.

    Every registry norm accepts ``num_groups="auto"``, ``track_running_stats`` and
    ``norm_batch_size`` (see :func:`build_norm`); a user's ``MyNorm(num_features, eps)`` does not.
    For a factory without ``**kwargs``, ``num_groups`` of ``"auto"``/``None``, any
    ``track_running_stats``, ``norm_batch_size=None`` and ``running_stats_from`` are dropped when
    it has no such parameter; an explicit int ``num_groups`` or ``norm_batch_size`` is an error
    naming the norm.
    """
    try:
        params = inspect.signature(declared).parameters
    except (TypeError, ValueError):  # no introspectable signature: pass everything through
        return call
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return call
    missing = [arg for arg in _SHARED_ARGS if arg not in params]
    if not missing:
        return call

    @functools.wraps(call)
    def adapted(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
        if "num_groups" in missing and kwargs.get("num_groups", "auto") not in ("auto", None):
            raise ValueError(
                f"{name}: has no num_groups to set (got num_groups={kwargs['num_groups']!r}); use bgn or gn"
            )
        if "norm_batch_size" in missing and kwargs.get("norm_batch_size") is not None:
            raise ValueError(
                f"{name}: takes no norm_batch_size (got norm_batch_size={kwargs['norm_batch_size']!r}); "
                f"a norm that uses batch statistics supports ghost batches by accepting a norm_batch_size "
                f"argument (see bgn_lightning.ghost)"
            )
        for arg in missing:
            kwargs.pop(arg, None)
        return call(num_features, dim, **kwargs)

    return adapted


def available_norms() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def _check_name(name: str) -> NormFactory:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown norm {name!r}; known norms: {', '.join(available_norms())}"
        ) from None


def build_norm(name: str, num_features: int, dim: int = 2, **kwargs: Any) -> nn.Module:
    """Build the norm layer ``name`` for ``num_features`` channels.

    Args:
        name: a registry name (see :func:`available_norms`).
        num_features: number of channels ``C``.
        dim: 1, 2 or 3 spatial dimensions (1 also accepts ``(N, C)`` inputs for bn/bgn).
        **kwargs: passed to the layer (e.g. ``num_groups``, ``eps``, ``momentum``).

    Raises:
        ValueError: for an unknown name, a bad ``dim`` or ``num_features``.
    """
    factory = _check_name(name)
    if dim not in (1, 2, 3):
        raise ValueError(f"build_norm: dim must be 1, 2 or 3, got {dim!r}")
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"build_norm: num_features must be a positive int, got {num_features!r}")
    return factory(num_features, dim, **kwargs)


def uses_batch_statistics(name: str) -> bool:
    """Whether registry norm ``name`` takes ``norm_batch_size``: its training statistics come from the batch.

    ``bn`` and ``bgn`` do; ``gn``, ``ln``, ``in``, ``pn`` and ``none`` do not (``norm_batch_size``
    has no effect there); a user's norm does when its factory accepts ``norm_batch_size``.
    Decided by building one small probe layer.

    Raises:
        ValueError: for an unknown name.
    """
    _check_name(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build_norm(name, 8, 2, norm_batch_size=2)
        except ValueError:  # a user's norm without the argument
            return False
    return not any("has no effect" in str(w.message) for w in caught)


class RegistryNorm:
    """``RegistryNorm(num_features, norm=name, dim=d, **kw)`` is ``build_norm(name, num_features, d, **kw)``.

    The class :func:`norm_layer` binds: a class taking ``num_features`` first and everything else
    by keyword is what model zoos expect of a ``norm_layer`` (timm unbinds a ``partial`` and
    rebinds only its keywords), and timm's norm-act lookup maps it to
    :class:`~bgn_lightning.norm_act.NormActLayer` (see :mod:`bgn_lightning._timm`).
    """

    def __new__(cls, num_features: int, *, norm: str, dim: int = 2, **kwargs: Any) -> nn.Module:
        return build_norm(norm, num_features, dim, **kwargs)


def norm_layer(name: str, dim: int = 2, **kwargs: Any) -> Callable[..., nn.Module]:
    """A ``num_features -> nn.Module`` callable, for the ``norm_layer=`` of torchvision and timm.

    Examples::

        torchvision.models.resnet18(norm_layer=norm_layer("bgn", num_groups="auto"))
        timm.create_model("efficientnet_b0", norm_layer=norm_layer("bgn"))   # keeps the activations

    The result is ``functools.partial(RegistryNorm, norm=name, dim=dim, **kwargs)`` (picklable);
    the name is checked now. timm models that fuse norm and activation (EfficientNet, RegNet,
    DenseNet, ...) build a :class:`~bgn_lightning.NormAct` (the norm, then timm's drop and
    activation) when timm was imported before this call. timm models whose constructor takes no
    ``norm_layer`` (e.g. MobileNetV3) reject it with timm's ``TypeError``: convert those with
    :func:`bgn_lightning.convert_norms`.
    """
    _check_name(name)
    from . import _timm

    _timm.register_norm_act(RegistryNorm)
    return functools.partial(RegistryNorm, norm=name, dim=dim, **kwargs)


def is_norm_layer(module: nn.Module) -> bool:
    """True for every normalization layer the project knows (registry layers and torch's).

    The known classes are torch's norm layers (BatchNorm, SyncBatchNorm, InstanceNorm and their
    lazy variants, GroupNorm, LayerNorm, LocalResponseNorm), the registry's (BatchGroupNorm and
    its subclasses, PositionalNorm) and the classes users declared with :func:`register_norm`
    (see there); subclasses count too. ``nn.Identity`` (the ``none`` norm) is not a norm layer.

    Use this instead of ``isinstance(m, _BatchNorm)`` or class-name matching when a piece of
    code must treat all norm layers alike (freezing, attack modes, AdaBN, SWA).
    """
    return isinstance(module, tuple(_NORM_TYPES))


# -- built-in norms ----------------------------------------------------------------------------
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_GHOST_BN = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
_BGN = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}
_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _drop_auto_groups(name: str, kwargs: dict[str, Any]) -> None:
    """Norms without groups accept ``num_groups="auto"`` (a sweep default) and nothing else."""
    groups = kwargs.pop("num_groups", "auto")
    if groups not in ("auto", None):
        raise ValueError(f"{name}: has no num_groups to set (got num_groups={groups!r}); use bgn or gn")


def _drop_running_stats(kwargs: dict[str, Any]) -> None:
    """Norms that never keep running statistics accept any ``track_running_stats``.

    Their train and eval behaviour are the same, which is what ``track_running_stats=False``
    asks for (e.g. MAML's transductive mode), so the flag is meaningless rather than wrong.
    """
    kwargs.pop("track_running_stats", None)


def _drop_norm_batch_size(name: str, kwargs: dict[str, Any]) -> None:
    """Norms without batch statistics accept ``norm_batch_size``, with one warning when it is set.

    A sweep over norms x ``norm_batch_size`` passes it to every norm; for these it changes nothing.
    """
    kwargs.pop("running_stats_from", None)
    b = kwargs.pop("norm_batch_size", None)
    if b is not None:
        warnings.warn(f"{name}: uses no batch statistics; norm_batch_size={b} has no effect", UserWarning,
                      stacklevel=4)


def _largest_divisor_at_most(c: int, g: int) -> int:
    return max(d for d in range(1, min(c, g) + 1) if c % d == 0)


@register_norm("bn")
def _bn(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    """torch's BatchNorm; the ghost-batch variant when ``norm_batch_size`` is given."""
    _drop_auto_groups("bn", kwargs)
    if kwargs.get("norm_batch_size") is None:
        kwargs.pop("norm_batch_size", None)
        kwargs.pop("running_stats_from", None)
        return _BN[dim](num_features, **kwargs)
    return _GHOST_BN[dim](num_features, **kwargs)


@register_norm("bgn")
def _bgn(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    return _BGN[dim](num_features, **kwargs)


@register_norm("gn")
def _gn(num_features: int, dim: int, num_groups: int | str = "auto", **kwargs: Any) -> nn.Module:
    """GroupNorm: ``"auto"`` is the GN paper's 32 groups, reduced to the largest divisor of C.

    An explicit ``num_groups`` is used as given, so it must divide C (it is never changed silently).
    """
    _drop_running_stats(kwargs)
    _drop_norm_batch_size("gn", kwargs)
    if num_groups == "auto":
        return nn.GroupNorm(_largest_divisor_at_most(num_features, 32), num_features, **kwargs)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"gn: num_groups must be a positive int or 'auto', got {num_groups!r}")
    if num_features % num_groups:
        divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
        raise ValueError(
            f"gn: num_groups={num_groups} must divide the layer's C={num_features}; "
            f"valid: {', '.join(map(str, divisors))}, or 'auto'"
        )
    return nn.GroupNorm(num_groups, num_features, **kwargs)


@register_norm("ln")
def _ln(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    """LayerNorm over (C, *S) with a per-channel affine, as in the GN/BGN papers."""
    _drop_auto_groups("ln", kwargs)
    _drop_running_stats(kwargs)
    _drop_norm_batch_size("ln", kwargs)
    return nn.GroupNorm(1, num_features, **kwargs)


@register_norm("in")
def _in(num_features: int, dim: int, affine: bool = True, **kwargs: Any) -> nn.Module:
    _drop_auto_groups("in", kwargs)
    _drop_norm_batch_size("in", kwargs)
    return _IN[dim](num_features, affine=affine, **kwargs)


@register_norm("pn")
def _pn(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    _drop_auto_groups("pn", kwargs)
    _drop_running_stats(kwargs)
    _drop_norm_batch_size("pn", kwargs)
    return PositionalNorm(num_features, **kwargs)


@register_norm("none")
def _none(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    _drop_auto_groups("none", kwargs)
    _drop_running_stats(kwargs)
    _drop_norm_batch_size("none", kwargs)
    return nn.Identity()
