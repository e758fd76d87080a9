"""The adversarial suite: attacks, norm modes during attacks, bad input, end-to-end run, eval-only, bench."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgn_lightning import is_norm_layer
from tasks.adversarial.attacks import ATTACK_DEFAULTS, AttackSettings, perturb
from tasks.adversarial.module import AdversarialModule
from tasks.runner.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

NORMS = ("bn", "bgn", "gn", "ln", "in", "pn")
TINY = [
    "--max-epochs", "1", "--accelerator", "cpu", "--devices", "1", "--batch-size", "16",
    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
    "--model.train_steps", "2", "--model.val_steps", "1", "--model.eval_steps", "3",
    "--model.curve_eps", "[0.05]",
]  # fmt: skip


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(norm: str = "bn") -> AdversarialModule:
    torch.manual_seed(0)
    return AdversarialModule(norm=norm)


@pytest.mark.parametrize("name", ["pgd", "fgsm", "ffgsm"])
def test_attack_raises_the_loss_and_stays_in_the_ball_and_in_pixel_range(name: str) -> None:
    model = _model().eval()
    x, y = _batch()
    eps = 0.1
    x_adv = perturb(model.attack(name, eps, steps=10), model, x, y)
    assert x_adv.shape == x.shape and not torch.equal(x_adv, x)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_norm_layer(m)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_attack_norm_mode_sets_every_norm_layer_and_restores_every_module(norm: str, mode: str) -> None:
    model = _model(norm).train()
    x, y = _batch()
    model(x)  # one training forward: BGN fixes its auto-G, BN and BGN hold real running statistics
    layers = _norm_layers(model)
    assert len(layers) == 5
    layers[0].eval()  # a mixed state on entry: it must come back exactly
    modes_before = [(m, m.training) for m in model.modules()]
    buffers_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append(m.training)) for m in layers]
    perturb(model.attack("pgd", 0.1, steps=3, norm_mode=mode), model, x, y, norm_mode=mode)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3 * len(layers)  # every attack step went through every norm layer
    assert set(seen) == {mode == "train"}, "every norm layer in the chosen mode during the attack"
    assert [(m, m.training) for m in model.modules()] == modes_before
    buffers_after = {k: v for k, v in model.state_dict().items() if k in buffers_before}
    if mode == "eval":
        assert all(torch.equal(buffers_before[k], v) for k, v in buffers_after.items())
    if norm in ("bn", "bgn"):
        assert buffers_before, f"{norm} keeps running statistics"
        if mode == "train":  # the contrast: train mode does update them
            assert any(not torch.equal(buffers_before[k], v) for k, v in buffers_after.items())


def test_modes_are_restored_when_the_attack_raises() -> None:
    model = _model("bgn").train()
    x, y = _batch()
    with pytest.raises(RuntimeError):
        perturb(model.attack("pgd", 0.1, steps=2, norm_mode="eval"), model, x[:, :, :3], y, norm_mode="eval")
    assert all(m.training for m in model.modules())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_attacks_with_the_norm_layers_in_eval_mode_without_touching_statistics() -> None:
    model = AdversarialModule(norm="bgn", attack=AttackSettings(attack_norm_mode="eval", train_steps=3))
    model.train()
    x, y = _batch()
    model(x)
    seen: list[bool] = []
    layers = _norm_layers(model)
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append(m.training)) for m in layers]
    model.training_step((x, y), 0)
    for hook in hooks:
        hook.remove()
    # 3 attack steps in eval mode, then the training forward on the adversarial batch in train mode
    assert seen == [False] * (3 * len(layers)) + [True] * len(layers)
    assert all(int(m.num_batches_tracked) == 2 for m in layers)  # the two training forwards only


def test_dataset_defaults() -> None:
    assert ATTACK_DEFAULTS["cifar10"].eps == 8 / 255 and ATTACK_DEFAULTS["cifar10"].step_size == 2 / 255
    assert 7 <= ATTACK_DEFAULTS["cifar10"].train_steps <= 10
    mnist = AdversarialModule(dataset="mnist")
    assert (mnist.attacks.eps, mnist.attacks.step_size, mnist.attacks.train_steps) == (0.3, 0.01, 40)
    assert mnist.attack_settings["eval_step_size"] == pytest.approx(2.5 * 0.3 / 20)  # crosses the ball
    model = AdversarialModule(dataset="cifar10", attack=AttackSettings(eps=4 / 255))
    assert (model.attacks.eps, model.attacks.step_size) == (4 / 255, 2 / 255)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eps": -0.1}, "eps must be a number in [0, 1]"),
    ({"eps": 1.5}, "eps must be a number in [0, 1]"),
    ({"train_steps": 0}, "train_steps must be an int >= 1, got 0"),
    ({"eval_steps": 0}, "eval_steps must be an int >= 1, got 0"),
    ({"train_attack": "cw"}, "unknown train_attack 'cw'; choose from: pgd, fgsm, none"),
    ({"attack_norm_mode": "frozen"}, "attack_norm_mode must be one of: eval, train"),
    ({"clean_weight": 2.0}, "clean_weight must be in [0, 1]"),
])  # fmt: skip
def test_bad_values_raise_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AdversarialModule(attack=AttackSettings(**kwargs))


def test_eval_only_without_ckpt_is_refused_by_the_run_option_check() -> None:
    from tasks.adversarial.hooks import check_options

    with pytest.raises(ValueError, match="--eval-only needs --ckpt PATH"):
        check_options({"eval_only": True, "ckpt": None}, None)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--eps", "-0.1"], "eps must be a number in [0, 1] (pixels are in [0, 1]), got -0.1"),
    (["--model.train_steps", "0"], "train_steps must be an int >= 1, got 0"),
    (["--train-attack", "cw"], "unknown train_attack 'cw'"),
    (["--data.normalize", "true"], "the adversarial task needs --data.normalize false"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["adversarial", "--output", str(tmp_path / "run"), *TINY, *flags]) == 2
    assert message in _one_line_error(capsys)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-cell ``bgn-task bench`` of tiny bn runs: a results.json, a checkpoint and the sweep outputs."""
    out = tmp_path_factory.mktemp("adv-bench")
    argv = ["bench", "--task", "adversarial", "--norms", "bn", "--batch-sizes", "16", "--seeds", "0",
            "--threads", "1", "--output", str(out), "--", *TINY]  # fmt: skip
    assert main(argv) == 0
    return out


