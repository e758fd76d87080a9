"""Everything timm-specific, without importing timm (a model with timm layers has imported it).

* :func:`adapters`: the converter's adapters for timm's fused norm-act layers, ``BatchNormAct2d``
  and ``SyncBatchNormAct`` (a BatchNorm whose ``forward`` then applies ``self.drop`` and
  ``self.act``): the new norm is wrapped in a :class:`~bgn_lightning.NormAct` with the same
  ``drop`` and ``act`` modules, as timm's own ``convert_sync_batchnorm`` keeps them.
* :func:`register_norm_act`: makes ``timm.create_model(name, norm_layer=norm_layer("bgn"))`` work
  for the families that build fused norm-act layers (EfficientNet, RegNet, DenseNet, ...).
  timm's ``get_norm_act_layer`` maps a norm class to its norm-act class by the lower-cased class
  name through module-level tables and has no public way to add an entry (timm 1.0.x,
  ``timm/layers/create_norm_act.py``: ``_NORM_TO_NORM_ACT_MAP``, ``_NORM_ACT_TYPES``,
  ``_NORM_ACT_REQUIRES_ARG``). The registry's factory class is added to those tables, mapped to
  :class:`~bgn_lightning.norm_act.NormActLayer`; a timm without them gets a warning and the plain
  norm path only (``tests/test_zoo.py`` fails when timm changes them).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from torch import nn

from .norm_act import NormAct, NormActLayer

__all__ = ["adapters", "register_norm_act"]

_NORM_ACT_MODULE = "timm.layers.norm_act"
_CREATE_NORM_ACT_MODULE = "timm.layers.create_norm_act"
_TABLES = ("_NORM_TO_NORM_ACT_MAP", "_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG")


def _keep_drop_and_act(source: nn.Module, norm: nn.Module) -> nn.Module:
    # timm's SyncBatchNormAct only has drop/act when timm's convert_sync_batchnorm set them
    return NormAct(norm, drop=getattr(source, "drop", None), act=getattr(source, "act", None))


def adapters() -> dict[type[nn.Module], Any]:
    """``class -> adapter`` for timm's fused BatchNorm-act layers; empty when timm is not imported."""
    module = sys.modules.get(_NORM_ACT_MODULE)
    if module is None:
        return {}
    classes = [getattr(module, name, None) for name in ("BatchNormAct2d", "SyncBatchNormAct")]
    return {cls: _keep_drop_and_act for cls in classes if isinstance(cls, type)}


def register_norm_act(factory: type) -> None:
    """Map ``factory`` (the class :func:`bgn_lightning.norm_layer` binds) to ``NormActLayer`` in timm.

    A no-op when timm is not imported: a model that timm builds has imported it first, and
    :func:`bgn_lightning.norm_layer` calls this each time it is called.
    """
    if "timm" not in sys.modules:
        return
    try:
        module = __import__(_CREATE_NORM_ACT_MODULE, fromlist=["get_norm_act_layer"])
    except ImportError:  # a partly installed or very old timm: the plain norm path still works
        return
    to_norm_act, types, requires_arg = (getattr(module, name, None) for name in _TABLES)
    if not (isinstance(to_norm_act, dict) and isinstance(types, set) and isinstance(requires_arg, set)):
        warnings.warn(
            f"bgn_lightning: this timm ({getattr(sys.modules['timm'], '__version__', '?')}) has no "
            f"{', '.join(_TABLES)} in {_CREATE_NORM_ACT_MODULE}, so timm models that fuse norm and "
            f"activation cannot be built with norm_layer=bgn_lightning.norm_layer(...); build them "
            f"with BatchNorm and use bgn_lightning.convert_norms",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    to_norm_act[factory.__name__.lower()] = NormActLayer
    types.add(NormActLayer)
    requires_arg.add(NormActLayer)
