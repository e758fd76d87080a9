"""N-way K-shot episodes built with learn2learn's ``MetaDataset``, ``Taskset`` and task transforms.

``Taskset`` is learn2learn's current name of ``TaskDataset`` (the old name warns that it is
deprecated).

An episode samples ``ways`` classes (``NWays``), ``shots + queries`` images of each (``KShots``),
loads them (``LoadData``), maps the classes to ``0..ways-1`` in random order (``RemapLabels``) and
groups them by class (``ConsecutiveLabels``); :func:`split_episode` then cuts every class into
``shots`` support and ``queries`` query images, so support and query never share an image.

Training episodes are fresh random draws (learn2learn samples with Python's ``random``, which
``lightning.seed_everything`` and the DataLoader workers seed). Evaluation episodes are drawn once,
from their own seed, so every run and every norm is scored on exactly the same episodes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.errors import TaskConfigError
from tasks.common.validate import check_int

from .datasets import LabeledDataset
from .l2l import learn2learn

__all__ = ["EpisodeSpec", "Episodes", "learn2learn", "meta_dataset", "split_episode", "taskset"]

class Episode(NamedTuple):
    """One episode, support and query each grouped by class (collates into a meta-batch)."""

    support: Tensor
    """``(ways * shots, C, H, W)`` images."""
    support_labels: Tensor
    """``(ways * shots,)`` in ``0..ways-1``."""
    query: Tensor
    """``(ways * queries, C, H, W)`` images."""
    query_labels: Tensor
    """``(ways * queries,)``."""
    support_ids: Tensor
    """Dataset index of every support image (the same image has the same id in every episode)."""
    query_ids: Tensor
    """Dataset index of every query image."""


@dataclass(frozen=True)
class EpisodeSpec:
    """An N-way K-shot episode with Q queries per class."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            check_int(name, getattr(self, name), owner="EpisodeSpec")

    def __str__(self) -> str:
        return f"{self.ways}-way {self.shots}-shot ({self.queries} queries)"


def meta_dataset(dataset: LabeledDataset) -> Any:
    """``learn2learn.data.MetaDataset`` over ``dataset``, indexed from its known labels (no image is read)."""
    l2l = learn2learn()
    return l2l.data.MetaDataset(dataset, indices_to_labels=dict(enumerate(dataset.labels)))


def check_spec(meta: Any, spec: EpisodeSpec, split: str) -> None:
    """Raise unless the ``MetaDataset`` ``meta`` (the ``split`` split) can make ``spec`` episodes.

    Raises:
        TaskConfigError: when the split has fewer than ``ways`` classes, or a class fewer than
            ``shots + queries`` images.
    """
    per_class = {label: len(indices) for label, indices in meta.labels_to_indices.items()}
    if len(per_class) < spec.ways:
        raise TaskConfigError(
            f"fsl: {spec} episodes need >= {spec.ways} classes, the {split} split has {len(per_class)}; "
            f"lower ways"
        )
    smallest = min(per_class.values())
    if smallest < spec.shots + spec.queries:
        raise TaskConfigError(
            f"fsl: {spec} episodes need >= shots + queries = {spec.shots + spec.queries} images per "
            f"class, the {split} split has a class with {smallest}; lower queries or shots"
        )


def taskset(meta: Any, spec: EpisodeSpec, num_tasks: int = -1) -> Any:
    """A ``learn2learn.data.Taskset`` of ``spec`` episodes over the ``MetaDataset`` ``meta``.

    Args:
        meta: from :func:`meta_dataset`.
        spec: ways, shots and queries.
        num_tasks: ``-1`` samples a new task at every access; ``n > 0`` caches ``n`` task descriptions.

    Raises:
        TaskConfigError: when ``meta`` cannot make ``spec`` episodes (:func:`check_spec`).
    """
    l2l = learn2learn()
    check_spec(meta, spec, "given")
    transforms = [
        l2l.data.transforms.NWays(meta, spec.ways),
        l2l.data.transforms.KShots(meta, spec.shots + spec.queries),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def split_episode(images: Tensor, labels: Tensor, ids: Tensor, shots: int) -> Episode:
    """Cut a task into support (the first ``shots`` images of each class) and query (the rest).

    Args:
        images: ``(ways * (shots + queries), C, H, W)``.
        labels: ``(ways * (shots + queries),)`` in ``0..ways-1``, the same count for every class.
        ids: the dataset index of every image.
        shots: support images per class.

    Raises:
        ValueError: when classes have different counts, or no more than ``shots`` images.
    """
    counts = torch.bincount(labels)
    ways, per_class = len(counts), int(counts[0])
    if bool((counts != per_class).any()) or per_class <= shots:
        raise ValueError(
            f"split_episode: every class needs the same number (> shots={shots}) of images, "
            f"got counts {counts.tolist()}"
        )
    order = torch.argsort(labels, stable=True).view(ways, per_class)
    support, query = order[:, :shots].reshape(-1), order[:, shots:].reshape(-1)
    return Episode(images[support], labels[support], images[query], labels[query], ids[support], ids[query])


class Episodes(Dataset):
    """``length`` episodes of a learn2learn task set, each split into support and query.

    Args:
        meta: a ``MetaDataset`` from :func:`meta_dataset`.
        spec: ways, shots and queries.
        length: episodes per pass (an epoch for training).
        seed: ``None`` draws a fresh random episode at every access (training); an int draws the
            ``length`` episodes once, up front, with Python's ``random`` seeded by it, then restores
            the global random state (evaluation: the same episodes on every run).
    """

    def __init__(self, meta: Any, spec: EpisodeSpec, length: int, seed: int | None = None) -> None:
        check_int("length", length, owner="Episodes")
        self.spec = spec
        self.length = length
        self.tasks = taskset(meta, spec, num_tasks=-1 if seed is None else length)
        if seed is not None:
            # learn2learn's transforms draw from the global `random`: seed it for the draw, then restore.
            state = random.getstate()
            random.seed(seed)
            try:
                for i in range(length):
                    self.tasks.sampled_descriptions[i] = self.tasks.sample_task_description()
            finally:
                random.setstate(state)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episode:
        if self.tasks.num_tasks == -1:
            description = self.tasks.sample_task_description()
        else:
            description = self.tasks.sampled_descriptions[index]
        images, labels = self.tasks.get_task(description)
        ids = torch.tensor([dd.index for dd in description])
        return split_episode(images, labels, ids, self.spec.shots)
