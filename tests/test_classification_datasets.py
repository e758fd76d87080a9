"""Every classification dataset path, on tiny copies of the real on-disk formats made in the test.

Each dataset kind gets a DataModule test (splits, shapes, classes) and a 1-epoch ``bgn-task``
run that writes results.json. torchvision checks the md5 of the official CIFAR and SVHN files;
the fake files cannot match, so those checks are patched to "file exists".
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import cifar, svhn

from tasks.common.vision import VisionDataModule
from tasks.runner.cli import main

TINY_RUN = [
    "--max-epochs", "1", "--batch-size", "4", "--accelerator", "cpu",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--model.backbone", "small_cnn",
]  # fmt: skip


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def make_cifar10(root: Path, per_batch: int = 20) -> None:
    """``cifar-10-batches-py``: 5 train batches + test batch (latin1 pickles) and ``batches.meta``."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": _images(rng, per_batch, (3072,)), "labels": [i % 10 for i in range(per_batch)]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def make_cifar100(root: Path, n: int = 200) -> None:
    """``cifar-100-python``: ``train``, ``test`` with ``fine_labels``, ``meta`` with ``fine_label_names``."""
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        split = {"data": _images(rng, n, (3072,)), "fine_labels": [i % 100 for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(split))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def make_mnist(root: Path, n: int = 40) -> None:
    """``MNIST/raw``: the four big-endian IDX files (magic 2051 images, 2049 labels)."""
    rng = np.random.default_rng(2)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        images = _images(rng, n, (28, 28)).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + images)
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + labels.tobytes())


def make_svhn(root: Path, n: int = 40) -> None:
    """``train_32x32.mat`` / ``test_32x32.mat``: X of shape (32, 32, 3, N), y in 1..10 (10 is digit 0)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        x = _images(rng, n, (32, 32, 3)).transpose(1, 2, 3, 0)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def make_imagefolder(root: Path, splits: tuple[str, ...], size: int, n: int) -> None:
    """``root/<split>/<class>/*.png`` with three classes of RGB PNGs."""
    rng = np.random.default_rng(4)
    for split in splits:
        for c in ("cat", "dog", "owl"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_images(rng, 1, (size, size, 3))[0]).save(folder / f"{i:03d}.png")


MAKERS = {
    "cifar10": (make_cifar10, 10, 3, 32),
    "cifar100": (make_cifar100, 100, 3, 32),
    "mnist": (make_mnist, 10, 1, 28),
    "svhn": (make_svhn, 10, 3, 32),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_torchvision_formats_load_with_a_fixed_val_split(name: str, tmp_path: Path, no_md5: None) -> None:
    make, num_classes, channels, size = MAKERS[name]
    make(tmp_path)
    dm = VisionDataModule(name, str(tmp_path), batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    n_train = len(dm.train_set) + len(dm.val_set)
    assert len(dm.val_set) == pytest.approx(0.25 * n_train, abs=1)
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    assert (dm.num_classes, dm.in_channels) == (num_classes, channels)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, channels, size, size) and x.dtype == torch.float32 and y.dtype == torch.long
    xv, _ = next(iter(dm.val_dataloader()))
    assert abs(float(xv.mean())) < 1.5  # normalised, not raw [0, 255]
    again = VisionDataModule(name, str(tmp_path), batch_size=4, val_fraction=0.25)
    again.setup("fit")
    assert np.array_equal(again.val_set.indices, dm.val_set.indices)


@pytest.mark.parametrize("name", list(MAKERS))
def test_missing_torchvision_dataset_is_a_one_line_error(name: str, tmp_path: Path, capsys) -> None:
    code = main(["classification", "--data", name, "--data-dir", str(tmp_path / "none"), *TINY_RUN,
                 "--output", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"bgn-task: error: {name}: dataset not found in '{tmp_path / 'none'}'")
    assert "--download" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("name", list(MAKERS))
def test_one_epoch_run_per_torchvision_format(name: str, tmp_path: Path, no_md5: None) -> None:
    MAKERS[name][0](tmp_path / "data")
    out = tmp_path / "out"
    assert main(["classification", "--data", name, "--data-dir", str(tmp_path / "data"), "--norm", "bgn",
                 *TINY_RUN, "--output", str(out)]) == 0  # fmt: skip
    record = json.loads((out / "results.json").read_text())
    assert record["dataset"] == name and record["epochs"] == 1
    assert 0.0 <= record["metrics"]["test/acc"] <= 1.0
    assert record["hparams"]["num_classes"] == MAKERS[name][1]


def test_imagefolder_carves_val_from_train_and_tests_on_val(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, ("train", "val"), size=16, n=8)
    dm = VisionDataModule("imagefolder", str(tmp_path), batch_size=4, val_fraction=0.25)
    assert (dm.num_classes, dm.image_size) == (3, 16)  # small images keep their size
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 24)
    assert dm.test_set.dataset.root.endswith("val")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1, 2}


def test_imagefolder_with_val_and_test_uses_both(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, ("train", "val", "test"), size=80, n=4)
    dm = VisionDataModule("imagefolder", str(tmp_path), batch_size=2, image_size=64)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 12, 12)
    assert dm.val_set.dataset.root.endswith("val") and dm.test_set.dataset.root.endswith("test")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64)  # random-resized crops for large images
    assert VisionDataModule("imagefolder", str(tmp_path)).image_size == 224


def test_imagefolder_one_epoch_run(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "data", ("train", "test"), size=16, n=8)
    out = tmp_path / "out"
    data = str(tmp_path / "data")
    args = ["--data", "imagefolder", "--data-dir", data, "--norm", "gn", "--groups", "4", *TINY_RUN]
    assert main(["classification", *args, "--output", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["hparams"]["num_classes"] == 3 and record["groups"] == 4
    assert set(record["num_groups"]["histogram"]) == {"4"}  # every GroupNorm got G = 4


def test_imagefolder_missing_tree_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["classification", "--data", "imagefolder", "--data-dir", str(tmp_path), *TINY_RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bgn-task: error: imagefolder: dataset not found in '{tmp_path}'")
    assert "\n" not in err


def test_digits_split_is_fixed_and_stratified() -> None:
    dm = VisionDataModule("digits", batch_size=16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1293, 144, 360)
    test_labels = np.array([int(dm.test_set.dataset.tensors[1][i]) for i in dm.test_set.indices])
    assert np.bincount(test_labels).min() >= 35  # ~36 per class: stratified
    assert next(iter(dm.train_dataloader()))[0].shape == (16, 1, 8, 8)
    plain = dm.val_set[0][0]
    assert torch.equal(plain, dm.val_set[0][0])  # evaluation is deterministic
    shifted = {tuple(dm.train_set[0][0].flatten().tolist()) for _ in range(20)}
    assert len(shifted) > 1  # training images are randomly shifted


def test_datamodule_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; choose from: digits, cifar10"):
        VisionDataModule("imagenet")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        VisionDataModule("digits", batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        VisionDataModule("digits", val_fraction=0.0)
