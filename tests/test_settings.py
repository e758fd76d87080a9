"""Settings groups (model.sgd, model.attack, model.search, model.retrain); earlier versions' flat keys."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from tasks.classification.model import ClassificationModule
from tasks.common.contract import check_axis
from tasks.common.optim import SGDSettings
from tasks.common.settings import CLI_INSTANTIATOR
from tasks.nas import DartsSearchModule
from tasks.nas.module import RetrainSettings, SearchSettings
from tasks.runner.cli import main
from tasks.runner.discovery import available_tasks, load_task
from tasks.uda.module import DANNModule, DannSGDSettings

FLAT = {"norm": "gn", "lr": 0.05, "base_batch_size": 64, "warmup_epochs": 0.5, "milestones": [0.5]}
NESTED = {"norm": "gn", "sgd": {"lr": 0.05, "base_batch_size": 64, "warmup_epochs": 0.5, "milestones": [0.5]}}


def _printed(capsys, *argv: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_flat_config_and_a_nested_one_give_the_same_model(tmp_path: Path, capsys) -> None:
    configs = {}
    for name, model in (("flat", FLAT), ("nested", NESTED)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": model}))
        configs[name] = _printed(capsys, "classification", "--config", str(path))
    assert configs["flat"] == configs["nested"]
    assert configs["flat"]["model"]["sgd"]["base_batch_size"] == 64 and "lr" not in configs["flat"]["model"]
    flags = ["--model.lr", "0.05", "--model.sgd.base_batch_size", "64", "--model.warmup_epochs=0.5"]
    flags += ["--model.milestones", "[0.5]", "--norm", "gn"]
    assert _printed(capsys, "classification", *flags) == configs["nested"]


# The optimiser groups of UDA (model.sgd, DannSGDSettings) and of NAS's search (model.search), beside
# a key that stays the model's own (trade_off) or another group's flat key (NAS's eval_lr).
GROUPED = {
    "uda": ({"lr": 0.02, "lr_alpha": 5.0, "backbone_lr_mult": 0.5, "nesterov": False, "trade_off": 0.3},
            {"sgd": {"lr": 0.02, "lr_alpha": 5.0, "backbone_lr_mult": 0.5, "nesterov": False},
             "trade_off": 0.3}),
    "nas": ({"lr": 0.05, "arch_lr": 0.01, "arch_betas": [0.6, 0.9], "grad_clip": 2.0, "unrolled": True,
             "eval_lr": 0.1},
            {"search": {"lr": 0.05, "arch_lr": 0.01, "arch_betas": [0.6, 0.9], "grad_clip": 2.0,
                        "unrolled": True}, "retrain": {"lr": 0.1}}),
}  # fmt: skip


def _flags(model: dict) -> list[str]:
    return [arg for key, value in model.items() for arg in (f"--model.{key}", yaml.safe_dump(value).strip())]


# one key of each group, as the log line names its move (flags: --model.lr_alpha -> --model.sgd.lr_alpha)
MOVE_LOGGED = {"uda": r"model\.lr_alpha -> (--)?model\.sgd\.lr_alpha",
               "nas": r"model\.arch_lr -> (--)?model\.search\.arch_lr"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_uda_and_nas_read_their_optimiser_settings_flat_or_nested(name: str, tmp_path: Path, capsys,
                                                                  caplog) -> None:
    """A config file, ``--model FILE`` and flags with the flat keys give the nested keys' config,
    each with one log line saying where the keys moved."""
    caplog.set_level(logging.INFO, logger="tasks")
    flat, nested = GROUPED[name]

    def printed(label: str, *argv: str) -> dict:
        caplog.clear()
        config = _printed(capsys, name, *argv)
        moved = [r.getMessage() for r in caplog.records if "read from their old places" in r.getMessage()]
        assert len(moved) == (label == "flat") and all(re.search(MOVE_LOGGED[name], m) for m in moved), moved
        return config

    configs = {}
    for label, model in (("flat", flat), ("nested", nested)):
        (tmp_path / f"{label}.yaml").write_text(yaml.safe_dump({"model": model}))
        (tmp_path / f"{label}-model.yaml").write_text(yaml.safe_dump(model))
        configs[label] = printed(label, "--config", str(tmp_path / f"{label}.yaml"))
        assert printed(label, "--model", str(tmp_path / f"{label}-model.yaml")) == configs[label]
    assert configs["flat"] == configs["nested"]
    assert printed("flat", *_flags(flat)) == printed("nested", *_flags(nested)) == configs["nested"]
    model, group = configs["flat"]["model"], next(iter(nested))
    assert model[group] == {**model[group], **nested[group]} and not (set(flat) - {"trade_off"}) & set(model)


def test_uda_and_nas_list_their_flat_optimiser_keys_as_moved() -> None:
    uda = {m.old: m.new for m in load_task("uda").moved_keys}
    assert uda["model.lr"] == "model.sgd.lr" and uda["model.backbone_lr_mult"] == "model.sgd.backbone_lr_mult"
    assert not {"model.trade_off", "model.grl_gamma"} & set(uda)  # the method's, not the optimiser's
    nas = {m.old: m.new for m in load_task("nas").moved_keys}
    assert (nas["model.lr"], nas["model.unrolled"]) == ("model.search.lr", "model.search.unrolled")
    assert nas["model.eval_lr"] == "model.retrain.lr"


def test_a_later_source_wins_whichever_place_it_writes(tmp_path: Path, capsys) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("model: {eval_epochs: 3, eval_norm: gn, drop_path_prob: 0.1}\n")
    new.write_text("model: {retrain: {epochs: 4}}\n")
    retrain = _printed(capsys, "nas", "--config", str(old), "--config", str(new))["model"]["retrain"]
    assert (retrain["epochs"], retrain["norm"], retrain["drop_path_prob"]) == (4, "gn", 0.1)
    argv = ["nas", "--config", str(new), "--config", str(old), "--model.eval_epochs", "5"]
    model = _printed(capsys, *argv)["model"]
    assert model["retrain"]["epochs"] == 5 and not {"eval_epochs", "eval_norm"} & set(model)


@pytest.mark.parametrize("name", available_tasks())
def test_print_config_shows_no_moved_key(name: str, capsys) -> None:
    task = load_task(name)
    config = _printed(capsys, name)
    for moved in task.moved_keys:
        owner, _, key = moved.old.partition(".")
        assert key not in config[owner], f"{moved.old} is shown beside {moved.new}"
        node = config
        for part in moved.new.split("."):
            node = node[part]  # the new place is shown


def test_the_groups_are_sweep_axes_under_both_keys() -> None:
    owners = {"model": ClassificationModule}
    for key in ("model.lr", "model.sgd.lr"):
        check_axis(key, ["0.05", "0.1"], owners)
    with pytest.raises(ValueError, match=r"takes no 'sgd\.nope'"):
        check_axis("model.sgd.nope", ["1"], owners)
    for model_class, keys in ((DANNModule, ("model.lr_alpha", "model.sgd.lr_alpha")),
                              (DartsSearchModule, ("model.arch_lr", "model.search.arch_lr"))):  # fmt: skip
        for key in keys:
            check_axis(key, ["0.05", "0.1"], {"model": model_class})


def _checkpoint(path: Path, model: torch.nn.Module, hparams: dict) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, path)  # fmt: skip
    return path


@pytest.mark.parametrize("instantiator", [None, CLI_INSTANTIATOR])
def test_a_checkpoint_with_flat_hparams_loads_into_the_groups(instantiator, tmp_path: Path) -> None:
    """Checkpoints from before the groups, written by a script or by bgn-task (LightningCLI)."""
    trained = ClassificationModule(norm="gn", in_channels=1, sgd=SGDSettings(lr=0.05, warmup_epochs=0.5))
    flat = {"norm": "gn", "groups": "auto", "backbone": "small_cnn", "num_classes": 10, "in_channels": 1,
            "lr": 0.05, "warmup_epochs": 0.5, "label_smoothing": 0.0, "norm_kwargs": None}  # fmt: skip
    if instantiator:
        flat["_instantiator"] = instantiator
    path = _checkpoint(tmp_path / "old.ckpt", trained, flat)
    loaded = ClassificationModule.load_from_checkpoint(path, weights_only=False)
    assert loaded.sgd == trained.sgd == SGDSettings(lr=0.05, warmup_epochs=0.5)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))

    settings = SearchSettings(lr=0.05, arch_lr=0.01, arch_betas=(0.6, 0.9), grad_clip=2.0, unrolled=True)
    search = DartsSearchModule(num_classes=10, in_channels=1, channels=4, cells=3, nodes=2, search=settings)
    hparams = {**dict(search.hparams), "eval_norm": "bn", "eval_epochs": 2, "drop_path_prob": 0.1,
               **settings.to_dict()}  # fmt: skip
    del hparams["retrain"], hparams["search"]
    if instantiator:
        hparams["_instantiator"] = instantiator
    path = _checkpoint(tmp_path / "nas.ckpt", search, hparams)
    loaded_search = DartsSearchModule.load_from_checkpoint(path, weights_only=False)
    retrain = loaded_search.retrain
    assert (retrain.norm, retrain.epochs, retrain.drop_path_prob, retrain.channels) == ("bn", 2, 0.1, 36)
    assert loaded_search.search == settings

    sgd = DannSGDSettings(lr=0.02, lr_alpha=5.0, lr_beta=0.5, backbone_lr_mult=0.5, nesterov=False)
    dann = DANNModule(norm="gn", num_classes=10, in_channels=3, trade_off=0.3, sgd=sgd)
    hparams = {**dict(dann.hparams), "lr": 0.02, "lr_alpha": 5.0, "lr_beta": 0.5, "backbone_lr_mult": 0.5,
               "nesterov": False}  # fmt: skip
    del hparams["sgd"]
    if instantiator:
        hparams["_instantiator"] = instantiator
    loaded_dann = DANNModule.load_from_checkpoint(_checkpoint(tmp_path / "uda.ckpt", dann, hparams),
                                                  weights_only=False)  # fmt: skip
    assert loaded_dann.sgd == sgd and loaded_dann.hparams.trade_off == 0.3
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(loaded_dann.eval()(x), dann.eval()(x))


def test_checkpoints_hold_the_groups_as_plain_data(tmp_path: Path) -> None:
    model = ClassificationModule(norm="gn", in_channels=1, sgd=SGDSettings(lr=0.02))
    checkpoint = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["sgd"] == SGDSettings(lr=0.02).to_dict()
    path = _checkpoint(tmp_path / "new.ckpt", model, checkpoint["hyper_parameters"])
    assert ClassificationModule.load_from_checkpoint(path, weights_only=True).sgd == SGDSettings(lr=0.02)
    nested = RetrainSettings.of({"retrain": {"lr": 0.1}})
    assert RetrainSettings.of({"eval_lr": 0.1}) == RetrainSettings(lr=0.1) == nested
    dann = DANNModule(norm="gn", num_classes=10, in_channels=1, sgd=DannSGDSettings(lr_alpha=5.0))
    checkpoint = {"hyper_parameters": dict(dann.hparams)}
    dann.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["sgd"] == DannSGDSettings(lr_alpha=5.0).to_dict()
    path = _checkpoint(tmp_path / "uda.ckpt", dann, checkpoint["hyper_parameters"])
    assert DANNModule.load_from_checkpoint(path, weights_only=True).sgd == DannSGDSettings(lr_alpha=5.0)


def test_a_group_file_with_flat_keys_moves_them(tmp_path: Path, capsys) -> None:
    """``--model FILE`` (a file of the model's own keys) reads the flat keys too, never drops them."""
    configs = {}
    for name, model in (("flat", FLAT), ("nested", NESTED)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(model))
        configs[name] = _printed(capsys, "classification", "--model", str(path))
    assert configs["flat"] == configs["nested"]
    assert configs["flat"]["model"]["sgd"]["lr"] == 0.05 and "lr" not in configs["flat"]["model"]
    flat = str(tmp_path / "flat.yaml")
    later = _printed(capsys, "classification", "--model", flat, "--model.sgd.lr", "0.2")
    assert later["model"]["sgd"]["lr"] == 0.2
