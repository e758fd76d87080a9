"""Few-shot data: glyph generator, dataset loaders, missing-data errors, episode construction."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.common.errors import DatasetNotFoundError
from tasks.fsl.datamodule import FewShotDataModule
from tasks.fsl.datasets import RotatedClasses, TensorImages, load_fewshot_data, prepare_fewshot_data
from tasks.fsl.episodes import Episodes, EpisodeSpec, meta_dataset, split_episode, taskset
from tasks.fsl.glyphs import GLYPH_SCRIPTS, Script, generate_glyphs, load_glyphs

pytestmark = pytest.mark.usefixtures("one_thread")



SMALL_SCRIPTS = (
    Script("greek", "train", ((0x3B1, 0x3C9),)),
    Script("armenian", "val", ((0x561, 0x570),)),
    Script("ogham", "test", ((0x1681, 0x168A),)),
)


# -- glyphs ------------------------------------------------------------------------------------
def test_glyph_generator_is_deterministic_in_its_seed():
    a = generate_glyphs(seed=3, images_per_class=4, scripts=SMALL_SCRIPTS)
    b = generate_glyphs(seed=3, images_per_class=4, scripts=SMALL_SCRIPTS)
    c = generate_glyphs(seed=4, images_per_class=4, scripts=SMALL_SCRIPTS)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.class_names == c.class_names  # the classes do not depend on the seed, the renderings do
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (4 * len(a.class_names), 28, 28) and a.images.dtype == np.uint8
    # white ink on black, every image has ink, images of a class differ (jitter)
    assert (a.images.reshape(len(a.images), -1).max(1) > 200).all()
    assert np.median(a.images) < 20
    assert not np.array_equal(a.images[0], a.images[1])


def test_glyph_splits_are_disjoint_by_script():
    glyphs = generate_glyphs(seed=0, images_per_class=2, scripts=SMALL_SCRIPTS)
    splits = {s: set(glyphs.split_classes(s)) for s in ("train", "val", "test")}
    assert all(splits.values())
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"])
    assert not splits["val"] & splits["test"]
    assert sum(len(s) for s in splits.values()) == len(glyphs.class_names)
    for split, classes in splits.items():
        scripts = {glyphs.class_names[c].split(":")[0] for c in classes}
        assert scripts == {s.name for s in SMALL_SCRIPTS if s.split == split}
    with pytest.raises(ValueError, match="split must be"):
        glyphs.split_classes("validation")


def test_default_scripts_assign_each_script_to_one_split():
    names = [s.name for s in GLYPH_SCRIPTS]
    assert len(names) == len(set(names))
    assert {s.split for s in GLYPH_SCRIPTS} == {"train", "val", "test"}
    assert {s.name for s in GLYPH_SCRIPTS if s.split == "train"} >= {"latin", "greek"}


def test_full_glyph_set_size_and_cache(glyph_root):
    glyphs = load_glyphs(glyph_root / "glyphs")
    counts = np.bincount(glyphs.labels)
    assert len(counts) >= 400 and counts.min() >= 10
    assert all(len(glyphs.split_classes(s)) >= 20 for s in ("train", "val", "test"))
    cached = sorted((glyph_root / "glyphs").glob("glyphs-v*.npz"))
    assert len(cached) == 1
    again = load_glyphs(glyph_root / "glyphs")  # from the cache
    assert np.array_equal(again.images, glyphs.images) and again.class_names == glyphs.class_names


def test_glyph_generator_rejects_bad_count():
    with pytest.raises(ValueError, match="images_per_class"):
        generate_glyphs(images_per_class=0, scripts=SMALL_SCRIPTS)


# -- omniglot, mini-imagenet, imagefolder ------------------------------------------------------
def _omniglot_tree(root, alphabets=3, characters=4, drawings=3):
    for part in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / part / f"{part[7:]}_alpha{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    pixels = np.full((105, 105), 255, np.uint8)  # white paper
                    pixels[10 + 5 * c : 30 + 5 * c, 20 + 10 * a : 25 + 10 * a + d] = 0  # black stroke
                    Image.fromarray(pixels).convert("1").save(folder / f"{a:02d}{c:02d}_{d:02d}.png")
    return 2 * alphabets * characters


@pytest.mark.parametrize("layout", ["unzipped", "omniglot-py"])
def test_omniglot_folder_loader(tmp_path, layout):
    root = tmp_path / "omniglot-py" if layout == "omniglot-py" else tmp_path
    n_chars = _omniglot_tree(root)
    data = load_fewshot_data("omniglot", tmp_path, seed=0)
    assert (data.in_channels, data.image_size) == (1, 28)
    classes = {s: set(ds.labels) for s, ds in data.splits.items()}
    assert sum(len(c) for c in classes.values()) == 4 * n_chars  # 90-degree rotations are classes
    assert not (classes["train"] & classes["val"] or classes["train"] & classes["test"])
    assert len(classes["train"]) == 4 * round(n_chars * 1100 / 1623)
    image, _ = data.splits["train"][0]
    assert image.shape == (1, 28, 28) and image.min() >= 0.0 and image.max() <= 1.0
    assert image.mean() < 0.3  # ink is bright on a dark background, as in learn2learn (1 - x)
    # the split is a function of the seed
    again = load_fewshot_data("omniglot", tmp_path, seed=0)
    assert set(again.splits["test"].labels) == classes["test"]
    other = load_fewshot_data("omniglot", tmp_path, seed=1, rotations=False)
    assert sum(len(set(ds.labels)) for ds in other.splits.values()) == n_chars


def test_rotated_classes_rotate_images():
    images = torch.arange(2 * 9, dtype=torch.uint8).view(2, 1, 3, 3)
    rotated = RotatedClasses(TensorImages(images, [0, 1]))
    assert len(rotated) == 8 and rotated.labels == [0, 4, 1, 5, 2, 6, 3, 7]
    image, label = rotated[2 + 1]  # item 1 rotated by 90 degrees
    assert label == 5
    assert torch.equal(image, torch.rot90(images[1].float() / 255, 1, dims=(-2, -1)))


def test_mini_imagenet_pickles(tmp_path):
    for mode, n_classes in (("train", 6), ("validation", 5), ("test", 5)):
        image_data = np.random.default_rng(0).integers(0, 255, (3 * n_classes, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{mode}{c}": list(range(3 * c, 3 * c + 3)) for c in range(n_classes)}
        with open(tmp_path / f"mini-imagenet-cache-{mode}.pkl", "wb") as fh:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, fh)
    data = load_fewshot_data("mini-imagenet", tmp_path)
    assert (data.in_channels, data.image_size) == (3, 84)
    assert [ds.num_classes() for ds in data.splits.values()] == [6, 5, 5]
    image, _ = data.splits["val"][4]
    assert image.shape == (3, 84, 84)
    small = load_fewshot_data("mini-imagenet", tmp_path, image_size=32)
    assert small.splits["test"][0][0].shape == (3, 32, 32)


def _image_tree(root, classes, per_class=3):
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (10 * c, 5 * i, 100)).save(root / f"class{c}" / f"{i}.png")


def test_imagefolder_single_tree_is_split_by_class(tmp_path):
    _image_tree(tmp_path, classes=10)
    data = load_fewshot_data("imagefolder", tmp_path, image_size=16)
    classes = {s: set(ds.labels) for s, ds in data.splits.items()}
    assert [len(c) for c in classes.values()] == [6, 2, 2]
    assert set().union(*classes.values()) == set(range(10))
    assert data.splits["test"][0][0].shape == (3, 16, 16)


def test_imagefolder_with_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _image_tree(tmp_path / split, classes=n)
    data = load_fewshot_data("imagefolder", tmp_path, image_size=8)
    assert [ds.num_classes() for ds in data.splits.values()] == [4, 2, 3]
    assert not set(data.splits["train"].labels) & set(data.splits["test"].labels)


@pytest.mark.parametrize("name, match", [
    ("omniglot", r"omniglot: dataset not found in .*nothing-here.*images_background/.*--download"),
    ("mini-imagenet", r"mini-imagenet: .*mini-imagenet-cache-train.pkl.*--download"),
    ("imagefolder", r"imagefolder: dataset not found in .*nothing-here.*--data-dir"),
])
def test_missing_data_is_a_one_line_error_with_the_fix(tmp_path, name, match):
    with pytest.raises(DatasetNotFoundError, match=match) as info:
        load_fewshot_data(name, tmp_path / "nothing-here")
    assert "\n" not in str(info.value)


def test_unknown_dataset_and_bad_size():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; choose from: glyphs, omniglot"):
        load_fewshot_data("mnist", "/tmp")
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare_fewshot_data("mnist", "/tmp")
    with pytest.raises(ValueError, match="image_size"):
        load_fewshot_data("glyphs", "/tmp", image_size=2)


# -- episodes ----------------------------------------------------------------------------------
def _numbered(classes=8, per_class=6):
    """Images whose single pixel holds their index; labels 10, 20, ... (not 0..N-1)."""
    n = classes * per_class
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return TensorImages(images, [10 * (i // per_class + 1) for i in range(n)])


def test_episode_construction():
    dataset = _numbered()
    meta = meta_dataset(dataset)
    spec = EpisodeSpec(ways=3, shots=2, queries=4)
    episodes = Episodes(meta, spec, length=5, seed=0)
    for index in range(len(episodes)):
        ep = episodes[index]
        assert ep.support.shape == (6, 1, 1, 1) and ep.query.shape == (12, 1, 1, 1)
        assert torch.bincount(ep.support_labels).tolist() == [2, 2, 2]
        assert torch.bincount(ep.query_labels).tolist() == [4, 4, 4]
        # support and query never share an image; images are the ones their ids name
        assert not set(ep.support_ids.tolist()) & set(ep.query_ids.tolist())
        assert torch.equal((ep.support.flatten() * 255).round().long(), ep.support_ids)
        assert torch.equal((ep.query.flatten() * 255).round().long(), ep.query_ids)
        # each remapped label 0..2 is one original class, the same in support and query
        mapping = {}
        for ids, labels in ((ep.support_ids, ep.support_labels), (ep.query_ids, ep.query_labels)):
            for i, y in zip(ids.tolist(), labels.tolist(), strict=True):
                assert mapping.setdefault(y, dataset.labels[i]) == dataset.labels[i]
        assert sorted(mapping) == [0, 1, 2] and len(set(mapping.values())) == 3


def test_evaluation_episodes_are_fixed_by_their_seed():
    meta = meta_dataset(_numbered())
    spec = EpisodeSpec(5, 1, 3)
    state = random.getstate()
    a = Episodes(meta, spec, 20, seed=7)
    assert random.getstate() == state  # the global random state is left alone
    b = Episodes(meta, spec, 20, seed=7)
    c = Episodes(meta, spec, 20, seed=8)
    ids = [lambda e, i=i: torch.cat([e[i].support_ids, e[i].query_ids]) for i in range(20)]
    assert all(torch.equal(f(a), f(b)) for f in ids)
    assert not all(torch.equal(f(a), f(c)) for f in ids)
    assert torch.equal(a[3].support_ids, a[3].support_ids)  # re-reading an episode gives it again


def test_training_episodes_are_fresh_draws():
    episodes = Episodes(meta_dataset(_numbered()), EpisodeSpec(3, 1, 2), length=10)
    assert len(episodes) == 10
    draws = {tuple(episodes[0].support_ids.tolist()) for _ in range(10)}
    assert len(draws) > 1


def test_episode_errors():
    meta = meta_dataset(_numbered(classes=4, per_class=5))
    with pytest.raises(ValueError, match="need >= 6 classes"):
        taskset(meta, EpisodeSpec(6, 1, 1))
    with pytest.raises(ValueError, match=r"shots \+ queries = 6 images per class.*with 5"):
        taskset(meta, EpisodeSpec(2, 1, 5))
    with pytest.raises(ValueError, match="ways must be a positive int"):
        EpisodeSpec(0, 1, 1)
    with pytest.raises(ValueError, match="same number"):
        split_episode(torch.zeros(5, 1), torch.tensor([0, 0, 1, 1, 1]), torch.arange(5), shots=1)


def test_datamodule_serves_meta_batches_and_one_test_loader_per_shot(tmp_path):
    _image_tree(tmp_path, classes=20, per_class=7)
    dm = FewShotDataModule("imagefolder", str(tmp_path), batch_size=2, ways=3, shots=2, queries=2,
                           train_ways=5, train_queries=1, test_shots=[1, 2], episodes_per_epoch=4,
                           val_episodes=2, test_episodes=3, image_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.in_channels, dm.image_size) == (3, 8)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support.shape == (2, 5 * 2, 3, 8, 8) and batch.query.shape == (2, 5 * 1, 3, 8, 8)
    assert len(dm.train_dataloader()) == 2  # 4 episodes, 2 per optimizer step
    loaders = dm.test_dataloader()
    assert [next(iter(dl)).support.shape[1] for dl in loaders] == [3 * 2, 3 * 1]  # configured shots first
    with pytest.raises(ValueError, match="unknown dataset"):
        FewShotDataModule("cifar")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        FewShotDataModule(batch_size=0)
