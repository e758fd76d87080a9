"""`bgn-task bench --launcher submitit`: cells as jobs of submitit's local executor (submit, collect,
re-submit a killed job, never submit a running one twice, --wait and the report), a real cell
through it, the SLURM job array submitit builds (fake ``srun``/``sbatch``/``sacct``, no cluster)
and the one-line errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.runner.bench import bench_main
from tasks.runner.cli import main
from tasks.runner.failure import RunFailure
from tests.processes import gone, wait_for

REPO = Path(__file__).resolve().parents[1]
LOCK_FILE = ".bench.lock"  # (this module is light: jobs import it for fake_entry)
RUN_ARGS = [
    "--accelerator", "cpu", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1",
]  # fmt: skip


def fake_entry(argv: list[str], error_dir: Path | None = None) -> int:
    """Stands in for ``bgn-task`` in a job (no torch run): writes the cell's ``results.json``.

    ``BENCH_FAKE_HOLD=<norm>:<batch size>``: that cell saves a checkpoint, writes its pid to
    ``hold.pid`` and sleeps;
    ``BENCH_FAKE_FAIL=<norm>:<batch size>``: that cell fails as a missing dataset does.
    """
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    out, cell = Path(value["--output"]), f"{value['--norm']}:{value['--batch-size']}"
    if os.environ.get("BENCH_FAKE_HOLD") == cell:
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.ckpt").write_text("weights")
        (out / "hold.pid").write_text(str(os.getpid()))
        time.sleep(120)
    if os.environ.get("BENCH_FAKE_FAIL") == cell:
        print("loading the data\nfake: dataset not found in /nowhere", flush=True)
        RunFailure("DatasetNotFoundError", "fake: dataset not found in /nowhere", 2).write(error_dir)
        return 2
    acc = 0.5 + int(value["--batch-size"]) / 100
    record = {
        "schema": 1, "task": argv[0], "dataset": "digits", "norm": value["--norm"],
        "batch_size": int(value["--batch-size"]), "seed": int(value["--seed"]), "config": {},
        "metrics": {"test/acc": acc, "test/acc_top5": 1.0}, "wall_time_s": 0.1, "resumed": "--resume" in argv,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(record))
    return 0


@pytest.fixture
def jobs_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Jobs (processes the local executor starts) import this repository's ``tasks`` and ``tests``;
    a held job the test left running is ended."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for name in ("BENCH_FAKE_HOLD", "BENCH_FAKE_FAIL"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    for held in tmp_path.rglob("hold.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(held.read_text()), signal.SIGKILL)


def _bench(out: Path, *extra: str, norms: str = "bn,bgn", batch_sizes: str = "4,8") -> list[str]:
    return ["bench", "--task", "classification", "--norms", norms, "--batch-sizes", batch_sizes,
            "--max-epochs", "1", "--output", str(out), *extra, "--", *RUN_ARGS]  # fmt: skip


def _one_waited_cell(out: Path, norm: str) -> tuple[Path, list[str]]:
    """A bench of one cell (``norm``, batch size 4, seed 0) on the local executor with ``--wait``:
    the cell's folder and the argv."""
    argv = _bench(out, "--launcher", "submitit", "--cluster", "local", "--wait", norms=norm, batch_sizes="4")
    return out / "classification" / norm / "bs4" / "seed0", argv


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks"]
    caplog.clear()
    return lines


