"""Few-shot datasets, each as disjoint meta-train / meta-val / meta-test class splits.

========================= ==========================================================================
name                      source and split
========================= ==========================================================================
``glyphs`` (default)      characters rendered from matplotlib's fonts (:mod:`tasks.fsl.glyphs`),
                          28x28, split by script; generated once and cached.
``omniglot``              Omniglot from ``--data-dir`` (torchvision's ``omniglot-py/`` layout or the
                          unzipped ``images_background/`` + ``images_evaluation/`` folders); 28x28,
                          the 1623 characters shuffled with ``seed`` and split 1100/100/423 as in
                          learn2learn's benchmark, each rotated by 0/90/180/270 degrees into 4 classes.
``mini-imagenet``         learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl``, 84x84 RGB
                          (the Ravi & Larochelle 64/16/20 class split).
``imagefolder``           any folder-per-class tree: ``train/``, ``val/``, ``test/`` sub-trees, or one
                          tree whose classes are split 64/16/20 % with ``seed``; RGB, resized.
========================= ==========================================================================

Every split yields ``(image, label)`` with a float image in [0, 1] of shape ``(C, H, W)`` and an
int label (class ids are global, not remapped: episodes remap them).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.data import dataset_not_found
from tasks.common.validate import check_choice, check_int

from .glyphs import IMAGE_SIZE as GLYPH_SIZE
from .glyphs import load_glyphs
from .l2l import learn2learn

__all__ = [
    "DATASETS",
    "FewShotData",
    "LabeledDataset",
    "RotatedClasses",
    "TensorImages",
    "find_omniglot",
    "load_fewshot_data",
    "prepare_fewshot_data",
]

SPLITS = ("train", "val", "test")
OMNIGLOT_SPLIT = (1100, 100, 423)
OMNIGLOT_SIZE = 28
MINI_IMAGENET_SIZE = 84
IMAGEFOLDER_FRACTIONS = (0.64, 0.16)  # train, val; the rest is test (mini-ImageNet's 64/16/20)


class LabeledDataset(Dataset):
    """A map-style dataset of ``(image, label)`` that also knows every label without loading images.

    ``labels[i]`` is the label of item ``i``; learn2learn's ``MetaDataset`` is built from it directly
    instead of reading every sample once.
    """

    labels: list[int]

    def num_classes(self) -> int:
        """The number of distinct labels."""
        return len(set(self.labels))


class TensorImages(LabeledDataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)``, returned as floats in [0, 1].

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: ``N`` int labels.
        size: output side length; images are area-resized on the fly when it differs.
    """

    def __init__(self, images: Tensor, labels: Sequence[int], size: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"TensorImages: need uint8 images (N, C, H, W) and N labels, got {images.dtype} "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        self.images = images
        self.labels = [int(y) for y in labels]
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].float().div_(255.0)
        if self.size is not None and image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        return image, self.labels[index]


class _Subset(LabeledDataset):
    """Items ``indices`` of a dataset whose labels are known."""

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _ = self.base[self.indices[index]]
        return image, self.labels[index]


class RotatedClasses(LabeledDataset):
    """Every class of ``base`` four times, rotated by 0, 90, 180 and 270 degrees, as new classes.

    The Omniglot augmentation of Santoro et al. (2016) and Vinyals et al. (2016), also used by
    learn2learn's benchmark: item ``r * len(base) + i`` is item ``i`` rotated by ``r * 90`` degrees,
    with label ``4 * label + r``.
    """

    def __init__(self, base: LabeledDataset) -> None:
        self.base = base
        self.labels = [4 * y + r for r in range(4) for y in base.labels]

    def __len__(self) -> int:
        return 4 * len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rotation, item = divmod(index, len(self.base))
        image, _ = self.base[item]
        return torch.rot90(image, rotation, dims=(-2, -1)), self.labels[index]


@dataclass
class FewShotData:
    """The three class-disjoint splits of a few-shot dataset and its image shape."""

    splits: dict[str, LabeledDataset]
    in_channels: int
    image_size: int


def _partition(num_classes: int, seed: int, train: float, val: float) -> dict[str, list[int]]:
    """Class ids ``0..num_classes-1`` shuffled with ``seed`` and cut into train/val/test fractions."""
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    n_train, n_val = round(num_classes * train), round(num_classes * val)
    cut = n_train + n_val
    return {"train": order[:n_train], "val": order[n_train:cut], "test": order[cut:]}


