"""Time the headline classification run, ``bgn-task classification --norm bgn``, end to end.

Each repeat is a fresh process (so the wall time includes Python start-up and the imports a user
waits for) writing into a temporary directory; the test accuracy and the run's own fit/test times
come from its ``results.json``. Target (issue 4): under 2 minutes on a 2-core CPU with test
accuracy >= 95 % on the embedded digits. The machine's load average is printed with each run,
because other processes on a shared CPU change the timing a lot.

    python benchmarks/classification_default_run.py                  # one run, as configured (1 thread)
    python benchmarks/classification_default_run.py --repeats 3 --threads 2
    python benchmarks/classification_default_run.py -- --norm bn     # other run arguments
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S, TARGET_ACC = 120.0, 0.95


def one_run(extra: list[str], threads: int | None) -> dict[str, float]:
    """Run ``bgn-task classification --norm bgn`` once; wall time, fit time and metrics."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "tasks.runner.cli", "classification", "--norm", "bgn", "--output", out,
                "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
        if threads is not None:
            argv += ["--threads", str(threads)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        record = json.loads((Path(out) / "results.json").read_text())
    return {
        "wall_s": wall,
        "fit_s": record["fit_time_s"],
        "test_acc": record["metrics"]["test/acc"],
        "epochs": record["epochs"],
        "threads": record["torch_threads"],
        "load_before": load,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="--threads of the run (default: config's)")
    parser.add_argument("extra", nargs="*", help="extra bgn-task arguments (after --)")
    args = parser.parse_args()
    runs = []
    for i in range(args.repeats):
        run = one_run(args.extra, args.threads)
        runs.append(run)
        print(
            f"run {i + 1}: wall {run['wall_s']:.1f} s (fit {run['fit_s']:.1f} s, {run['epochs']} epochs, "
            f"{run['threads']} thread(s)), "
            f"test/acc {run['test_acc']:.4f}, load average before {run['load_before']:.2f}"
        )
    wall = statistics.median(r["wall_s"] for r in runs)
    acc = statistics.median(r["test_acc"] for r in runs)
    ok = wall < TARGET_S and acc >= TARGET_ACC
    print(f"median: wall {wall:.1f} s, test/acc {acc:.4f} -> target (<{TARGET_S:.0f} s, >={TARGET_ACC}) "
          f"{'met' if ok else 'MISSED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
