"""Interop: norm-mode helpers, torchattacks' mode switching and Lightning's SWA treat BGN as a norm layer."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchattacks
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bgn_lightning import (
    BatchGroupNorm2d,
    NormAwareSWA,
    PositionalNorm,
    is_norm_layer,
    norm_aware_attack,
    norm_mode,
    set_norm_mode,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(dropout: bool = True) -> nn.Sequential:
    """conv -> BGN -> conv -> BN -> dropout -> head: one BGN and one BatchNorm to compare."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchGroupNorm2d(8, num_groups=4),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5) if dropout else nn.Identity(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _running_stats(model: nn.Module) -> list[Tensor]:
    return [
        buf.clone() for name, buf in model.named_buffers()
        if name.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
    ]


@pytest.fixture
def seen_modes() -> Iterator[tuple[nn.Sequential, dict[str, list[bool]]]]:
    """A CNN (in training mode, stats warmed up) whose BGN/BN/dropout record ``training`` per forward."""
    torch.manual_seed(0)
    model = _cnn()
    model(torch.rand(8, 3, 8, 8))
    seen: dict[str, list[bool]] = {"bgn": [], "bn": [], "dropout": []}
    handles = [
        model[i].register_forward_hook(lambda m, args, out, key=key: seen[key].append(m.training))
        for i, key in ((1, "bgn"), (4, "bn"), (6, "dropout"))
    ]
    yield model, seen
    for handle in handles:
        handle.remove()


def _attack_inputs() -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))


# -- set_norm_mode / norm_mode -------------------------------------------------------------------
def _all_norms_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), BatchGroupNorm2d(4, num_groups=2), nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4), PositionalNorm(4), nn.Dropout(), nn.Identity(),
    )


def test_set_norm_mode_switches_norm_layers_only() -> None:
    model = _all_norms_model().train()
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert len(norms) == 5
    changed = set_norm_mode(model, False)
    assert changed == norms
    assert [m.training for m in model.modules()] == [not is_norm_layer(m) for m in model.modules()]
    assert set_norm_mode(model, False) == []  # nothing left to change
    for layer in changed:  # the documented undo
        layer.train(True)
    assert all(_modes(model))
    norms[0].eval()  # only layers in the other mode are reported
    assert set_norm_mode(model.eval(), True) == norms
    assert is_norm_layer(model[1]) and set_norm_mode(model[1], False) == [model[1]]  # the model itself


def test_norm_mode_restores_each_module_mode() -> None:
    model = _all_norms_model().train()
    model[1].eval()  # a frozen BatchNorm
    before = _modes(model)
    with norm_mode(model, train=True) as changed:
        assert changed == [model[1]]
        assert all(m.training for m in model.modules() if is_norm_layer(m))
        model.eval()  # the block may switch anything: all is put back on exit
    assert _modes(model) == before
    with pytest.raises(RuntimeError, match="boom"), norm_mode(model, train=False):
        raise RuntimeError("boom")
    assert _modes(model) == before


def test_norm_mode_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"set_norm_mode: train must be True or False, got 1"):
        set_norm_mode(nn.BatchNorm2d(2), 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"norm_mode: model must be an nn.Module, got str"), \
            norm_mode("model", True):  # type: ignore[arg-type]
        pass


# -- torchattacks ------------------------------------------------------------------------------
def test_torchattacks_alone_leaves_bgn_training(seen_modes) -> None:
    """Why norm_aware_attack exists: torchattacks finds "batchnorm" by class name."""
    model, seen = seen_modes
    bgn_stats = _running_stats(model[1])
    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)
    atk.set_model_training_mode(model_training=True, batchnorm_training=False)
    atk(*_attack_inputs())
    assert seen["bn"] and not any(seen["bn"])  # BatchNorm2d: eval, as asked
    assert all(seen["bgn"])  # BatchGroupNorm2d: still training...
    after = _running_stats(model[1])
    assert not all(torch.equal(a, b) for a, b in zip(bgn_stats, after, strict=True))  # ...and updated


def test_norm_aware_attack_keeps_norms_in_eval(seen_modes) -> None:
    model, seen = seen_modes
    stats, before = _running_stats(model), _modes(model)
    atk = norm_aware_attack(torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2))
    atk.set_model_training_mode(model_training=True, batchnorm_training=False)
    x_adv = atk(*_attack_inputs())
    assert x_adv.shape == (6, 3, 8, 8)
    assert len(seen["bgn"]) == 2 and not any(seen["bgn"]) and not any(seen["bn"])  # one forward a step
    assert not any(seen["dropout"])  # dropout_training=False: torchattacks' dropout rule is kept
    assert all(torch.equal(a, b) for a, b in zip(stats, _running_stats(model), strict=True))
    assert _modes(model) == before


def test_norm_aware_attack_trains_norms_when_asked(seen_modes) -> None:
    model, seen = seen_modes
    bgn_batches = int(model[1].num_batches_tracked)
    before = _modes(model)
    atk = norm_aware_attack(torchattacks.FGSM(model, eps=8 / 255))
    atk.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
    atk(*_attack_inputs())
    assert seen["bgn"] and all(seen["bgn"]) and all(seen["bn"]) and all(seen["dropout"])
    assert int(model[1].num_batches_tracked) == bgn_batches + len(seen["bgn"])
    assert _modes(model) == before


