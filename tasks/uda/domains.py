"""The domains a DANN run adapts between: what each one loads, and how a pair is brought to one input.

A :class:`Domain` is untransformed ``(train, test)`` datasets of ``(image, label)`` (a PIL image
or a ``(C, H, W)`` float tensor in [0, 1]), with its class names, channels and native size.
Named domains: ``synth`` (:mod:`tasks.uda.synth_digits`, embedded), ``digits`` (scikit-learn's,
embedded), ``mnist``, ``usps`` and ``svhn`` (torchvision's formats under ``data_dir``); and any
ImageFolder directory (:func:`folder_domain`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from tasks.common.data import dataset_not_found, stratified_split
from tasks.common.images import ImageFolder, first_image
from tasks.common.validate import check_choice
from tasks.common.vision import DATASETS as VISION_DATASETS
from tasks.common.vision import load_split_datasets

from .synth_digits import IMAGE_SIZE as SYNTH_SIZE
from .synth_digits import load_synth_digits

__all__ = ["DIGIT_CLASSES", "NAMED_DOMAINS", "Domain", "folder_domain", "hold_out", "named_domain"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
NAMED_DOMAINS = ("synth", "digits", "mnist", "usps", "svhn")
SYNTH_TEST_FRACTION = 1 / 6
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")


@dataclass
class Domain:
    """One domain's data, untransformed.

    Attributes:
        name: what results and tables call it (``mnist``, or a folder's name).
        train: training images (labelled for the source; for the target, labels are never served).
        test: test images.
        train_labels: labels of ``train`` (to carve the source's validation split).
        classes: class names, in label order.
        channels: 1 (grey) or 3 (RGB).
        image_size: the shorter side of its images.
    """

    name: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    classes: tuple[str, ...]
    channels: int
    image_size: int


def named_domain(name: str, data_dir: Path, split_seed: int, synth_per_class: int) -> Domain:
    """The named domain ``name`` (one of :data:`NAMED_DOMAINS`).

    Raises:
        DatasetNotFoundError: when a torchvision dataset is not under ``data_dir``.
        ValueError: for an unknown name.
    """
    if name == "synth":
        images, labels = load_synth_digits(data_dir, seed=split_seed, images_per_class=synth_per_class)
        x = torch.from_numpy(images).float().div_(255.0)
        y = torch.from_numpy(labels).long()
        train, test = stratified_split(y, SYNTH_TEST_FRACTION, seed=split_seed)
        return Domain(name, TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]),
                      labels[train], DIGIT_CLASSES, 3, SYNTH_SIZE)  # fmt: skip
    check_choice("domain", name, NAMED_DOMAINS)
    # the shared loader carves a validation split; a domain's training set is all of it
    splits = load_split_datasets(name, data_dir, False, 0.1, split_seed)
    train = splits["train"][0]
    spec = VISION_DATASETS[name]
    return Domain(name, train, splits["test"][0], _labels(train), DIGIT_CLASSES, spec.in_channels,
                  int(spec.image_size))  # fmt: skip


def _labels(dataset: Dataset) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    raise TypeError(f"no labels found on {type(dataset).__name__}")


class _FolderImages(ImageFolder):
    """An ImageFolder that reads images as grey (``L``) or ``RGB``, as its domain's channels say."""

    def __init__(self, root: Path, channels: int) -> None:
        super().__init__(str(root), mode="L" if channels == 1 else "RGB")


def _image_files(root: Path, classes: list[str]) -> Iterator[Path]:
    for cls in classes:
        for p in sorted((root / cls).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
                yield p


def hold_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~tasks.common.data.stratified_split`'s ``(keep, held_out)``; ``fraction=0`` keeps everything."""
    if fraction == 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    return stratified_split(labels, fraction, seed=seed)


def folder_domain(
    root: str | Path, test_fraction: float, split_seed: int, flag: str = "--data-dir"
) -> Domain:
    """An ImageFolder domain: ``root/train`` and ``root/test`` as its splits, or a flat ``root/<class>``.

    A flat folder (Office-31's ``amazon/<class>/<image>``) gets a fixed stratified split holding
    out ``test_fraction`` of each class (seeded by ``split_seed``); with ``test_fraction=0`` its
    test set is the whole folder, the same images as its training set. The domain is grey when its
    first image is (mode ``L``, ``1``...), otherwise RGB; its size is that image's shorter side.

    ``flag`` is the option that set ``root``, for the error message.

    Raises:
        DatasetNotFoundError: when ``root`` is missing or holds no class folders with images.
    """
    root = Path(root).expanduser()
    expected = "<class>/<image> folders, or train/<class>/<image> and test/<class>/<image>"
    if not root.is_dir():
        raise dataset_not_found(f"domain folder {root.name!r}", root, expected, download=False, flag=flag)
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_dir = root / "train" if split else root
    try:
        classes, _ = find_classes(str(train_dir))
    except FileNotFoundError as err:
        name = f"domain folder {root.name!r}"
        raise dataset_not_found(name, root, expected, download=False, flag=flag) from err
    first = first_image(_image_files(train_dir, classes))
    if first is None:
        raise dataset_not_found(f"domain folder {root.name!r}", root, expected, download=False, flag=flag)
    channels, size = (1 if first.mode in _GREY_MODES else 3), min(first.size)
    train: Dataset = _FolderImages(train_dir, channels)
    labels = np.asarray(train.targets)
    if split:
        test: Dataset = _FolderImages(root / "test", channels)
        if test.classes != train.classes:
            raise ValueError(
                f"domain folder {root}: test/ has classes {test.classes[:5]}..., train/ has "
                f"{train.classes[:5]}...; both splits must hold the same class folders"
            )
    elif test_fraction == 0:  # transductive: tested on the images it trains on (unlabelled for a target)
        test = train
    else:
        keep, held_out = stratified_split(labels, test_fraction, seed=split_seed)
        train, test, labels = Subset(train, keep.tolist()), Subset(train, held_out.tolist()), labels[keep]
    return Domain(root.name, train, test, labels, tuple(classes), channels, size)
