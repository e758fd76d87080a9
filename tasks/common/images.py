"""Image files that cannot be read are found and named, never a traceback from inside a DataLoader.

Every task that reads image files (the ``imagefolder`` of classification, adversarial, nas and
fsl, fsl's ``omniglot``, uda's ``folders``) reads them through :class:`ImageFolder`,
:func:`open_image` and :func:`screen`. What happens to a bad file (not an image, truncated,
unreadable) is the run's :data:`POLICY`, set by the runner from ``--bad-images`` and
``--check-data``:

* ``stop`` (the default): the run stops with one line naming the file (exit code 2) — when the
  file is first drawn, or before training with ``--check-data``;
* ``skip``: every file is decoded once before training; bad ones are left out with one warning
  each, and ``results.json`` lists them (``images.skipped``).

``--check-data`` decodes every file of the tree before training (so a bad file is found at
set-up, not hours in); ``skip`` implies it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision import datasets as tvd

from .errors import TaskConfigError
from .validate import check_choice

__all__ = [
    "BAD_IMAGES",
    "POLICY",
    "BadImageError",
    "ImageFolder",
    "ImagePolicy",
    "first_image",
    "open_image",
    "screen",
]

BAD_IMAGES = ("stop", "skip")
"""What a run does with an image file that cannot be read (``--bad-images``)."""

log = logging.getLogger("tasks")


class BadImageError(TaskConfigError):
    """An image file that cannot be read: one line naming it (exit code 2 from ``bgn-task``)."""


@dataclass
class ImagePolicy:
    """The run's handling of bad image files and what it found.

    Attributes:
        bad_images: ``stop`` or ``skip`` (see the module docstring).
        check_data: decode every file before training.
        checked: files decoded by the check.
        skipped: the files left out (``skip``).
    """

    bad_images: str = "stop"
    check_data: bool = False
    checked: int = 0
    skipped: list[str] = field(default_factory=list)

    def set(self, bad_images: str = "stop", check_data: bool = False) -> None:
        """Start a run's policy afresh.

        Raises:
            ValueError: for a ``bad_images`` other than ``stop`` or ``skip``.
        """
        check_choice("--bad-images", bad_images, BAD_IMAGES)
        self.bad_images, self.check_data, self.checked, self.skipped = bad_images, check_data, 0, []

    @property
    def screens(self) -> bool:
        """Whether image folders are decoded file by file before training."""
        return self.check_data or self.bad_images == "skip"

    def record(self) -> dict[str, Any]:
        """The ``images`` entry of ``results.json``."""
        return {"bad_images": self.bad_images, "checked": self.checked, "skipped": list(self.skipped)}


POLICY = ImagePolicy()
"""The policy of the run in this process (``bgn-task`` sets it from its arguments)."""


def _reason(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def _bad(path: str, err: Exception, more: int = 0) -> BadImageError:
    others = f" (and {more} more)" if more else ""
    return BadImageError(
        f"bad image file {path}: {_reason(err)}{others}; remove or replace it, or pass --bad-images skip "
        "to leave bad files out (--check-data finds them all before training)"
    )


def open_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:
    """Read ``path`` as a PIL image in ``mode`` (``None``: the file's own mode).

    Raises:
        BadImageError: naming the file when it is not a readable image.
    """
    try:
        with Image.open(path) as image:
            return image.convert(mode) if mode is not None else image.copy()
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError, truncated data, ...
        raise _bad(str(path), err) from None


def first_image(paths: Iterable[Path]) -> Image.Image | None:
    """The first of ``paths`` that reads as an image (a dataset's size and channels come from it).

    In ``skip`` mode bad files are passed over (:func:`screen` warns about them); ``None``: no image.

    Raises:
        BadImageError: in ``stop`` mode, for a bad file met first.
    """
    for path in paths:
        try:
            return open_image(path, mode=None)
        except BadImageError:
            if POLICY.bad_images != "skip":
                raise
    return None


def screen(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``samples`` (``(path, label)``) less the unreadable files, under :data:`POLICY`.

    Without ``--check-data`` and in ``stop`` mode it returns ``samples`` untouched (a bad file then
    stops the run when drawn). Otherwise it decodes every file once.

    Raises:
        BadImageError: in ``stop`` mode, naming the first bad file and how many more there are.
    """
    if not POLICY.screens:
        return samples
    good: list[tuple[str, int]] = []
    bad: list[tuple[str, Exception]] = []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as err:
            bad.append((path, err))
            continue
        good.append((path, label))
    POLICY.checked += len(samples)
    if bad and POLICY.bad_images == "stop":
        raise _bad(bad[0][0], bad[0][1], more=len(bad) - 1)
    for path, err in bad:
        log.warning("skipping bad image file %s: %s", path, _reason(err))
        POLICY.skipped.append(path)
    return good


class ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder whose bad files are named (``stop``) or left out (``skip``).

    Args:
        root: the folder-per-class tree.
        transform: applied to each image.
        mode: the PIL mode images are read in (``RGB``, ``L``).
    """

    def __init__(self, root: str, transform: Any = None, mode: str = "RGB") -> None:
        super().__init__(root, transform=transform, loader=self._load)
        self.mode = mode
        self.samples = self.imgs = screen(self.samples)
        self.targets = [label for _, label in self.samples]

    def _load(self, path: str) -> Image.Image:
        return open_image(path, self.mode)
