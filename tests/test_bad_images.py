"""Bad image files are found and named: one line and exit 2 (``stop``), or left out (``skip``)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from tasks.common.images import POLICY, BadImageError, ImageFolder, open_image
from tasks.runner.cli import main
from tests.test_classification_datasets import make_imagefolder
from tests.test_uda_data import make_folder

QUICK = [
    "--max-epochs", "1", "--accelerator", "cpu", "--batch-size", "4", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_policy() -> Iterator[None]:
    POLICY.set()
    yield
    POLICY.set()


def _truncated(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("extension", sorted(IMG_EXTENSIONS))
def test_a_text_file_of_every_image_format_is_named(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"00007{extension}"
    path.write_text("not an image\n")
    with pytest.raises(
        BadImageError, match=rf"^bad image file {path}: cannot identify image file.*--bad-images skip"
    ):
        open_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_named(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(_truncated(fmt))
    with pytest.raises(BadImageError, match=f"bad image file {path}: "):
        open_image(path)


def test_image_folder_stops_skips_or_checks(tmp_path: Path, caplog) -> None:
    make_imagefolder(tmp_path, ("train",), size=8, n=3)
    bad = tmp_path / "train" / "dog" / "001.png"
    bad.write_text("text")
    folder = ImageFolder(str(tmp_path / "train"))  # stop, unchecked: named when drawn
    assert len(folder) == 9
    with pytest.raises(BadImageError, match=f"bad image file {bad}"):
        folder[4]
    POLICY.set(check_data=True)
    with pytest.raises(BadImageError, match=f"bad image file {bad}: .* \\(and 1 more\\)"):
        (tmp_path / "train" / "owl" / "000.png").write_bytes(_truncated("PNG"))
        ImageFolder(str(tmp_path / "train"))
    POLICY.set("skip")
    with caplog.at_level(logging.WARNING, logger="tasks"):
        folder = ImageFolder(str(tmp_path / "train"))
    assert len(folder) == 7 and len(folder.targets) == 7 and all(folder[i] for i in range(7))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"skipping bad image file {bad}",
        f"skipping bad image file {tmp_path / 'train' / 'owl' / '000.png'}",
    ]
    assert POLICY.record() == {
        "bad_images": "skip",
        "checked": 9,
        "skipped": [str(bad), str(tmp_path / "train/owl/000.png")],
    }


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_classification_stops_on_a_bad_file_or_skips_it(tmp_path: Path, capsys, caplog) -> None:
    data = tmp_path / "data"
    make_imagefolder(data, ("train", "val", "test"), size=8, n=4)
    bad = data / "train" / "cat" / "002.png"
    bad.write_text("a text file saved as png")
    argv = ["classification", "--data", "imagefolder", "--data-dir", str(data), *QUICK]
    assert main([*argv, "--output", str(tmp_path / "stop")]) == 2  # drawn in the first epoch
    err = _last_error(capsys)
    assert err.startswith(f"bgn-task: error: bad image file {bad}: cannot identify image file")
    assert main([*argv, "--output", str(tmp_path / "skip"), "--bad-images", "skip"]) == 0
    record = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert record["images"] == {"bad_images": "skip", "checked": 36, "skipped": [str(bad)]}
    assert record["bgn_kernels"] in ("cpu: C++ kernels", "cpu: native ops")
    assert f"skipping bad image file {bad}" in caplog.text


def test_adversarial_check_data_finds_a_bad_file_before_training(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    make_imagefolder(data, ("train", "val", "test"), size=8, n=4)
    bad = data / "test" / "owl" / "003.jpg"
    bad.write_bytes(_truncated("JPEG"))
    argv = ["adversarial", "--data", "imagefolder", "--data-dir", str(data), "--check-data", *QUICK]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 2
    assert _last_error(capsys).startswith(f"bgn-task: error: bad image file {bad}: ")
    assert not (tmp_path / "run").exists()


def test_uda_folders_name_a_bad_target_file(tmp_path: Path, capsys) -> None:
    source = make_folder(tmp_path / "src", ("a", "b"), size=8, n=6, mode="RGB", splits=False)
    target = make_folder(tmp_path / "tgt", ("a", "b"), size=8, n=6, mode="RGB", splits=False)
    bad = target / "b" / "004.png"
    bad.write_text("not a png")
    argv = ["uda", "--data", "folders", "--source-dir", str(source), "--target-dir", str(target), *QUICK]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 2
    assert _last_error(capsys).startswith(
        f"bgn-task: error: bad image file {bad}: cannot identify image file"
    )


def test_fsl_image_folders_skip_a_bad_file(tmp_path: Path) -> None:
    from tasks.fsl.datasets import load_fewshot_data

    make_folder(tmp_path, tuple("abcdefghij"), size=8, n=3, mode="RGB", splits=False)
    bad = tmp_path / "c" / "001.png"
    bad.write_text("x")
    POLICY.set(check_data=True)
    with pytest.raises(BadImageError, match=f"bad image file {bad}"):
        load_fewshot_data("imagefolder", tmp_path, image_size=8)
    POLICY.set("skip")
    data = load_fewshot_data("imagefolder", tmp_path, image_size=8)
    assert sum(len(split) for split in data.splits.values()) == 29 and POLICY.skipped == [str(bad)]


def test_a_bad_file_met_in_a_dataloader_worker_is_still_one_line(tmp_path: Path) -> None:
    from torch._utils import ExceptionWrapper

    from tasks.runner.failure import one_line as _last_line

    path = tmp_path / "00007.png"
    path.write_text("text")
    try:
        open_image(path)
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    with pytest.raises(BadImageError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert _last_line(raised.value).startswith(f"bad image file {path}: cannot identify image file")


def test_fsl_omniglot_names_a_bad_file_or_skips_it(tmp_path: Path) -> None:
    from tasks.fsl.datasets import load_fewshot_data
    from tests.test_fsl_data import _omniglot_tree

    _omniglot_tree(tmp_path)
    bad = tmp_path / "images_evaluation" / "evaluation_alpha1" / "character02" / "0101_02.png"
    bad.write_bytes(_truncated("PNG"))
    with pytest.raises(BadImageError, match=f"bad image file {bad}: "):
        load_fewshot_data("omniglot", tmp_path, seed=0)
    POLICY.set("skip")
    data = load_fewshot_data("omniglot", tmp_path, seed=0)
    assert sum(len(split) for split in data.splits.values()) == 4 * 71  # 72 drawings less one, 4 rotations
    assert POLICY.skipped == [str(bad)]
