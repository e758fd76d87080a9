"""Retrain every genotype a ``bgn-task bench --task nas`` sweep found, with each of several norms.

The sweep retrains each derived network with its search norm, so a bn-vs-bgn difference there mixes
two effects: the cells the search picked and the norm they were retrained with. This script
separates them: for every ``results.json`` under the sweep directory it runs
``bgn-task nas --stage eval --genotype <that run's genotype.json> --norm N --seed <its seed>`` for
each ``N`` of ``--norms`` and tables test accuracy as search norm (rows) x retraining norm
(columns), mean ± std over seeds. Runs whose ``results.json`` exists are skipped.

    python benchmarks/nas_cross_retrain.py outputs/bench/nas --norms bn,bgn --output outputs/bench/nas_cross
    python benchmarks/nas_cross_retrain.py outputs/bench/nas --norms bn,bgn -- --model.retrain.epochs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def _runs(sweep: Path) -> list[dict]:
    records = []
    for path in sorted(sweep.rglob("results.json")):
        record = json.loads(path.read_text())
        if (
            record.get("task") == "nas"
            and record.get("stage") != "eval"
            and (path.parent / "genotype.json").is_file()
        ):
            records.append({"dir": path.parent, **record})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="a bgn-task bench --task nas output directory")
    parser.add_argument("--norms", default="bn,bgn", help="retraining norms, comma-separated")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/nas_cross"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="extra bgn-task arguments (after --)")
    args = parser.parse_args()
    norms = args.norms.split(",")
    runs = _runs(args.sweep)
    if not runs:
        parser.error(f"no nas search results under {args.sweep}")
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        for norm in norms:
            out = (
                args.output / f"search_{run['norm']}" / f"bs{run['batch_size']}" / f"seed{run['seed']}" / norm
            )
            if not (out / "results.json").is_file():
                argv = [sys.executable, "-m", "tasks.runner.cli", "nas", "--stage", "eval",
                        "--genotype", str(run["dir"] / "genotype.json"), "--norm", norm,
                        "--seed", str(run["seed"]), "--batch-size", str(run["batch_size"]),
                        "--threads", str(args.threads), "--output", str(out), "--overwrite",
                        "--trainer.enable_progress_bar", "false", *args.extra]  # fmt: skip
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            record = json.loads((out / "results.json").read_text())
            acc[(run["norm"], norm)].append(record["metrics"]["test/acc"])
    lines = [
        "| search norm \\ retrained with | " + " | ".join(norms) + " |",
        "|---|" + "---|" * len(norms),
    ]
    for search in sorted({s for s, _ in acc}):
        cells = []
        for norm in norms:
            values = [100 * v for v in acc[(search, norm)]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})")
        lines.append(f"| {search} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cross_retrain.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
