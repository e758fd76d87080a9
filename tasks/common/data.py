"""Datamodule helpers shared by the task suites: a base DataModule, paired loaders, splits, the
missing-dataset error."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from .errors import DatasetNotFoundError
from .validate import check_choice, check_int

__all__ = [
    "TaskDataModule",
    "TransformSubset",
    "dataset_not_found",
    "default_data_dir",
    "paired_loader",
    "stratified_split",
]

DATA_DIR_ENV = "BGN_DATA_DIR"


def default_data_dir() -> Path:
    """Dataset root without ``--data-dir``: ``$BGN_DATA_DIR``, else ``~/.cache/bgn-lightning/datasets``."""
    return Path(os.environ.get(DATA_DIR_ENV, "~/.cache/bgn-lightning/datasets")).expanduser()


def dataset_not_found(
    name: str, path: Path | str, expected: str, download: bool = True, flag: str = "--data-dir"
) -> DatasetNotFoundError:
    """The one-line error for a dataset missing on disk, saying where it was looked for and what to do.

    Args:
        name: dataset name as the CLI spells it.
        path: the directory that was searched.
        expected: what should be there (e.g. ``cifar-10-batches-py/``).
        download: whether ``--download`` can fetch it.
        flag: the option that sets ``path`` (uda's domains: ``--source-dir``, ``--target-dir``).
    """
    fix = f"pass --download to fetch it, or {flag} to point at a copy" if download else \
        f"pass {flag} to point at a copy"
    return DatasetNotFoundError(f"{name}: dataset not found in {str(path)!r} (expected {expected}); {fix}")


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..n-1`` into (keep, held-out) with ``fraction`` held out, per-class balanced.

    The split depends only on ``labels``, ``fraction`` and ``seed`` (not on the run's seed), so
    every run of a sweep sees the same validation set. ``keep`` is sorted; ``held-out`` is in a
    fixed random order, so that any prefix of it (e.g. Lightning's ``limit_val_batches=0.5``)
    is a sample of all classes rather than of the first ones. Falls back to a plain random split
    when some class has a single sample or the held-out part is smaller than the number of classes.

    Raises:
        ValueError: when ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"stratified_split: fraction must be in (0, 1), got {fraction!r}")
    y = np.asarray(labels)
    index = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and round(fraction * len(y)) >= len(counts) else None
    keep, held_out = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(keep), np.asarray(held_out)


class TransformSubset(Dataset):
    """``dataset[indices]`` with ``transform`` applied to the input (not the target).

    Lets one untransformed dataset back a training subset (augmented) and a validation subset
    (deterministic) without loading it twice.

    Args:
        dataset: a map-style dataset returning ``(input, target)``.
        indices: the subset; ``None`` for all samples.
        transform: applied to each input.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)  # type: ignore[arg-type]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[int(self.indices[i])]
        return (self.transform(x) if self.transform is not None else x), y


class TaskDataModule(pl.LightningDataModule):
    """Base DataModule of every task: the common arguments, their checks and the three dataloaders.

    Subclasses set ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``, or
    override the ``*_dataloader`` hooks and build their loaders with :meth:`_loader` (few-shot
    episodes) or :func:`paired_loader` (two streams stepped together). Training batches drop the
    last incomplete batch, so batch-statistics norms never see a batch of one sample.

    Args:
        dataset: dataset name (validated by the subclass).
        data_dir: where datasets live; ``None`` for :func:`default_data_dir`.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        download: fetch missing datasets.
    """

    BATCH_OF_SAMPLES: ClassVar[bool] = True
    """Whether ``batch_size`` counts samples (so ``--norm-batch-size`` may not exceed it); few-shot
    batches count episodes."""

    def __init__(
        self,
        dataset: str,
        data_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise ValueError(f"{type(self).__name__}: setup() has not built this split yet")
        if train and len(dataset) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"{self.dataset}: training split has {len(dataset)} samples, fewer than "  # type: ignore[arg-type]
                f"batch_size={self.batch_size} (the last incomplete batch is dropped)"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, train=False)


PairMode = Literal["max_size_cycle", "min_size", "max_size"]


def paired_loader(loaders: Mapping[str, DataLoader], mode: PairMode = "max_size_cycle") -> CombinedLoader:
    """Step several loaders together: each batch is ``{name: batch of that loader}``.

    A thin use of Lightning's :class:`~lightning.pytorch.utilities.CombinedLoader` (which also
    counts the epoch's length and restarts exhausted loaders) for tasks that train on two streams:
    labelled source + unlabelled target (domain adaptation), weight half + architecture half of
    the training split (DARTS).

    Args:
        loaders: at least two named loaders.
        mode: ``max_size_cycle`` (epoch = the longest loader, shorter ones restart),
            ``min_size`` (stop with the shortest) or ``max_size`` (exhausted ones yield ``None``).

    Raises:
        ValueError: for fewer than two loaders or an unknown mode.
    """
    if len(loaders) < 2:
        raise ValueError(f"paired_loader: needs at least two loaders, got {list(loaders)}")
    check_choice("mode", mode, ("max_size_cycle", "min_size", "max_size"), owner="paired_loader")
    return CombinedLoader(dict(loaders), mode=mode)
