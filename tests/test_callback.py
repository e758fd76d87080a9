"""NormSwap inside a real (CPU) Trainer: swap timing, optimizer, resume, inference reload."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgn_lightning import BatchGroupNorm, BatchGroupNorm1d, BatchGroupNorm2d, NormSwap


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def backbone(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 6), nn.BatchNorm1d(6), nn.Linear(6, 3),
    )


class TinyNet(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = backbone(width)
        self.optimized: list[nn.Parameter] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        self.optimized = list(self.parameters())
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class LateNet(TinyNet):
    """Builds its layers in configure_model (idempotently, as Lightning asks)."""

    def __init__(self, width: int = 8, lr: float = 0.1) -> None:
        super().__init__(width, lr)
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = backbone(self.hparams.width)


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                   num_sanity_val_steps=0, deterministic=True)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def assert_swapped(model: pl.LightningModule, cls: type[nn.Module] = BatchGroupNorm, layers: int = 2) -> None:
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == layers


@pytest.mark.parametrize("model_cls", [TinyNet, LateNet])
def test_fit_swaps_before_the_optimizer_exists(tmp_path, caplog, model_cls):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    pl.seed_everything(0)
    model = model_cls()
    trainer(tmp_path, [NormSwap("bgn", num_groups=2)]).fit(model, loader())
    assert_swapped(model)
    assert isinstance(model.net[1], BatchGroupNorm2d) and isinstance(model.net[6], BatchGroupNorm1d)
    assert model.net[1].num_groups == 2
    # the optimizer holds exactly the model's parameters, BGN weights included (identity)
    assert [id(p) for p in model.optimized] == [id(p) for p in model.parameters()]
    bgn_params = {id(p) for m in (model.net[1], model.net[6]) for p in (m.weight, m.bias)}
    assert bgn_params <= {id(p) for p in model.optimized}
    trained = model.net[1].weight.detach().clone()
    assert not torch.equal(trained, torch.ones_like(trained))  # it did train
    assert int(model.net[1].num_batches_tracked) == 4
    when = "after configure_model" if model_cls is LateNet else "in setup"
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NormSwap")]
    assert messages == [
        f"NormSwap: replaced 2 norm layers with 'bgn' (num_groups=2) {when}: "
        "1 BatchNorm1d -> BatchGroupNorm1d, 1 BatchNorm2d -> BatchGroupNorm2d"
    ]
    assert "configure_model" not in vars(model)  # the one-shot wrapper is gone


def test_validate_test_predict_after_fit(tmp_path):
    model = TinyNet()
    t = trainer(tmp_path, [NormSwap("bgn", num_groups="auto")])
    t.fit(model, loader(), loader(16))
    groups = model.net[1].num_groups
    assert groups == 2  # auto: C * N / 32 = 8 * 8 / 32
    assert t.validate(model, loader(16))[0]["val_loss"] > 0
    assert t.test(model, loader(16))[0]["test_loss"] > 0
    predictions = t.predict(model, loader(16))
    assert torch.cat(predictions).shape == (16, 3)
    assert model.net[1].num_groups == groups
    assert_swapped(model)


def fit_with_checkpoints(tmp_path, max_epochs, ckpt_path=None, norm_swap=None) -> tuple[TinyNet, pl.Trainer]:
    pl.seed_everything(0)
    model = TinyNet()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(tmp_path, [norm_swap or NormSwap("bgn", num_groups="auto"), checkpoint],
                max_epochs=max_epochs, enable_checkpointing=True)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return model, t


def test_resume_from_checkpoint_reaches_the_same_weights(tmp_path):
    straight, _ = fit_with_checkpoints(tmp_path / "straight", 2)
    _, first = fit_with_checkpoints(tmp_path / "resumed", 1)
    ckpt = tmp_path / "resumed" / "epoch=0.ckpt"
    assert first.checkpoint_callback.best_model_path == str(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # the callback state is plain data
    assert saved["callbacks"]["NormSwap"]["kwargs"] == {"num_groups": "auto"}
    resumed, t = fit_with_checkpoints(tmp_path / "resumed", 2, ckpt_path=ckpt)
    assert t.current_epoch == 2 and t.global_step == 8
    assert_swapped(resumed)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=name)


def test_rebuild_for_inference_from_checkpoint(tmp_path):
    model, t = fit_with_checkpoints(tmp_path, 1, norm_swap=NormSwap("bgn", num_groups=2, eps=1e-4))
    ckpt = t.checkpoint_callback.best_model_path
    swap = NormSwap.from_checkpoint(ckpt)
    assert (swap.norm, swap.kwargs, swap.types) == ("bgn", {"num_groups": 2, "eps": 1e-4}, NormSwap().types)

    loaded = NormSwap.load_model(TinyNet, ckpt, map_location="cpu")
    assert type(loaded) is TinyNet and loaded.hparams.width == 8
    assert_swapped(loaded)
    assert loaded.net[1].num_groups == 2 and loaded.net[1].eps == 1e-4
    x = next(iter(loader()))[0]
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))

    # the standard path works too: Lightning builds the model through NormSwap's instantiator
    standard = TinyNet.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(standard) is TinyNet and "on_load_checkpoint" not in vars(standard)
    assert_swapped(standard)
    torch.testing.assert_close(standard.eval()(x), model(x))
    assert "_instantiator" not in standard.hparams  # a re-saved checkpoint gets it from NormSwap again

    # the same settings in a new Trainer: predict a fresh model from the checkpoint
    fresh = TinyNet()
    out = trainer(tmp_path, [swap]).predict(fresh, loader(16), ckpt_path=ckpt)
    torch.testing.assert_close(torch.cat(out), model(torch.cat([b[0] for b in loader(16)])))

    # a plain nn.Module rebuilt by hand
    plain = backbone(8)
    assert swap.convert(plain) == 2
    plain.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(ckpt)["state_dict"].items()})
    torch.testing.assert_close(plain.eval()(x), model(x))


def test_model_built_in_configure_model_resumes_and_reloads(tmp_path):
    pl.seed_everything(0)
    model = LateNet()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    t = trainer(tmp_path, [NormSwap("bgn", num_groups="auto"), checkpoint], enable_checkpointing=True)
    t.fit(model, loader())
    ckpt = checkpoint.best_model_path
    loaded = NormSwap.load_model(LateNet, ckpt)
    assert_swapped(loaded)
    x = next(iter(loader()))[0]
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    resumed = LateNet()
    t = trainer(tmp_path, [NormSwap("bgn", num_groups="auto")], max_epochs=2)
    t.fit(resumed, loader(), ckpt_path=ckpt)
    assert_swapped(resumed)
    assert resumed.net[1].num_groups == 2


def test_resuming_with_other_settings_warns(tmp_path):
    callback = NormSwap("bgn", num_groups=4)
    state = callback.state_dict()
    callback.load_state_dict(state)  # same settings: silent
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's \(kwargs: .*'eps': 0\.001"):
        NormSwap("bgn", num_groups=4, eps=1e-3).load_state_dict(state)


def test_other_targets_and_types(tmp_path):
    model = TinyNet()
    trainer(tmp_path, [NormSwap("gn", types=["torch.nn.BatchNorm2d"], num_groups=4)]).fit(model, loader())
    assert isinstance(model.net[1], nn.GroupNorm) and model.net[1].num_groups == 4
    assert isinstance(model.net[6], nn.BatchNorm1d)  # not in types
    assert any(p is model.net[1].weight for p in model.optimized)


def test_configurable_from_lightning_cli():
    from lightning.pytorch.cli import LightningCLI

    args = ["--trainer.callbacks=bgn_lightning.NormSwap", "--trainer.callbacks.norm=bgn",
            "--trainer.callbacks.num_groups=4", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    cli = LightningCLI(TinyNet, run=False, args=args, save_config_callback=None)
    swaps = [c for c in cli.trainer.callbacks if isinstance(c, NormSwap)]
    assert len(swaps) == 1 and swaps[0].kwargs == {"num_groups": 4}
    assert repr(swaps[0]) == "NormSwap('bgn', num_groups=4)"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown norm 'batchgroup'"):
        NormSwap("batchgroup")
    with pytest.raises(ValueError, match=r"must be a plain value .* saved in checkpoints"):
        NormSwap("bgn", device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"dotted paths to already imported ones, got 'no\.such\.Norm'"):
        NormSwap("bgn", types=["no.such.Norm"])
    with pytest.raises(ValueError, match="dim must be 1, 2, 3 or None, got 5"):
        NormSwap("bgn", dim=5)
    with pytest.raises(ValueError, match="has no 'NormSwap' callback state"):
        NormSwap.from_checkpoint({"callbacks": {}})


def test_sync_hook_runs_after_the_swap_and_before_the_optimizer(tmp_path, monkeypatch):
    calls = []

    def convert_sync_batchgroupnorm(module, process_group=None):
        calls.append((module, [type(m).__name__ for m in module.modules()], list(module.optimized)))
        return module

    fake = types.ModuleType("bgn_lightning.sync")
    fake.convert_sync_batchgroupnorm = convert_sync_batchgroupnorm
    monkeypatch.setitem(sys.modules, "bgn_lightning.sync", fake)
    model = TinyNet()
    trainer(tmp_path, [NormSwap("bgn", sync=True, num_groups=2)]).fit(model, loader())
    assert len(calls) == 1
    module, layer_names, optimized = calls[0]
    assert module is model and optimized == []  # configure_optimizers had not run yet
    assert "BatchGroupNorm2d" in layer_names and "BatchNorm2d" not in layer_names


@pytest.mark.skipif(importlib.util.find_spec("bgn_lightning.sync") is None,
                    reason="bgn_lightning.sync (SyncBatchGroupNorm) is not in the tree yet")
def test_sync_converts_to_sync_batchgroupnorm(tmp_path):
    from bgn_lightning.sync import convert_sync_batchgroupnorm

    expected = convert_sync_batchgroupnorm(nn.Sequential(BatchGroupNorm2d(8, num_groups=2)))[0]
    model = TinyNet()
    trainer(tmp_path, [NormSwap("bgn", sync=True, num_groups=2)]).fit(model, loader())
    assert type(model.net[1]) is type(expected) and type(expected) is not BatchGroupNorm2d
    assert any(p is model.net[1].weight for p in model.optimized)


# -- the pytorch_lightning namespace: learn2learn's Lightning modules ----------------------------
def _episodic_data():
    import learn2learn as l2l
    from learn2learn.utils.lightning import EpisodicBatcher

    g = torch.Generator().manual_seed(0)
    dataset = l2l.data.MetaDataset(TensorDataset(torch.randn(60, 1, 8, 8, generator=g),
                                                 torch.arange(10).repeat_interleave(6)))
    transforms = [l2l.data.transforms.NWays(dataset, 5), l2l.data.transforms.KShots(dataset, 2),
                  l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset)]
    tasks = l2l.data.TaskDataset(dataset, transforms, num_tasks=20)
    return EpisodicBatcher(tasks, tasks, tasks, epoch_length=3)


def _l2l_module(algorithm: str):
    from learn2learn.algorithms.lightning import LightningMAML, LightningPrototypicalNetworks

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    episodes = {"train_shots": 1, "train_queries": 1, "test_shots": 1, "test_queries": 1}
    if algorithm == "protonet":
        return LightningPrototypicalNetworks, {"features": features}, episodes
    return LightningMAML, {"model": nn.Sequential(features, nn.Linear(8 * 64, 5))}, {**episodes,
                                                                                     "adaptation_steps": 1}


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_pytorch_lightning_trainer_with_learn2learn_modules(tmp_path, algorithm):
    """learn2learn's Lightning modules are ``pytorch_lightning`` modules: fit, resume and reload."""
    ptl = pytest.importorskip("pytorch_lightning")
    pytest.importorskip("learn2learn")
    cls, modules, hparams = _l2l_module(algorithm)
    model = cls(**modules, **hparams)
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "limit_val_batches": 1, "default_root_dir": tmp_path}
    checkpoint = ptl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    ptl.Trainer(max_epochs=1, callbacks=[NormSwap("bgn"), checkpoint], **options).fit(model, _episodic_data())
    assert_swapped(model, layers=1)
    ckpt = checkpoint.best_model_path

    resumed = cls(**_l2l_module(algorithm)[1], **hparams)
    t = ptl.Trainer(max_epochs=2, callbacks=[NormSwap("bgn")], **options)
    t.fit(resumed, _episodic_data(), ckpt_path=ckpt)
    assert_swapped(resumed, layers=1)
    assert t.current_epoch == 2 and t.global_step == 6

    # the standard reload: pytorch_lightning calls NormSwap's instantiator, then loads the weights
    loaded = cls.load_from_checkpoint(ckpt, **_l2l_module(algorithm)[1])
    assert_swapped(loaded, layers=1)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


