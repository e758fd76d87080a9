"""The classification DataModule: one of :data:`~tasks.classification.datasets.DATASETS`, three splits."""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

import torch
from torchvision.transforms import v2

from tasks.common.data import TaskDataModule, TransformSubset, check_choice

from .datasets import DATASETS, imagefolder_info, load_split_datasets

__all__ = ["ClassificationDataModule"]

IMAGENET_RESIZE_RATIO = 256 / 224


class ClassificationDataModule(TaskDataModule):
    """Image classification data: ``digits`` (default), CIFAR-10/100, MNIST, SVHN or an ImageFolder tree.

    * ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, embedded (no download); a fixed
      stratified split of 1,293 train / 144 val / 360 test images; augmentation: random shifts
      of up to 1 pixel.
    * ``cifar10``, ``cifar100``, ``mnist``, ``svhn``: torchvision's classes under ``data_dir``
      (``download=True`` fetches them; otherwise a missing copy is a one-line error naming the
      path and ``--download``). The validation set is a stratified ``val_fraction`` of the
      training set (fixed by ``split_seed``), the test set is the official one. Augmentation:
      random crops with padding (1/8 of the side), plus horizontal flips for CIFAR.
    * ``imagefolder``: any ``data_dir/train/<class>/<image>`` tree with ``val/`` and/or
      ``test/`` beside it (ImageNet, the CIFAR-10 JPEG subset). Images are read as RGB and
      normalised with ImageNet statistics. ``image_size`` defaults to 224 (random-resized crops
      and flips; resize + centre crop for evaluation) unless the first training image is smaller
      than 64 px, in which case the data is treated as small images at their own size.

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
    ) -> None:
        check_choice("dataset", dataset, self.DATASETS)
        super().__init__(dataset, data_dir, batch_size, num_workers, download)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.spec = DATASETS[dataset]
        self.val_fraction = val_fraction
        self._image_size = image_size
        self.augment = augment
        self.split_seed = split_seed
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
    def image_size(self) -> int:
        """Side of the square images fed to the network."""
        if self.spec.image_size is not None:
            return self.spec.image_size
        if self._image_size is not None:
            return self._image_size
        first_side = self._imagefolder_info[1]
        return first_side if first_side < 64 else 224

    # -- transforms ------------------------------------------------------------------------------
    def _transforms(self, train: bool) -> v2.Compose:
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
        return v2.Compose([*to_tensor, *geometry, v2.Normalize(self.spec.mean, self.spec.std)])

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
        train_tf, eval_tf = self._transforms(train=True), self._transforms(train=False)
        self.train_set = TransformSubset(*splits["train"], transform=train_tf)
        self.val_set = TransformSubset(*splits["val"], transform=eval_tf)
        self.test_set = TransformSubset(*splits["test"], transform=eval_tf)
