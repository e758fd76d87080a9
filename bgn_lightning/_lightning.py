"""Lightning from both of its namespaces: ``lightning.pytorch`` and ``pytorch_lightning``.

The ``lightning`` and ``pytorch-lightning`` packages ship the same Lightning as two separate
copies (Lightning 2.x): a ``pytorch_lightning.LightningModule`` is not a
``lightning.pytorch.LightningModule``, and each copy's helpers check for their own classes
(``is_overridden`` raises ``Expected a parent``; a Trainer accepts only its own ``LayerSync``
plugins; each has its own allow-list of checkpoint instantiators). Codebases still import
either (learn2learn's Lightning modules use ``pytorch_lightning``), so :class:`~bgn_lightning.NormSwap`
and :class:`~bgn_lightning.BGNSync` work out which copy a model or Trainer comes from and use
that copy's helpers; a copy the user has not imported is never imported here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = [
    "NAMESPACES",
    "allow_instantiator",
    "is_overridden",
    "namespace_of",
    "rank_zero",
    "register_layer_sync",
]

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def namespace_of(obj: Any) -> str:
    """``"pytorch_lightning"`` or ``"lightning.pytorch"``: the copy ``obj``'s class derives from."""
    for cls in type(obj).__mro__:
        for namespace in NAMESPACES:
            if cls.__module__ == namespace or cls.__module__.startswith(namespace + "."):
                return namespace
    return NAMESPACES[0]


def _imported(namespaces: tuple[str, ...] = NAMESPACES) -> list[str]:
    return [namespace for namespace in namespaces if namespace in sys.modules]


def is_overridden(method: str, pl_module: Any) -> bool:
    """Lightning's ``is_overridden(method, pl_module)`` from the module's own namespace."""
    helpers = importlib.import_module(f"{namespace_of(pl_module)}.utilities.model_helpers")
    return bool(helpers.is_overridden(method, pl_module))


def rank_zero(level: str, message: str, like: Any) -> None:
    """Log ``message`` on rank zero through ``rank_zero_info``/``rank_zero_warn`` of ``like``'s namespace."""
    utilities = importlib.import_module(f"{namespace_of(like)}.utilities")
    getattr(utilities, f"rank_zero_{level}")(message)


def allow_instantiator(path: str) -> None:
    """Add ``path`` to the checkpoint-instantiator allow-list of every imported namespace.

    Lightning (2.6, ``core/saving.py``: ``_ALLOWED_INSTANTIATORS``) only calls an ``_instantiator``
    named in a checkpoint's hyper-parameters if it is on that set; there is no public way to add
    one. ``tests/test_callback.py`` fails if the set goes away.
    """
    for namespace in _imported():
        saving = importlib.import_module(f"{namespace}.core.saving")
        allowed = getattr(saving, "_ALLOWED_INSTANTIATORS", None)
        if isinstance(allowed, set):
            allowed.add(path)


def register_layer_sync(cls: type) -> None:
    """Make ``cls`` a (virtual) ``LayerSync`` of every imported namespace, so either Trainer takes it."""
    for namespace in _imported():
        layer_sync = importlib.import_module(f"{namespace}.plugins").LayerSync
        if not issubclass(cls, layer_sync):
            layer_sync.register(cls)
