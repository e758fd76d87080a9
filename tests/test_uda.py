"""The UDA suite's method: gradient reversal, DANN's schedules, the no-target-label guarantee,
joint vs separate batch statistics, AdaBN, and a tiny end-to-end run per method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from tasks.common.optim import scaled_lr
from tasks.runner.cli import main
from tasks.uda.dann import (
    DomainDiscriminator,
    adapt_norm_statistics,
    annealed_lr_factor,
    domain_probe_accuracy,
    grad_reverse,
    grl_coefficient,
    norm_statistics,
)
from tasks.uda.datamodule import DomainAdaptationDataModule
from tasks.uda.module import DANNModule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--max-epochs", "1", "--accelerator", "cpu", "--batch-size", "8", "--data.synth_per_class", "12",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the tiny synthetic digits for the whole module."""
    return tmp_path_factory.mktemp("uda-data")


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient_exactly() -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 7, dtype=torch.float64)
    for coeff in (0.0, 0.37, 1.0, 2.5):
        y = grad_reverse(x, coeff)
        assert torch.equal(y, x)
        (g,) = torch.autograd.grad(y, x, grad)
        assert torch.equal(g, -coeff * grad)
    with pytest.raises(ValueError, match="coeff must be >= 0, got -1"):
        grad_reverse(x, -1.0)


def test_grl_coefficient_warm_start() -> None:
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(0.25) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1)
    values = [grl_coefficient(p / 20) for p in range(21)]
    assert values == sorted(values) and values[-1] < 1.0
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], got 1.5"):
        grl_coefficient(1.5)


def test_annealed_learning_rate_factor() -> None:
    assert annealed_lr_factor(0.0) == 1.0
    assert annealed_lr_factor(1.0) == pytest.approx(11**-0.75)
    assert annealed_lr_factor(0.3) == pytest.approx((1 + 3) ** -0.75)
    with pytest.raises(ValueError, match="progress"):
        annealed_lr_factor(-0.1)


def _datamodule(data_dir: Path, **kwargs) -> DomainAdaptationDataModule:
    return DomainAdaptationDataModule(data_dir=str(data_dir), batch_size=8, synth_per_class=12, **kwargs)


def _fit(model: DANNModule, datamodule: DomainAdaptationDataModule, steps: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    return trainer


def test_the_learning_rate_follows_the_annealing_per_step_and_no_target_label_is_used(data_dir: Path) -> None:
    """Target labels poisoned (shifted and garbage) give bit-identical weights: they never reach a step."""
    states = []
    for poison in (None, "shift", "garbage"):
        pl.seed_everything(0)
        datamodule = _datamodule(data_dir)
        target = datamodule.domains[1]
        images, labels = (torch.stack([target.train[i][0] for i in range(len(target.train))]),
                          torch.as_tensor(target.train_labels))  # fmt: skip
        if poison == "shift":
            target.train = TensorDataset(images, (labels + 3) % 10)
        elif poison == "garbage":
            target.train = TensorDataset(images, torch.full_like(labels, -10**6))
        model = DANNModule(norm="bgn", num_classes=10, in_channels=3)
        trainer = _fit(model, datamodule)
        states.append({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    assert len(states[0]) > 20
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    # the annealed rate after the last step, lr * (1 + 10 p)^-0.75 with p = steps / total
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    base = scaled_lr(model.sgd.lr, 8, model.sgd.base_batch_size)
    assert lr == pytest.approx(base * annealed_lr_factor(4 / trainer.estimated_stepping_batches))
    assert model.progress == pytest.approx(4 / trainer.estimated_stepping_batches)


def _batch_stats_calls(model: DANNModule, mode: str, xs: torch.Tensor, xt: torch.Tensor):
    """Inputs seen by the first norm layer in one ``_pair`` forward, and the features."""
    model.hparams.domain_mode = mode
    seen: list[torch.Tensor] = []
    first = model.backbone[1]
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        features = model._pair(model.features, xs, xt)
        logits = model.discriminator(torch.cat(features))
    finally:
        handle.remove()
    return seen, torch.cat(features), logits


def _joint_and_separate(norm: str):
    """:func:`_batch_stats_calls` of a fresh model with ``norm`` in both modes, on the same batches."""
    torch.manual_seed(0)
    model = DANNModule(norm=norm, num_classes=10, in_channels=3).train()
    xs, xt = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16) + 1.0
    return _batch_stats_calls(model, "joint", xs, xt), _batch_stats_calls(model, "separate", xs, xt)


@pytest.mark.parametrize("norm", ["bn", "bgn"])
def test_joint_and_separate_give_different_batch_statistics(norm: str) -> None:
    (joint_seen, joint, _), (separate_seen, separate, _) = _joint_and_separate(norm)
    assert [len(s) for s in joint_seen] == [16] and [len(s) for s in separate_seen] == [8, 8]
    assert not torch.allclose(joint, separate, atol=1e-3)


@pytest.mark.parametrize(("method", "mode"), [
    ("dann", "separate"), ("dann", "joint"), ("source_only", "separate"),
])  # fmt: skip
def test_the_discriminator_always_sees_both_domains_in_one_batch(method: str, mode: str) -> None:
    """Its norms standardise source and target together, so they cannot erase the domain shift."""
    torch.manual_seed(0)
    model = DANNModule(norm="bn", method=method, domain_mode=mode, num_classes=10, in_channels=3).train()
    seen: list[int] = []
    handle = model.discriminator[1].register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    batch = {"source": (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))),
             "target": torch.randn(6, 3, 16, 16) + 1.0}  # fmt: skip
    try:
        with pytest.warns(UserWarning, match="self.log"):
            model.training_step(batch, 0)
    finally:
        handle.remove()
    assert seen == [14]


