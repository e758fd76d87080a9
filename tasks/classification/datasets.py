"""The classification datasets: ``digits`` (embedded), torchvision's CIFAR-10/100, MNIST, SVHN, ImageFolder.

Each loader returns untransformed ``(train, test)`` datasets of ``(PIL image or tensor, label)``
and the training labels; the DataModule carves the validation split and adds transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from tasks.common.data import dataset_not_found, stratified_split

__all__ = ["DATASETS", "DatasetSpec", "imagefolder_info", "imagefolder_layout", "load_split_datasets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """What the model and the transforms need to know about a dataset.

    Attributes:
        num_classes: number of classes (``None``: read from the ImageFolder tree).
        in_channels: image channels.
        image_size: side of the (square) images fed to the network (``None``: from the data).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        flip: whether horizontal flips are a valid augmentation (not for digits).
        expected: what ``--data-dir`` must hold, for the missing-dataset error.
    """

    num_classes: int | None
    in_channels: int
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    expected: str


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(10, 1, 8, (0.3053,), (0.3760,), False, "nothing (embedded in scikit-learn)"),
    "cifar10": DatasetSpec(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, "cifar-10-batches-py/"
    ),
    "cifar100": DatasetSpec(
        100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, "cifar-100-python/"
    ),
    "mnist": DatasetSpec(10, 1, 28, (0.1307,), (0.3081,), False, "MNIST/raw/*-ubyte"),
    "svhn": DatasetSpec(
        10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False,
        "train_32x32.mat and test_32x32.mat",
    ),
    "imagefolder": DatasetSpec(
        None, 3, None, IMAGENET_MEAN, IMAGENET_STD, True, "train/<class>/<image> and val/ or test/ alike"
    ),
}

DIGITS_TEST_FRACTION = 0.2


def _digits(split_seed: int) -> tuple[Dataset, Dataset, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1]; a fixed stratified 20 % test split."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    trainval, test = stratified_split(labels, DIGITS_TEST_FRACTION, seed=split_seed)
    train_set = TensorDataset(images[trainval], labels[trainval])
    test_set = TensorDataset(images[test], labels[test])
    return train_set, test_set, labels[trainval].numpy()


def _torchvision(name: str, root: Path, download: bool) -> tuple[Dataset, Dataset, np.ndarray]:
    """A torchvision dataset's train and test splits (PIL images), or a one-line missing-data error."""
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
            labels = np.asarray(train.targets)
        elif name == "mnist":
            train, test = tvd.MNIST(root, train=True, download=download), tvd.MNIST(root, train=False)
            labels = train.targets.numpy()
        elif name == "svhn":
            train = tvd.SVHN(root, split="train", download=download)
            test = tvd.SVHN(root, split="test", download=download)
            labels = np.asarray(train.labels)
        else:
            raise ValueError(f"_torchvision: {name!r} is not a torchvision dataset of this task")
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        raise dataset_not_found(name, root, DATASETS[name].expected) from err
    return train, test, labels


def imagefolder_layout(root: Path) -> tuple[Path, Path | None, Path]:
    """``(train, val or None, test)`` directories of an ImageFolder tree.

    ``root/train`` is required. With both ``root/val`` and ``root/test``, val is the validation
    set and test the test set; with only one of them it is the test set (ImageNet's ``val``) and
    the validation set is carved from train.

    Raises:
        FileNotFoundError: when ``root/train`` or both ``root/val`` and ``root/test`` are missing.
    """
    train, val, test = root / "train", root / "val", root / "test"
    if not train.is_dir() or not (val.is_dir() or test.is_dir()):
        raise dataset_not_found("imagefolder", root, DATASETS["imagefolder"].expected, download=False)
    if val.is_dir() and test.is_dir():
        return train, val, test
    return train, None, (test if test.is_dir() else val)


def _imagefolder(root: Path) -> tuple[Dataset, Dataset | None, Dataset, np.ndarray]:
    train_dir, val_dir, test_dir = imagefolder_layout(root)
    train = tvd.ImageFolder(str(train_dir))
    val = tvd.ImageFolder(str(val_dir)) if val_dir is not None else None
    test = tvd.ImageFolder(str(test_dir))
    for name, split in (("val", val), ("test", test)):
        if split is not None and split.classes != train.classes:
            raise ValueError(
                f"imagefolder: {root}/{name} has classes {split.classes[:5]}..., train has "
                f"{train.classes[:5]}...; every split must hold the same class folders"
            )
    return train, val, test, np.asarray(train.targets)


def imagefolder_info(root: Path) -> tuple[int, int]:
    """Number of classes and the side of the first training image of an ImageFolder tree."""
    train_dir, _, _ = imagefolder_layout(root)
    classes, _ = find_classes(str(train_dir))
    first = next(
        (p for p in sorted((train_dir / classes[0]).iterdir()) if p.suffix.lower() in IMG_EXTENSIONS), None
    )
    if first is None:
        raise dataset_not_found("imagefolder", root, f"images in {train_dir / classes[0]}", download=False)
    with Image.open(first) as im:
        return len(classes), min(im.size)


def load_split_datasets(
    name: str, root: Path, download: bool, val_fraction: float, split_seed: int
) -> dict[str, Any]:
    """Untransformed train/val/test datasets of ``name``, with the validation split carved if needed.

    Returns ``{"train": (dataset, indices), "val": (dataset, indices), "test": (dataset, None)}``:
    train and val may index the same underlying dataset; the split is stratified and fixed by
    ``split_seed``.
    """
    val_set: Dataset | None = None
    if name == "digits":
        train, test, labels = _digits(split_seed)
    elif name == "imagefolder":
        train, val_set, test, labels = _imagefolder(root)
    else:
        train, test, labels = _torchvision(name, root, download)
    if val_set is not None:
        return {"train": (train, None), "val": (val_set, None), "test": (test, None)}
    train_idx, val_idx = stratified_split(labels, val_fraction, seed=split_seed)
    return {"train": (train, train_idx), "val": (train, val_idx), "test": (test, None)}
