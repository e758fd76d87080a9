"""The NAS data: the shared vision datasets, with the training split halved into weight and arch parts."""

from __future__ import annotations

import copy

import numpy as np
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from tasks.common.data import TransformSubset, paired_loader
from tasks.common.vision import VisionDataModule

__all__ = ["NasDataModule"]


class NasDataModule(VisionDataModule):
    """:class:`~tasks.common.vision.VisionDataModule` whose training loader serves DARTS' two halves.

    While :attr:`paired` is true (the search), each training batch is ``{"weights": (x, y),
    "arch": (x, y)}``: the network weights train on one part of the training split and alpha on the
    other (DARTS' ``train_portion``), a fixed random split (``split_seed``) of the same images
    the derived network later trains on. Set :attr:`paired` to false for plain ``(x, y)`` batches
    of the whole training split (retraining the derived network). Validation and test are the
    vision module's.

    Args:
        dataset: see :class:`~tasks.common.vision.VisionDataModule` (``digits``, ``cifar10``,
            ``imagefolder``, ...).
        data_dir: dataset root.
        batch_size: samples per batch (each half of a paired batch has this many).
        num_workers: DataLoader workers.
        download: fetch a missing torchvision dataset.
        val_fraction: share of the training set held out for validation.
        image_size: network input side for ``imagefolder``.
        augment: training augmentation (both halves).
        split_seed: seed of the train/val and weight/arch splits.
        normalize: standardise inputs.
        arch_fraction: share of the training split that trains alpha, in (0, 1) (DARTS: 0.5).
        cache_images: decode small ``imagefolder`` images once, cached on disk (see the vision module).
    """

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
        arch_fraction: float = 0.5,
        cache_images: bool = True,
    ) -> None:
        super().__init__(
            dataset, data_dir, batch_size, num_workers, download, val_fraction, image_size, augment,
            split_seed, normalize, cache_images,
        )  # fmt: skip
        if not 0.0 < arch_fraction < 1.0:
            raise ValueError(f"arch_fraction must be in (0, 1), got {arch_fraction!r}")
        self.arch_fraction = arch_fraction
        self.paired = True
        self.weight_set: TransformSubset | None = None
        self.arch_set: TransformSubset | None = None

    def setup(self, stage: str | None = None) -> None:
        """The vision splits, then the weight/arch halves of the training split (once)."""
        super().setup(stage)
        if self.weight_set is not None:
            return
        train = self.train_set
        assert isinstance(train, TransformSubset)
        order = np.random.default_rng(self.split_seed).permutation(len(train.indices))
        n_arch = round(self.arch_fraction * len(order))
        if not 0 < n_arch < len(order):
            raise ValueError(
                f"{self.dataset}: arch_fraction={self.arch_fraction} leaves an empty part of the "
                f"{len(order)}-image training split"
            )
        weight_idx, arch_idx = train.indices[np.sort(order[n_arch:])], train.indices[np.sort(order[:n_arch])]
        self.weight_set = TransformSubset(train.dataset, weight_idx, train.transform)
        self.arch_set = TransformSubset(train.dataset, arch_idx, train.transform)

    def retrain_view(self, batch_size: int | None = None) -> NasDataModule:
        """This data for retraining the derived network: plain ``(x, y)`` batches of ``batch_size``
        (``None``: this module's) from the whole training split; this module is left as it is."""
        view = copy.copy(self)
        view.paired = False
        view.batch_size = self.batch_size if batch_size is None else batch_size
        return view

    def train_dataloader(self) -> CombinedLoader | DataLoader:
        """Paired ``{"weights", "arch"}`` batches while :attr:`paired`, else the whole training split."""
        if not self.paired:
            return super().train_dataloader()
        return paired_loader(
            {
                "weights": self._loader(self.weight_set, train=True),
                "arch": self._loader(self.arch_set, train=True),
            }
        )