def test_norm_aware_attack_restores_each_module_mode(seen_modes) -> None:
    """torchattacks ends with ``model.train()`` (or nothing); the adapter puts every mode back."""
    model, seen = seen_modes
    model[4].eval()  # a frozen BatchNorm in a training model
    plain = torchattacks.FGSM(model)
    plain.set_model_training_mode(model_training=True)
    plain(*_attack_inputs())
    assert model[4].training  # torchattacks unfroze it
    model[4].eval()
    before = _modes(model)
    atk = norm_aware_attack(torchattacks.FGSM(model))
    atk.set_model_training_mode(model_training=True)
    atk(*_attack_inputs())
    assert _modes(model) == before
    model.eval()  # an eval model attacked in training mode stays in eval mode
    atk(*_attack_inputs())
    assert not any(_modes(model))
    atk.set_model_training_mode(model_training=False)  # torchattacks' default: whole model in eval
    seen["bgn"].clear()
    atk(*_attack_inputs())
    assert seen["bgn"] and not any(seen["bgn"]) and not any(_modes(model))


def test_norm_aware_attack_targeted_and_multiattack(seen_modes) -> None:
    """Label choice in targeted modes and the attacks inside a MultiAttack switch norms too."""
    model, seen = seen_modes
    stats, before = _running_stats(model), _modes(model)
    pgd = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=1)
    pgd.set_mode_targeted_random(quiet=True)
    atk = norm_aware_attack(torchattacks.MultiAttack([pgd, torchattacks.FGSM(model)]))
    atk.set_model_training_mode(model_training=True, batchnorm_training=False)
    atk(*_attack_inputs())
    assert len(seen["bgn"]) >= 3 and not any(seen["bgn"]) and not any(seen["bn"])
    assert all(torch.equal(a, b) for a, b in zip(stats, _running_stats(model), strict=True))
    assert _modes(model) == before
    assert norm_aware_attack(atk) is atk  # patching twice is harmless


def test_norm_aware_attack_rejects_non_attacks() -> None:
    with pytest.raises(TypeError, match=r"expected a torchattacks.Attack, got Sequential"):
        norm_aware_attack(_cnn())  # type: ignore[type-var]


# -- SWA ---------------------------------------------------------------------------------------
class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn(dropout=False)  # no dropout: the recomputed stats are exact

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(48, 3, 8, 8, generator=generator) * 2 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (48,), generator=generator)), batch_size=16)


class _WeightsAtEpochStart(pl.Callback):
    """After SWA in the callback list: the weights the last epoch (SWA's statistics epoch) starts with."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = [p.detach().clone() for p in pl_module.parameters()]


def _fit(swa: StochasticWeightAveraging, tmp_path: Path) -> tuple[_TinyModule, list[Tensor]]:
    """Fit 3 epochs (SWA from the 2nd) + SWA's statistics epoch; the model and its averaged weights."""
    pl.seed_everything(0, verbose=False)
    model, probe = _TinyModule(), _WeightsAtEpochStart()
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, callbacks=[swa, probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, _loader())
    assert trainer.current_epoch == 4  # SWA added its statistics epoch
    return model, probe.weights


def _recomputed(model: _TinyModule, weights: list[Tensor]) -> list[Tensor]:
    """The running stats of ``weights`` on the training batches, as a cumulative average."""
    ref = copy.deepcopy(model).train()
    for param, weight in zip(ref.parameters(), weights, strict=True):
        param.data.copy_(weight)
    for module in ref.modules():
        if isinstance(module, (nn.BatchNorm2d, BatchGroupNorm2d)):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for x, _ in _loader():
            ref(x)
    return _running_stats(ref)


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(
        torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6) for x, y in zip(a, b, strict=True)
    )


def test_swa_recomputes_bgn_running_stats(tmp_path: Path) -> None:
    plain, averaged = _fit(StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2), tmp_path)
    expected = _recomputed(plain, averaged)
    assert _same(_running_stats(plain.net[4]), expected[3:])  # Lightning recomputes BatchNorm...
    assert not _same(_running_stats(plain.net[1]), expected[:3])  # ...but not BGN,
    assert not _same(list(plain.parameters()), averaged)  # and a stale-gradient step moves the weights

    ours, averaged = _fit(NormAwareSWA(swa_lrs=0.05, swa_epoch_start=2), tmp_path)
    assert all(torch.equal(p, w) for p, w in zip(ours.parameters(), averaged, strict=True))
    assert _same(_running_stats(ours), _recomputed(ours, averaged))  # BGN and BN, over the 3 batches
    assert int(ours.net[1].num_batches_tracked) == 3
    assert ours.net[1].momentum == ours.net[4].momentum == 0.1  # momenta put back


def test_swa_norm_detection() -> None:
    """Which models get SWA's extra statistics epoch."""
    bgn_only = nn.Sequential(nn.Conv2d(3, 4, 1), BatchGroupNorm2d(4, num_groups=2))
    assert not StochasticWeightAveraging.pl_module_contains_batch_norm(bgn_only)  # type: ignore[arg-type]
    assert NormAwareSWA.pl_module_contains_batch_norm(bgn_only)  # type: ignore[arg-type]
    no_stats = nn.Sequential(
        nn.GroupNorm(2, 4), PositionalNorm(4), nn.BatchNorm2d(4, track_running_stats=False),
        BatchGroupNorm2d(4, num_groups=2, track_running_stats=False),
    )
    assert not NormAwareSWA.pl_module_contains_batch_norm(no_stats)  # type: ignore[arg-type]
    swa = NormAwareSWA(swa_lrs=0.05)
    swa.reset_batch_norm_and_save_state(nn.Sequential(bgn_only, no_stats))  # type: ignore[arg-type]
    assert list(swa.momenta) == [bgn_only[1]] and bgn_only[1].momentum is None