def test_the_domain_probe_scores_separability_on_held_out_halves() -> None:
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(200, 16, generator=generator)
    same = torch.randn(90, 16, generator=generator)
    state = torch.random.get_rng_state()
    chance = domain_probe_accuracy(source, same)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert abs(chance - 0.5) < 0.1
    assert domain_probe_accuracy(source, same) == chance  # deterministic
    shifted = same.clone()
    shifted[:, 0] += 6.0  # one coordinate shifted by 6 std: separable
    assert domain_probe_accuracy(source, shifted) > 0.95
    with pytest.raises(ValueError, match="one width"):
        domain_probe_accuracy(source, same[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        domain_probe_accuracy(source, same[:1])


@pytest.mark.parametrize("norm", ["gn", "ln", "pn", "none"])
def test_joint_and_separate_agree_for_norms_without_batch_statistics(norm: str) -> None:
    (_, joint, joint_d), (_, separate, separate_d) = _joint_and_separate(norm)
    torch.testing.assert_close(joint, separate)
    torch.testing.assert_close(joint_d, separate_d)


@pytest.mark.parametrize("norm", ["bn", "bgn"])
def test_adabn_changes_running_statistics_only(norm: str) -> None:
    torch.manual_seed(0)
    model = DANNModule(norm=norm, num_classes=10, in_channels=3)
    model.train()
    for _ in range(3):  # some source statistics (and BGN's auto-G fixed)
        model.discriminator(model.features(torch.randn(8, 3, 16, 16)))
    model.eval()
    model.discriminator.train()  # a mixed mode, to check every module gets its own back
    modes = {name: m.training for name, m in model.named_modules()}
    params = {k: v.clone() for k, v in model.named_parameters()}
    before = norm_statistics(model)
    momenta = [m.momentum for m in model.modules() if hasattr(m, "momentum")]
    target = torch.randn(4, 8, 3, 16, 16) * 2 + 3
    seen = adapt_norm_statistics(model, target, lambda x: model.discriminator(model.features(x)))
    assert seen == 4
    after = norm_statistics(model)
    assert set(after) == set(before) and any("discriminator" in k for k in after)
    for key in before:
        if key.endswith("running_mean"):
            assert not torch.allclose(before[key], after[key]), key
        if key.endswith("num_batches_tracked"):
            assert int(after[key]) == 4
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert [m.momentum for m in model.modules() if hasattr(m, "momentum")] == momenta
    # the first layer's statistics are the cumulative average of the four target batches
    first = model.backbone[1]
    if norm == "bn":
        expected = torch.stack([x.mean((0, 2, 3)) for x in _first_inputs(model, target)]).mean(0)
        torch.testing.assert_close(first.running_mean, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        adapt_norm_statistics(model, [])


def _first_inputs(model: DANNModule, batches: torch.Tensor) -> list[torch.Tensor]:
    conv = model.backbone[0]
    with torch.no_grad():
        return [conv(x) for x in batches]


def test_discriminator_norms_come_from_the_registry_in_1d() -> None:
    from bgn_lightning import BatchGroupNorm1d

    disc = DANNModule(norm="bgn", num_classes=10).discriminator
    assert isinstance(disc, DomainDiscriminator)
    assert sum(isinstance(m, BatchGroupNorm1d) for m in disc.modules()) == 2


@pytest.mark.parametrize(("method", "extra"), [
    ("dann", []),
    ("source_only", ["--domain-mode", "separate", "--adabn"]),
])  # fmt: skip
def test_tiny_end_to_end_run_per_method(method: str, extra: list[str], data_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    argv = ["uda", "--method", method, "--data-dir", str(data_dir), "--output", str(out), *TINY, *extra]
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["dataset"] == "synth→digits" and record["domains"] == "synth→digits"
    assert record["hparams"]["method"] == method
    for key in ("test/target_acc", "test/source_acc", "test/domain_acc"):
        assert 0.0 <= record["metrics"][key] <= 1.0
