"""Time the headline few-shot run, ``bgn-task fsl --norm bgn``, end to end.

Each repeat is a fresh process (the wall time includes Python start-up and imports) writing into a
temporary directory; accuracies and the run's own fit/test times come from its ``results.json``.
Target (issue 5): under 3 minutes on a 2-core CPU, 5-way 1-shot accuracy far above 20 % chance.
``--cold`` also renders the glyph cache inside the timed run (a fresh data directory), as on a
first run on a new machine. The load average and the run's CPU time (user + system, all threads)
are printed with each run: other processes on a shared CPU change the wall time a lot, and with
``--threads 1`` the CPU time is what the run costs on one otherwise idle core.

    python benchmarks/fsl_default_run.py                       # warm glyph cache, default threads
    python benchmarks/fsl_default_run.py --cold --repeats 2
    python benchmarks/fsl_default_run.py -- --norm bn          # other run arguments
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 180.0


def one_run(extra: list[str], threads: int | None, data_dir: str | None) -> dict[str, float]:
    """Run ``bgn-task fsl --norm bgn`` once; wall, fit and test times and the test accuracies."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "tasks.runner.cli", "fsl", "--norm", "bgn", "--output", out,
                "--trainer.enable_progress_bar", "false"]  # fmt: skip
        if data_dir is not None:
            argv += ["--data-dir", data_dir]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([*argv, *extra], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = json.loads((Path(out) / "results.json").read_text())
    metrics = record["metrics"]
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "fit_s": record["fit_time_s"],
        "test_s": record["test_time_s"],
        "acc_1shot": metrics["test/acc_1shot"],
        "ci_1shot": metrics["test/acc_1shot_ci95"],
        "acc_5shot": metrics["test/acc_5shot_from_1shot"],
        "ci_5shot": metrics["test/acc_5shot_from_1shot_ci95"],
        "load_before": load,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run")
    parser.add_argument("--cold", action="store_true", help="render the glyphs inside the timed run")
    parser.add_argument("extra", nargs="*", help="extra bgn-task arguments (after --)")
    args = parser.parse_args()
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as data_dir:
            run = one_run(args.extra, args.threads, data_dir if args.cold else None)
        verdict = "ok" if run["wall_s"] < TARGET_S else "SLOW"
        print(
            f"run {i + 1}: wall {run['wall_s']:.1f} s [{verdict}] (fit {run['fit_s']:.1f} s, test "
            f"{run['test_s']:.1f} s, CPU {run['cpu_s']:.1f} s, load {run['load_before']:.2f}); 5-way 1-shot "
            f"{100 * run['acc_1shot']:.2f} ± {100 * run['ci_1shot']:.2f} %, 5-way 5-shot (1-shot-trained) "
            f"{100 * run['acc_5shot']:.2f} ± {100 * run['ci_5shot']:.2f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
