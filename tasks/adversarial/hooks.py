"""The suite's runner hooks: fit + test or ``--eval-only``, extra ``results.json`` fields, sweep curves."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tasks.common.contract import RunOption, TaskRun
from tasks.common.errors import TaskConfigError

from .curve import CURVE_CSV, CURVE_PNG, curve_points, plot_curves, sweep_curves, write_curve_csv
from .module import ARCHITECTURE_KEYS, CHECKPOINT_TASK_KEY, AdversarialModule

__all__ = ["OPTIONS", "bench_outputs", "check_options", "extra_results", "load_for_eval", "run_adversarial"]

OPTIONS = (
    RunOption(
        "eval_only", "test the checkpoint --ckpt without training", type=bool, default=False,
        flag="--eval-only", value="true", legacy="model.eval_only",
    ),
    RunOption("ckpt", "an adversarial-task checkpoint for --eval-only", legacy="model.ckpt"),
)  # fmt: skip
"""The suite's run options: ``--eval-only`` and ``--ckpt`` (``eval_only:`` / ``ckpt:`` in a config)."""


def check_options(options: Mapping[str, Any], config: Any) -> None:
    """``--eval-only`` needs ``--ckpt``.

    Raises:
        ValueError: ``--eval-only needs --ckpt PATH``.
    """
    if options["eval_only"] and not options["ckpt"]:
        raise ValueError("--eval-only needs --ckpt PATH (a checkpoint of the adversarial task)")


def load_for_eval(path: str, template: AdversarialModule) -> AdversarialModule:
    """The network of checkpoint ``path`` with ``template``'s evaluation settings.

    The architecture (:data:`~tasks.adversarial.module.ARCHITECTURE_KEYS`: norm, groups,
    backbone, classes, channels, normalisation) comes from the checkpoint; the attack settings
    (eps, steps, curve, opt-in attacks) from ``template`` (the command line).

    Raises:
        TaskConfigError: for a missing or unreadable file, a checkpoint of another task, or one
            whose classes or channels differ from the data's.
    """
    if not Path(path).is_file():
        raise TaskConfigError(f"--ckpt {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise TaskConfigError(f"--ckpt {path}: not a readable checkpoint ({type(err).__name__})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get(CHECKPOINT_TASK_KEY) != "adversarial":
        owner = checkpoint.get(CHECKPOINT_TASK_KEY) if isinstance(checkpoint, dict) else None
        saved_by = f"task {owner!r}" if owner else "another model (no adversarial-task marker)"
        raise TaskConfigError(
            f"--ckpt {path}: not a checkpoint of the adversarial task (saved by {saved_by}); "
            "train one with 'bgn-task adversarial'"
        )
    hparams, current = checkpoint["hyper_parameters"], template.hparams
    for key in ("num_classes", "in_channels"):
        if hparams[key] != current[key]:
            raise TaskConfigError(
                f"--ckpt {path}: the checkpoint has {key}={hparams[key]} (trained on "
                f"{hparams.get('dataset')!r}), the data {current['dataset']!r} has {current[key]}"
            )
    architecture = {k: hparams[k] for k in ARCHITECTURE_KEYS}
    model = AdversarialModule(
        **architecture, dataset=current["dataset"], attack=template.attacks, sgd=template.sgd
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model


def run_adversarial(run: TaskRun) -> None:
    """Fit and test (the default), or test ``--ckpt`` without training (``--eval-only``).

    Raises:
        TaskConfigError: for ``data.normalize: true`` (attacks need pixels in [0, 1]) or a bad
            ``--ckpt`` (:func:`load_for_eval`).
    """
    if getattr(run.datamodule, "normalize", False):
        raise TaskConfigError(
            "the adversarial task needs --data.normalize false: the model normalises inside, so that "
            "attacks work on pixels in [0, 1]"
        )
    model = run.model
    if not run.options["eval_only"]:
        run.metrics = run.fit_and_test(model, run.trainer)
        return
    ckpt = run.options["ckpt"]
    model = load_for_eval(ckpt, model)
    run.config["model"].update({k: model.hparams[k] for k in ARCHITECTURE_KEYS})
    start = time.perf_counter()
    run.trainer.test(model, datamodule=run.datamodule)
    run.times["test_time_s"] = time.perf_counter() - start
    run.metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("test/")}
    run.model, run.checkpoint = model, ckpt


def extra_results(run: TaskRun) -> dict[str, Any]:
    """``attack`` (resolved settings) and ``robustness_curve`` fields; writes the run's curve CSV + PNG."""
    model = run.model
    curve = model.curve(run.metrics)
    if run.trainer.is_global_zero and curve["eps"]:
        hp = model.hparams
        series = {(str(hp.norm), int(run.datamodule.batch_size)): curve_points([curve])}
        write_curve_csv(series, run.output / CURVE_CSV)
        attacks = model.attacks
        title = f"{hp.dataset}: PGD-{attacks.eval_steps} accuracy vs eps ({attacks.train_attack} training)"
        plot_curves(series, run.output / CURVE_PNG, title)
    return {"attack": model.attack_settings, "robustness_curve": curve}


def bench_outputs(rows: list[tuple[str, dict[str, Any]]], output: Path) -> list[Path]:
    """The sweep's robustness curves (mean ± std over seeds, one line per row, a panel per batch size)."""
    series = sweep_curves(rows)
    if not series:
        return []
    record = rows[0][1]
    steps = (record.get("attack") or {}).get("eval_steps", 20)
    title = f"{record.get('dataset')}: PGD-{steps} accuracy vs eps"
    return [write_curve_csv(series, output / CURVE_CSV), plot_curves(series, output / CURVE_PNG, title)]
