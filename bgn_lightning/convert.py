"""Replace the normalization layers of a model with registry norms, keeping what carries over.

:func:`convert_norms` walks a model and replaces every layer of the given types (BatchNorm by
default) with a registry norm (``"bgn"`` by default); :func:`convert_norm_layer` converts one
layer and returns it. A converted layer

* reuses the source's ``weight`` and ``bias`` :class:`~torch.nn.Parameter` objects when the
  shapes match (so ``requires_grad``, gradients and any external references stay valid),
* inherits ``eps``, ``momentum`` and ``affine`` when the target layer has those attributes,
  and ``track_running_stats=False`` from a source that keeps no running statistics
  (keyword arguments given to the converter win),
* keeps the source's device, dtype, ``training`` flag and ``qconfig``,
* carries the running statistics over (see below).

Running statistics, BatchNorm (``C`` per-channel entries) to BatchGroupNorm (``G`` entries):

* ``G = C``: copied exactly.
* groups spanning channels (``G`` divides ``C``): pooled per group, the mean of the channel
  means and the mean of the channel variances plus the (biased) variance of the channel means,
  i.e. the law of total variance with each channel weighted by its share of the group. BatchNorm
  stores *unbiased* variances, so the pooled value is the pooled unbiased within-channel variance
  plus the biased between-channel variance; the exact unbiased pooled variance differs from it by
  a relative amount of order ``1 / (values per channel)``, negligible for image batches.
* ``G > C`` (groups inside channels): replicated, each group gets its channel's statistics.
* ``num_groups="auto"``, or a ``G`` whose groups straddle channel borders (then the split depends
  on the spatial size): ``G`` or the layout is only known at the first training batch, so the
  per-channel statistics are kept on a one-shot forward pre-hook that pools them (same rules,
  weighted by overlap) just before that batch updates them. Eval-mode forwards before that first
  training batch see the layer's initial statistics (mean 0, variance 1). Loading a state dict
  with trained statistics into the layer cancels the pending statistics.

Same-shape running statistics (e.g. BatchNorm to BatchNorm, or BatchGroupNorm with ``G = C`` back
to BatchNorm) are copied; anything else starts fresh.

Layers whose ``forward`` does more than normalize. A matched layer is replaced only when the
converter knows what its ``forward`` computes:

* the ``forward`` is torch's or this project's (``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and
  subclasses that do not override ``forward``): replaced by the new norm;
* its class has an *adapter* (:func:`register_norm_adapter`), which builds the replacement from
  the old layer and the new norm. timm's fused norm-act layers (``BatchNormAct2d``,
  ``SyncBatchNormAct``: norm, then ``drop``, then ``act``) have built-in adapters that keep their
  ``drop`` and ``act`` modules in a :class:`~bgn_lightning.NormAct`;
* anything else (e.g. timm's ``SplitBatchNorm2d``, quantized BatchNorm) is **not** replaced:
  ``on_unknown="error"`` (the default) raises a ``ValueError`` naming the class and the layer
  path; ``on_unknown="warn"`` leaves such layers as they are, with one warning.

Modules that are not instances of ``types`` are never touched (torchvision's
``FrozenBatchNorm2d`` is an ``nn.Module``, not a BatchNorm).
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .layers import BatchGroupNorm, BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d
from .registry import available_norms, build_norm, is_norm_layer

__all__ = [
    "DEFAULT_SOURCE_TYPES",
    "ConversionReport",
    "NormAdapter",
    "convert_norm_layer",
    "convert_norms",
    "register_norm_adapter",
]

NormAdapter = Callable[[nn.Module, nn.Module], nn.Module]
"""``adapter(source_layer, new_norm) -> replacement``: see :func:`register_norm_adapter`."""

OnUnknown = Literal["error", "warn"]

DEFAULT_SOURCE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
"""What :func:`convert_norms` replaces unless told otherwise."""

_DIM_OF_TYPE: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    ((nn.BatchNorm1d, nn.LazyBatchNorm1d, nn.InstanceNorm1d, nn.LazyInstanceNorm1d, BatchGroupNorm1d), 1),
    ((nn.BatchNorm2d, nn.LazyBatchNorm2d, nn.InstanceNorm2d, nn.LazyInstanceNorm2d, BatchGroupNorm2d), 2),
    ((nn.BatchNorm3d, nn.LazyBatchNorm3d, nn.InstanceNorm3d, nn.LazyInstanceNorm3d, BatchGroupNorm3d), 3),
)

_INHERITED = ("eps", "momentum", "affine")
_ON_UNKNOWN = ("error", "warn")
_ADAPTERS: dict[type[nn.Module], NormAdapter] = {}


def register_norm_adapter(
    source_type: type[nn.Module], adapter: NormAdapter | None = None, *, overwrite: bool = False
) -> Any:
    """Teach the converter a norm class whose ``forward`` does more than normalize.

    ``adapter(source_layer, new_norm)`` returns the module that replaces ``source_layer``;
    ``new_norm`` is the registry norm already built from it (parameters, running statistics,
    device, dtype and mode carried over). The adapter applies to ``source_type`` and to its
    subclasses that do not override ``forward``. Usable as a decorator::

        @register_norm_adapter(MyBatchNormReLU)        # forward: relu(batch_norm(x))
        def keep_relu(source: MyBatchNormReLU, norm: nn.Module) -> nn.Module:
            return NormAct(norm, act=nn.ReLU())

    Args:
        source_type: the norm class (an ``nn.Module`` subclass).
        adapter: the function; omitted, the call returns a decorator.
        overwrite: replace an adapter already registered for ``source_type``.

    Returns:
        ``adapter`` (or, without it, a decorator that registers and returns its function).

    Raises:
        ValueError: if ``source_type`` is not an ``nn.Module`` subclass, ``adapter`` cannot be
            called as ``adapter(source_layer, new_norm)``, or ``source_type`` already has one
            and ``overwrite`` is false.
    """
    if not (isinstance(source_type, type) and issubclass(source_type, nn.Module)):
        raise ValueError(
            f"register_norm_adapter: source_type must be an nn.Module subclass, got {source_type!r}"
        )

    def register(fn: NormAdapter) -> NormAdapter:
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError:
            raise ValueError(
                f"register_norm_adapter({source_type.__name__}): the adapter must be callable as "
                f"adapter(source_layer, new_norm), got {getattr(fn, '__name__', fn)!r} with signature "
                f"{inspect.signature(fn)}"
            ) from None
        except ValueError:  # no signature to inspect (some builtins): checked when called
            if not callable(fn):
                raise ValueError(
                    f"register_norm_adapter({source_type.__name__}): the adapter must be callable, got {fn!r}"
                ) from None
        if source_type in _ADAPTERS and not overwrite:
            raise ValueError(
                f"register_norm_adapter: {source_type.__name__} already has an adapter; pass "
                f"overwrite=True to replace it"
            )
        _ADAPTERS[source_type] = fn
        return fn

    return register if adapter is None else register(adapter)


def _forward_owner(cls: type[nn.Module]) -> type:
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def _adapter_for(cls: type[nn.Module]) -> NormAdapter | None:
    """The user's adapter for ``cls``, else the built-in one, else ``None`` (plain replacement)."""
    from . import _timm

    owner = _forward_owner(cls)
    for adapters in (_ADAPTERS, _timm.adapters()):
        for candidate in cls.__mro__:  # up to the class that defines forward: same computation
            if candidate in adapters:
                return adapters[candidate]
            if candidate is owner:
                break
    return None


