"""``NormSwap``: a Lightning callback that swaps a model's norm layers inside the Trainer.

Where the swap happens in Lightning's ``Trainer._run`` (checked against Lightning 2.x)::

    callbacks' setup           <- NormSwap converts the layers that exist now
    LightningModule.setup
    configure_model            <- NormSwap converts the layers built here, right after it returns
    restore model from ckpt_path   (loads into the swapped layers)
    strategy.setup             (LayerSync plugins, move to device, DDP wrap, configure_optimizers)

so the optimizer and DDP only ever see the new layers, and ``trainer.fit(..., ckpt_path=...)``
resumes into them. The settings are saved in the checkpoint (``state_dict``), which is how
:meth:`NormSwap.load_model` rebuilds a swapped model for inference. The callback works in a
``lightning.pytorch`` and in a ``pytorch_lightning`` Trainer (see :mod:`bgn_lightning._lightning`).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from . import _lightning
from .convert import _ON_UNKNOWN, DEFAULT_SOURCE_TYPES, OnUnknown, convert_tree
from .functional import check_norm_batch_size
from .registry import available_norms

__all__ = ["NormSwap"]

M = TypeVar("M", bound=pl.LightningModule)

_PLAIN = (str, int, float, bool, type(None))

INSTANTIATOR = _lightning.INSTANTIATOR
"""The ``_instantiator`` path :meth:`NormSwap.on_save_checkpoint` writes into checkpoints."""


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_type(spec: type[nn.Module] | str) -> type[nn.Module]:
    """A class, or a dotted path resolved among already imported modules only.

    Like Lightning's checkpoint loading, settings read from a checkpoint never import new code.
    """
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        parts = spec.split(".")
        for i in range(len(parts) - 1, 0, -1):
            target: Any = sys.modules.get(".".join(parts[:i]))
            if target is None:
                continue
            for attr in parts[i:]:
                target = getattr(target, attr, None)
            if isinstance(target, type) and issubclass(target, nn.Module):
                return target
            break
    raise ValueError(
        f"NormSwap: types entries must be nn.Module subclasses or dotted paths to already imported "
        f"ones, got {spec!r}"
    )


class NormSwap(pl.Callback):
    """Replace a model's BatchNorm (or other) layers with a registry norm when the Trainer starts.

    The conversion is :func:`bgn_lightning.convert_norms` (parameters reused, running statistics
    carried over), applied in ``setup`` and after ``configure_model``: before the checkpoint given
    to ``ckpt_path=`` is loaded, before ``configure_optimizers`` and before DDP wraps the model.
    Every ``fit``/``validate``/``test``/``predict`` call runs it; on an already swapped model it
    is a no-op. Rank zero logs how many layers of each type were replaced.

    Example::

        trainer = Trainer(callbacks=[NormSwap("bgn", num_groups="auto")])
        trainer.fit(model)                      # model's BatchNorm layers are now BatchGroupNorm
        model = NormSwap.load_model(MyModel, trainer.checkpoint_callback.best_model_path)

    Args:
        norm: a registry name (see :func:`bgn_lightning.available_norms`).
        sync: after converting, also call
            :func:`bgn_lightning.sync.convert_sync_batchgroupnorm` so that the statistics are
            computed over all processes (DDP).
        types: the layer classes to replace, as classes or dotted paths (e.g.
            ``"torch.nn.GroupNorm"``); default BatchNorm1d/2d/3d and SyncBatchNorm.
        dim: spatial dimensionality for source layers whose class does not tell it.
        on_unknown: a source-type layer whose ``forward`` the converter does not know (see
            :func:`bgn_lightning.convert_norms`): ``"error"`` stops the run, ``"warn"`` leaves it.
        num_groups: ``G`` for the new layers (int or ``"auto"``); ``None`` keeps the norm's
            default. Every registry norm accepts ``"auto"``. A named argument (not only part of
            ``**kwargs``) so that LightningCLI can set it: ``--trainer.callbacks.num_groups=8``.
        norm_batch_size: ghost batches (:mod:`bgn_lightning.ghost`): in training, every run of
            this many samples is normalized with its own statistics (``bn`` and ``bgn``; the norms
            without batch statistics warn that it has no effect). With ``sync=True`` the layers then
            synchronize nothing. ``None``: the whole batch.
        **kwargs: further arguments of the new layers, e.g. ``eps``, ``momentum``; plain values
            only (str, int, float, bool, None), since they are saved in checkpoints.

    Attributes:
        swapped: how many layers were replaced so far, per ``"Source -> Target"`` class pair.

    Raises:
        ValueError: for an unknown ``norm``, a ``types`` entry that is not an ``nn.Module``
            subclass, a bad ``dim``, ``on_unknown`` or ``norm_batch_size``, or a keyword value
            that cannot be saved in a checkpoint.
    """

    def __init__(
        self,
        norm: str = "bgn",
        sync: bool = False,
        types: Sequence[type[nn.Module] | str] | None = None,
        dim: int | None = None,
        num_groups: int | str | None = None,
        on_unknown: OnUnknown = "error",
        norm_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if norm not in available_norms():
            raise ValueError(f"NormSwap: unknown norm {norm!r}; known norms: {', '.join(available_norms())}")
        if dim not in (None, 1, 2, 3):
            raise ValueError(f"NormSwap: dim must be 1, 2, 3 or None, got {dim!r}")
        if on_unknown not in _ON_UNKNOWN:
            raise ValueError(
                f"NormSwap: on_unknown must be one of {', '.join(_ON_UNKNOWN)}, got {on_unknown!r}"
            )
        check_norm_batch_size(norm_batch_size, "NormSwap")
        if norm_batch_size is not None:
            kwargs = {"norm_batch_size": norm_batch_size, **kwargs}
        if num_groups is not None:
            kwargs = {"num_groups": num_groups, **kwargs}
        for key, value in kwargs.items():
            if not isinstance(value, _PLAIN):
                raise ValueError(
                    f"NormSwap: {key}={value!r} must be a plain value (str, int, float, bool or None) "
                    f"so that it can be saved in checkpoints"
                )
        if isinstance(types, (str, type)):
            types = [types]
        self.norm = norm
        self.sync = bool(sync)
        self.types: tuple[type[nn.Module], ...] = (
            DEFAULT_SOURCE_TYPES if types is None else tuple(_resolve_type(t) for t in types)
        )
        if not self.types:
            raise ValueError("NormSwap: types must name at least one layer class")
        self.dim = dim
        self.on_unknown = on_unknown
        self.kwargs = dict(kwargs)
        self.swapped: Counter[str] = Counter()
        self._wrapper: Any = None
        _lightning.allow_instantiator(INSTANTIATOR)

    def __repr__(self) -> str:
        settings = [f"{self.norm!r}", *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        if self.sync:
            settings.append("sync=True")
        if self.types != DEFAULT_SOURCE_TYPES:
            settings.append(f"types={[t.__name__ for t in self.types]}")
        if self.dim is not None:
            settings.append(f"dim={self.dim}")
        if self.on_unknown != "error":
            settings.append(f"on_unknown={self.on_unknown!r}")
        return f"{type(self).__name__}({', '.join(settings)})"

    # -- conversion --------------------------------------------------------------------------
    def convert(self, module: nn.Module) -> int:
        """Apply this callback's conversion to ``module`` in place (no sync layers).

        This is what :meth:`load_model` does to a freshly built model; it is also the way to
        rebuild a swapped plain ``nn.Module`` before ``load_state_dict``.

        Returns:
            The number of layers replaced.
        """
        return self._convert(module).total

    def _convert(self, module: nn.Module) -> Any:
        return convert_tree(module, self.norm, self.types, dim=self.dim, on_unknown=self.on_unknown,
                            kwargs=self.kwargs)

    def _swap(self, pl_module: pl.LightningModule, when: str) -> None:
        report = self._convert(pl_module)
        if report.replaced:
            for (source, target), n in report.replaced.items():
                self.swapped[f"{source} -> {target}"] += n
            settings = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
            total = report.total
            _lightning.rank_zero(
                "info",
                f"NormSwap: replaced {total} norm layer{'s' if total != 1 else ''} with {self.norm!r}"
                f"{f' ({settings})' if settings else ''} {when}: {report.describe()}",
                like=pl_module,
            )
        if self.sync:
            from .sync import convert_sync_batchgroupnorm

            convert_sync_batchgroupnorm(pl_module)

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the existing layers; arrange a second swap right after ``configure_model``."""
        self._swap(pl_module, "in setup")
        overridden = _lightning.is_overridden("configure_model", pl_module)
        if overridden and "configure_model" not in vars(pl_module):
            self._wrapper = _lightning.call_once_around(
                pl_module, "configure_model", after=lambda: self._swap(pl_module, "after configure_model")
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Drop the ``configure_model`` wrapper if the run stopped before calling it."""
        _lightning.remove_once(pl_module, "configure_model", self._wrapper)
        self._wrapper = None

    # -- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Make ``MyModel.load_from_checkpoint(path)`` rebuild the swapped model.

        Lightning rebuilds a model from its saved hyper-parameters; it lets a checkpoint name a
        trusted *instantiator* for that (``_instantiator``, an allow-listed path). This names
        :func:`instantiate_swapped`, which builds the model and applies the saved swap before the
        weights are loaded. A checkpoint that already names an instantiator (LightningCLI's
        subclass mode) is left alone: load it with :meth:`load_model`.
        """
        _lightning.allow_instantiator(INSTANTIATOR)  # the user may have imported their Lightning after us
        hparams = checkpoint.get(type(pl_module).CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict) and "_instantiator" not in hparams:
            hparams["_instantiator"] = INSTANTIATOR

    def state_dict(self) -> dict[str, Any]:
        """The swap settings (plain values, loadable with ``torch.load(weights_only=True)``)."""
        return {
            "norm": self.norm,
            "kwargs": dict(self.kwargs),
            "types": [_type_name(t) for t in self.types],
            "dim": self.dim,
            "sync": self.sync,
            "on_unknown": self.on_unknown,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint's settings against this callback's (warn when they differ).

        On resume the model has already been converted with this callback's settings when
        Lightning restores callbacks; the weights loaded fine if the layers matched.
        """
        current = self.state_dict()
        differ = {k: (state_dict.get(k), v) for k, v in current.items() if state_dict.get(k, v) != v}
        if differ:
            changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
            rank_zero_warn(f"NormSwap: resuming with settings that differ from the checkpoint's ({changes})")

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | dict[str, Any], weights_only: bool | None = None
    ) -> NormSwap:
        """The ``NormSwap`` saved in a Lightning checkpoint (a path or the loaded dict).

        Args:
            checkpoint: a ``.ckpt`` path or the dictionary ``torch.load`` returned for it.
            weights_only: passed to ``torch.load`` for a path (its default when ``None``).

        Raises:
            ValueError: if the checkpoint holds no ``NormSwap`` state.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
        callbacks = checkpoint.get("callbacks") or {}
        state = callbacks.get(cls.__qualname__)
        if state is None:
            raise ValueError(
                f"NormSwap.from_checkpoint: the checkpoint has no {cls.__qualname__!r} callback state "
                f"(callbacks saved: {sorted(map(str, callbacks))}); was it written by a Trainer with "
                f"NormSwap?"
            )
        return cls(state["norm"], sync=state.get("sync", False), types=state.get("types"),
                   dim=state.get("dim"), on_unknown=state.get("on_unknown", "error"),
                   **state.get("kwargs", {}))

    @classmethod
    def load_model(cls, model_class: type[M], checkpoint_path: str | Path, **kwargs: Any) -> M:
        """Rebuild a swapped LightningModule from a checkpoint written with ``NormSwap``.

        Works like ``model_class.load_from_checkpoint``: the model is built from its saved
        hyper-parameters (and ``configure_model``), then the saved swap is applied, then the
        weights are loaded into the swapped layers. Checkpoints that Lightning cannot rebuild
        from hyper-parameters (e.g. LightningCLI subclass mode): build the model yourself, call
        ``NormSwap.from_checkpoint(ckpt).convert(model)``, then ``model.load_state_dict``.

        Args:
            model_class: the LightningModule class that was trained.
            checkpoint_path: the ``.ckpt`` file.
            **kwargs: passed to ``load_from_checkpoint`` (``map_location``, ``strict``,
                ``weights_only``, hyper-parameter overrides).

        Returns:
            A ``model_class`` instance with swapped layers and the checkpoint's weights.
        """

        _lightning.allow_instantiator(INSTANTIATOR)

        def convert(model: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            cls.from_checkpoint(checkpoint).convert(model)

        return _lightning.load_with_hook(model_class, checkpoint_path, convert, **kwargs)




def instantiate_swapped(cls: type[M], init_args: dict[str, Any]) -> M:
    """Build ``cls(**init_args)`` so that loading a NormSwap checkpoint converts it first.

    Lightning calls this from ``cls.load_from_checkpoint`` for checkpoints written with
    :class:`NormSwap` (see :meth:`NormSwap.on_save_checkpoint`). The model's
    ``on_load_checkpoint`` hook, which Lightning calls before ``load_state_dict``, applies the
    checkpoint's saved swap; the hook then behaves as the class defines it.
    """
    model = cls(**init_args)

    def convert(checkpoint: dict[str, Any]) -> None:
        if (checkpoint.get("callbacks") or {}).get(NormSwap.__qualname__) is not None:
            NormSwap.from_checkpoint(checkpoint).convert(model)

    _lightning.call_once_around(model, "on_load_checkpoint", before=convert)
    return model
