"""Everything that depends on how Lightning works inside, in one place; nothing else here reaches in.

Two kinds of things live here.

**Both namespaces.**
The ``lightning`` and ``pytorch-lightning`` packages ship the same Lightning as two separate
copies (Lightning 2.x): a ``pytorch_lightning.LightningModule`` is not a
``lightning.pytorch.LightningModule``, and each copy's helpers check for their own classes
(``is_overridden`` raises ``Expected a parent``; a Trainer accepts only its own ``LayerSync``
plugins; each has its own allow-list of checkpoint instantiators). Codebases still import
either (learn2learn's Lightning modules use ``pytorch_lightning``), so :class:`~bgn_lightning.NormSwap`
and :class:`~bgn_lightning.BGNSync` work out which copy a model or Trainer comes from and use
that copy's helpers; a copy the user has not imported is never imported here.

**Workarounds** for what Lightning (checked against 2.6) has no public hook for; each names what
it relies on, and ``tests/test_lightning_workarounds.py`` fails when Lightning changes under it:

* :func:`call_once_around`: an instance attribute that shadows a LightningModule hook for one
  call. NormSwap converts the layers built in ``configure_model`` right after it returns (there is
  no callback hook between ``configure_model`` and the checkpoint restore / optimizer set-up), and
  NormSwap's checkpoint instantiator converts a model before ``load_state_dict``. Relies on
  Lightning calling hooks through ``getattr(pl_module, name)`` and ``is_overridden`` following
  ``__wrapped__``.
* :func:`allow_instantiator`: Lightning only calls a checkpoint's ``_instantiator`` if it is on
  the private set ``core.saving._ALLOWED_INSTANTIATORS``.
* :func:`load_with_hook`: ``load_from_checkpoint`` for a class with an extra
  ``on_load_checkpoint``, for checkpoints that already name another instantiator (LightningCLI's).
  Relies on ``load_from_checkpoint`` calling ``on_load_checkpoint`` after building the model and
  before ``load_state_dict``; the helper subclass is swapped back (``__class__``) afterwards.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "INSTANTIATOR",
    "NAMESPACES",
    "allow_instantiator",
    "call_once_around",
    "is_overridden",
    "load_with_hook",
    "namespace_of",
    "rank_zero",
    "register_layer_sync",
    "remove_once",
]

M = TypeVar("M")

INSTANTIATOR = "bgn_lightning.callback.instantiate_swapped"
"""The ``_instantiator`` path NormSwap writes into checkpoints (stable: old checkpoints name it)."""

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
    one. Called when ``bgn_lightning`` is imported, when a NormSwap is created, when it saves a
    checkpoint and in ``NormSwap.load_model``: the points of use.
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


def call_once_around(
    module: Any,
    hook: str,
    *,
    before: Callable[..., None] | None = None,
    after: Callable[[], None] | None = None,
) -> Callable[..., Any]:
    """Shadow ``module.<hook>`` for its next call: ``before(*args)``, the hook, then ``after()``.

    The shadow is an instance attribute that removes itself when called; ``after`` runs only when
    the hook returned normally. Returns the shadow, for :func:`remove_once`.
    """
    original = getattr(module, hook)

    @functools.wraps(original)
    def once(*args: Any, **kwargs: Any) -> Any:
        vars(module).pop(hook, None)
        if before is not None:
            before(*args)
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    vars(module)[hook] = once  # not setattr: nn.Module.__setattr__ is for parameters and modules
    return once


def remove_once(module: Any, hook: str, shadow: Callable[..., Any] | None) -> None:
    """Drop a :func:`call_once_around` shadow that was never called (e.g. the run stopped first)."""
    if shadow is not None and vars(module).get(hook) is shadow:
        del vars(module)[hook]


def load_with_hook(
    model_class: type[M], checkpoint_path: str | Path, on_load: Callable[[Any, dict[str, Any]], None],
    **kwargs: Any,
) -> M:
    """``model_class.load_from_checkpoint(checkpoint_path, **kwargs)`` with ``on_load(model, checkpoint)``
    run before the class's own ``on_load_checkpoint`` (i.e. before the weights are loaded)."""

    def on_load_checkpoint(self: Any, checkpoint: dict[str, Any]) -> None:
        on_load(self, checkpoint)
        super(loading, self).on_load_checkpoint(checkpoint)

    loading = type(model_class.__name__, (model_class,), {
        "on_load_checkpoint": on_load_checkpoint,
        "__module__": model_class.__module__,
        "__qualname__": model_class.__qualname__,
    })
    model = loading.load_from_checkpoint(checkpoint_path, **kwargs)
    model.__class__ = model_class  # same layout: the helper subclass only added the hook
    return model