def _knows_forward(cls: type[nn.Module]) -> bool:
    """Whether ``cls``'s ``forward`` is torch's or this project's, i.e. a plain norm."""
    return _forward_owner(cls).__module__.startswith(("torch.nn.", "bgn_lightning."))


@dataclass
class ConversionReport:
    """What one conversion did, by class name.

    Attributes:
        replaced: ``(source class, new class)`` -> number of layers replaced.
        left: class -> number of norm layers left as they were (not of the source types,
            of a type with an unknown ``forward`` under ``on_unknown="warn"``, or already
            converted); a norm layer is an :func:`~bgn_lightning.is_norm_layer` module or any
            module with a ``running_mean`` tensor (e.g. ``FrozenBatchNorm2d``).
    """

    replaced: Counter[tuple[str, str]] = field(default_factory=Counter)
    left: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """The number of layers replaced."""
        return sum(self.replaced.values())

    def describe(self) -> str:
        """One line: ``"3 BatchNorm2d -> BatchGroupNorm2d; left: 2 LayerNorm"``."""
        done = ", ".join(f"{n} {s} -> {t}" for (s, t), n in sorted(self.replaced.items()))
        done = done or "nothing replaced"
        left = ", ".join(f"{n} {c}" for c, n in sorted(self.left.items()))
        return f"{done}; left: {left}" if left else done