# -- glyphs ------------------------------------------------------------------------------------
def _load_glyphs(root: Path, seed: int, size: int | None) -> FewShotData:
    glyphs = load_glyphs(root / "glyphs", seed=seed)
    images = torch.from_numpy(glyphs.images)[:, None]
    splits = {}
    for split in SPLITS:
        keep = np.isin(glyphs.labels, glyphs.split_classes(split)).nonzero()[0]
        splits[split] = TensorImages(images[keep], glyphs.labels[keep].tolist(), size)
    return FewShotData(splits, 1, size or GLYPH_SIZE)


# -- omniglot ----------------------------------------------------------------------------------
def find_omniglot(root: Path) -> Path | None:
    """The folder under ``root`` holding ``images_background/`` and ``images_evaluation/``, if any.

    Looks at ``root/omniglot-py`` (torchvision's layout), ``root`` itself (the unzipped release)
    and both under ``root/omniglot``.
    """
    for candidate in (root / "omniglot-py", root, root / "omniglot" / "omniglot-py", root / "omniglot"):
        if (candidate / "images_background").is_dir() and (candidate / "images_evaluation").is_dir():
            return candidate
    return None


def _download_omniglot(root: Path) -> None:
    from torchvision.datasets import Omniglot

    for background in (True, False):
        Omniglot(str(root), background=background, download=True)


def _read_omniglot_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from tasks.common.images import open_image

    resized = open_image(path, "L").resize((size, size), Image.LANCZOS)
    return 255 - np.asarray(resized, dtype=np.uint8)  # white ink on black, like learn2learn's 1 - x


def _load_omniglot(root: Path, seed: int, size: int | None) -> FewShotData:
    from tasks.common.images import screen

    folder = find_omniglot(root)
    if folder is None:
        raise dataset_not_found(
            "omniglot", root, "images_background/ and images_evaluation/, or omniglot-py/ holding them"
        )
    parts = ("images_background", "images_evaluation")
    characters = sorted(c for part in parts for c in (folder / part).glob("*/*") if c.is_dir())
    files = [sorted(c.glob("*.png")) for c in characters]
    total = sum(OMNIGLOT_SPLIT)
    class_sets = _partition(len(characters), seed, OMNIGLOT_SPLIT[0] / total, OMNIGLOT_SPLIT[1] / total)
    side = size or OMNIGLOT_SIZE
    splits: dict[str, LabeledDataset] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for split, classes in class_sets.items():
            samples = screen([(str(p), c) for c in classes for p in files[c]])  # bad files: stop or skip
            labels = [c for _, c in samples]
            arrays = list(pool.map(lambda sample: _read_omniglot_image(sample[0], side), samples))
            images = torch.from_numpy(np.stack(arrays).reshape(-1, 1, side, side))
            splits[split] = TensorImages(images, labels)
    return FewShotData(splits, 1, side)


# -- mini-ImageNet -----------------------------------------------------------------------------
_MINI_MODES = {"train": "train", "val": "validation", "test": "test"}


