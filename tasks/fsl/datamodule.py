"""LightningDataModule serving few-shot episodes (see :mod:`tasks.fsl.episodes`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

from torch.utils.data import DataLoader

from tasks.common.data import TaskDataModule
from tasks.common.validate import check_choice, check_int

from .datasets import DATASETS, FewShotData, load_fewshot_data, prepare_fewshot_data
from .episodes import Episodes, EpisodeSpec, check_spec, meta_dataset

__all__ = ["FewShotDataModule"]


def _seed(data_seed: int, split: str, spec: EpisodeSpec) -> int:
    """The episode seed of a split and spec: the same episodes whatever else is configured."""
    text = f"{data_seed}|{split}|{spec.ways}|{spec.shots}|{spec.queries}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class FewShotDataModule(TaskDataModule):
    """N-way K-shot episodes of a few-shot dataset, with fixed evaluation episodes.

    A *training epoch* is ``episodes_per_epoch`` random episodes; ``batch_size`` is the
    **meta-batch**: the number of episodes (tasks) per optimizer step. Validation uses
    ``val_episodes`` and testing ``test_episodes`` episodes, drawn once from ``data_seed``, so runs
    with different norms or seeds are scored on the same episodes. Testing evaluates the
    configured ``shots`` first (the primary ``test/acc``), then every other value of
    ``test_shots``.

    Args:
        dataset: ``glyphs`` (embedded default), ``omniglot``, ``mini-imagenet`` or ``imagefolder``.
        data_dir: where the data lives (glyphs: where its cache goes, under ``glyphs/``); default
            :func:`tasks.common.data.default_data_dir` (``$BGN_DATA_DIR`` or
            ``~/.cache/bgn-lightning/datasets``).
        batch_size: episodes per optimizer step (meta-batch); also episodes per evaluation step.
        num_workers: DataLoader worker processes.
        download: fetch ``omniglot`` (torchvision) or ``mini-imagenet`` (learn2learn) if missing.
        ways: classes per evaluation episode (N).
        shots: support images per class (K), for training and the primary evaluation.
        queries: query images per class (Q) in evaluation episodes (15 is the standard protocol).
        train_ways: classes per training episode (default ``ways``; Snell et al. train wider).
        train_queries: query images per class in training episodes (default ``queries``).
        test_shots: further shot counts evaluated at test time (default 1 and 5).
        episodes_per_epoch: training episodes per epoch.
        val_episodes: validation episodes.
        test_episodes: meta-test episodes per shot count (>= 600 for the standard protocol).
        image_size: image side length (default: the dataset's standard, 28 or 84).
        rotations: add 90/180/270-degree rotations of every class as new classes (default: on for
            omniglot, off elsewhere).
        data_seed: seeds glyph rendering, class splits and the evaluation episodes.
    """

    BATCH_OF_SAMPLES: ClassVar[bool] = False  # batch_size counts episodes of ways x (shots + queries)

    DATASETS = tuple(DATASETS)
    """The dataset names (the CLI checks ``--data`` against them)."""

    def __init__(
        self,
        dataset: str = "glyphs",
        data_dir: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        download: bool = False,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        train_ways: int | None = None,
        train_queries: int | None = None,
        test_shots: Sequence[int] = (1, 5),
        episodes_per_epoch: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        image_size: int | None = None,
        rotations: bool | None = None,
        data_seed: int = 0,
    ) -> None:
        check_choice("dataset", dataset, self.DATASETS)
        super().__init__(dataset, data_dir, batch_size, num_workers, download)
        name = type(self).__name__
        for arg, value in (("episodes_per_epoch", episodes_per_epoch), ("val_episodes", val_episodes),
                           ("test_episodes", test_episodes)):
            check_int(arg, value, owner=name)
        self.save_hyperparameters()
        self.train_spec = EpisodeSpec(train_ways or ways, shots, train_queries or queries)
        self.eval_specs = [EpisodeSpec(ways, s, queries)
                           for s in dict.fromkeys([shots, *(check_int("test_shots", k, owner=name)
                                                            for k in test_shots)])]
        self.data: FewShotData | None = None
        self._meta: dict[str, Any] = {}

    @property
    def in_channels(self) -> int:
        """Image channels (available after :meth:`setup`)."""
        return self._loaded().in_channels

    @property
    def image_size(self) -> int:
        """Image side length (available after :meth:`setup`)."""
        return self._loaded().image_size

    def _loaded(self) -> FewShotData:
        if self.data is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before reading the data's shape")
        return self.data

    def prepare_data(self) -> None:
        """Download (``download=True``) or render the glyph cache, once per node."""
        hp = self.hparams
        prepare_fewshot_data(hp.dataset, self.data_dir, hp.data_seed, hp.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the class splits and index them for episode sampling (once).

        Raises:
            TaskConfigError: when a split cannot make the configured episodes (too few classes or
                images per class for the ways, shots and queries).
        """
        if self.data is not None:
            return
        hp = self.hparams
        self.data = load_fewshot_data(hp.dataset, self.data_dir, seed=hp.data_seed, image_size=hp.image_size,
                                      download=False, rotations=hp.rotations)
        self._meta = {split: meta_dataset(ds) for split, ds in self.data.splits.items()}
        # Before any training: a setting the data cannot serve fails now, not after an epoch.
        check_spec(self._meta["train"], self.train_spec, "train")
        for split in ("val", "test"):
            for spec in self.eval_specs:
                check_spec(self._meta[split], spec, split)

    def train_dataloader(self) -> DataLoader:
        """``episodes_per_epoch`` fresh random training episodes."""
        episodes = Episodes(self._meta["train"], self.train_spec, self.hparams.episodes_per_epoch)
        return self._loader(episodes, train=False)  # fresh random episodes: no shuffling, none dropped

    def val_dataloader(self) -> DataLoader:
        """``val_episodes`` fixed episodes of the primary spec."""
        hp = self.hparams
        spec = self.eval_specs[0]
        seed = _seed(hp.data_seed, "val", spec)
        return self._loader(Episodes(self._meta["val"], spec, hp.val_episodes, seed=seed), train=False)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader of ``test_episodes`` fixed episodes per shot count, the configured shots first."""
        hp = self.hparams
        return [self._loader(Episodes(self._meta["test"], spec, hp.test_episodes,
                                      seed=_seed(hp.data_seed, "test", spec)), train=False)
                for spec in self.eval_specs]
