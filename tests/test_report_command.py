"""``bgn-task report DIR...`` over bench folders (cells written by the test, no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tasks.runner.cli import main


def _cell(root: Path, norm: str, seed: int, acc: float, *, b: int | None = None, task: str = "classification",
          extra: tuple[str, ...] = (), batch: int = 32, axis: str | None = None) -> Path:
    name = f"bs{batch}" + ("" if b is None else f"-nb{b}")
    cell = root / task / norm / (axis or "") / name / f"seed{seed}"
    cell.mkdir(parents=True)
    argv = [task, "--max-epochs", "10", *extra, "--norm", norm, "--batch-size", str(batch)]
    if axis is not None:
        key, value = axis.split("=", 1)
        argv += [f"--model.{key}", value]
    argv += ["--seed", str(seed)]
    argv += [] if b is None else ["--norm-batch-size", str(b)]
    argv += ["--output", str(cell), "--threads", "1"]
    (cell / "bench_args.json").write_text(json.dumps({"hash": "x", "argv": argv}))
    record = {"schema": 1, "task": task, "norm": norm, "batch_size": batch, "norm_batch_size": b,
              "seed": seed, "dataset": "imagefolder", "metrics": {"test/acc": acc, "test/acc_top5": 0.9},
              "config": {}}
    (cell / "results.json").write_text(json.dumps(record))
    return cell


def _grid(root: Path) -> None:
    accs = [(0.30, 0.70, 0.60, 0.71, 0.62), (0.32, 0.71, 0.61, 0.70, 0.63), (0.31, 0.72, 0.62, 0.72, 0.61)]
    for seed, (bn2, bn32, bgn2, bgn32, gn) in enumerate(accs):
        _cell(root, "bn", seed, bn2, b=2)
        _cell(root, "bn", seed, bn32, b=32)
        _cell(root, "bgn", seed, bgn2, b=2)
        _cell(root, "bgn", seed, bgn32, b=32)
        _cell(root, "gn", seed, gn)


def test_report_tables_marks_csv_and_plot(tmp_path: Path) -> None:
    bench, other = tmp_path / "bench", tmp_path / "fsl_bench"
    _grid(bench)
    stale = _cell(tmp_path / "old", "bn", 0, 0.99, b=2)  # a kept-aside cell is never read
    stale.rename(bench / "classification" / "bn" / "bs32-nb2" / "seed0.previous-abc123")
    _cell(other, "bn", 0, 0.5, task="fsl", batch=4)
    out = tmp_path / "report"
    assert main(["report", str(bench), str(other), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## classification on imagefolder" in md and "## fsl on imagefolder" in md
    table = md.split("### top-1 accuracy (%): `test/acc` (primary)")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| norm | b = 2 | b = 32 |"
    assert rows[1] == "| bn | 31.00 ± 1.00 | **71.00 ± 1.00** |"  # the .previous- cell's 99 % is not in it
    assert rows[2] == "| bgn | 61.00 ± 1.00 ≈ | **71.00 ± 1.00** |"  # 61 vs 62: within noise of the best
    assert rows[3] == "| gn | **62.00 ± 1.00** | 62.00 ± 1.00 |"  # gn fills both b columns; 62 vs 71: not
    assert "Optimisation batch B = 32 in every run" in md and "15 runs (seeds 0, 1, 2)" in md
    assert (out / "classification.png").stat().st_size > 0 and (out / "fsl.png").stat().st_size > 0
    with (out / "report.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 16


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_report_bad_folders_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert "is not a bench output" in _error(capsys, ["report", str(tmp_path)])
    mixed = tmp_path / "mixed"
    _cell(mixed, "bn", 0, 0.5)
    _cell(mixed, "bn", 0, 0.5, task="uda")
    assert "mixes benches of tasks classification, uda" in _error(capsys, ["report", str(mixed)])
    a, b = tmp_path / "a", tmp_path / "b"
    _cell(a, "bn", 0, 0.5)
    _cell(b, "bn", 1, 0.5, extra=("--model.lr", "0.5"))
    assert "ran with other settings than the rest of the classification runs" in _error(
        capsys, ["report", str(a), str(b)])
    c = tmp_path / "c"
    _cell(c, "bn", 0, 0.5, b=2)
    _cell(c, "bn", 1, 0.5)
    assert "mix a norm batch size sweep with whole-batch runs of bn" in _error(capsys, ["report", str(c)])


def test_report_draws_the_values_per_statistic_heat_map(tmp_path: Path) -> None:
    bench = tmp_path / "gsweep"
    for v in (64, 1024):
        for b in (2, 32):
            axis = f"norm_kwargs={{values_per_statistic: {v}}}"
            _cell(bench, "bgn", 0, 0.5 + v / 1e4 + b / 1e3, b=b, axis=axis)
    out = tmp_path / "report"
    assert main(["report", str(bench), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| bgn, norm_kwargs={values_per_statistic: 1024} | **60.44** | **63.44** |" in md
    assert (out / "classification_values_per_statistic.png").stat().st_size > 0


def test_report_fits_the_best_values_per_statistic_per_column(tmp_path: Path) -> None:
    bench = tmp_path / "gsweep"
    for v in (16, 128, 1024, 8192, 65536):
        for b, centre in ((2, 10.0), (32, 8.0)):  # accuracy peaks at log2 V = 10 (b = 2) and 8 (b = 32)
            axis = f"norm_kwargs={{values_per_statistic: {v}}}"
            _cell(bench, "bgn", 0, 0.6 - 0.004 * (math.log2(v) - centre) ** 2, b=b, axis=axis)
    out = tmp_path / "report"
    assert main(["report", str(bench), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "- b = 2: peak V ≈ 1,024; best measured V = 1,024" in md
    assert "- b = 32: peak V ≈ 256; best measured V = 128" in md
    assert "The peaks span 2.0 octaves of V across b (geometric mean V ≈ 512)." in md
