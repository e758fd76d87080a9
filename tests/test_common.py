"""tasks.common: data helpers, metrics, the learning-rate rule, results.json and sweep reports."""

from __future__ import annotations

import csv
import json
import math
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from bgn_lightning import BatchGroupNorm2d
from tasks.common.backbones import small_cnn
from tasks.common.contract import Metric
from tasks.common.data import TransformSubset, dataset_not_found, stratified_split
from tasks.common.errors import DatasetNotFoundError, TaskConfigError
from tasks.common.metrics import classification_metrics
from tasks.common.norms import norm_factory
from tasks.common.optim import lr_multiplier, param_groups, scaled_lr, warmup_scheduler
from tasks.common.results import RESULTS_FILE, read_results, resolved_groups, results_record, write_results
from tasks.common.validate import check_choice, check_int
from tasks.runner.report import markdown_table, summarize, write_report

# -- data -----------------------------------------------------------------------------------------


def test_stratified_split_is_fixed_balanced_and_disjoint() -> None:
    labels = np.repeat(np.arange(5), 20)
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert len(held) == 20 and len(keep) == 80
    assert set(keep).isdisjoint(held) and set(keep) | set(held) == set(range(100))
    assert np.bincount(labels[held]).tolist() == [4] * 5  # 20 % of every class
    again_keep, again_held = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(keep, again_keep)
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=4)[1])
    assert np.array_equal(keep, np.sort(keep))
    assert len(set(labels[held[:10]])) >= 4  # a prefix of the held-out part spans the classes


def test_stratified_split_falls_back_when_a_class_is_a_singleton() -> None:
    keep, held = stratified_split([0, 0, 0, 1, 1, 2], 0.5, seed=0)
    assert len(keep) + len(held) == 6


def test_stratified_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        stratified_split([0, 1], 1.0)


def test_transform_subset_applies_transform_to_inputs_only() -> None:
    base = TensorDataset(torch.arange(6.0), torch.arange(6))
    sub = TransformSubset(base, [4, 1], transform=lambda x: x * 10)
    assert len(sub) == 2
    assert [(float(x), int(y)) for x, y in sub] == [(40.0, 4), (10.0, 1)]
    assert len(TransformSubset(base)) == 6


def test_check_choice_and_not_found_messages_are_one_line() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'x'; choose from: a, b"):
        check_choice("dataset", "x", ["a", "b"])
    err = dataset_not_found("cifar10", "/nowhere", "cifar-10-batches-py/")
    assert isinstance(err, DatasetNotFoundError) and isinstance(err, FileNotFoundError)
    assert "/nowhere" in str(err) and "--download" in str(err) and "\n" not in str(err)
    assert "--download" not in str(dataset_not_found("imagefolder", "/x", "train/", download=False))


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({}, 0, "n must be a positive int, got 0"),
        ({}, True, "n must be a positive int, got True"),
        ({}, 2.0, "n must be a positive int, got 2.0"),
        ({"minimum": 0, "owner": "f"}, -1, "f: n must be an int >= 0, got -1"),
        ({"optional": True}, "x", "n must be a positive int or None, got 'x'"),
        ({"expected": "an int >= 1"}, 0, "n must be an int >= 1, got 0"),
    ],
)
def test_check_int_is_the_one_int_validator(kwargs: dict, value: object, message: str) -> None:
    with pytest.raises(TaskConfigError) as info:
        check_int("n", value, **kwargs)
    assert str(info.value) == message and isinstance(info.value, ValueError)
    assert check_int("n", 3) == 3 and check_int("n", None, optional=True) is None


def test_check_choice_names_the_owner_or_the_problem() -> None:
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(TaskConfigError, match=r"^f: unknown mode 'c'; choose from: a, b$"):
        check_choice("mode", "c", ("a", "b"), owner="f")
    with pytest.raises(TaskConfigError, match=r"^op 'c' is not here; choose from: a$"):
        check_choice("op", "c", ["a"], problem="op 'c' is not here")


# -- metrics --------------------------------------------------------------------------------------


def test_classification_metrics_top1_and_top5() -> None:
    metrics = classification_metrics(10, "val/")
    logits = torch.zeros(4, 10)
    logits[0, 3] = 5  # correct top-1
    logits[1, 0] = 5  # wrong top-1 (target 2), target second best -> top-5 hit
    logits[1, 2] = 4
    logits[2, :5] = torch.arange(5.0) + 1  # target 9 is outside the top 5
    logits[3, 7] = 1  # correct
    out = metrics(logits, torch.tensor([3, 2, 9, 7]))
    assert set(out) == {"val/acc", "val/acc_top5"}
    assert out["val/acc"].item() == pytest.approx(0.5)
    assert out["val/acc_top5"].item() == pytest.approx(0.75)


