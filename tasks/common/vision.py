"""Image-classification data every vision task shares: datasets, transforms and :class:`VisionDataModule`.

Datasets: ``digits`` (scikit-learn's, embedded), torchvision's CIFAR-10/100, MNIST, SVHN and USPS,
and any ImageFolder tree. Each loader returns untransformed ``(train, test)`` datasets of
``(PIL image or tensor, label)`` and the training labels; :class:`VisionDataModule` carves the
validation split and adds transforms. The classification, adversarial and NAS suites use the
DataModule as it is; domain adaptation pairs two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.transforms import v2

from .data import TaskDataModule, TransformSubset, dataset_not_found, stratified_split
from .image_cache import decode_folder
from .images import ImageFolder, first_image
from .validate import check_choice, check_int

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "VisionDataModule",
    "imagefolder_info",
    "imagefolder_layout",
    "load_split_datasets",
]

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
    "usps": DatasetSpec(10, 1, 16, (0.2469,), (0.2989,), False, "usps.bz2 and usps.t.bz2"),
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
        elif name == "usps":
            train = tvd.USPS(str(root), train=True, download=download)
            test = tvd.USPS(str(root), train=False, download=download)
            labels = np.asarray(train.targets)
        elif name == "svhn":
            train = tvd.SVHN(root, split="train", download=download)
            test = tvd.SVHN(root, split="test", download=download)
            labels = np.asarray(train.labels)
        else:
            raise ValueError(f"_torchvision: {name!r} is not a torchvision dataset of this task")
    except (RuntimeError, FileNotFoundError) as err:  # torchvision: "Dataset not found or corrupted..."
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
    train = ImageFolder(str(train_dir))
    val = ImageFolder(str(val_dir)) if val_dir is not None else None
    test = ImageFolder(str(test_dir))
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
    first = first_image(
        p for p in sorted((train_dir / classes[0]).iterdir()) if p.suffix.lower() in IMG_EXTENSIONS
    )
    if first is None:
        raise dataset_not_found("imagefolder", root, f"images in {train_dir / classes[0]}", download=False)
    return len(classes), min(first.size)


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


IMAGENET_RESIZE_RATIO = 256 / 224


class VisionDataModule(TaskDataModule):
    """Image data: ``digits`` (default), CIFAR-10/100, MNIST, SVHN, USPS or an ImageFolder tree.

    * ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, embedded (no download); a fixed
      stratified split of 1,293 train / 144 val / 360 test images; augmentation: random shifts
      of up to 1 pixel.
    * ``cifar10``, ``cifar100``, ``mnist``, ``svhn``, ``usps``: torchvision's classes under ``data_dir``
      (``download=True`` fetches them; otherwise a missing copy is a one-line error naming the
      path and ``--download``). The validation set is a stratified ``val_fraction`` of the
      training set (fixed by ``split_seed``), the test set is the official one. Augmentation:
      random crops with padding (1/8 of the side), plus horizontal flips for CIFAR.
    * ``imagefolder``: any ``data_dir/train/<class>/<image>`` tree with ``val/`` and/or
      ``test/`` beside it (ImageNet, the CIFAR-10 JPEG subset). Images are read as RGB and
      normalised with ImageNet statistics. ``image_size`` defaults to 224 (random-resized crops
      and flips; resize + centre crop for evaluation) unless the first training image is smaller
      than 64 px, in which case the data is treated as small images at their own size. Small
      images that all share one size are decoded once per split into memory and kept in an
      on-disk cache (``cache_images``; see :mod:`tasks.common.image_cache`).

    Args:
        dataset: one of the names above.
        data_dir: dataset root (``None``: ``$BGN_DATA_DIR`` or ``~/.cache/bgn-lightning/datasets``).
        batch_size: samples per batch per device.
        num_workers: DataLoader workers.
        download: fetch a missing torchvision dataset.
        val_fraction: share of the training set held out for validation, in (0, 1).
        image_size: side of the network's input for ``imagefolder`` (``None``: see above);
            ignored by the other datasets, which keep their native size.
        augment: apply the training augmentation.
        split_seed: seed of the train/val (and, for digits, test) split; independent of the
            run's seed so that every run of a sweep evaluates on the same images.
        normalize: standardise inputs with the dataset's ``mean`` and ``std``; ``False`` keeps
            pixels in [0, 1] (what adversarial attacks expect: the model normalises inside).
        cache_images: for ``imagefolder`` trees of small images (the first under 64 px), decode
            each split once into memory, cached on disk under ``$BGN_CACHE_DIR/decoded`` (default
            ``~/.cache/bgn-lightning/decoded``); the transforms give the same pixels either way.
            ``False`` decodes every image on each access, as large images always are.
    """

    DATASETS: ClassVar[tuple[str, ...]] = tuple(DATASETS)
    """Accepted ``dataset`` names (the CLI checks them before anything is built)."""

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        download: bool = False,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        augment: bool = True,
        split_seed: int = 0,
        normalize: bool = True,
        cache_images: bool = True,
    ) -> None:
        check_choice("dataset", dataset, self.DATASETS)
        super().__init__(dataset, data_dir, batch_size, num_workers, download)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        check_int("image_size", image_size, optional=True)
        self.spec = DATASETS[dataset]
        self.val_fraction = val_fraction
        self._image_size = image_size
        self.augment = augment
        self.split_seed = split_seed
        self.normalize = normalize
        self.cache_images = cache_images
        self.save_hyperparameters()

    # -- what the model needs (linked into the model's init args by the CLI) ----------------------
    @cached_property
    def _imagefolder_info(self) -> tuple[int, int]:
        return imagefolder_info(self.data_dir)

    @property
    def num_classes(self) -> int:
        """Number of classes (for ``imagefolder``: class folders under ``train/``)."""
        return self.spec.num_classes or self._imagefolder_info[0]

    @property
    def in_channels(self) -> int:
        """Image channels fed to the network."""
        return self.spec.in_channels

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean used to standardise inputs (applied by the transforms when ``normalize``)."""
        return self.spec.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation used to standardise inputs."""
        return self.spec.std

    @property
    def image_size(self) -> int:
        """Side of the square images fed to the network."""
        if self.spec.image_size is not None:
            return self.spec.image_size
        if self._image_size is not None:
            return self._image_size
        first_side = self._imagefolder_info[1]
        return first_side if first_side < 64 else 224

    # -- transforms ------------------------------------------------------------------------------
    def _transforms(self, train: bool) -> v2.Transform:
        size = self.image_size
        to_tensor = [] if self.dataset == "digits" else [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        small = self.dataset != "imagefolder" or size < 64
        if small:
            geometry = [] if self.dataset != "imagefolder" else [v2.Resize(size), v2.CenterCrop(size)]
            if train and self.augment:
                geometry.append(v2.RandomCrop(size, padding=max(1, size // 8)))
                if self.spec.flip:
                    geometry.append(v2.RandomHorizontalFlip())
        elif train and self.augment:
            geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(round(size * IMAGENET_RESIZE_RATIO), antialias=True), v2.CenterCrop(size)]
        normalize = [v2.Normalize(self.spec.mean, self.spec.std)] if self.normalize else []
        steps = [*to_tensor, *geometry, *normalize]
        # digits' evaluation pipeline without normalisation has no step (Compose refuses an empty list)
        return v2.Compose(steps) if steps else v2.Identity()

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the dataset (once, on the main process) when ``download=True``."""
        if self.download and self.dataset not in ("digits", "imagefolder"):
            load_split_datasets(self.dataset, self.data_dir, True, self.val_fraction, self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (any stage); later calls are no-ops."""
        if self.train_set is not None:
            return
        splits = load_split_datasets(self.dataset, self.data_dir, False, self.val_fraction, self.split_seed)
        if self.dataset == "imagefolder" and self.cache_images and self._imagefolder_info[1] < 64:
            splits = self._decoded(splits)
        train_tf, eval_tf = self._transforms(train=True), self._transforms(train=False)
        self.train_set = TransformSubset(*splits["train"], transform=train_tf)
        self.val_set = TransformSubset(*splits["val"], transform=eval_tf)
        self.test_set = TransformSubset(*splits["test"], transform=eval_tf)

    @staticmethod
    def _decoded(splits: dict[str, Any]) -> dict[str, Any]:
        """``splits`` with each image folder decoded into memory (once, where train and val share one)."""
        decoded: dict[int, Dataset] = {}
        for name, (folder, indices) in splits.items():
            if id(folder) not in decoded:
                in_memory = decode_folder(folder)
                decoded[id(folder)] = folder if in_memory is None else in_memory
            splits[name] = (decoded[id(folder)], indices)
        return splits
