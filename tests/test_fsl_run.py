"""End-to-end ``bgn-task fsl`` runs (tiny budgets) through the CLI, per algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.fsl import FewShotModule
from tasks.runner.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--model.hidden", "8", "--max-epochs", "1", "--data.episodes_per_epoch", "4", "--data.train_ways", "5",
    "--data.val_episodes", "3", "--data.test_episodes", "6", "--trainer.enable_progress_bar", "false",
]


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("algorithm, extra", [
    ("protonet", []),
    ("maml", ["--config", str(CONFIGS / "fsl_maml.yaml")]),
])
def test_tiny_fsl_run_writes_accuracy_and_ci(tmp_path, glyph_root, algorithm, extra, capsys):
    out = tmp_path / "run"
    argv = [*extra, "--norm", "bgn", "--data-dir", str(glyph_root), "--output", str(out), *TINY]
    assert main(["fsl", *argv]) == 0
    shown = capsys.readouterr().out  # one test table, not one column per test dataloader (1- and 5-shot)
    assert shown.count("Test metric") == 1 and "DataLoader" not in shown
    assert shown.count("test/acc_5shot_from_1shot ") == 1
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    for name in ("1shot", "5shot_from_1shot"):  # 5 shots test the model trained at 1, and say so
        assert 0.0 <= metrics[f"test/acc_{name}"] <= 1.0
        assert metrics[f"test/acc_{name}_ci95"] > 0.0
    assert "test/acc_5shot" not in metrics
    assert metrics["test/acc"] == metrics["test/acc_1shot"]
    assert metrics["test/acc_ci95"] == metrics["test/acc_1shot_ci95"]
    assert "val/acc" in metrics and "test/loss" in metrics
    assert results["config"]["model"]["algorithm"] == algorithm
    # the tested checkpoint reloads on its own (image shape and ways were saved with it)
    checkpoint = next((out / "checkpoints").glob("*.ckpt"))
    model = FewShotModule.load_from_checkpoint(checkpoint)
    network = model.encoder if algorithm == "protonet" else model.learner
    assert network is not None
    with torch.no_grad():
        features = network.eval()(torch.zeros(2, 1, 28, 28))
    assert features.shape == ((2, 8) if algorithm == "protonet" else (2, 5))


@pytest.mark.parametrize("extra, message", [
    (["--model.algorithm", "maml", "--data.train_ways", "10"], "train_ways=10, ways=5"),
    (["--data.queries", "30"], "need >= shots + queries = 31 images per class"),
])
def test_incompatible_settings_are_one_line_errors(tmp_path, glyph_root, capsys, extra, message):
    # Found only when fit builds the data or the model, still reported like a bad flag: one line, exit 2.
    argv = ["fsl", "--data-dir", str(glyph_root), "--output", str(tmp_path), *TINY, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("norm", ["bgn", "bn", "gn"])
def test_default_config_at_full_width_runs_a_step_of_everything(tmp_path, glyph_root, norm):
    """The headline config's real shapes (Conv-4 64, 20-way training episodes of 120 images: BGN's
    auto-G exceeds C) through one training, validation and test batch."""
    argv = ["--norm", norm, "--data-dir", str(glyph_root), "--output", str(tmp_path),
            "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false",
            "--data.val_episodes", "2", "--data.test_episodes", "2"]
    assert main(["fsl", *argv]) == 0
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["test/acc"] <= 1.0
