"""The DataModule of the UDA suite: a labelled source domain and an unlabelled target domain."""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

from tasks.common.data import TaskDataModule, TransformSubset, paired_loader
from tasks.common.validate import check_choice, check_int
from tasks.common.vision import IMAGENET_MEAN, IMAGENET_RESIZE_RATIO, IMAGENET_STD, load_split_datasets

from .domains import Domain, folder_domain, hold_out, named_domain

__all__ = ["DomainAdaptationDataModule", "Unlabelled"]

PAIRS: dict[str, tuple[str, str]] = {
    "synth→digits": ("synth", "digits"),
    "mnist→usps": ("mnist", "usps"),
    "usps→mnist": ("usps", "mnist"),
    "svhn→mnist": ("svhn", "mnist"),
}
FOLDERS = "folders"
PAIR_SIZE = {"synth→digits": 16, "mnist→usps": 28, "usps→mnist": 28, "svhn→mnist": 32}
LARGE = 64  # images at least this large get ImageNet-style crops and statistics


class Unlabelled(Dataset):
    """The images of a dataset of ``(image, label)``, without the labels.

    The target domain's training loader is built on it, so no target label can reach a training
    step.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i][0]


def _tensors(dataset: Dataset, transform: v2.Compose) -> TensorDataset:
    """``dataset`` with ``transform`` applied once, as an in-memory ``TensorDataset`` of (image, label)."""
    loader = DataLoader(TransformSubset(dataset, transform=transform), batch_size=256)
    images, labels = zip(*loader, strict=True)
    return TensorDataset(torch.cat(images), torch.cat(labels).long())


class _Channels(torch.nn.Module):
    """Bring an image tensor ``(C, H, W)`` to ``channels`` channels (grey <-> RGB)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] == self.channels:
            return x
        if self.channels == 3:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        return v2.functional.rgb_to_grayscale(x)