def test_tiny_run_reports_robust_below_clean_and_writes_its_curve(bench_dir: Path) -> None:
    run = bench_dir / "adversarial" / "bn" / "bs16" / "seed0"
    record = json.loads((run / "results.json").read_text())
    metrics = record["metrics"]
    for name in ("test/clean_acc", "test/fgsm_acc", "test/pgd_acc", "test/pgd_acc_eps0.05", "val/pgd_acc"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # the tested (best) checkpoint validated again scores what it scored when it was selected
    assert metrics["val/pgd_acc"] == metrics["val/pgd_acc_best"]
    assert metrics["test/pgd_acc"] <= metrics["test/clean_acc"]
    assert metrics["test/fgsm_acc"] <= metrics["test/clean_acc"]
    assert record["attack"]["eps"] == ATTACK_DEFAULTS["digits"].eps and record["attack"]["train_steps"] == 2
    assert record["robustness_curve"]["eps"] == [0.0, 0.05, ATTACK_DEFAULTS["digits"].eps]
    assert record["robustness_curve"]["pgd_acc"][0] == metrics["test/clean_acc"]
    with (run / "robustness_curve.csv").open() as f:
        assert [r["eps"] for r in csv.DictReader(f)] == ["0", "0.05", "0.15"]
    assert (run / "robustness_curve.png").stat().st_size > 0


def test_bench_writes_the_sweep_curve(bench_dir: Path) -> None:
    with (bench_dir / "robustness_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["row"], r["batch_size"], r["runs"]) for r in rows] == [("bn", "16", "1")] * 3
    assert (bench_dir / "robustness_curve.png").stat().st_size > 0
    assert "PGD-20 accuracy" in (bench_dir / "results.md").read_text()


def test_eval_only_tests_a_checkpoint_with_its_own_architecture(bench_dir: Path, tmp_path: Path) -> None:
    ckpt = next((bench_dir / "adversarial" / "bn" / "bs16" / "seed0" / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "eval"
    argv = [
        "adversarial",
        "--eval-only",
        "--ckpt",
        str(ckpt),
        "--output",
        str(out),
        *TINY,
    ]  # default norm: bgn
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["norm"] == "bn" and record["checkpoint"] == str(ckpt)
    assert record["epochs"] == 0 and record["global_step"] == 0, "no training"
    assert record["metrics"]["test/pgd_acc"] <= record["metrics"]["test/clean_acc"]
    trained = json.loads((ckpt.parents[1] / "results.json").read_text())
    tests = {k: v for k, v in trained["metrics"].items() if k.startswith("test/")}
    assert {k: record["metrics"][k] for k in tests} == tests  # the attacks' random starts too


def test_eval_only_refuses_another_tasks_checkpoint(tmp_path: Path, capsys) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(BoringModel())
    ckpt = tmp_path / "boring.ckpt"
    trainer.save_checkpoint(ckpt)
    capsys.readouterr()
    assert (
        main(["adversarial", "--eval-only", "--ckpt", str(ckpt), "--output", str(tmp_path / "e"), *TINY]) == 2
    )
    assert "not a checkpoint of the adversarial task" in _one_line_error(capsys)
    missing = ["--ckpt", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "m")]
    assert main(["adversarial", "--eval-only", *missing, *TINY]) == 2
    assert "no such file" in _one_line_error(capsys)