def _mini_imagenet_file(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{_MINI_MODES[split]}.pkl"


def _download_mini_imagenet(root: Path) -> None:
    l2l = learn2learn()
    for split, mode in _MINI_MODES.items():
        if not _mini_imagenet_file(root, split).is_file():
            l2l.vision.datasets.MiniImagenet(str(root), mode=mode, download=True)


def _load_mini_imagenet(root: Path, seed: int, size: int | None) -> FewShotData:
    """The split is fixed by the files: ``seed`` plays no part."""
    splits: dict[str, LabeledDataset] = {}
    for split in SPLITS:
        path = _mini_imagenet_file(root, split)
        if not path.is_file():
            raise dataset_not_found("mini-imagenet", root, f"learn2learn's {path.name}")
        with open(path, "rb") as fh:
            data = pickle.load(fh)
        labels = np.zeros(len(data["image_data"]), dtype=np.int64)
        for label, class_name in enumerate(sorted(data["class_dict"])):
            labels[data["class_dict"][class_name]] = label
        images = torch.from_numpy(np.ascontiguousarray(data["image_data"])).permute(0, 3, 1, 2).contiguous()
        splits[split] = TensorImages(images, labels.tolist(), size)
    return FewShotData(splits, 3, size or MINI_IMAGENET_SIZE)


# -- image folders -----------------------------------------------------------------------------
def _load_imagefolder(root: Path, seed: int, size: int | None) -> FewShotData:
    from torchvision import transforms

    from tasks.common.images import ImageFolder

    side = size or MINI_IMAGENET_SIZE
    transform = transforms.Compose(
        [transforms.Resize(side), transforms.CenterCrop(side), transforms.ToTensor()]
    )
    if not root.is_dir():
        raise dataset_not_found(
            "imagefolder", root, "a folder-per-class tree, or train/, val/ and test/ trees", download=False
        )
    if all((root / split).is_dir() for split in SPLITS):
        splits: dict[str, LabeledDataset] = {}
        offset = 0
        for split in SPLITS:
            folder = ImageFolder(str(root / split), transform=transform)
            splits[split] = _Subset(folder, range(len(folder)), [offset + t for t in folder.targets])
            offset += len(folder.classes)
        return FewShotData(splits, 3, side)
    folder = ImageFolder(str(root), transform=transform)
    splits = {}
    for split, classes in _partition(len(folder.classes), seed, *IMAGEFOLDER_FRACTIONS).items():
        wanted = set(classes)
        indices = [i for i, t in enumerate(folder.targets) if t in wanted]
        splits[split] = _Subset(folder, indices, [folder.targets[i] for i in indices])
    return FewShotData(splits, 3, side)


DATASETS: dict[str, Callable[[Path, int, int | None], FewShotData]] = {
    "glyphs": _load_glyphs,
    "omniglot": _load_omniglot,
    "mini-imagenet": _load_mini_imagenet,
    "imagefolder": _load_imagefolder,
}
"""Name -> loader ``(root, seed, image_size) -> FewShotData``."""


def prepare_fewshot_data(name: str, root: str | Path, seed: int = 0, download: bool = False) -> None:
    """Make sure the files :func:`load_fewshot_data` reads exist: render the glyph cache, or
    (``download=True``) fetch ``omniglot`` with torchvision / ``mini-imagenet`` with learn2learn.

    Raises:
        ValueError: for an unknown name.
    """
    check_choice("dataset", name, tuple(DATASETS))
    root = Path(root).expanduser()
    if name == "glyphs":
        load_glyphs(root / "glyphs", seed=seed)
    elif download and name == "omniglot" and find_omniglot(root) is None:
        _download_omniglot(root)
    elif download and name == "mini-imagenet":
        _download_mini_imagenet(root)


def load_fewshot_data(
    name: str,
    root: str | Path,
    seed: int = 0,
    image_size: int | None = None,
    download: bool = False,
    rotations: bool | None = None,
) -> FewShotData:
    """Load the few-shot dataset ``name`` as class-disjoint train/val/test splits.

    Args:
        name: one of :data:`DATASETS`.
        root: where the data lives (or, for ``glyphs``, where its cache goes).
        seed: seeds the glyph rendering and the class splits of ``omniglot`` and ``imagefolder``.
        image_size: output side length; ``None`` keeps the dataset's standard size.
        download: fetch ``omniglot`` (torchvision) or ``mini-imagenet`` (learn2learn) when missing.
        rotations: add 90/180/270-degree rotations of every class as new classes; ``None`` means
            the dataset's convention (on for ``omniglot``, off elsewhere).

    Raises:
        ValueError: for an unknown name or a bad ``image_size``.
        tasks.common.errors.DatasetNotFoundError: when the data is missing (a ``FileNotFoundError``
            whose one-line message says where it looked and how to get the data).
    """
    check_choice("dataset", name, tuple(DATASETS))
    check_int("image_size", image_size, minimum=8, optional=True, owner="fsl")
    if download:
        prepare_fewshot_data(name, root, seed, download=True)
    data = DATASETS[name](Path(root).expanduser(), seed, image_size)
    if (name == "omniglot") if rotations is None else rotations:
        data.splits = {split: RotatedClasses(ds) for split, ds in data.splits.items()}
    return data
