"""``--norm-batch-size`` of every task run, ``bench --norm-batch-sizes`` and its report columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.common.contract import Metric
from tasks.runner.cli import main
from tasks.runner.report import markdown_table, summarize
from tasks.runner.sweep import Grid

TINY = ["--max-epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--threads", "1"]  # fmt: skip


def test_a_run_records_its_norm_batch_size_and_auto_groups_follow_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["classification", "--norm", "bgn", "--batch-size", "16", "--norm-batch-size", "4",
                 "--output", str(out), *TINY]) == 0  # fmt: skip
    record = json.loads((out / "results.json").read_text())
    assert record["norm_batch_size"] == 4 and record["batch_size"] == 16
    # auto-G at b = 4 of 32: G = C/8 where that is valid (C = 32, 64 in the small CNN)
    assert set(record["num_groups"]["histogram"]) <= {"4", "8", "2", "1", "16"}


def test_norms_without_batch_statistics_say_it_has_no_effect(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert main(["classification", "--norm", "gn", "--batch-size", "8", "--norm-batch-size", "2",
                     "--output", str(out), *TINY]) == 0  # fmt: skip
    said = "--norm-batch-size 2 has no effect: no norm layer of this model uses batch statistics (--norm gn)"
    assert said in caplog.text


@pytest.mark.parametrize(("value", "message"), [
    ("0", "--norm-batch-size must be a positive int (samples per set of norm statistics), got 0"),
    ("64", "--norm-batch-size 64 is larger than the batch (--batch-size 16)"),
    ("two", 'Parser key "norm_batch_size"'),
])  # fmt: skip
def test_bad_norm_batch_size_is_one_line_and_exit_2(tmp_path: Path, capsys, value: str, message: str) -> None:
    out = tmp_path / "run"
    assert main(["classification", "--norm", "bgn", "--batch-size", "16", "--norm-batch-size", value,
                 "--output", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_grid_sweeps_norm_batch_sizes_once_per_norm_without_batch_statistics() -> None:
    grid = Grid("classification", ["bn", "bgn", "gn"], [32], [0, 1], Path("o"), norm_batch_sizes=[2, 8])
    cells = grid.cells()
    assert [(c.norm, c.norm_batch_size) for c in cells if c.seed == 0] == [
        ("bn", 2), ("bn", 8), ("bgn", 2), ("bgn", 8), ("gn", None)]
    argv = grid.run_argv(cells[0])
    assert argv[argv.index("--norm-batch-size") + 1] == "2"
    assert cells[0].directory(Path("o"), "classification") == Path("o/classification/bn/bs32-nb2/seed0")
    assert "--norm-batch-size" not in grid.run_argv(cells[-1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_sizes": [16, 32]}, "sweeps b at one batch size"),
    ({"norm_batch_sizes": [2, 64]}, r"norm batch sizes \[64\] are larger than the batch size 32"),
    ({"norm_batch_sizes": [0]}, "norm batch sizes must be positive ints"),
    ({"norm_batch_sizes": [2, 2]}, "norm batch sizes has duplicates"),
])  # fmt: skip
def test_grid_rejects_bad_norm_batch_sizes(kwargs: dict, message: str) -> None:
    spec = {"task": "classification", "norms": ["bn"], "batch_sizes": [32], "seeds": [0], "output": Path("o"),
            "norm_batch_sizes": [2]}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Grid(**{**spec, **kwargs})


def test_bench_norm_batch_sizes_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["bench", "--task", "classification", "--norms", "bn,gn", "--batch-sizes", "8",
            "--norm-batch-sizes", "2,8", "--max-epochs", "1", "--threads", "1", "--output", str(out), "--",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.parent.parent.name for p in out.glob("classification/*/*/seed0/results.json")) == [
        "bs8", "bs8-nb2", "bs8-nb8"]
    md = (out / "results.md").read_text()
    assert "vs norm batch size b (B = 8)" in md and "| norm | b = 2 | b = 8 |" in md
    assert "gn use no batch statistics" in md
    gn_row = next(line for line in md.splitlines() if line.startswith("| gn |"))
    assert gn_row.count("-") == 0  # the gn runs fill every b column
    assert (out / "accuracy_vs_batch_size.png").stat().st_size > 0
    assert "norm_batch_size" in (out / "results.csv").read_text().splitlines()[0]


def test_summary_by_norm_batch_size_repeats_runs_without_one() -> None:
    acc = Metric("test/acc", "top-1 accuracy", unit="%")
    rows = [("bn", {"batch_size": 32, "norm_batch_size": 2, "metrics": {"test/acc": 0.5}}),
            ("bn", {"batch_size": 32, "norm_batch_size": 8, "metrics": {"test/acc": 0.7}}),
            ("gn", {"batch_size": 32, "norm_batch_size": None, "metrics": {"test/acc": 0.6}})]  # fmt: skip
    summary = summarize(rows, acc, "norm_batch_size", [2, 8])
    assert summary[("gn", 2)].mean == summary[("gn", 8)].mean == pytest.approx(60.0)
    table = markdown_table(summary, ["bn", "gn"], [2, 8], acc, "norm_batch_size")
    assert "| bn | 50.00 | **70.00** |" in table and "| gn | **60.00** | 60.00 |" in table


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grid", sorted((ROOT / "configs").glob("bench_*.yaml")), ids=lambda p: p.name)
def test_every_bench_config_makes_a_valid_grid(grid: Path, capsys, monkeypatch) -> None:
    """The shipped grid files (the small-batch study, the G sweep...) parse and list their cells."""
    monkeypatch.chdir(ROOT)
    assert main(["bench", "--config", str(grid), "--dry-run", "--", "--data-dir", "data"]) == 0
    assert "--norm" in capsys.readouterr().out