def convert_norms(
    module: nn.Module,
    to: str = "bgn",
    types: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_SOURCE_TYPES,
    *,
    dim: int | None = None,
    on_unknown: OnUnknown = "error",
    **kwargs: Any,
) -> int:
    """Replace, in place, every submodule of ``module`` that is an instance of ``types``.

    Each match is replaced by ``build_norm(to, num_features, dim, **kwargs)`` as described in the
    module docstring (parameters reused, hyper-parameters and running statistics carried over;
    fused norm-act layers keep their activation). Converting an already converted model is a
    no-op: a layer whose replacement would have its own type is left alone. A layer shared by
    several parents is converted once and stays shared.

    Args:
        module: the model; its children are replaced in place.
        to: a registry name (see :func:`bgn_lightning.available_norms`).
        types: the layer classes to replace (``isinstance`` match).
        dim: spatial dimensionality of the new layers, for source layers whose class does not
            tell it (``SyncBatchNorm``). Left ``None``, such layers become the any-rank
            :class:`~bgn_lightning.BatchGroupNorm` for ``to="bgn"`` and raise for other names.
        on_unknown: what to do with a matched layer whose ``forward`` the converter does not
            know and that has no adapter: ``"error"`` raises before anything is replaced,
            ``"warn"`` leaves those layers as they are, with one warning.
        **kwargs: passed to the new layers, e.g. ``num_groups=8`` or ``num_groups="auto"``.

    Returns:
        The number of layers replaced.

    Raises:
        ValueError: if ``module`` itself is one of ``types`` (it cannot be replaced in place; use
            :func:`convert_norm_layer`), for an unknown ``to``, bad ``types``, ``dim`` or
            ``on_unknown``, a lazy layer that has not seen an input yet, or (with
            ``on_unknown="error"``) a layer whose ``forward`` is unknown.
    """
    return convert_tree(module, to, types, dim=dim, on_unknown=on_unknown, kwargs=kwargs).total


def convert_norm_layer(
    layer: nn.Module, to: str = "bgn", *, dim: int | None = None, **kwargs: Any
) -> nn.Module:
    """Return a ``to`` norm layer built from the norm layer ``layer`` (which is left unchanged).

    The counterpart of :func:`convert_norms` for a single layer, e.g. a model that is itself a
    norm layer. Returns ``layer`` itself when the new layer would have its type.

    Args:
        layer: a norm layer with a ``num_features`` attribute (BatchNorm, BatchGroupNorm, …).
        to: a registry name.
        dim: spatial dimensionality, for layers whose class does not tell it.
        **kwargs: passed to the new layer.

    Raises:
        ValueError: for an unknown ``to``, a layer without ``num_features`` or an unknown ``dim``.
    """
    _check_target(to, dim, "error")
    if not _knows_forward(type(layer)) and _adapter_for(type(layer)) is None:
        raise ValueError(_unknown_message([("<layer>", layer)]))
    return _convert_layer(layer, to, dim, kwargs)


