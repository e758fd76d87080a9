"""Small ImageFolder images are decoded once into memory and an on-disk cache, with the same pixels."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.common.image_cache as image_cache
from tasks.common.image_cache import DecodedImages
from tasks.common.images import POLICY, BadImageError, ImageFolder
from tasks.common.vision import VisionDataModule


@pytest.fixture(autouse=True)
def _fresh_policy() -> Iterator[None]:
    POLICY.set()
    yield
    POLICY.set()


def _tree(root: Path, size: int = 12, n: int = 4, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """``root/<split>/<class>/``: JPEGs, RGB PNGs and greyscale PNGs (read as RGB) of ``size`` px."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i % 3 == 0:
                    image.save(root / split / c / f"{i}.jpg", quality=90)
                elif i % 3 == 1:
                    image.save(root / split / c / f"{i}.png")
                else:
                    image.convert("L").save(root / split / c / f"{i}.png")
    return root


def _module(root: Path, cache: bool) -> VisionDataModule:
    dm = VisionDataModule("imagefolder", str(root), batch_size=4, val_fraction=0.25, cache_images=cache)
    dm.setup()
    return dm


def _epoch(dm: VisionDataModule, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # the shuffle and the v2 transforms draw from the global generator
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    return [t for loader in loaders for batch in loader for t in batch]


def test_cached_and_lazy_splits_give_the_same_tensors(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    cached, lazy = _module(root, cache=True), _module(root, cache=False)
    assert type(cached.train_set.dataset) is DecodedImages and type(cached.test_set.dataset) is DecodedImages
    assert cached.val_set.dataset is cached.train_set.dataset and type(lazy.train_set.dataset) is ImageFolder
    for seed in (0, 1):
        a, b = _epoch(cached, seed), _epoch(lazy, seed)
        assert len(a) == 2 * (1 + 1 + 2) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(_epoch(cached, 0)[0], _epoch(cached, 1)[0])  # augmentation is on


def _cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    monkeypatch.setenv("BGN_CACHE_DIR", str(root))
    return root / "decoded"


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, monkeypatch, caplog) -> None:
    root, cache = _tree(tmp_path / "data"), _cache(monkeypatch, tmp_path / "cache")
    first = _module(root, cache=True)
    files = sorted(p.name for p in cache.iterdir())
    assert [name.split("-")[0] for name in files] == ["test", "train"]
    with monkeypatch.context() as patch:
        patch.setattr(image_cache, "open_image", lambda *_: pytest.fail("decoded again"))
        again = _module(root, cache=True)
    assert torch.equal(again.train_set.dataset.images, first.train_set.dataset.images)

    changed = root / "train" / "bee" / "1.png"
    Image.new("RGB", (12, 12), (7, 8, 9)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime whatever the clock's resolution
    rebuilt = _module(root, cache=True).train_set.dataset
    new = sorted({p.name for p in cache.iterdir()} - set(files))
    assert len(new) == 1 and new[0].startswith("train-")
    k = [path for path, _ in ImageFolder(str(root / "train")).samples].index(str(changed))
    assert rebuilt.images[k].tolist() == [[[v] * 12] * 12 for v in (7, 8, 9)]

    (cache / new[0]).write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="tasks"):
        assert torch.equal(_module(root, cache=True).train_set.dataset.images, rebuilt.images)
    assert "is unreadable" in caplog.text and torch.equal(torch.load(cache / new[0]), rebuilt.images)


def test_an_unwritable_cache_keeps_the_images_in_memory(tmp_path: Path, monkeypatch, caplog) -> None:
    root = _tree(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    _cache(monkeypatch, tmp_path / "file")  # mkdir fails (also for root, who may write anywhere)
    with caplog.at_level(logging.WARNING, logger="tasks"):
        dm = _module(root, cache=True)
    assert type(dm.train_set.dataset) is DecodedImages and "image cache not written" in caplog.text

    cache = _cache(monkeypatch, tmp_path / "cache")

    def cut_short(images: torch.Tensor, out) -> None:
        out.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    assert type(_module(root, cache=True).test_set.dataset) is DecodedImages
    assert list(cache.iterdir()) == []  # neither a cache file nor a temporary one is left


def test_bad_files_stop_or_are_skipped_as_without_the_cache(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    bad = root / "train" / "ant" / "2.png"
    bad.write_text("a text file saved as png")
    with pytest.raises(BadImageError, match=f"^bad image file {bad}: cannot identify image file"):
        _module(root, cache=True)  # stop: the same line, at set-up rather than when drawn
    POLICY.set("skip")
    dm = _module(root, cache=True)
    assert len(dm.train_set.dataset) == 7 and POLICY.skipped == [str(bad)]
    lazy = _epoch(_module(root, cache=False), 0)
    assert all(torch.equal(x, y) for x, y in zip(_epoch(dm, 0), lazy, strict=True))


def test_large_or_mixed_images_are_decoded_on_access(tmp_path: Path) -> None:
    assert type(_module(_tree(tmp_path / "large", size=64), cache=True).train_set.dataset) is ImageFolder
    mixed = _tree(tmp_path / "mixed")
    Image.new("RGB", (12, 10)).save(mixed / "test" / "bee" / "9.png")
    dm = _module(mixed, cache=True)
    assert type(dm.train_set.dataset) is DecodedImages and type(dm.test_set.dataset) is ImageFolder