class DomainAdaptationDataModule(TaskDataModule):
    """Paired source (labelled) and target (unlabelled) domains for unsupervised domain adaptation.

    Pairs (``dataset``):

    * ``synth→digits`` (default, embedded): digits rendered from matplotlib's fonts in colour with
      clutter and blur (:mod:`tasks.uda.synth_digits`, cached under ``data_dir/uda``) to
      scikit-learn's grey 8x8 handwritten digits; 16x16 RGB.
    * ``mnist→usps``, ``usps→mnist`` (28x28 grey), ``svhn→mnist`` (32x32 RGB): torchvision's
      formats under ``data_dir``.
    * ``folders``: any two ImageFolder domains, ``source_dir`` and ``target_dir`` (Office-31's
      ``amazon`` and ``webcam``, or ``../shared/datasets/mnist`` and ``usps``). A folder with
      ``train/`` and ``test/`` uses them as its splits; a flat ``<class>/<image>`` folder gets a
      fixed stratified split holding out ``test_fraction``. Both must hold the same classes.

    Images are brought to one input: ``channels`` (default: 3 if either domain is RGB, grey
    images are repeated; 1 converts RGB to grey) and ``image_size`` (default: the pair's size,
    for folders the larger domain's size, or 224 for images of 64 px or more, which get
    ImageNet-style resized crops and flips, and ImageNet statistics). Smaller images are
    standardised with mean and std 0.5 in every channel (the same for both domains).

    Training batches are ``{"source": (images, labels), "target": images}`` (a Lightning
    :class:`~lightning.pytorch.utilities.CombinedLoader`, ``max_size_cycle``: an epoch is the longer
    domain, the shorter one restarts); the target loader serves images only (:class:`Unlabelled`).
    Validation: the source's held-out ``val_fraction`` of its training set (labelled source only).
    Test: dataloader 0 is the target's test set, 1 the source's. :meth:`adapt_dataloader` serves the
    target's training images without augmentation, for AdaBN.

    Args:
        dataset: a pair above.
        data_dir: where the torchvision datasets and the synthetic digits' cache live.
        batch_size: images per domain per batch (a DANN step sees twice as many).
        num_workers: DataLoader workers.
        download: fetch missing torchvision datasets.
        source_dir: the source ImageFolder domain (``folders`` only).
        target_dir: the target ImageFolder domain (``folders`` only).
        image_size: side of the network's input (``None``: see above).
        channels: the network's input channels, 1 or 3 (``None``: see above).
        val_fraction: share of the source's training set held out for validation (0: none, all
            source images train; set ``trainer.limit_val_batches: 0`` then).
        test_fraction: share of a flat folder domain held out as its test set (0: the whole
            folder is both its training and its test set, the reference library's Office-31
            protocol: the target's unlabelled training images are the ones it is tested on).
        augment: random crops (small images: shifts with padding; large: resized crops and flips).
        split_seed: seeds every split and the synthetic digits; independent of the run's seed.
        synth_per_class: synthetic digits rendered per class (5/6 train, 1/6 test).
    """

    DATASETS: ClassVar[tuple[str, ...]] = (*PAIRS, FOLDERS)
    """Accepted ``dataset`` names (the CLI checks them before anything is built)."""

    def __init__(
        self,
        dataset: str = "synth→digits",
        data_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        download: bool = False,
        source_dir: str | None = None,
        target_dir: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        augment: bool = True,
        split_seed: int = 0,
        synth_per_class: int = 600,
    ) -> None:
        check_choice("dataset", dataset, self.DATASETS)
        super().__init__(dataset, data_dir, batch_size, num_workers, download)
        if dataset == FOLDERS:
            missing = [n for n, d in (("source_dir", source_dir), ("target_dir", target_dir)) if not d]
            if missing:
                raise ValueError(
                    "dataset 'folders' needs both domain folders; pass "
                    + " and ".join(f"--{name.replace('_', '-')} DIR" for name in missing)
                )
        elif source_dir or target_dir:
            raise ValueError(
                f"source_dir/target_dir are read with dataset 'folders' only, got dataset {dataset!r} "
                "(add --data folders)"
            )
        check_int("image_size", image_size, optional=True)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (from the domains), got {channels!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        self.source_dir, self.target_dir = source_dir, target_dir
        self._image_size, self._channels = image_size, channels
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.augment = augment
        self.split_seed = split_seed
        self.synth_per_class = synth_per_class
        self.adapt_set: Dataset | None = None
        self.save_hyperparameters()

    # -- the two domains ---------------------------------------------------------------------------
    @cached_property
    def domains(self) -> tuple[Domain, Domain]:
        """``(source, target)``, loaded once and checked to share classes.

        Raises:
            DatasetNotFoundError: for a missing dataset or domain folder.
            ValueError: when the two domains' classes differ.
        """
        if self.dataset == FOLDERS:
            source = folder_domain(str(self.source_dir), self.test_fraction, self.split_seed, "--source-dir")
            target = folder_domain(str(self.target_dir), self.test_fraction, self.split_seed, "--target-dir")
        else:
            source, target = (named_domain(n, self.data_dir, self.split_seed, self.synth_per_class)
                              for n in PAIRS[self.dataset])  # fmt: skip
        if len(source.classes) != len(target.classes) or source.classes != target.classes:
            raise ValueError(
                f"source {source.name!r} has {len(source.classes)} classes "
                f"({', '.join(source.classes[:5])}...), "
                f"target {target.name!r} has {len(target.classes)} ({', '.join(target.classes[:5])}...); "
                "unsupervised domain adaptation needs the same class folders in both"
            )
        return source, target

    @property
    def pair(self) -> str:
        """``"<source>→<target>"``: the two domains' names (folder names for ``folders``)."""
        source, target = self.domains
        return f"{source.name}→{target.name}"

    @property
    def num_classes(self) -> int:
        """Number of classes, shared by both domains."""
        return len(self.domains[0].classes)

    @property
    def in_channels(self) -> int:
        """Channels of the network's input."""
        if self._channels is not None:
            return self._channels
        return max(d.channels for d in self.domains)

    @property
    def image_size(self) -> int:
        """Side of the square images fed to the network."""
        if self._image_size is not None:
            return self._image_size
        if self.dataset in PAIR_SIZE:
            return PAIR_SIZE[self.dataset]
        side = max(d.image_size for d in self.domains)
        return side if side < LARGE else 224

    # -- transforms --------------------------------------------------------------------------------
    def _transforms(self, train: bool) -> v2.Compose:
        size, channels = self.image_size, self.in_channels
        head = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), _Channels(channels)]
        if size >= LARGE:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
            resize = v2.Resize(round(size * IMAGENET_RESIZE_RATIO), antialias=True)
            if train and self.augment:
                geometry = [resize, v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            else:
                geometry = [resize, v2.CenterCrop(size)]
        else:
            mean, std = (0.5,) * channels, (0.5,) * channels
            geometry = [v2.Resize((size, size), antialias=True)]  # random crops: in setup()
        return v2.Compose([*head, *geometry, v2.Normalize(mean, std)])

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the torchvision domains (once, on the main process) when ``download=True``."""
        if self.download and self.dataset in PAIRS:
            for name in PAIRS[self.dataset]:
                if name not in ("synth", "digits"):
                    load_split_datasets(name, self.data_dir, True, self.val_fraction, self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Build the source's train/val/test, the target's unlabelled train and its test (once).

        Small images (under 64 px) are converted, resized and standardised once and kept in memory
        as tensors; only the random crop runs per batch. Large ones are transformed on the fly.
        """
        if self.train_set is not None:
            return
        source, target = self.domains
        keep, val = hold_out(source.train_labels, self.val_fraction, self.split_seed)
        eval_tf = self._transforms(train=False)
        if self.image_size < LARGE:
            size = self.image_size
            crop = v2.RandomCrop(size, padding=max(1, size // 8)) if self.augment else None
            source_train, target_train = _tensors(source.train, eval_tf), _tensors(target.train, eval_tf)
            self.train_set = TransformSubset(source_train, keep, transform=crop)
            self.val_set = TransformSubset(source_train, val)
            self.test_set = _tensors(source.test, eval_tf)
            self.target_train_set = Unlabelled(TransformSubset(target_train, transform=crop))
            self.target_test_set = _tensors(target.test, eval_tf)
            self.adapt_set = Unlabelled(target_train)
        else:
            train_tf = self._transforms(train=True)
            self.train_set = TransformSubset(source.train, keep, transform=train_tf)
            self.val_set = TransformSubset(source.train, val, transform=eval_tf)
            self.test_set = TransformSubset(source.test, transform=eval_tf)
            self.target_train_set = Unlabelled(TransformSubset(target.train, transform=train_tf))
            self.target_test_set = TransformSubset(target.test, transform=eval_tf)
            self.adapt_set = Unlabelled(TransformSubset(target.train, transform=eval_tf))

    def train_dataloader(self) -> CombinedLoader:
        """``{"source": (images, labels), "target": images}`` batches, the shorter domain cycling."""
        return paired_loader({"source": self._loader(self.train_set, train=True),
                              "target": self._loader(self.target_train_set, train=True)})  # fmt: skip

    def test_dataloader(self) -> list[DataLoader]:
        """``[target test, source test]``."""
        return [self._loader(self.target_test_set, train=False), self._loader(self.test_set, train=False)]

    def adapt_dataloader(self) -> DataLoader:
        """The target's training images, unaugmented, in a fixed order (AdaBN's statistics pass).

        Drops the last incomplete batch (when there is more than one), so no batch-statistics norm
        sees a batch of one image.
        """
        if self.adapt_set is None:
            raise ValueError(f"{type(self).__name__}: setup() has not built the target domain yet")
        drop = len(self.adapt_set) > self.batch_size
        return DataLoader(self.adapt_set, batch_size=self.batch_size, shuffle=False, drop_last=drop,
                          num_workers=self.num_workers)  # fmt: skip
