"""Settings groups: a model's init arguments that belong together, as one typed argument.

A group is a frozen dataclass deriving from :class:`SettingsGroup`; a model takes it as one init
argument, e.g. ``sgd: SGDSettings = SGDSettings()``, so its config keys are ``model.sgd.lr``,
``model.sgd.warmup_epochs``... (LightningCLI makes a dataclass argument a nested group).

Before the groups, the same settings were flat init arguments (``model.lr``, NAS's
``model.eval_lr``): :attr:`SettingsGroup.FLAT_NAMES` names them. :func:`moved_keys` lists every
such old key of a model class, so that the runner still reads them (command line, config files,
``bgn-task bench --vary``: :attr:`tasks.common.contract.Task.moved_keys`), and
:class:`SettingsCheckpoints` loads checkpoints whose hyper-parameters were saved flat.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, ClassVar, TypeVar

__all__ = ["MovedKey", "SettingsCheckpoints", "SettingsGroup", "moved_keys", "settings_groups"]

G = TypeVar("G", bound="SettingsGroup")

CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
"""The ``_instantiator`` LightningCLI writes into the hyper-parameters of the models it builds: it
rebuilds them from plain data (a group as a mapping), through the CLI's parser."""


@dataclass(frozen=True)
class MovedKey:
    """A config key that moved: the runner still reads it at its old place.

    Attributes:
        old: its old dotted key, e.g. ``model.lr`` or ``model.stage``.
        new: where it lives now, e.g. ``model.sgd.lr`` or ``stage`` (a run option).
        type: its type, for the parser (a bad value is named by its old key).
    """

    old: str
    new: str
    type: Any


@dataclass(frozen=True)
class SettingsGroup:
    """Base of a settings group (a frozen dataclass of a model's init arguments that belong together).

    Subclasses are frozen dataclasses whose fields are the settings, each with its default.
    """

    KEY: ClassVar[str] = ""
    """The init argument (and config key under ``model``) models take the group as, e.g. ``sgd``."""
    FLAT_NAMES: ClassVar[Mapping[str, str]] = {}
    """Field -> the flat init argument it was before the group existed, where the name differs
    (NAS's ``lr`` was ``eval_lr``); any other field kept its name."""

    @classmethod
    def flat_name(cls, field: str) -> str:
        """The flat init argument ``field`` was before the group existed."""
        return cls.FLAT_NAMES.get(field, field)

    @classmethod
    def of(cls: type[G], hparams: Mapping[str, Any], key: str | None = None) -> G:
        """The group among a model's hyper-parameters (or ``model`` config), whichever version wrote them.

        Args:
            hparams: init arguments: the group under ``key`` (an instance, or a mapping as in a
                LightningCLI config), or, saved before the group existed, its flat keys
                (:meth:`flat_name`; missing ones take their defaults).
            key: the group's init argument (default :attr:`KEY`).
        """
        group = hparams.get(key or cls.KEY)
        if isinstance(group, cls):
            return group
        if isinstance(group, Mapping):
            return cls(**group)
        names = {cls.flat_name(f.name): f.name for f in dataclasses.fields(cls)}
        return cls(**{field: hparams[flat] for flat, field in names.items() if flat in hparams})

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (``results.json``, a LightningCLI config)."""
        return dataclasses.asdict(self)


def settings_groups(model_class: type) -> dict[str, type[SettingsGroup]]:
    """``{init argument: group class}`` of the settings groups ``model_class`` takes."""
    hints = typing.get_type_hints(model_class.__init__)
    return {
        name: hints[name]
        for name in inspect.signature(model_class.__init__).parameters
        if inspect.isclass(hints.get(name)) and issubclass(hints[name], SettingsGroup)
    }


def moved_keys(model_class: type, owner: str = "model") -> tuple[MovedKey, ...]:
    """The flat keys of ``model_class``'s settings groups: ``model.lr`` -> ``model.sgd.lr``..."""
    moved = []
    for key, group in settings_groups(model_class).items():
        hints = typing.get_type_hints(group)
        for field in dataclasses.fields(group):
            old, new = f"{owner}.{group.flat_name(field.name)}", f"{owner}.{key}.{field.name}"
            moved.append(MovedKey(old, new, hints[field.name]))
    return tuple(moved)


class SettingsCheckpoints:
    """LightningModule mixin: the model's settings groups are plain data in its checkpoints, and
    ``load_from_checkpoint`` also reads checkpoints saved before a group existed (its flat keys).

    Checkpoints hold each group as a mapping (:meth:`on_save_checkpoint`), so they load with
    ``weights_only``. Lightning rebuilds a model from its saved hyper-parameters and drops those
    that are not init arguments: the flat keys of an older checkpoint would be dropped and the
    group left at its defaults. :meth:`load_from_checkpoint` therefore passes each group as an
    override (:meth:`SettingsGroup.of` the saved hyper-parameters): a mapping for a checkpoint
    LightningCLI wrote (its instantiator parses plain data), an instance otherwise.
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint`` (same arguments), reading the settings groups."""
        hparams = _saved_hparams(checkpoint_path, kwargs.get("weights_only"))
        plain = hparams.get("_instantiator") == CLI_INSTANTIATOR
        for key, group in settings_groups(cls).items():
            if key not in kwargs:
                settings = group.of(hparams, key)
                kwargs[key] = settings.to_dict() if plain else settings
        return super().load_from_checkpoint(checkpoint_path, **kwargs)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the settings groups among the hyper-parameters as mappings."""
        hparams = checkpoint.get("hyper_parameters") or {}
        for key, value in hparams.items():
            if isinstance(value, SettingsGroup):
                hparams[key] = value.to_dict()


def _saved_hparams(checkpoint_path: Any, weights_only: bool | None) -> Mapping[str, Any]:
    """The hyper-parameters a checkpoint (a path or an open file, left where it was) holds."""
    import torch

    if not hasattr(checkpoint_path, "seek"):
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only, mmap=True)
        return checkpoint.get("hyper_parameters") or {}
    file: IO[bytes] = checkpoint_path
    start = file.tell()
    checkpoint = torch.load(file, map_location="cpu", weights_only=weights_only)
    file.seek(start)
    return checkpoint.get("hyper_parameters") or {}
