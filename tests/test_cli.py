"""`bgn-task`: shortcut translation, help, one-line usage errors, LightningCLI config handling."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from tasks.common.errors import UsageError
from tasks.runner import cli, discovery
from tasks.runner.cli import main
from tasks.runner.discovery import available_tasks
from tasks.runner.shortcuts import translate_shortcuts

QUICK = [
    "--max-epochs", "1", "--accelerator", "cpu", "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def test_translate_shortcuts_maps_every_flag() -> None:
    argv = ["--norm", "gn", "--groups=4", "--batch-size", "8", "--data", "mnist", "--data-dir", "/d",
            "--max-epochs", "3", "--seed=7", "--output", "o", "--accelerator", "cpu", "--devices", "1",
            "--download", "--trainer.max_steps", "5", "--config", "c.yaml"]  # fmt: skip
    assert translate_shortcuts(argv) == [
        "--model.norm", "gn", "--model.groups", "4", "--data.batch_size", "8", "--data.dataset", "mnist",
        "--data.data_dir", "/d", "--trainer.max_epochs", "3", "--seed_everything", "7",
        "--trainer.default_root_dir", "o", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--data.download", "true", "--trainer.max_steps", "5", "--config", "c.yaml",
    ]  # fmt: skip


def test_translate_shortcuts_needs_a_value() -> None:
    with pytest.raises(UsageError, match="--norm needs a value"):
        translate_shortcuts(["--norm"])


def test_available_tasks_lists_only_task_packages() -> None:
    tasks = available_tasks()
    assert tasks[0] == "classification"
    assert "common" not in tasks and "configs" not in tasks and "cli" not in tasks


def test_help_lists_tasks_and_norms(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "tasks: " + ", ".join(available_tasks()) in out
    assert "norms: bn, bgn, gn, ln, in, pn, none" in out
    assert "bgn-task bench" in out


def test_no_arguments_prints_usage_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "usage: bgn-task <task>" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["imagenet"], "unknown task 'imagenet'; choose from: classification"),
        (["classification", "--norm", "batchnorm"], "unknown norm 'batchnorm'; choose from: bn, bgn, gn, ln"),
        (["classification", "--data", "imagenet"], "unknown dataset 'imagenet'; choose from: digits"),
        (["classification", "--groups", "0"], "groups must be a positive int or 'auto', got 0"),
        (["classification", "--threads", "0"], "--threads must be a positive int or null, got 0"),
        (["classification", "--model.backbone", "vgg"], "unknown backbone 'vgg'; choose from: small_cnn"),
        (["bench", "--task", "nope", "--norms", "bn", "--batch-sizes", "2"], "unknown task 'nope'"),
        (["bench", "--task", "classification", "--norms", "bn,x", "--batch-sizes", "2"], "unknown norm 'x'"),
        (["bench", "--task", "classification", "--norms", "bn", "--batch-sizes", "2,x"], "list of int"),
        # exact names only: a prefix is a typo, with the nearest name suggested
        (["uda", "--model.trade_of", "1"], "arguments: --model.trade_of 1; did you mean --model.trade_off?"),
        (["classification", "--trainer.max_epoch", "1"], "did you mean --trainer.max_epochs?"),
        (["classification", "--max-epoch", "1", "--nrom", "bn"], "--max-epochs for --max-epoch, --norm for"),
        (["bench", "--task", "classification", "--norm", "bn", "--batch-sizes", "2"], "you mean --norms?"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(argv: list[str], message: str, capsys, tmp_path) -> None:
    assert main([*argv, *(["--output", str(tmp_path)] if argv[0] != "bench" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bgn-task: error: ") and message in err[-1]
    assert not list(tmp_path.iterdir())  # nothing was trained or written


def test_task_package_without_the_contract_is_a_bug_not_a_usage_error(monkeypatch) -> None:
    monkeypatch.setattr(discovery, "available_tasks", lambda: ["classification", "stub"])
    monkeypatch.setitem(sys.modules, "tasks.stub", types.ModuleType("tasks.stub"))
    with pytest.raises(TypeError, match=r"tasks.stub must export TASK = Task\(name='stub'"):
        main(["stub"])


def test_a_type_error_in_a_task_is_a_bug_with_its_traceback_not_a_usage_error(monkeypatch, tmp_path) -> None:
    import functools

    from tasks.classification.model import ClassificationModule

    original = ClassificationModule.__init__

    @functools.wraps(original)
    def buggy(self, *args, **kwargs) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(ClassificationModule, "__init__", buggy)
    with pytest.raises(TypeError, match="unsupported operand"):  # propagates: traceback, exit code 1
        main(["classification", "--output", str(tmp_path / "run")])


def test_task_cli_is_a_module_level_lightning_cli() -> None:
    from lightning.pytorch.cli import LightningCLI

    from tasks.runner.task_cli import TaskCLI

    assert issubclass(TaskCLI, LightningCLI) and TaskCLI.__qualname__ == "TaskCLI"


def test_print_config_shows_shortcuts_over_the_packaged_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["classification", "--norm", "gn", "--batch-size", "8", "--seed", "3", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["model"]["norm"], config["data"]["batch_size"], config["seed_everything"]) == ("gn", 8, 3)
    assert config["data"]["dataset"] == "digits" and config["threads"] == 1  # configs/classification.yaml
    assert config["trainer"]["callbacks"][0]["class_path"].endswith("ModelCheckpoint")


def test_config_file_then_later_flags_override(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"model": {"norm": "ln", "lr": 0.05}, "data": {"batch_size": 16}}))
    with pytest.raises(SystemExit):
        main(["classification", "--config", str(mine), "--batch-size", "4", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]  # the flat model.lr of earlier versions, shown where it lives now
    assert (model["norm"], model["sgd"]["lr"], config["data"]["batch_size"]) == ("ln", 0.05, 4)


def test_run_writes_results_logs_and_tests_the_best_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        argv = ["--norm", "bgn", "--batch-size", "8", "--seed", "1", "--threads", "2", *QUICK]
        argv += ["--max-epochs", "3"]  # the best checkpoint need not be the last
        assert main(["classification", *argv, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((out / "results.json").read_text())
    assert (record["task"], record["norm"], record["groups"], record["batch_size"], record["seed"]) == (
        "classification", "bgn", "auto", 8, 1
    )  # fmt: skip
    assert set(record["metrics"]) >= {"test/acc", "test/acc_top5", "test/loss", "val/acc", "val/acc_best"}
    assert all(0.0 <= record["metrics"][k] <= 1.0 for k in ("test/acc", "test/acc_top5", "val/acc"))
    assert record["epochs"] == 3 and record["global_step"] == 9
    # val/* describe the tested (best) checkpoint, validated again, and say which epoch it is
    assert record["metrics"]["val/acc"] == pytest.approx(record["metrics"]["val/acc_best"])
    assert record["checkpoint_step"] == 3 * (record["checkpoint_epoch"] + 1)
    assert record["checkpoint"].endswith(f"epoch{record['checkpoint_epoch']:03d}.ckpt")
    assert record["wall_time_s"] >= record["fit_time_s"] > 0
    assert Path(record["checkpoint"]).is_file() and Path(record["checkpoint"]).parent == out / "checkpoints"
    # auto-G at batch 8 (reference 32) for widths 32, 64, 128: G = C / 4
    assert record["num_groups"]["histogram"] == {"16": 2, "32": 1, "8": 2}
    assert record["config"]["model"]["norm"] == "bgn" and record["config"]["trainer"]["max_epochs"] == 3
    assert record["hparams"]["num_classes"] == 10 and record["hparams"]["in_channels"] == 1
    assert record["versions"]["lightning"] and record["command"][:2] == ["bgn-task", "classification"]
    assert record["torch_threads"] == 2 and record["config"]["threads"] == 2
    assert (out / "csv" / "metrics.csv").is_file() and list((out / "tensorboard").glob("events.*"))
    assert (out / "csv" / "config.yaml").is_file()


def test_default_output_directory_names_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["classification", "--norm", "pn", "--batch-size", "4", *QUICK]) == 0
    (run,) = (tmp_path / "outputs" / "classification").iterdir()
    assert run.name.endswith("-pn-bs4-seed0") and (run / "results.json").is_file()


@pytest.mark.parametrize(("content", "message"), [
    ("model:\n  norm: bgn\n  lr: [0.1\n", "bad.yaml:4:1: invalid YAML: expected ',' or ']'"),
    ("model:\n  nrom: bgn\n", "Group 'model' does not accept option 'nrom' ('bgn-task classification"),
    ("model:\n  lr: fast\n", 'Parser key "model.lr": Expected a <class \'float\'>. Got value: fast'),
    (None, "no such file"),
])  # fmt: skip
def test_config_errors_are_one_line_naming_the_file(tmp_path, capsys, content, message) -> None:
    config = tmp_path / "bad.yaml"
    if content is not None:
        config.write_text(content)
    assert main(["classification", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "usage:" not in err[0] and "<unicode string>" not in err[0]


def test_groups_that_do_not_fit_a_layer_are_one_line_before_any_step(tmp_path, capsys) -> None:
    argv = ["classification", "--output", str(tmp_path / "run"), *QUICK]
    assert main([*argv, "--norm", "bgn", "--groups", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "bgn-task: error: --groups 7 does not fit layer 'net.1' (BatchGroupNorm2d, C=32, D=C*8x8=2048)"
    )
    assert "valid here: 1, 2, 4, 8, 16, 32, 64" in err[-1] and "Traceback" not in "\n".join(err)
    assert main([*argv, "--norm", "gn", "--groups", "7"]) == 2  # never silently a divisor of C
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gn: num_groups=7 must divide the layer's C=32; valid: 1, 2, 4, 8, 16, 32" in last
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_groups_error_comes_before_the_model_summary_and_lightning_noise(tmp_path, capsys, caplog) -> None:
    summary = "--trainer.enable_model_summary=true"
    argv = ["classification", "--output", str(tmp_path / "run"), *QUICK, summary]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--norm", "bgn", "--groups", "7"]) == 2
    captured = capsys.readouterr()
    assert "--groups 7 does not fit layer" in captured.err.strip().splitlines()[-1]
    shown = captured.out + captured.err + caplog.text
    assert "Trainable params" not in shown  # the summary waits for the first forward
    assert "Seed set to" not in shown and "model summary" not in shown
    assert "TPU available: False" not in shown  # accelerators that do not exist go unmentioned


def test_normswap_from_the_cli_joins_the_tasks_callbacks_and_is_recorded(tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["classification", "--norm", "bn", "--trainer.callbacks=bgn_lightning.NormSwap",
            "--trainer.callbacks.norm=gn", "--output", str(out), *QUICK]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in record["config"]["trainer"]["callbacks"]]
    assert callbacks == ["ModelCheckpoint", "LearningRateMonitor", "NormSwap"]  # appended, not replaced
    assert record["norm"] == "gn" and record["norm_swap"]["from"] == "bn"
    assert record["norm_swap"]["replaced"] == {"BatchNorm2d -> GroupNorm": 5}
    assert Path(record["checkpoint"]).is_file()  # the task's checkpoint policy still ran
    assert oct((out / "results.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sync_norm_shortcut_adds_the_plugin_and_is_recorded(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["classification", "--sync-norm", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["sync_norm"] is True
    assert translate_shortcuts(["--sync-norm"]) == ["--sync_norm", "true"]


def test_help_imports_no_torch_and_lists_the_builtin_norms() -> None:
    import subprocess

    code = ("import sys; from tasks.runner.cli import main; main(['--help']); "
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "False"
    from bgn_lightning import available_norms

    assert list(cli.BUILTIN_NORMS) == available_norms()[: len(cli.BUILTIN_NORMS)]  # registered first


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tasks.runner.bench.bench_main", interrupted)
    assert main(["bench", "--task", "classification"]) == 130
    assert capsys.readouterr().err.strip() == "bgn-task: interrupted; re-run the same command to resume"


def test_the_runner_modules_import_each_other_without_a_circle() -> None:
    import ast
    import graphlib

    import tasks.runner

    root = Path(tasks.runner.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks.runner."):
                deps.add(node.module.split(".")[2])
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle
    assert order.index("discovery") < order.index("cli") and order.index("sweep") < order.index("cli")
