"""The task contract, checked for every installed task: declaration, default config, a 2-batch run.

A new task is covered here without a line of test code of its own: this builds it from its default
config (with tiny loops), fits and tests it, and checks results.json against what it declares.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule

from tasks.common.contract import Task
from tasks.runner.cli import main
from tasks.runner.discovery import available_tasks, load_task
from tasks.runner.run import default_config

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = available_tasks()
TINY = [
    "--max-epochs", "1", "--accelerator", "cpu", "--devices", "1",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip


def test_run_options_are_runner_flags_and_old_model_keys_still_reach_them() -> None:
    from tasks.runner.shortcuts import translate_shortcuts

    nas, adversarial = load_task("nas"), load_task("adversarial")
    assert [o.name for o in nas.options] == ["stage", "genotype"]
    assert [o.name for o in adversarial.options] == ["eval_only", "ckpt"]
    stage, eval_only = ["--stage", "eval", "--genotype", "g.json"], ["--eval_only", "true", "--ckpt", "c"]
    for task, argv, expected in [
        (nas, ["--stage", "eval", "--genotype=g.json"], stage),
        (nas, ["--model.stage", "eval", "--model.genotype", "g.json"], stage),
        (adversarial, ["--eval-only", "--ckpt", "c"], eval_only),
        (adversarial, ["--model.eval_only", "true", "--model.ckpt", "c"], eval_only),
    ]:  # fmt: skip
        assert translate_shortcuts(argv, task.all_shortcuts, task.all_flags) == expected


def test_the_five_suites_in_the_papers_order_come_first() -> None:
    known = ("classification", "fsl", "adversarial", "uda", "nas")
    assert TASKS[: len([t for t in known if t in TASKS])] == [t for t in known if t in TASKS]
    assert {"classification", "fsl"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_declaration(name: str) -> None:
    task = load_task(name)
    assert isinstance(task, Task) and task.name == name
    assert issubclass(task.model_class, LightningModule)
    assert issubclass(task.datamodule_class, LightningDataModule)
    init = inspect.signature(task.model_class.__init__).parameters
    assert {"norm", "groups", "norm_kwargs"} <= set(init), "the shared norm arguments"
    data_init = inspect.signature(task.datamodule_class.__init__).parameters
    assert {"dataset", "data_dir", "batch_size"} <= set(data_init), "the shared data arguments"
    assert isinstance(getattr(task.datamodule_class, "DATASETS", None), tuple)
    config = default_config(task)
    assert config is not None and config.name == task.config, f"configs/{task.config} is packaged"
    for source, target in task.links:
        assert source.split(".")[0] == "data" and target.split(".")[0] == "model"
        assert target.split(".", 1)[1] in init, f"link target {target} is a model init argument"
    for key in task.bench_axes:
        owner, arg = key.split(".", 1)
        params = init if owner == "model" else data_init
        assert owner == "trainer" or arg in params, f"bench axis {key}"
    assert all(m.name.startswith("test/") for m in task.metrics)
    for option in task.options:  # run modes are the runner's options, not the model's
        assert option.name not in init and option.name not in data_init, f"run option {option.name}"


@pytest.mark.parametrize("name", TASKS)
def test_two_batch_run_writes_every_declared_metric(name: str, tmp_path: Path, glyph_root: Path) -> None:
    """Default config, tiny loops, ghost batches of 2: fit + test + results.json with the task's metrics
    (and extra fields)."""
    task = load_task(name)
    out = tmp_path / "run"
    argv = [name, "--data-dir", str(glyph_root), "--output", str(out), "--norm-batch-size", "2", *TINY,
            *task.smoke_args]
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    missing = [m.name for m in task.metrics if m.name not in record["metrics"]]
    assert not missing, f"{name} declares {missing} but did not report them"
    for metric in task.metrics:
        value = record["metrics"][metric.name]
        assert value == value, f"{metric.name} is NaN"
        if metric.unit == "%":
            assert 0.0 <= value <= 1.0, f"{metric.name}={value} is not a fraction"
    assert record["task"] == name and record["norm"] == "bgn" and record["norm_batch_size"] == 2


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize(("flags", "message"), [
    (["--groups", "0"], "groups must be a positive int or 'auto', got 0"),
    (["--norm", "bn", "--groups", "4"], "--norm bn --groups 4: bn: has no num_groups to set"),
    (["--norm", "batchnorm"], "unknown norm 'batchnorm'; choose from: bn, bgn"),
    (["--data", "nope"], "unknown dataset 'nope'; choose from: "),
    (["--model.norm_kwargs", "{num_groups: 2}"], "norm_kwargs must not set num_groups"),
])  # fmt: skip
def test_bad_shared_values_are_one_line_before_anything_runs(name, flags, message, tmp_path, capsys) -> None:
    assert main([name, "--output", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