def _check_target(to: str, dim: int | None, on_unknown: str) -> None:
    if to not in available_norms():
        raise ValueError(f"convert_norms: unknown norm {to!r}; known norms: {', '.join(available_norms())}")
    if dim is not None and dim not in (1, 2, 3):
        raise ValueError(f"convert_norms: dim must be 1, 2, 3 or None, got {dim!r}")
    if on_unknown not in _ON_UNKNOWN:
        raise ValueError(
            f"convert_norms: on_unknown must be one of {', '.join(_ON_UNKNOWN)}, got {on_unknown!r}"
        )


_WAY_OUT = ", or pass on_unknown='warn' to leave such layers as they are"


def _unknown_message(layers: list[tuple[str, nn.Module]], ending: str = _WAY_OUT) -> str:
    paths = ", ".join(
        f"{path} ({type(layer).__module__}.{type(layer).__qualname__})" for path, layer in layers
    )
    return (
        f"convert_norms: {len(layers)} layer{'s' if len(layers) != 1 else ''} of the source types "
        f"compute{'s' if len(layers) == 1 else ''} more than a norm in forward(), which the new norm would "
        f"silently drop: {paths}. Register an adapter (bgn_lightning.register_norm_adapter(cls, fn))"
        f"{ending}"
    )


def _check_types(types: Sequence[type[nn.Module]] | type[nn.Module]) -> tuple[type[nn.Module], ...]:
    if isinstance(types, type):
        types = (types,)
    types = tuple(types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if not types or bad:
        raise ValueError(
            f"convert_norms: types must be a non-empty sequence of nn.Module subclasses, got {types!r}"
        )
    return types


def convert_tree(
    module: nn.Module,
    to: str,
    types: Sequence[type[nn.Module]] | type[nn.Module],
    *,
    dim: int | None,
    on_unknown: str,
    kwargs: dict[str, Any],
) -> ConversionReport:
    """:func:`convert_norms`, returning the :class:`ConversionReport` instead of the count."""
    _check_target(to, dim, on_unknown)
    types = _check_types(types)
    if isinstance(module, types):
        raise ValueError(
            f"convert_norms: the root module is itself a {type(module).__name__}, which cannot be "
            f"replaced in place; use convert_norm_layer(module, {to!r}, ...) and keep its result"
        )
    matches = _matches(module, types)
    unknown = [(path, layer) for path, layer in matches.values()
               if not _knows_forward(type(layer)) and _adapter_for(type(layer)) is None]
    if unknown and on_unknown == "error":
        raise ValueError(_unknown_message(unknown))
    if unknown:
        warnings.warn(_unknown_message(unknown, "; left as they are"), stacklevel=3)
    skip = {id(layer) for _, layer in unknown}
    report = ConversionReport()
    converted: dict[int, nn.Module] = {}  # id(old layer) -> new layer, keeps shared layers shared

    def visit(parent: nn.Module) -> None:
        # _modules, not named_children(): the latter skips a second reference to the same child
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in matches and id(child) not in skip:
                if id(child) not in converted:
                    new = _convert_layer(child, to, dim, kwargs)
                    converted[id(child)] = new
                    if new is not child:
                        report.replaced[(type(child).__name__, _describe(new))] += 1
                setattr(parent, name, converted[id(child)])
            elif id(child) not in visited:
                visited.add(id(child))
                visit(child)

    visited = {id(module)}
    visit(module)
    new_layers = {id(m) for new in converted.values() for m in new.modules()}
    for m in module.modules():
        is_norm = is_norm_layer(m) or isinstance(getattr(m, "running_mean", None), Tensor)
        if is_norm and id(m) not in new_layers:
            report.left[type(m).__name__] += 1
    return report


def _matches(module: nn.Module, types: tuple[type[nn.Module], ...]) -> dict[int, tuple[str, nn.Module]]:
    """``id -> (first path, layer)`` for each layer of ``types`` under ``module``, not inside another."""
    found: dict[int, tuple[str, nn.Module]] = {}
    visited: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if isinstance(child, types):
                found.setdefault(id(child), (path, child))
            elif id(child) not in visited:
                visited.add(id(child))
                visit(child, path + ".")

    visit(module, "")
    return found


def _describe(new: nn.Module) -> str:
    from .norm_act import NormAct

    if isinstance(new, NormAct):
        return f"{type(new).__name__}({type(new.norm).__name__})"
    return type(new).__name__


def _source_dim(layer: nn.Module, dim: int | None, to: str) -> int | None:
    for classes, d in _DIM_OF_TYPE:
        if isinstance(layer, classes):
            return d
    if dim is None and to != "bgn":
        raise ValueError(
            f"convert_norms: cannot tell the spatial dimensionality of {type(layer).__name__}; "
            f"pass dim=1, 2 or 3 to convert it to {to!r}"
        )
    return dim


def _first_tensor(layer: nn.Module) -> Tensor | None:
    for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


def _convert_layer(layer: nn.Module, to: str, dim: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(
            f"convert_norms: {type(layer).__name__} has uninitialized parameters; run one forward "
            f"pass before converting it"
        )
    num_features = getattr(layer, "num_features", None)
    if not isinstance(num_features, int):
        raise ValueError(
            f"convert_norms: {type(layer).__name__} has no int num_features, so it cannot be converted"
        )
    target_dim = _source_dim(layer, dim, to)
    new = _build(to, num_features, target_dim, kwargs)
    inherited = {k: getattr(layer, k) for k in _INHERITED
                 if k not in kwargs and hasattr(layer, k) and hasattr(new, k)
                 and getattr(new, k) != getattr(layer, k)}
    if (getattr(layer, "track_running_stats", True) is False and "track_running_stats" not in kwargs
            and getattr(new, "track_running_stats", False) is True):
        inherited["track_running_stats"] = False
    if inherited:
        new = _build(to, num_features, target_dim, {**kwargs, **inherited})
    if type(new) is type(layer):
        return layer
    adapter = _adapter_for(type(layer))
    reference = _first_tensor(layer)
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old_p, new_p = getattr(layer, name, None), getattr(new, name, None)
            if (isinstance(old_p, nn.Parameter) and isinstance(new_p, nn.Parameter)
                    and old_p.shape == new_p.shape):
                setattr(new, name, old_p)
        _carry_running_stats(layer, new)
    new.train(layer.training)
    if hasattr(layer, "qconfig"):
        new.qconfig = layer.qconfig
    if adapter is None:
        return new
    replacement = adapter(layer, new)
    if not isinstance(replacement, nn.Module):
        raise ValueError(
            f"convert_norms: the adapter {getattr(adapter, '__name__', adapter)!r} for "
            f"{type(layer).__name__} returned {type(replacement).__name__}, not an nn.Module"
        )
    replacement.training = layer.training
    return replacement


def _build(to: str, num_features: int, dim: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if dim is None:  # only for to == "bgn": the any-rank layer
        return BatchGroupNorm(num_features, **kwargs)
    return build_norm(to, num_features, dim, **kwargs)


def _running_stats(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor | None] | None:
    mean, var = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor)) or mean.numel() == 0:
        return None
    count = getattr(layer, "num_batches_tracked", None)
    return mean, var, count if isinstance(count, Tensor) else None


def _carry_running_stats(old: nn.Module, new: nn.Module) -> None:
    source, target = _running_stats(old), _running_stats(new)
    if source is None:
        return
    mean, var, count = source
    if target is not None and target[0].shape == mean.shape:
        target[0].copy_(mean)
        target[1].copy_(var)
        if count is not None and target[2] is not None:
            target[2].copy_(count)
        return
    if not isinstance(new, BatchGroupNorm) or not new.track_running_stats or mean.dim() != 1 \
            or mean.numel() != new.num_features:
        return
    g, c = new.num_groups, new.num_features
    if g is not None and (c % g == 0 or g % c == 0):
        pooled_mean, pooled_var = pool_channel_stats(mean, var, g, max(g // c, 1))
        new.running_mean.copy_(pooled_mean)
        new.running_var.copy_(pooled_var)
        if count is not None:
            new.num_batches_tracked.copy_(count)
        return
    seed = _PendingChannelStats(mean.detach().clone(), var.detach().clone(),
                                None if count is None else count.detach().clone())
    seed.hook_id = new.register_forward_pre_hook(seed).id


def pool_channel_stats(
    mean: Tensor, var: Tensor, num_groups: int, spatial_numel: int
) -> tuple[Tensor, Tensor]:
    """Per-group statistics from per-channel ones, for BGN's group layout.

    Group ``g`` is the g-th of ``num_groups`` contiguous chunks of a flattened ``(C, *S)`` sample
    with ``prod(S) = spatial_numel``; channel ``c``'s values are assumed to follow its statistics
    at every position. The group mean is the overlap-weighted mean of the channel means, the group
    variance the weighted mean of the channel variances plus the weighted variance of the channel
    means (law of total variance).

    Args:
        mean: ``(C,)`` channel means.
        var: ``(C,)`` channel variances.
        num_groups: ``G``, dividing ``C * spatial_numel``.
        spatial_numel: ``prod(S)``; only matters when groups straddle channel borders.

    Returns:
        ``(G,)`` means and variances, in the dtype of ``mean``.
    """
    c = mean.numel()
    d = c * spatial_numel
    if num_groups < 1 or d % num_groups != 0:
        raise ValueError(
            f"pool_channel_stats: num_groups={num_groups} must divide C*prod(S)={c}*{spatial_numel}={d}"
        )
    size = d // num_groups
    # weights[g, c] = share of group g's values that lie in channel c (overlap of index intervals)
    opts = {"device": mean.device, "dtype": torch.float64}
    group_start = torch.arange(num_groups, **opts)[:, None] * size
    channel_start = torch.arange(c, **opts)[None, :] * spatial_numel
    overlap = torch.minimum(group_start + size, channel_start + spatial_numel) \
        - torch.maximum(group_start, channel_start)
    weights = overlap.clamp_(min=0) / size
    m, v = mean.to(torch.float64), var.to(torch.float64)
    group_mean = weights @ m
    group_var = weights @ v + (weights * (m[None, :] - group_mean[:, None]) ** 2).sum(1)
    return group_mean.to(mean.dtype), group_var.to(var.dtype)


class _PendingChannelStats:
    """One-shot forward pre-hook seeding a BatchGroupNorm's running stats from channel stats.

    Runs at the layer's first training forward, before the layer updates its statistics: fixes
    ``G`` if it is still ``"auto"`` (the same rule the layer applies), pools the channel
    statistics for the input's layout and removes itself. A layer whose statistics already moved
    (``num_batches_tracked > 0`` with ``G`` fixed, e.g. loaded from a checkpoint) is left alone.
    A module-level class (not a closure) so that models holding it can be pickled.
    """

    def __init__(self, mean: Tensor, var: Tensor, count: Tensor | None) -> None:
        self.mean, self.var, self.count = mean, var, count
        self.hook_id: int | None = None

    def __call__(self, layer: BatchGroupNorm, args: tuple[Any, ...]) -> None:
        if not layer.training:
            return
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0 or x.shape[1] != layer.num_features:
            return  # the layer's own forward reports bad input
        c, d = layer.num_features, x[0].numel()
        if layer.num_groups is None:
            layer.fix_num_groups(layer.statistics_batch_size(x.shape[0]), d)
        elif int(layer.num_batches_tracked) > 0:
            self._remove(layer)
            return
        g = layer.num_groups
        if d % g == 0:  # otherwise the layer's forward raises its own error
            with torch.no_grad():
                mean, var = pool_channel_stats(
                    self.mean.to(layer.running_mean), self.var.to(layer.running_var), g, d // c
                )
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                if self.count is not None:
                    layer.num_batches_tracked.copy_(self.count)
        self._remove(layer)

    def _remove(self, layer: nn.Module) -> None:
        layer._forward_pre_hooks.pop(self.hook_id, None)
