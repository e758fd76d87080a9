"""`bgn-task bench`: a 2x2 grid runs, resumes after a simulated interruption and writes its reports."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tasks.common.sweep import Cell, Grid, parse_epochs

RUN_ARGS = [
    "--accelerator", "cpu", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "2",
]  # fmt: skip


def _bench(out: Path, *extra: str) -> list[str]:
    return ["bench", "--task", "classification", "--norms", "bn,bgn", "--batch-sizes", "4,8", "--seeds", "0",
            "--max-epochs", "1", "--threads", "1", "--output", str(out), *extra, "--", *RUN_ARGS]  # fmt: skip


def test_grid_resumes_after_interruption_and_writes_reports(tmp_path: Path, caplog) -> None:
    out = tmp_path / "sweep"
    caplog.set_level(logging.INFO, logger="tasks")
    assert main(_bench(out)) == 0
    cells = [out / "classification" / n / f"bs{b}" / "seed0" for n in ("bn", "bgn") for b in (4, 8)]
    assert all((c / "results.json").is_file() and (c / "run.log").is_file() for c in cells)
    first = {c: (c / "results.json").read_text() for c in cells}
    assert json.loads(first[cells[3]])["batch_size"] == 8 and json.loads(first[cells[3]])["norm"] == "bgn"

    # Simulate a run killed mid-way: no results.json, leftovers in its directory, reports not yet written.
    victim = cells[3]
    (victim / "results.json").unlink()
    (victim / "leftover.ckpt").write_text("partial")
    for name in ("results.csv", "results.md", "accuracy_vs_batch_size.png"):
        (out / name).unlink()
    caplog.clear()
    assert main(_bench(out)) == 0

    lines = [r.getMessage() for r in caplog.records if "bs=" in r.getMessage()]
    assert len(lines) == 4 and sum("skipped" in line for line in lines) == 3
    assert any(
        line.startswith("[4/4] bgn bs=8 seed=0: test/acc=") and "skipped" not in line for line in lines
    )
    assert (victim / "results.json").is_file() and not (victim / "leftover.ckpt").exists()
    assert all((c / "results.json").read_text() == first[c] for c in cells[:3])  # finished runs untouched

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
    assert not (out / "results.md").exists()


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
