"""The UDA suite's measured numbers (docs/uda.md): five ``bgn-task bench`` sweeps, run one after another.

1. ``default``: DANN vs source-only x bn, bgn x seeds 0, 1, 2 on the embedded synth→digits pair.
2. ``mnist_usps``: DANN vs source-only x bn, bgn on MNIST→USPS from the ImageFolder copies in
   ``../shared/datasets`` (both at 16x16 grey, USPS's native size), seeds 0, 1, 2.
3. ``modes``: DANN, bn vs bgn x domain_mode joint, separate x AdaBN off, on (seeds 0, 1, 2).
4. ``joint_long``: DANN with ``joint`` at twice the epochs, bn vs bgn x AdaBN off, on (seeds 0, 1, 2).
5. ``small_batch``: DANN, bn vs bgn at 8 + 8 images per step (a quarter of the epochs: the same
   number of steps), where BGN's auto-G pools 4 channels per statistic (seeds 0, 1, 2).

Every run uses one thread and the sweeps run one run at a time (the CPU is shared); each sweep
writes results.csv, results.md and accuracy_vs_batch_size.png under ``--output/<name>``, and
re-running skips finished runs.

    python benchmarks/uda_sweep.py                       # all five, ~35 min on the shared 2-core CPU
    python benchmarks/uda_sweep.py --only default --epochs 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def sweeps(epochs: int, mnist_epochs: int, shared: Path) -> dict[str, list[str]]:
    """The sweeps' ``bgn-task bench`` arguments, by name."""
    common = ["--norms", "bn,bgn", "--batch-sizes", "32", "--jobs", "1", "--threads", "1"]
    run = ["--", "--trainer.enable_progress_bar", "false"]
    return {
        "default": [*common, "--seeds", "0,1,2", "--max-epochs", str(epochs), *run],
        "mnist_usps": [*common, "--seeds", "0,1,2", "--max-epochs", str(mnist_epochs), *run,
                       "--data", "folders", "--source-dir", str(shared / "mnist"),
                       "--target-dir", str(shared / "usps"), "--data.image_size", "16"],
        "modes": [*common, "--seeds", "0,1,2", "--max-epochs", str(epochs),
                  "--vary", "model.domain_mode=joint,separate", "--vary", "model.adabn=false,true",
                  *run, "--method", "dann"],
        "joint_long": [*common, "--seeds", "0,1,2", "--max-epochs", str(2 * epochs),
                       "--vary", "model.domain_mode=joint", "--vary", "model.adabn=false,true",
                       *run, "--method", "dann"],
        "small_batch": ["--norms", "bn,bgn", "--batch-sizes", "8", "--jobs", "1", "--threads", "1",
                        "--seeds", "0,1,2", "--max-epochs", str(epochs // 4), "--vary", "none",
                        *run, "--method", "dann"],
    }  # fmt: skip


def main() -> None:
    """Run the chosen sweeps and print each one's wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/uda"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run on synth→digits")
    parser.add_argument("--mnist-epochs", type=int, default=1, help="epochs per run on MNIST→USPS")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding mnist/ and usps/")
    parser.add_argument("--only", action="append", help="run only these sweeps (repeatable)")
    args = parser.parse_args()
    for name, argv in sweeps(args.epochs, args.mnist_epochs, args.shared.resolve()).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        command = [sys.executable, "-m", "tasks.runner.cli", "bench", "--task", "uda",
                   "--output", str(args.output / name), *argv]  # fmt: skip
        subprocess.run(command, check=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
