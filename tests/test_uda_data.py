"""The UDA suite's data: every on-disk format it loads (tiny copies written here), the embedded pair,
bringing two domains to one input, and the one-line errors for pairs it cannot adapt between."""

from __future__ import annotations

import bz2
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import svhn

from tasks.runner.cli import main
from tasks.uda.datamodule import DomainAdaptationDataModule, Unlabelled
from tasks.uda.synth_digits import IMAGE_SIZE, generate_synth_digits

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--max-epochs", "1", "--accelerator", "cpu", "--batch-size", "4",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def make_folder(root: Path, classes: tuple[str, ...], size: int, n: int, mode: str, splits: bool) -> Path:
    """``root/<class>/*.png`` (or ``root/{train,test}/<class>/*.png``) of random ``mode`` images."""
    rng = np.random.default_rng(len(classes) + size)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for split in ("train", "test") if splits else ("",):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")
    return root


def make_mnist(root: Path, n: int = 40) -> None:
    """``MNIST/raw``: the four big-endian IDX files."""
    rng = np.random.default_rng(2)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + images)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + labels.tobytes())


def make_usps(root: Path, n: int = 40) -> None:
    """``usps.bz2`` / ``usps.t.bz2``: LIBSVM lines ``label i:v ...`` with labels 1-10, values in [-1, 1]."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("usps.bz2", "usps.t.bz2"):
        values = rng.uniform(-1, 1, (n, 256))
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.3f}" for j, v in enumerate(row))
                 for i, row in enumerate(values)]  # fmt: skip
        (root / name).write_bytes(bz2.compress("\n".join(lines).encode()))


def make_svhn(root: Path, n: int = 40) -> None:
    """``train_32x32.mat`` / ``test_32x32.mat``: X of shape (32, 32, 3, N), y in 1..10."""
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def test_synthetic_digits_are_deterministic_rgb_and_balanced() -> None:
    images, labels = generate_synth_digits(seed=3, images_per_class=4)
    again, _ = generate_synth_digits(seed=3, images_per_class=4)
    assert images.shape == (40, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.bincount(labels).tolist() == [4] * 10
    assert images.std(axis=(1, 2, 3)).min() > 10  # every image has a digit on its background
    with pytest.raises(ValueError, match="images_per_class must be a positive int, got 0"):
        generate_synth_digits(images_per_class=0)


def test_default_pair_brings_both_domains_to_16px_rgb_and_hides_target_labels(tmp_path: Path) -> None:
    dm = DomainAdaptationDataModule(data_dir=str(tmp_path), batch_size=8, synth_per_class=6)
    assert (dm.pair, dm.num_classes, dm.in_channels, dm.image_size) == ("synth→digits", 10, 3, 16)
    assert list((tmp_path / "uda").glob("synth-digits-v*.npz")), "the rendering is cached under data_dir/uda"
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 50 and len(dm.test_set) == 10
    x, y = dm.train_set[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 10
    target = dm.target_train_set[0]
    assert isinstance(dm.target_train_set, Unlabelled) and isinstance(target, torch.Tensor)
    assert target.shape == (3, 16, 16) and torch.equal(target[0], target[1])  # grey repeated to RGB
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"source", "target"} and isinstance(batch["target"], torch.Tensor)
    adapt = [batch.shape for batch in dm.adapt_dataloader()]
    assert len(adapt) == len(dm.target_train_set) // 8 and set(adapt) == {(8, 3, 16, 16)}


def test_folder_domains_with_splits_and_flat_are_brought_to_one_size(tmp_path: Path) -> None:
    classes = ("a", "b", "c")
    source = make_folder(tmp_path / "big", classes, 28, 4, "L", splits=True)
    target = make_folder(tmp_path / "small", classes, 16, 10, "L", splits=False)
    dm = DomainAdaptationDataModule("folders", batch_size=2, source_dir=str(source), target_dir=str(target))
    assert (dm.pair, dm.num_classes, dm.in_channels, dm.image_size) == ("big→small", 3, 1, 28)
    dm.setup()
    assert len(dm.test_set) == 12 and len(dm.target_test_set) == 6  # train/test as given; flat: 20 % held out
    assert dm.target_test_set[0][0].shape == (1, 28, 28) and dm.target_train_set[0].shape == (1, 28, 28)
    again = DomainAdaptationDataModule("folders", source_dir=str(source), target_dir=str(target))
    assert again.domains[1].test.indices == dm.domains[1].test.indices  # a fixed seeded split
    other = DomainAdaptationDataModule("folders", source_dir=str(source), target_dir=str(target),
                                       split_seed=1)  # fmt: skip
    assert other.domains[1].test.indices != dm.domains[1].test.indices


def test_grey_and_rgb_folders_meet_at_rgb_and_large_images_at_224(tmp_path: Path) -> None:
    classes = ("a", "b")
    rgb = make_folder(tmp_path / "rgb", classes, 20, 5, "RGB", splits=False)
    grey = make_folder(tmp_path / "grey", classes, 12, 5, "L", splits=False)
    dm = DomainAdaptationDataModule("folders", batch_size=2, source_dir=str(rgb), target_dir=str(grey))
    assert (dm.in_channels, dm.image_size) == (3, 20)
    dm.setup()
    x = dm.target_test_set[0][0]
    assert x.shape == (3, 20, 20) and torch.equal(x[0], x[2])
    grey_only = DomainAdaptationDataModule("folders", source_dir=str(rgb), target_dir=str(grey), channels=1)
    grey_only.setup()
    assert grey_only.test_set[0][0].shape == (1, 20, 20)
    large = make_folder(tmp_path / "large", classes, 64, 2, "RGB", splits=False)
    assert DomainAdaptationDataModule("folders", source_dir=str(large), target_dir=str(rgb)).image_size == 224


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svhn, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize(("pair", "makers", "channels", "size"), [
    ("mnist→usps", (make_mnist, make_usps), 1, 28),
    ("usps→mnist", (make_usps, make_mnist), 1, 28),
    ("svhn→mnist", (make_svhn, make_mnist), 3, 32),
])  # fmt: skip
def test_torchvision_pairs_load(pair, makers, channels, size, tmp_path: Path, no_md5: None) -> None:
    for make in makers:
        make(tmp_path)
    dm = DomainAdaptationDataModule(pair, data_dir=str(tmp_path), batch_size=4)
    assert (dm.pair, dm.num_classes, dm.in_channels, dm.image_size) == (pair, 10, channels, size)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 40 and len(dm.target_train_set) == 40
    assert dm.train_set[0][0].shape == dm.target_test_set[0][0].shape == (channels, size, size)


def test_folder_pair_run_names_both_domains_in_results(tmp_path: Path) -> None:
    classes = tuple("0123")
    source = make_folder(tmp_path / "mnist", classes, 28, 4, "L", splits=True)
    target = make_folder(tmp_path / "usps", classes, 16, 4, "L", splits=True)
    out = tmp_path / "run"
    argv = ["uda", "--data", "folders", "--source-dir", str(source), "--target-dir", str(target),
            "--output", str(out), "--data.image_size", "16", *TINY]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["dataset"] == "folders" and record["domains"] == "mnist→usps"
    assert (record["source_domain"], record["target_domain"]) == ("mnist", "usps")
    assert record["hparams"]["num_classes"] == 4 and record["hparams"]["in_channels"] == 1


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {
        "three": make_folder(tmp_path / "three", ("a", "b", "c"), 16, 2, "L", splits=False),
        "two": make_folder(tmp_path / "two", ("a", "b"), 16, 2, "L", splits=False),
        "other": make_folder(tmp_path / "other", ("a", "b", "z"), 16, 2, "L", splits=False),
    }


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "folders", "--source-dir", "{three}", "--target-dir", "{two}"],
     "source 'three' has 3 classes (a, b, c...), target 'two' has 2 (a, b...)"),
    (["--data", "folders", "--source-dir", "{three}", "--target-dir", "{other}"], "target 'other' has 3"),
    (["--data", "folders", "--source-dir", "{three}", "--target-dir", "{three}/missing"],
     "domain folder 'missing': dataset not found in"),
    (["--data", "folders", "--source-dir", "{three}", "--target-dir", "{two}/a"],  # no class folders
     "domain folder 'a': dataset not found in"),
    (["--data", "folders", "--source-dir", "{three}/missing", "--target-dir", "{two}"],
     "pass --source-dir to point at a copy"),
    (["--data", "folders", "--source-dir", "{three}"],
     "dataset 'folders' needs both domain folders; pass --target-dir DIR"),
    (["--data", "folders", "--source-dir", "{three}", "--target-dir", ""], "pass --target-dir DIR"),
    (["--source-dir", "{three}", "--target-dir", "{two}"], "read with dataset 'folders' only"),
    (["--data", "mnist→usps", "--data-dir", "{three}/empty"], "mnist: dataset not found in"),
    (["--data.channels", "2"], "channels must be 1, 3 or None (from the domains), got 2"),
    (["--method", "dan"], "unknown method 'dan'; choose from: dann, source_only"),
    (["--domain-mode", "mixed"], "unknown domain mode 'mixed'; choose from: joint, separate"),
    (["--norm", "in"], "head_norm 'in': instance norm"),
])  # fmt: skip
def test_bad_pairs_and_options_are_one_line_errors(args, message, folders, tmp_path: Path, capsys) -> None:
    argv = ["uda", "--output", str(tmp_path / "run"), *[a.format(**folders) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_office31_config_is_the_reference_protocol_on_fake_office_folders(tmp_path: Path) -> None:
    """All source and all target images train, the target is tested on all of them, no source
    hold-out; λ ramps as 2 / (1 + exp(-i / 1000)) - 1 and the rate decays as (1 + 0.001 i)^-0.75."""
    import yaml

    from tasks.uda.dann import annealed_lr_factor, grl_coefficient

    config = Path(__file__).resolve().parents[1] / "configs" / "uda_office31.yaml"
    spec = yaml.safe_load(config.read_text())
    classes = ("back_pack", "bike", "calculator")  # flat <domain>/<class>/<image> folders, 64 px
    amazon = make_folder(tmp_path / "amazon", classes, 64, 5, "RGB", splits=False)
    webcam = make_folder(tmp_path / "webcam", classes, 64, 3, "RGB", splits=False)
    data = {k: v for k, v in spec["data"].items() if k not in ("num_workers", "image_size")}
    dm = DomainAdaptationDataModule(**data, source_dir=str(amazon), target_dir=str(webcam), image_size=64)
    dm.setup()
    assert len(dm.train_set) == 15 and len(dm.val_set) == 0 and len(dm.test_set) == 15
    assert len(dm.target_train_set) == len(dm.target_test_set) == 9
    model, sgd, steps = spec["model"], spec["model"]["sgd"], spec["trainer"]["max_steps"]
    for i in (0, 500, 1000, 5000, steps):
        ramp = 2 / (1 + np.exp(-i / 1000)) - 1
        assert grl_coefficient(i / steps, model["grl_gamma"]) == pytest.approx(ramp)
        assert annealed_lr_factor(i / steps, sgd["lr_alpha"], sgd["lr_beta"]) == pytest.approx(
            (1 + 0.001 * i) ** -0.75
        )  # fmt: skip
    out = tmp_path / "run"  # the config's wiring end to end, small: a CNN, 64 px, 2 steps, CPU
    argv = ["uda", "--config", str(config), "--source-dir", str(amazon), "--target-dir", str(webcam),
            "--output", str(out), "--model.backbone", "small_cnn", "--model.bottleneck_dim", "8",
            "--model.discriminator_hidden", "8", "--data.image_size", "64", "--data.num_workers", "0",
            "--batch-size", "4", "--accelerator", "cpu", "--trainer.precision", "32",
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["global_step"] == 2 and not any(k.startswith("val/") for k in record["metrics"])
    assert {"test/target_acc", "test/source_acc", "test/domain_acc"} <= set(record["metrics"])
