"""`bgn-task bench`: a 2x2 grid is killed mid-run, resumes, and writes its reports; grid options."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.runner.cli import main
from tasks.runner.sweep import Cell, Grid, args_hash, parse_epochs
from tests.processes import gone, wait_for

RUN_ARGS = [
    "--accelerator", "cpu", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "2",
]  # fmt: skip


def _bench(out: Path, epochs: str = "1") -> list[str]:
    return ["bench", "--task", "classification", "--norms", "bn,bgn", "--batch-sizes", "4,8", "--seeds", "0",
            "--max-epochs", epochs, "--threads", "1", "--output", str(out), "--", *RUN_ARGS]  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_killed_grid_resumes_and_writes_reports(tmp_path: Path, caplog) -> None:
    out = tmp_path / "sweep"
    done, victim = (out / "classification" / "bn" / f"bs{b}" / "seed0" for b in (4, 8))
    # 1. The bench in its own process; its second run (bn, B=8, 500 epochs) is killed with it.
    argv = [sys.executable, "-m", "tasks.runner.cli", *_bench(out, epochs="4:1,8:500")]
    bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (done / "results.json").is_file() and "[pid " in _read(victim / "run.log"),
                 timeout=180)
    finally:
        bench.kill()
        bench.wait()
    run_pid = int(re.search(r"\[pid (\d+)\]", _read(victim / "run.log")).group(1))
    wait_for(lambda: gone(run_pid), timeout=10)  # the run ended itself with the bench
    assert not (victim / "results.json").exists() and not (out / "results.md").exists()
    finished = (done / "results.json").read_text()

    # 2. Re-running resumes: the finished run is skipped, the killed one starts again, the rest run.
    caplog.set_level(logging.INFO, logger="tasks")
    assert main(_bench(out, epochs="1")) == 0
    lines = [r.getMessage() for r in caplog.records if "bs=" in r.getMessage()]
    assert len(lines) == 4 and [line for line in lines if "skipped" in line] == [
        "[1/4] bn bs=4 seed=0: test/acc="
        + f"{json.loads(finished)['metrics']['test/acc']:.4f}, test/acc_top5="
        + f"{json.loads(finished)['metrics']['test/acc_top5']:.4f} "
        + "(done before with the same arguments, skipped)"
    ]
    assert (done / "results.json").read_text() == finished
    record = json.loads((victim / "results.json").read_text())
    assert (record["norm"], record["batch_size"], record["epochs"]) == ("bn", 8, 1)

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["norm"], r["batch_size"]) for r in rows) == [
        ("bgn", "4"),
        ("bgn", "8"),
        ("bn", "4"),
        ("bn", "8"),
    ]
    md = (out / "results.md").read_text()
    assert (
        "| norm | B = 4 | B = 8 |" in md and "| bgn |" in md and "bgn-task bench --task classification" in md
    )
    assert (out / "accuracy_vs_batch_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`test/acc_top5`" in md  # every metric the task declares gets its table

    # 3. Other arguments: the stored results are not reused; the old cells are kept aside.
    caplog.clear()
    assert main([*_bench(out, epochs="1"), "--trainer.limit_test_batches", "1"]) == 0
    lines = [r.getMessage() for r in caplog.records if "bs=" in r.getMessage()]
    assert len(lines) == 4 and all("arguments changed since the stored result" in line for line in lines)
    kept = list(done.parent.glob("seed0.previous-*"))
    assert len(kept) == 1 and (kept[0] / "results.json").read_text() == finished
    assert json.loads((done / "results.json").read_text())["config"]["trainer"]["limit_test_batches"] == 1


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_failed_runs_are_reported_and_retried(tmp_path: Path, caplog) -> None:
    out = tmp_path / "sweep"
    caplog.set_level(logging.INFO, logger="tasks")
    missing = str(tmp_path / "missing")
    argv = ["bench", "--task", "classification", "--norms", "bn", "--batch-sizes", "4", "--output", str(out),
            "--threads", "1", "--", "--data", "imagefolder", "--data-dir", missing]  # fmt: skip
    assert main(argv) == 1
    run_log = out / "classification" / "bn" / "bs4" / "seed0" / "run.log"
    assert "imagefolder: dataset not found" in run_log.read_text()
    assert any("FAILED (exit 2)" in r.getMessage() for r in caplog.records)
    failure = json.loads((run_log.parent / "error.json").read_text())  # the run's error, not its log
    assert (failure["kind"], failure["exit_code"]) == ("DatasetNotFoundError", 2)
    assert failure["message"].startswith("imagefolder: dataset not found")
    assert any(f"FAILED (exit 2): {failure['message']}, see " in r.getMessage() for r in caplog.records)
    assert not (out / "results.md").exists()


def test_a_run_failure_round_trips_through_its_cell(tmp_path: Path) -> None:
    from tasks.runner.failure import RunFailure

    assert RunFailure.read(tmp_path) is None  # a run killed before it could write one
    bug = RunFailure.of(TypeError("unsupported operand"), 1)
    bug.write(tmp_path)
    assert RunFailure.read(tmp_path) == bug == RunFailure("TypeError", "unsupported operand", 1)


def test_grid_from_yaml_with_epochs_per_batch_size(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "task": "classification", "norms": ["gn", "ln"], "batch_sizes": [16], "seeds": [0],
        "max_epochs": {16: 1}, "output": str(tmp_path / "sweep"), "threads": 1, "args": RUN_ARGS,
    }))  # fmt: skip
    assert main(["bench", "--config", str(grid_file), "--norms", "ln"]) == 0  # flags override the file
    record = json.loads(
        (tmp_path / "sweep" / "classification" / "ln" / "bs16" / "seed0" / "results.json").read_text()
    )
    assert record["epochs"] == 1 and record["config"]["trainer"]["max_epochs"] == 1
    assert not (tmp_path / "sweep" / "classification" / "gn").exists()
    run_log = (tmp_path / "sweep" / "classification" / "ln" / "bs16" / "seed0" / "run.log").read_text()
    assert "train epoch 1/1 step 2/2: loss " in run_log  # progress lines, not a terminal's bar


def test_grid_argv_puts_the_cell_last() -> None:
    grid = Grid(
        "classification",
        ["bgn"],
        [2, 64],
        [0],
        Path("o"),
        max_epochs={2: 3, 64: 15},
        run_args=["--norm", "bn"],
    )
    argv = grid.run_argv(Cell("bgn", 64, 0))
    assert argv[:3] == ["classification", "--norm", "bn"]
    assert argv[argv.index("--norm", 2) + 1] == "bgn" and argv[argv.index("--max-epochs") + 1] == "15"
    assert argv[argv.index("--output") + 1] == str(Path("o") / "classification" / "bgn" / "bs64" / "seed0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norms": []}, "norms must not be empty"),
        ({"seeds": [0, 0]}, "seeds has duplicates"),
        ({"batch_sizes": [0]}, "batch sizes must be positive ints"),
        ({"max_epochs": {2: 1}}, "no entry for batch sizes \\[4\\]"),
    ],
)
def test_grid_rejects_bad_values(kwargs: dict, message: str) -> None:
    spec = {
        "task": "classification",
        "norms": ["bn"],
        "batch_sizes": [2, 4],
        "seeds": [0],
        "output": Path("o"),
    }
    with pytest.raises(ValueError, match=message):
        Grid(**{**spec, **kwargs})


def test_parse_epochs_forms() -> None:
    assert parse_epochs("3") == 3 and parse_epochs(None) is None
    assert parse_epochs("2:3,64:15") == {2: 3, 64: 15} == parse_epochs({2: "3", "64": 15})
    with pytest.raises(ValueError, match="batch:epochs"):
        parse_epochs("2-3")


def test_extra_axis_cells_rows_and_argv() -> None:
    axes = {"model.backbone": ["small_cnn", "resnet20"]}
    grid = Grid("classification", ["bn", "bgn"], [4], [0], Path("o"), axes=axes)
    cells = grid.cells()
    assert len(cells) == 4 and grid.rows() == [
        "bn, backbone=small_cnn", "bn, backbone=resnet20",
        "bgn, backbone=small_cnn", "bgn, backbone=resnet20",
    ]  # fmt: skip
    argv = grid.run_argv(cells[1])
    assert argv[argv.index("--model.backbone") + 1] == "resnet20"
    expected = Path("o/classification/bn/backbone=resnet20/bs4/seed0")
    assert cells[1].directory(Path("o"), "classification") == expected


def test_args_hash_ignores_output_threads_and_debug() -> None:
    base = ["classification", "--norm", "bn", "--output", "a", "--threads", "1"]
    assert args_hash(base) == args_hash([*base[:3], "--output", "b", "--threads", "2", "--debug"])
    assert args_hash(base) != args_hash([*base, "--max-epochs", "3"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--metrics", "test/nope"],
     "task classification reports no metric 'test/nope'; choose from: test/acc, test/acc_top5"),
    (["--vary", "model.nope=1,2"], "axis 'model.nope': ClassificationModule takes no 'nope'; it takes: norm"),
    (["--vary", "optimizer.lr=1"], "axis 'optimizer.lr' must be model.<arg>, data.<arg> or trainer.<arg>"),
    (["--vary", "model.lr"], "--vary takes KEY=V1,V2"),
    (["--norms", "bn,batchnorm"], "unknown norm 'batchnorm'; choose from: bn, bgn"),
    (["--jobs", "two"], "argument --jobs: invalid int value: 'two'"),
])  # fmt: skip
def test_bad_bench_values_are_one_line_and_write_nothing(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "sweep"
    argv = ["bench", "--task", "classification", "--norms", "bn", "--batch-sizes", "4", "--output", str(out)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
