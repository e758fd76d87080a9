"""A run never writes into a folder that holds another run: refuse, --overwrite, --resume, bench cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.common.errors import UsageError
from tasks.runner.cli import main
from tasks.runner.folders import claim_output

QUICK = [
    "--norm", "bn", "--max-epochs", "1", "--accelerator", "cpu", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_run_loses_nothing_to_a_failed_or_a_second_run(tmp_path: Path, capsys) -> None:
    run1 = tmp_path / "run1"
    assert main(["classification", *QUICK, "--output", str(run1)]) == 0
    before = _snapshot(run1)
    assert "results.json" in before and any(k.startswith("csv/") for k in before)
    capsys.readouterr()
    for extra in (["--norm", "bgn", "--groups", "7"], ["--norm", "gn"]):  # the failing run, then a good one
        assert main(["classification", *QUICK, *extra, "--output", str(run1)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"bgn-task: error: --output {run1} already holds a run (")
        assert "--overwrite moves it aside" in err and "fresh --output" in err
        assert _snapshot(run1) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]


def test_a_run_stopped_by_a_usage_error_leaves_its_fresh_folder_empty(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["classification", *QUICK, "--norm", "bgn", "--groups", "7", "--output", str(run)]) == 2
    assert "--groups 7 does not fit layer" in capsys.readouterr().err
    assert not run.exists()  # the G check failed at the first forward: what it wrote is gone


def test_overwrite_moves_the_earlier_run_aside(tmp_path: Path) -> None:
    run1 = tmp_path / "run1"
    assert main(["classification", *QUICK, "--output", str(run1)]) == 0
    before = _snapshot(run1)
    assert main(["classification", *QUICK, "--norm", "gn", "--output", str(run1), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("run1.previous-*")
    assert _snapshot(aside) == before
    record = json.loads((run1 / "results.json").read_text())
    assert record["norm"] == "gn" and record["bgn_kernels"] is None  # no BGN layer ran
    assert len(list((run1 / "tensorboard").glob("events.*"))) == len(
        list((aside / "tensorboard").glob("events.*"))
    )


def test_resume_continues_an_unfinished_run_from_its_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["classification", *QUICK, "--output", str(run)]) == 0
    (run / "results.json").unlink()  # as if killed after its first epoch
    capsys.readouterr()
    assert main(["classification", *QUICK, "--output", str(run)]) == 2
    assert "--resume continues it from its last checkpoint" in capsys.readouterr().err
    argv = ["classification", *QUICK, "--output", str(run), "--resume", "--max-epochs", "2"]
    assert main(argv) == 0
    record = json.loads((run / "results.json").read_text())
    assert record["epochs"] == 2 and record["global_step"] == 4
    assert (run / "csv" / "metrics.csv").is_file() and (run / "csv-resume1" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    ("files", "overwrite", "resume", "message"),
    [
        (["results.json"], False, True, "holds a finished run (results.json); --overwrite runs it anew"),
        (["csv/metrics.csv"], False, True, "--resume: no checkpoint in"),
        (["checkpoints/a.ckpt"], True, True, "pass one"),
    ],
)
def test_claim_output_refusals(tmp_path: Path, files, overwrite, resume, message) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    with pytest.raises(UsageError, match=re.escape(message)):
        claim_output(tmp_path, overwrite=overwrite, resume=resume)


def test_claim_output_accepts_bench_cells_and_fresh_folders(tmp_path: Path) -> None:
    assert claim_output(tmp_path / "new") is None
    (tmp_path / "bench_args.json").write_text("{}")
    (tmp_path / "run.log").write_text("$ bgn-task ...")
    assert claim_output(tmp_path) is None  # bench wrote them for this very run
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        claim_output(tmp_path / "file")
