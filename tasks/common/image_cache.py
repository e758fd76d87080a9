"""Small images decoded once: an image folder's split held in memory as one tensor, cached on disk.

Decoding a JPEG or PNG with PIL on every access makes a tree of small images (the CIFAR-10 JPEG
subset: 32x32) data-bound on a CPU. :func:`decode_folder` decodes a split once into a
``(N, C, H, W)`` tensor — what ``v2.ToImage`` makes of each PIL image, so the transforms give the
same pixels — and keeps it in ``$BGN_CACHE_DIR/decoded/`` (default
``~/.cache/bgn-lightning/decoded/``), one file per split, named by a hash of the split's files
with their labels, sizes and modification times: a changed, added or removed file makes a new
key and a fresh decode. Files are written to a temporary name and renamed, so parallel runs never
read a half-written one; a cache that cannot be written leaves the images decoded in memory only.

Bad files follow :data:`~tasks.common.images.POLICY`: they are read with
:func:`~tasks.common.images.open_image`, so in ``stop`` mode the first bad file stops the run with
the usual one line (at set-up rather than when first drawn); in ``skip`` mode the folder has
already left them out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from .images import ImageFolder, open_image

__all__ = ["CACHE_DIR_ENV", "DecodedImages", "decode_folder", "default_cache_dir"]

CACHE_DIR_ENV = "BGN_CACHE_DIR"
"""Environment variable naming the root of the project's caches (default ``~/.cache/bgn-lightning``)."""

FORMAT = 1
"""Version of the cached layout, part of every key (bump it when the layout changes)."""

log = logging.getLogger("tasks")


def default_cache_dir() -> Path:
    """Where decoded splits are cached: ``$BGN_CACHE_DIR/decoded`` or ``~/.cache/bgn-lightning/decoded``."""
    return Path(os.environ.get(CACHE_DIR_ENV, "~/.cache/bgn-lightning")).expanduser() / "decoded"


class DecodedImages(Dataset):
    """An image folder's samples in memory: ``(image, label)``, the image a uint8 ``tv_tensors.Image``.

    Args:
        images: ``(N, C, H, W)`` decoded images.
        targets: the ``N`` class indices.
        classes: class names (the folder's).
        root: the folder the images were read from.
    """

    def __init__(self, images: torch.Tensor, targets: list[int], classes: list[str], root: str) -> None:
        if len(images) != len(targets):
            raise ValueError(f"DecodedImages: {len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets
        self.classes = classes
        self.root = root

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, int]:
        return tv_tensors.Image(self.images[i]), self.targets[i]


def _key(folder: ImageFolder) -> str:
    """The cache file's name: the split's folder name and a hash of its files, labels, sizes and mtimes."""
    digest = hashlib.sha256(f"{FORMAT}\0{folder.mode}\n".encode())
    for path, label in folder.samples:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{Path(folder.root).name}-{digest.hexdigest()[:32]}"


def _decode(folder: ImageFolder) -> torch.Tensor | None:
    """Every image of ``folder`` in one tensor; ``None`` when they do not all share one shape.

    Raises:
        BadImageError: for a file that cannot be read (``stop`` mode; ``skip`` has screened them).
    """
    images: torch.Tensor | None = None
    for i, (path, _) in enumerate(folder.samples):
        image = pil_to_tensor(open_image(path, folder.mode))
        if images is None:
            images = torch.empty((len(folder.samples), *image.shape), dtype=image.dtype)
        elif image.shape != images.shape[1:]:
            log.info(
                "%s: images of different sizes (%s: %s, first: %s); decoding them on each access",
                folder.root, path, tuple(image.shape), tuple(images.shape[1:]),
            )  # fmt: skip
            return None
        images[i] = image
    return images


def _load(file: Path, count: int) -> torch.Tensor | None:
    """The cached images of ``file``; ``None`` when there is none or it does not hold ``count`` images."""
    try:
        images = torch.load(file, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:  # a damaged file raises anything from UnpicklingError to KeyError
        log.warning("image cache %s is unreadable (%s); decoding the images again", file, err)
        return None
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) != count:
        log.warning("image cache %s does not hold this split's %d images; decoding them again", file, count)
        return None
    return images


def _save(images: torch.Tensor, file: Path) -> bool:
    """Write ``images`` to ``file`` atomically (temporary file + rename); a failure is one warning.

    Returns:
        Whether ``file`` was written.
    """
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    except OSError as err:
        log.warning("image cache not written (%s); the decoded images are kept in memory only", err)
        return False
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(images, out)
        os.replace(tmp, file)
    except (OSError, RuntimeError) as err:
        log.warning("image cache %s not written (%s); the decoded images are kept in memory only", file, err)
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after a successful rename
    return True


def decode_folder(folder: ImageFolder) -> DecodedImages | None:
    """``folder``'s images decoded into memory, read from the on-disk cache when it holds them.

    Args:
        folder: the split (already screened under the bad-image policy); its cache file is in
            :func:`default_cache_dir`.

    Returns:
        The decoded split, or ``None`` when the folder is empty or its images differ in shape
        (the caller keeps decoding them on each access).

    Raises:
        BadImageError: in ``stop`` mode, for the first file that cannot be read.
    """
    targets = [label for _, label in folder.samples]
    if not targets:
        return None
    try:
        file: Path | None = default_cache_dir() / f"{_key(folder)}.pt"
    except OSError:  # a file gone since the folder was listed: decoding names it (stop) or fails alike
        file = None
    images = _load(file, len(targets)) if file is not None else None
    if images is None:
        start = time.perf_counter()
        images = _decode(folder)
        if images is None:
            return None
        seconds = time.perf_counter() - start
        saved = file is not None and _save(images, file)
        log.info(
            "decoded %d images of %s in %.1f s%s", len(images), folder.root, seconds,
            f" (cached in {file})" if saved else "",
        )  # fmt: skip
    return DecodedImages(images, targets, folder.classes, folder.root)