def _job(cell: Path) -> dict:
    return json.loads((cell / "job.json").read_text())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_local_executor_grid_collects_resubmits_a_killed_job_and_never_submits_twice(
    tmp_path: Path, jobs_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    caplog.set_level(logging.INFO, logger="tasks")
    out = tmp_path / "sweep"
    root = out / "classification"
    held = root / "bn" / "bs8" / "seed0"
    others = [root / norm / f"bs{b}" / "seed0" for norm, b in (("bn", 4), ("bgn", 4), ("bgn", 8))]
    argv = _bench(out, "--launcher", "submitit", "--cluster", "local")
    # 1. Submit: four jobs, returns at once; bn B=8 keeps running.
    jobs_env.setenv("BENCH_FAKE_HOLD", "bn:8")
    assert bench_main(argv[1:], entry=fake_entry) == 0
    lines = _lines(caplog)
    assert sum("submitted as job" in line for line in lines) == 4
    assert any(
        re.search(r"submitted 4 jobs \(local\): .*; logs in .*sweep/submitit$", line) for line in lines
    )
    assert "4 of 4 runs queued or running: re-run the same command to collect them" in lines[-1]
    first = _job(held)
    assert (
        first["cluster"] == "local"
        and first["hash"] == json.loads((held / "bench_args.json").read_text())["hash"]
    )
    wait_for(lambda: all((c / "results.json").is_file() for c in others) and (held / "hold.pid").is_file(),
             timeout=60)

    # 2. Re-run: the finished cells are collected, the running job is not submitted again; the
    # local pool refuses the folder while a job runs in it.
    assert bench_main(argv[1:], entry=fake_entry) == 0
    lines = _lines(caplog)
    collected = f"test/acc=0.5400, test/acc_top5=1.0000 (0.1 s) [job {_job(others[0])['job_id']}]"
    assert f"[1/4] bn bs=4 seed=0: {collected}" in lines
    assert f"[2/4] bn bs=8 seed=0: job {first['job_id']} RUNNING" in lines
    assert not any("submitted" in line for line in lines) and _job(held) == first
    assert (out / "results.md").is_file()  # the report of what finished so far
    assert main(_bench(out)) == 2  # the local pool
    assert "bench: 1 cell(s) have a cluster job queued or running" in capsys.readouterr().err

    # 3. The job dies (killed); re-running submits it again, continuing from the checkpoint it left,
    # --wait collects it, the report has all four.
    os.kill(int((held / "hold.pid").read_text()), signal.SIGKILL)
    wait_for(lambda: gone(int(first["job_id"])), timeout=60)
    jobs_env.delenv("BENCH_FAKE_HOLD")
    caplog.clear()
    assert (
        bench_main([*argv[1 : argv.index("--")], "--wait", *argv[argv.index("--") :]], entry=fake_entry) == 0
    )
    lines = _lines(caplog)
    again = _job(held)
    assert again["job_id"] != first["job_id"]
    resubmitted = next(line.splitlines() for line in lines if line.startswith("[2/4]"))
    assert resubmitted[0] == (
        f"[2/4] bn bs=8 seed=0: submitted as job {again['job_id']} [job {first['job_id']} ended without a "
        "result (ENDED); resumes from its last checkpoint]"
    )
    assert resubmitted[1].startswith("    | $ bgn-task classification ")  # the tail of its run.log
    assert json.loads((held / "results.json").read_text())["resumed"]
    log = (held / "run.log").read_text().splitlines()  # both attempts, the second with --resume
    assert [line.split("[job ")[1].split(",")[0] for line in log] == [first["job_id"], again["job_id"]]
    assert log[1].split("  [job")[0].endswith("--threads 1 --resume")
    assert (
        f"[2/4] bn bs=8 seed=0: test/acc=0.5800, test/acc_top5=1.0000 (0.1 s) [job {again['job_id']}]"
        in lines
    )
    assert "| bn | **54.00** | **58.00** |" in (out / "results.md").read_text()  # all four cells
    assert not (out / LOCK_FILE).exists()


def test_a_failed_run_is_reported_with_its_log_tail_and_retried_on_request(
    tmp_path: Path, jobs_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks")
    out = tmp_path / "sweep"
    cell, argv = _one_waited_cell(out, "gn")
    jobs_env.setenv("BENCH_FAKE_FAIL", "gn:4")
    assert bench_main(argv[1:], entry=fake_entry) == 1
    failed = [line for line in _lines(caplog) if "FAILED" in line]
    assert len(failed) == 1 and failed[0].splitlines()[1:] == [
        f"    | $ bgn-task {' '.join(json.loads((cell / 'bench_args.json').read_text())['argv'])}  "
        f"[job {_job(cell)['job_id']}, pid {failed[0].split('pid ')[1].split(']')[0]}]",
        "    | loading the data",
        "    | fake: dataset not found in /nowhere",
    ]
    assert "FAILED (exit 2): fake: dataset not found in /nowhere, see " in failed[0]
    job = _job(cell)
    # re-running reports it again and submits nothing; --retry-failed submits it again
    jobs_env.delenv("BENCH_FAKE_FAIL")
    assert bench_main(argv[1:], entry=fake_entry) == 1
    assert _job(cell) == job and "re-run the same command with --retry-failed" in caplog.text
    caplog.clear()
    assert (
        bench_main(
            [*argv[1 : argv.index("--")], "--retry-failed", *argv[argv.index("--") :]], entry=fake_entry
        )
        == 0
    )
    assert f"its run failed in job {job['job_id']}: fake: dataset not found in /nowhere" in caplog.text
    assert json.loads((cell / "results.json").read_text())["norm"] == "gn"


def test_a_real_cell_runs_through_the_local_executor(
    tmp_path: Path, jobs_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks")
    out = tmp_path / "sweep"
    cell, argv = _one_waited_cell(out, "bgn")
    assert main(argv) == 0
    record = json.loads((cell / "results.json").read_text())
    assert (record["norm"], record["batch_size"], record["torch_threads"]) == ("bgn", 4, 1)
    job = _job(cell)
    assert re.match(r"\$ bgn-task classification .* \[job \d+, pid \d+\]", (cell / "run.log").read_text())
    assert Path(job["log"]).is_file() and Path(job["log"]).is_relative_to(out / "submitit")
    assert "| bgn |" in (out / "results.md").read_text()
    # re-running collects it: nothing is submitted
    caplog.clear()
    assert main(argv) == 0
    assert not any("submitted" in r.getMessage() for r in caplog.records) and _job(cell) == job


FAKE_SLURM = {
    "srun": "#!/bin/sh\nexit 0\n",
    "sbatch": '#!/bin/sh\nn=$(cat "$LOG/count" 2>/dev/null || echo 4241); n=$((n + 1))\n'
    'echo $n > "$LOG/count"\ncp "$1" "$LOG/sbatch-$n.sh"\necho "Submitted batch job $n"\n',
    "sacct": '#!/bin/sh\necho "JobID|State|NodeList"\ncat "$LOG/sacct"\n',
}


def test_slurm_job_array_parameters_and_job_states_without_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import submitit

    caplog.set_level(logging.INFO, logger="tasks")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LOG", str(tmp_path))
    out = tmp_path / "sweep"
    argv = _bench(
        out, "--launcher", "submitit", "--gpus-per-cell", "4", "--cpus-per-cell", "10",
        "--nodes-per-cell", "2", "--timeout-min", "600", "--partition", "gpu", "--array-parallelism", "1",
        "--slurm", "qos=high", "--slurm", "constraint=volta32gb", norms="bgn",
    )  # fmt: skip
    assert main(argv) == 0  # the cluster is detected (srun), one array of two jobs is submitted
    script = (tmp_path / "sbatch-4242.sh").read_text()
    for line in ["--array=0-1%1", "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=2", "--time=600",
                 "--partition=gpu", "--qos=high", "--constraint=volta32gb", "--cpus-per-task=10",
                 "--job-name=bgn-classification"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert not (tmp_path / "sbatch-4243.sh").exists()
    cells = [out / "classification" / "bgn" / f"bs{b}" / "seed0" for b in (4, 8)]
    assert [_job(c)["job_id"] for c in cells] == ["4242_0", "4242_1"]
    run = json.loads((cells[0] / "bench_args.json").read_text())["argv"]
    assert [run[run.index(flag) + 1] for flag in ("--devices", "--trainer.num_nodes", "--threads")] == [
        "4",
        "2",
        "10",
    ]

    # sacct: the first job runs, the second was cancelled: only the second is submitted again
    (tmp_path / "sacct").write_text("4242_0|RUNNING|n1\n4242_1|CANCELLED by 7|n2\n")
    submitit.SlurmJob.watcher.clear()
    caplog.clear()
    assert main(argv) == 0
    assert "[1/2] bgn bs=4 seed=0: job 4242_0 RUNNING" in caplog.text
    assert (
        "[2/2] bgn bs=8 seed=0: submitted as job 4243 [job 4242_1 ended without a result (CANCELLED by 7)]"
        in (caplog.text)
    )
    assert [_job(c)["job_id"] for c in cells] == ["4242_0", "4243"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--launcher", "submitit", "--slurm", "qoss=high"],
     "bench: --slurm qoss: not a parameter of submitit's SlurmExecutor (did you mean qos?); known: "),
    (["--launcher", "submitit", "--slurm", "qos"],
     "bench: --slurm takes KEY=VALUE (e.g. qos=high), got 'qos'"),
    (["--gpus-per-cell", "2"], "bench: --gpus-per-cell needs --launcher submitit"),
    (["--launcher", "submitit", "--jobs", "2"], "bench: --jobs sizes the local pool"),
    (["--launcher", "submitit", "--nodes-per-cell", "0"],
     "bench: --nodes-per-cell must be a positive int, got 0"),
    (["--launcher", "submitit", "--cluster", "local", "--nodes-per-cell", "2"],
     "bench: --nodes-per-cell 2 needs SLURM; the local cluster is this one machine"),
    (["--launcher", "ssh"], "argument --launcher: invalid choice: 'ssh'"),
])  # fmt: skip
def test_bad_launcher_values_are_one_line_and_submit_nothing(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "sweep"
    assert main(_bench(out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_gpus_and_slurm_that_this_machine_lacks_are_one_line(tmp_path, capsys) -> None:
    import torch

    out = tmp_path / "sweep"
    if torch.cuda.device_count() < 64:
        assert main(_bench(out, "--launcher", "submitit", "--cluster", "local", "--gpus-per-cell", "64")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--gpus-per-cell 64: the local cluster (this machine) has" in err[0], err
    if shutil.which("srun") is None:
        assert main(_bench(out, "--launcher", "submitit", "--cluster", "slurm")) == 2
        assert "--cluster slurm: no SLURM on this machine" in capsys.readouterr().err
    assert not out.exists()


def test_without_submitit_the_launcher_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert main(_bench(tmp_path / "sweep", "--launcher", "submitit")) == 2
    assert "the submitit package is not installed" in capsys.readouterr().err


def test_a_folder_another_bench_holds_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys) -> None:
    from tasks.runner.launch import output_lock

    out = tmp_path / "sweep"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "then"}))
    assert main(_bench(out, "--launcher", "submitit", "--cluster", "local")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"bench: {out} is in use by another bench (pid {os.getpid()} on " in err[0]
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing submitted
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    lock.write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "since": "then"}))
    with output_lock(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_the_debug_cluster_runs_the_jobs_inside_the_bench(tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tasks")
    out = tmp_path / "sweep"
    argv = _bench(out, "--launcher", "submitit", "--cluster", "debug", batch_sizes="4")
    assert bench_main(argv[1:], entry=fake_entry) == 0  # waits: the jobs ran here
    cells = [out / "classification" / norm / "bs4" / "seed0" for norm in ("bn", "bgn")]
    assert all(json.loads((c / "results.json").read_text())["batch_size"] == 4 for c in cells)
    assert _job(cells[0])["cluster"] == "debug" and (out / "results.md").is_file()
    print("this process's stdout is its own again")
    assert capsys.readouterr().out == "this process's stdout is its own again\n"
