"""The UDA suite's measured numbers (docs/uda.md): ``bgn-task bench`` sweeps, run one after another.

1. ``default``: the default run (``bgn-task uda --norm bgn``, 8 epochs, ``separate``, trade-off
   0.1) x the suite's default axes, method (DANN, source-only) x AdaBN (off, on), seeds 0, 1, 2
   on the embedded synth→digits pair: DANN against source-only and source-only + AdaBN.
2. ``trade_off_0.3`` (DANN, AdaBN off and on) and ``trade_off_1.0`` (DANN): the trade-offs the
   default was chosen against, on the same pair and budget.
3. ``mnist_usps``: method x AdaBN on MNIST→USPS from the ImageFolder copies in
   ``../shared/datasets`` (both at 16x16 grey, USPS's native size), one epoch, DANN at
   trade-off 0.3, seeds 0, 1, 2.

Every run uses one thread; ``--jobs`` runs go at once (the CPU is shared); each sweep writes
results.csv, results.md and accuracy_vs_batch_size.png under ``--output/<name>``, and re-running
skips finished runs.

    python benchmarks/uda_sweep.py                       # all four
    python benchmarks/uda_sweep.py --only default --jobs 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def sweeps(mnist_epochs: int, shared: Path, jobs: int) -> dict[str, list[str]]:
    """The sweeps' ``bgn-task bench`` arguments, by name."""
    common = ["--norms", "bgn", "--batch-sizes", "32", "--jobs", str(jobs), "--threads", "1",
              "--seeds", "0,1,2"]  # fmt: skip
    run = ["--", "--trainer.enable_progress_bar", "false"]
    return {
        "default": [*common, *run],
        "trade_off_0.3": [*common, "--vary", "model.method=dann", "--vary", "model.adabn=false,true",
                          *run, "--model.trade_off", "0.3"],
        "trade_off_1.0": [*common, "--vary", "model.method=dann", "--vary", "model.adabn=false",
                          *run, "--model.trade_off", "1.0"],
        "mnist_usps": [*common, "--max-epochs", str(mnist_epochs), *run, "--model.trade_off", "0.3",
                       "--data", "folders", "--source-dir", str(shared / "mnist"),
                       "--target-dir", str(shared / "usps"), "--data.image_size", "16"],
    }  # fmt: skip


def main() -> None:
    """Run the chosen sweeps and print each one's wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/uda"))
    parser.add_argument("--mnist-epochs", type=int, default=1, help="epochs per run on MNIST→USPS")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding mnist/ and usps/")
    parser.add_argument("--only", action="append", help="run only these sweeps (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once within a sweep")
    args = parser.parse_args()
    for name, argv in sweeps(args.mnist_epochs, args.shared.resolve(), args.jobs).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        command = [sys.executable, "-m", "tasks.runner.cli", "bench", "--task", "uda",
                   "--output", str(args.output / name), *argv]  # fmt: skip
        subprocess.run(command, check=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
