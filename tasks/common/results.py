"""The ``results.json`` record every ``bgn-task`` run writes, and its reader.

Schema (``schema`` = 1), one JSON object:

================= =========================================================================
key               value
================= =========================================================================
schema            format version (int)
task              task suite name, e.g. ``classification``
dataset           ``data.dataset`` of the run
norm              registry norm name (``model.norm``)
groups            ``model.groups`` as configured (int or ``"auto"``)
num_groups        G actually used after fit: ``{"per_layer": {name: G}, "histogram": {G: count}}``
                  over every BatchGroupNorm and GroupNorm layer (auto-G resolved)
batch_size        ``data.batch_size`` (per device): the batch the optimizer steps on
norm_batch_size   ``--norm-batch-size``: samples per set of batch statistics in training (ghost
                  batches, :mod:`bgn_lightning.ghost`); ``null``: the whole batch
seed              ``seed_everything``
metrics           ``{name: float}``: ``test/*`` and ``val/*`` of the tested weights (the tested
                  checkpoint is validated again before testing; ``val/*`` are the end of fit's
                  only when no checkpoint is tested); ``val/<monitor>_best`` the checkpoint
                  callback's best score
epochs            training epochs completed
global_step       optimizer steps taken
checkpoint        checkpoint tested (path) or ``null`` for the in-memory weights
checkpoint_epoch  Lightning's 0-based epoch index when the tested checkpoint was saved (``null``:
                  in-memory weights); ``checkpoint_step`` its optimizer step
wall_time_s       seconds from start of set-up to results (float); also ``fit_time_s``, ``test_time_s``
torch_threads     torch intra-op CPU threads of the run
versions          python, platform and package versions
command           the argument list of the run
config            the full resolved LightningCLI config (dict)
hparams           the model's hyper-parameters, including values linked from the datamodule
created           ISO-8601 UTC time
images            bad image files: ``{"bad_images": "stop"|"skip", "checked": n, "skipped": [path]}``
bgn_kernels       what BGN ran on: ``cpu: C++ kernels``, ``cpu: native ops``, ``cuda: Triton
                  kernels``, ``cuda: native ops``; ``null`` without BGN layers
distributed       the run's processes: ``world_size``, ``num_nodes``, ``devices_per_node``,
                  ``global_batch_size`` (per-device batch x processes: what one synchronised BGN
                  statistic sees per step), ``sync_norm`` (``--sync-norm``: statistics pooled over
                  the processes) and ``cluster_environment`` (Lightning's: ``LightningEnvironment``,
                  ``TorchElasticEnvironment`` under torchrun, ``SLURMEnvironment``; ``null`` for
                  one process)
...               task-specific fields (:attr:`Task.extra_results <tasks.common.contract.Task>`),
                  e.g. NAS's ``genotype``
================= =========================================================================

The file is written atomically (temporary file + rename), so a killed run never leaves a
half-written ``results.json``: its presence means the run finished.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bgn_lightning import BatchGroupNorm

__all__ = [
    "RESULTS_FILE",
    "SCHEMA_VERSION",
    "package_versions",
    "read_results",
    "resolved_groups",
    "results_record",
    "write_results",
]

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema", "task", "norm", "batch_size", "seed", "metrics", "config")
_PACKAGES = ("bgn-lightning", "torch", "torchvision", "lightning", "torchmetrics", "jsonargparse", "numpy")


def package_versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the packages a run depends on (``None`` if absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def resolved_groups(model: nn.Module) -> dict[str, Any]:
    """G of every BatchGroupNorm and GroupNorm layer: ``{"per_layer": {...}, "histogram": {...}}``.

    Call it after training: an auto-G BatchGroupNorm fixes G at its first training forward
    (``None`` before that). Histogram keys are strings (JSON object keys).
    """
    per_layer: dict[str, int | None] = {
        name: module.num_groups
        for name, module in model.named_modules()
        if isinstance(module, (BatchGroupNorm, nn.GroupNorm))
    }
    histogram = Counter(str(g) for g in per_layer.values())
    return {"per_layer": per_layer, "histogram": dict(sorted(histogram.items(), key=lambda kv: kv[0]))}


def _to_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def results_record(
    *,
    task: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    model: nn.Module,
    epochs: int,
    global_step: int,
    checkpoint: str | None,
    times: dict[str, float],
    command: list[str],
    hparams: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    norm: str | None = None,
    checkpoint_epoch: int | None = None,
    checkpoint_step: int | None = None,
    distributed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``results.json`` record (see the module docstring for the schema).

    Args:
        task: task suite name.
        config: full resolved LightningCLI config as a plain dict (``model``, ``data``,
            ``trainer``, ``seed_everything`` keys).
        metrics: metric name to tensor or number; converted to floats.
        model: the trained model, for the G actually used.
        epochs: epochs completed.
        global_step: optimizer steps taken.
        checkpoint: path of the checkpoint tested, or ``None``.
        checkpoint_epoch: the tested checkpoint's 0-based epoch index (Lightning's ``epoch``).
        checkpoint_step: the tested checkpoint's optimizer step.
        times: ``wall_time_s``, ``fit_time_s``, ``test_time_s`` (seconds).
        command: the run's argument list.
        hparams: the model's hyper-parameters.
        norm: the norm that ran, when not the config's ``model.norm`` (a NormSwap callback swapped
            it in; ``extra`` then says from what).
        distributed: the run's processes (see the schema); ``None`` outside a ``bgn-task`` run.
        extra: task-specific fields (a task's ``extra_results`` hook), added after the others; they
            may not replace a schema key.

    Raises:
        ValueError: when ``extra`` names a schema key.
    """
    model_cfg, data_cfg = config.get("model") or {}, config.get("data") or {}
    record = {
        "schema": SCHEMA_VERSION,
        "task": task,
        "dataset": data_cfg.get("dataset"),
        "norm": norm or model_cfg.get("norm"),
        "groups": model_cfg.get("groups"),
        "num_groups": resolved_groups(model),
        "batch_size": data_cfg.get("batch_size"),
        "norm_batch_size": config.get("norm_batch_size"),
        "seed": config.get("seed_everything"),
        "metrics": {name: _to_float(v) for name, v in sorted(metrics.items())},
        "epochs": epochs,
        "global_step": global_step,
        "checkpoint": checkpoint,
        "checkpoint_epoch": checkpoint_epoch,
        "checkpoint_step": checkpoint_step,
        **{key: round(float(v), 3) for key, v in times.items()},
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "command": list(command),
        "config": config,
        "hparams": json.loads(json.dumps(hparams or {}, default=str)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "distributed": distributed,
    }
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ValueError(f"results_record: extra fields {clash} would replace schema keys")
    record.update(json.loads(json.dumps(extra or {}, default=str)))
    return record


def write_results(directory: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` to ``<directory>/results.json`` atomically and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results.", suffix=".json.tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; results are for everyone to read
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` (or the one inside a directory) and check its required keys.

    Raises:
        FileNotFoundError: when there is no such file.
        ValueError: when the file is not a results record (missing keys or wrong schema).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    with path.open() as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a results record (a JSON object), got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: not a results record, missing keys: {', '.join(missing)}")
    if record["schema"] != SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema {record['schema']!r}, this version reads {SCHEMA_VERSION}")
    return record