def test_classification_metrics_few_classes_and_errors() -> None:
    out = classification_metrics(3, "test/")(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    assert out["test/acc_top5"].item() == 1.0
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        classification_metrics(1, "x/")


# -- learning-rate rule ---------------------------------------------------------------------------


def test_scaled_lr_is_linear_in_batch_size() -> None:
    assert scaled_lr(0.1, 2, 32) == pytest.approx(0.00625)
    assert scaled_lr(0.1, 256, 32) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        scaled_lr(0.1, 0, 32)


def test_lr_multiplier_warmup_then_cosine() -> None:
    f = lr_multiplier(warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.5)  # halfway through the 16 post-warm-up steps
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_lr_multiplier_multistep_and_constant() -> None:
    f = lr_multiplier(0, 100, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert (f(0), f(49), f(50), f(75)) == pytest.approx((1.0, 1.0, 0.1, 0.01))
    assert lr_multiplier(2, 10, schedule="constant")(9) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule 'exp'"):
        lr_multiplier(0, 10, schedule="exp")  # type: ignore[arg-type]


def test_warmup_scheduler_steps_the_optimizer_rate() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = warmup_scheduler(opt, warmup_steps=2, total_steps=10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.2, 0.4, 0.4])


def test_param_groups_exempt_norms_and_biases_from_weight_decay() -> None:
    net = small_cnn(10, 1, norm_factory("bgn"), width=4)
    decay, rest = param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    norm_params = {id(p) for m in net.modules() if isinstance(m, BatchGroupNorm2d) for p in m.parameters()}
    assert norm_params and norm_params <= {id(p) for p in rest["params"]}
    assert all(p.dim() > 1 for p in decay["params"])  # conv and linear weights only
    assert len(decay["params"]) + len(rest["params"]) == len(list(net.parameters()))


# -- results.json ---------------------------------------------------------------------------------


def _record(tmp_path, norm="bgn", batch_size=4, seed=0, acc=0.9, **metrics):
    net = small_cnn(10, 1, norm_factory(norm), width=4)
    net.train()
    net(torch.randn(batch_size, 1, 8, 8))  # fixes auto-G
    config = {
        "seed_everything": seed,
        "model": {"norm": norm, "groups": "auto"},
        "data": {"dataset": "digits", "batch_size": batch_size},
        "trainer": {"max_epochs": 1},
    }
    return results_record(
        task="classification",
        config=config,
        metrics={"test/acc": torch.tensor(acc), **metrics},
        model=net,
        epochs=1,
        global_step=10,
        checkpoint=None,
        times={"wall_time_s": 1.23456, "fit_time_s": 1.0, "test_time_s": 0.1},
        command=["bgn-task", "classification"],
        hparams={"norm": norm, "dtype": torch.float32},
    )


def test_results_record_schema_and_roundtrip(tmp_path) -> None:
    record = _record(tmp_path, norm="bgn", batch_size=4)
    path = write_results(tmp_path / "run", record)
    assert path == tmp_path / "run" / RESULTS_FILE
    assert not list((tmp_path / "run").glob(".results.*"))  # the temporary file was renamed
    loaded = read_results(tmp_path / "run")
    keys = "schema task dataset norm groups num_groups batch_size seed metrics epochs global_step wall_time_s"
    for key in [*keys.split(), "fit_time_s", "versions", "command", "config", "hparams", "created"]:
        assert key in loaded, key
    assert (loaded["task"], loaded["norm"], loaded["batch_size"], loaded["dataset"]) == (
        "classification", "bgn", 4, "digits"
    )  # fmt: skip
    assert loaded["metrics"]["test/acc"] == pytest.approx(0.9)
    assert loaded["versions"]["torch"] == metadata.version("torch")
    assert loaded["hparams"]["dtype"] == "torch.float32"
    # auto-G was resolved to an int in each of the five BGN layers by the training forward
    per_layer = loaded["num_groups"]["per_layer"]
    assert len(per_layer) == 5 and all(isinstance(g, int) for g in per_layer.values())
    assert sum(loaded["num_groups"]["histogram"].values()) == 5


def test_resolved_groups_covers_groupnorm_and_skips_other_norms() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 1), nn.GroupNorm(4, 8), nn.BatchNorm2d(8))
    assert resolved_groups(net) == {"per_layer": {"1": 4}, "histogram": {"4": 1}}