class ZooNet(TinyNet):
    """TinyNet plus layers NormSwap must leave alone (unused in forward)."""

    def __init__(self, width: int = 8, lr: float = 0.1, fused: bool = False) -> None:
        super().__init__(width, lr)
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.extra = nn.Sequential(FrozenBatchNorm2d(width), nn.LayerNorm(4))
        if fused:
            self.extra.append(FusedBN(width))


class FusedBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_log_line_counts_what_was_replaced_and_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    trainer(tmp_path, [NormSwap("bgn", num_groups=2)]).fit(ZooNet(), loader())
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NormSwap")]
    assert messages == [
        "NormSwap: replaced 2 norm layers with 'bgn' (num_groups=2) in setup: "
        "1 BatchNorm1d -> BatchGroupNorm1d, 1 BatchNorm2d -> BatchGroupNorm2d; "
        "left: 1 FrozenBatchNorm2d, 1 LayerNorm"
    ]


def test_unknown_norm_subclass_stops_the_run_or_is_left_when_asked(tmp_path):
    with pytest.raises(ValueError, match=r"extra\.2 \(tests\.test_callback\.FusedBN\)"):
        trainer(tmp_path, [NormSwap("bgn")]).fit(ZooNet(fused=True), loader())
    model = ZooNet(fused=True)
    swap = NormSwap("bgn", on_unknown="warn")
    with pytest.warns(UserWarning, match="FusedBN.*left as they are"):
        trainer(tmp_path, [swap]).fit(model, loader())
    assert isinstance(model.extra[2], FusedBN) and isinstance(model.net[1], BatchGroupNorm2d)
    assert swap.state_dict()["on_unknown"] == "warn" and "on_unknown='warn'" in repr(swap)
    with pytest.raises(ValueError, match="on_unknown must be one of error, warn, got 'ignore'"):
        NormSwap("bgn", on_unknown="ignore")