def test_read_results_rejects_other_json(tmp_path) -> None:
    (tmp_path / RESULTS_FILE).write_text(json.dumps({"task": "x"}))
    with pytest.raises(ValueError, match="missing keys: schema"):
        read_results(tmp_path)


# -- sweep reports --------------------------------------------------------------------------------


def _records(tmp_path):
    accs = {
        ("bn", 2): [0.80, 0.84],
        ("bn", 8): [0.95, 0.96],
        ("bgn", 2): [0.90, 0.92],
        ("bgn", 8): [0.96, 0.96],
    }
    return [
        _record(tmp_path, norm, bs, seed, acc)
        for (norm, bs), values in accs.items()
        for seed, acc in enumerate(values)
    ]


ACC = Metric("test/acc", "top-1 accuracy", ci="test/acc_ci95")


def _rows(records):
    return [(r["norm"], r) for r in records]


def test_summarize_mean_and_std_over_seeds(tmp_path) -> None:
    summary = summarize(_rows(_records(tmp_path)), ACC)
    assert summary[("bn", 2)].mean == pytest.approx(82.0)
    assert summary[("bn", 2)].spread == pytest.approx(math.sqrt(8.0))  # sample std of 80, 84
    assert summary[("bn", 2)].spread_kind == "std" and summary[("bn", 2)].n == 2


def test_summarize_uses_ci95_for_single_runs(tmp_path) -> None:
    summary = summarize(_rows([_record(tmp_path, "bgn", 4, 0, 0.5, **{"test/acc_ci95": 0.02})]), ACC)
    assert (summary[("bgn", 4)].spread, summary[("bgn", 4)].spread_kind) == (pytest.approx(2.0), "ci95")


def test_markdown_table_bolds_the_best_per_column(tmp_path) -> None:
    table = markdown_table(summarize(_rows(_records(tmp_path)), ACC), ["bn", "bgn"], [2, 8], ACC)
    lines = table.splitlines()
    assert lines[0] == "| norm | B = 2 | B = 8 |"
    assert lines[2] == "| bn | 82.00 ± 2.83 | 95.50 ± 0.71 |"
    assert lines[3] == "| bgn | **91.00 ± 1.41** | **96.00 ± 0.00** |"


def test_write_report_makes_csv_markdown_and_png(tmp_path) -> None:
    rows = _rows(_records(tmp_path))
    paths = write_report(rows, tmp_path / "out", [ACC], ["bn", "bgn"], [2, 8], "digits",
                         command="bgn-task bench")
    with paths["csv"].open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 8 and {"norm", "row", "batch_size", "seed", "test/acc"} <= set(lines[0])
    md = paths["md"].read_text()
    assert "bgn-task bench" in md and "mean ± std over seeds (2 seeds: 0, 1)" in md
    assert "| bgn | **91.00 ± 1.41** | **96.00 ± 0.00** |" in md
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_report_has_a_table_per_metric_and_follows_its_direction(tmp_path) -> None:
    """Several metrics (clean and robust accuracy; a loss to minimise): one table each, bold by direction."""
    loss = Metric("test/loss", "test loss", direction="min", unit="")
    rows = [(r["norm"], r) for r in _records(tmp_path)]
    for (_, r), value in zip(rows, [1.0, 1.2, 0.5, 0.4, 0.9, 0.8, 0.6, 0.7], strict=True):
        r["metrics"]["test/loss"] = value
    paths = write_report(rows, tmp_path / "out", [ACC, loss], ["bn", "bgn"], [2, 8], "t")
    md = paths["md"].read_text()
    assert "## top-1 accuracy (%): `test/acc` (primary)" in md and "## test loss: `test/loss`" in md
    assert "| bn | 1.10 ± 0.14 | **0.45 ± 0.07** |" in md  # lowest loss in bold
    assert "| bgn | **0.85 ± 0.07** | 0.65 ± 0.07 |" in md
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 1500  # two panels side by side


def test_metric_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="direction must be 'max' or 'min'"):
        Metric("test/acc", "acc", direction="up")
    with pytest.raises(ValueError, match="name must be a logged key"):
        Metric("acc", "acc")
    assert Metric("test/acc", "acc").shown(0.5) == 50.0 and Metric("test/x", "x", unit="").shown(0.5) == 0.5
