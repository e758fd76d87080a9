"""The NAS run: search -> derive -> retrain (the task's ``run`` hook), its extra outputs and sweep output."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.common.contract import RunOption, TaskRun
from tasks.common.errors import TaskConfigError

from .datamodule import NasDataModule
from .genotype import Genotype, load_genotype
from .module import STAGES, DartsEvalModule, DartsSearchModule, RetrainSettings, _check_ops
from .ops import DARTS_OPS
from .plot import draw_genotype

__all__ = [
    "GENOTYPE_FILE", "GENOTYPE_PNG", "OPTIONS", "check_options", "genotype_agreement", "nas_extra_results",
    "retrain_settings", "run_nas",
]  # fmt: skip

GENOTYPE_FILE = "genotype.json"
GENOTYPE_PNG = "genotype.png"
AGREEMENT_FILE = "genotype_agreement.md"

OPTIONS = (
    RunOption(
        "stage", "what the run does: search, eval (retrain --genotype) or search+eval", type=str,
        default="search+eval", choices=STAGES, legacy="model.stage",
    ),
    RunOption(
        "genotype", "a genotype.json (or a results.json holding one) for --stage eval",
        legacy="model.genotype",
    ),
)  # fmt: skip
"""The suite's run options: ``--stage`` and ``--genotype`` (``stage:`` / ``genotype:`` in a config)."""


def given_genotype(options: Mapping[str, Any], ops: Sequence[str] | None, nodes: int) -> Genotype | None:
    """The genotype ``--stage eval`` retrains (``None`` for the stages that search).

    Raises:
        ValueError: ``--stage eval`` without ``--genotype``, a ``--genotype`` for a stage that
            derives its own, or a genotype file that is malformed, names ops outside ``ops`` or
            has more nodes than ``nodes``.
    """
    stage, genotype = options["stage"], options["genotype"]
    if stage == "eval":
        if genotype is None:
            raise ValueError("stage 'eval' retrains a given genotype: pass --genotype FILE")
        return load_genotype(genotype, _check_ops(ops), max_nodes=nodes)
    if genotype is not None:
        raise ValueError(
            f"--genotype {genotype} is only read by --stage eval; stage {stage!r} derives its own"
        )
    return None


def check_options(options: Mapping[str, Any], config: Any) -> None:
    """The run options against the model's space (``model.ops``, ``model.nodes``): :func:`given_genotype`."""
    model = config.model
    given_genotype(options, model.get("ops"), model.get("nodes"))


def run_nas(run: TaskRun) -> None:
    """``--stage search``: fit + test the supernet; ``eval``: retrain ``--genotype``; ``search+eval``: both.

    The derived network trains with ``run.make_trainer("eval", max_epochs=...)`` (logs and
    checkpoints under ``<output>/eval``) for ``model.retrain.epochs`` epochs (null: the trainer's), on
    plain batches of ``model.retrain.batch_size`` (null: ``data.batch_size``) from the whole training
    split (:meth:`NasDataModule.retrain_view`): :func:`retrain_settings`, recorded in
    ``results.json`` as ``retrain``. Neither the run's DataModule nor its config is changed.
    ``run.metrics`` gets the supernet's ``test/search_*`` and the derived network's ``test/*``.

    Raises:
        TaskConfigError: when the CLI's model or data are not the NAS task's.
    """
    search, data = run.model, run.datamodule
    if not isinstance(search, DartsSearchModule) or not isinstance(data, NasDataModule):
        raise TaskConfigError("nas: the model must be a DartsSearchModule and the data a NasDataModule")
    stage = run.options["stage"]
    metrics: dict[str, float] = {}
    if stage == "eval":
        genotype = given_genotype(run.options, search.space_ops, search.hparams.nodes)
        assert genotype is not None  # checked when parsed
    else:
        data.paired = True
        metrics.update(run.fit_and_test(search, run.trainer))
        genotype = search.genotype()
    if stage != "search":
        settings = retrain_settings(run)
        model = search.eval_module(genotype)
        trainer = run.make_trainer("eval", max_epochs=settings.epochs)
        metrics.update(run.fit_and_test(model, trainer, data.retrain_view(settings.batch_size)))
    if stage == "eval":  # nothing was searched: the reported network's norm is the run's
        run.norm = search.retrain.norm
    run.metrics = metrics


def retrain_settings(run: TaskRun) -> RetrainSettings:
    """The retraining stage's settings from the run's config, its norm and its epochs and batch size
    resolved (``model.retrain.norm``, ``.epochs``, ``.batch_size``; null: ``model.norm``,
    ``trainer.max_epochs``, ``data.batch_size``)."""
    config, model = run.config, run.config["model"]
    settings = RetrainSettings.of(model).inherit(model["norm"], model["groups"], model.get("norm_kwargs"))
    return settings.resolved(config["trainer"].get("max_epochs"), config["data"]["batch_size"])


def _final_genotype(run: TaskRun) -> Genotype:
    model = run.model
    return model.genotype if isinstance(model, DartsEvalModule) else model.genotype()


def nas_extra_results(run: TaskRun) -> dict[str, Any]:
    """Write ``genotype.json`` and ``genotype.png`` beside ``results.json``; the extra record fields.

    Fields: ``genotype`` (its JSON form), ``stage``, ``search_norm`` (``model.norm``; ``null`` for
    ``--stage eval``, which searched nothing), ``eval_norm`` (the derived network's norm; ``null``
    for ``--stage search``), ``retrain`` (the retraining stage's resolved settings,
    :func:`retrain_settings`; ``null`` for ``--stage search``).
    """
    search_norm, stage = run.config["model"]["norm"], run.options["stage"]
    retrain = retrain_settings(run)
    genotype = _final_genotype(run)
    if run.trainer.is_global_zero:
        run.output.mkdir(parents=True, exist_ok=True)
        (run.output / GENOTYPE_FILE).write_text(json.dumps(genotype.to_dict(), indent=2) + "\n")
        title = f"search {search_norm}" if stage != "eval" else f"given, retrained with {retrain.norm}"
        draw_genotype(genotype, run.output / GENOTYPE_PNG, title=title)
    return {
        "genotype": genotype.to_dict(),
        "stage": stage,
        "search_norm": search_norm if stage != "eval" else None,
        "eval_norm": retrain.norm if stage != "search" else None,
        "retrain": retrain.to_dict() if stage != "search" else None,
    }


def _edges(genotype: dict[str, Any]) -> dict[str, set[tuple[int, int, str]]]:
    """``{cell: {(node, input, op)}}`` of a genotype's JSON form."""
    return {
        cell: {(k // 2, j, op) for k, (op, j) in enumerate(genotype[cell])} for cell in ("normal", "reduce")
    }


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """How alike two genotypes are, per cell and over both: shares of their ``2 * nodes`` edges.

    ``same_op``: the edge (node, input) is in both with the same op; ``same_edge``: the edge is in
    both, whatever its op.
    """
    ea, eb = _edges(a), _edges(b)
    out: dict[str, float] = {}
    total = same_op = same_edge = 0
    for cell in ("normal", "reduce"):
        n = max(len(ea[cell]), len(eb[cell]))
        op = len(ea[cell] & eb[cell])
        edge = len({e[:2] for e in ea[cell]} & {e[:2] for e in eb[cell]})
        out[f"{cell}_same_op"], out[f"{cell}_same_edge"] = op / n, edge / n
        total, same_op, same_edge = total + n, same_op + op, same_edge + edge
    out["same_op"], out["same_edge"] = same_op / total, same_edge / total
    return out


def genotype_agreement(rows: list[tuple[str, dict[str, Any]]], output: Path) -> list[Path]:
    """Sweep output: ``genotype_agreement.md``, how often searches of different rows pick the same ops.

    For every pair of rows (e.g. ``bn`` vs ``bgn``) and every (batch size, seed) both ran, the
    shares of edges that agree (same input and op; same input), and their mean over seeds; then
    how often each of DARTS' ops (other than ``none``) appears in each row's derived cells.
    """
    genotypes: dict[str, dict[tuple[Any, Any], dict[str, Any]]] = defaultdict(dict)
    for label, record in rows:
        if record.get("genotype") and record.get("stage") != "eval":
            genotypes[label][(record.get("batch_size"), record.get("seed"))] = record["genotype"]
    labels = sorted(genotypes)
    lines = [
        "# Genotype agreement between searches",
        "",
        "Share of the derived cells' edges (2 per node, normal and reduce cells) that two searches with the",
        "same batch size and seed pick alike: `same op` = same input node and op, `same edge` = same input.",
        "",
        "| rows | batch size | seed | same op (normal) | same op (reduce) | same op | same edge |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            keys = sorted(set(genotypes[a]) & set(genotypes[b]), key=str)
            scores = [agreement(genotypes[a][k], genotypes[b][k]) for k in keys]
            for (bs, seed), s in zip(keys, scores, strict=True):
                lines.append(
                    f"| {a} vs {b} | {bs} | {seed} | {s['normal_same_op']:.0%} | {s['reduce_same_op']:.0%} "
                    f"| {s['same_op']:.0%} | {s['same_edge']:.0%} |"
                )
            if scores:
                mean = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
                lines.append(
                    f"| **{a} vs {b}** | all | mean of {len(scores)} | {mean['normal_same_op']:.0%} "
                    f"| {mean['reduce_same_op']:.0%} | {mean['same_op']:.0%} | {mean['same_edge']:.0%} |"
                )
    lines += [
        "",
        "Ops in the derived cells, counted over every run of a row (normal / reduce):",
        "",
        "| row | runs | " + " | ".join(DARTS_OPS[1:]) + " |",
        "|---|---|" + "---|" * (len(DARTS_OPS) - 1),
    ]
    for label in labels:
        runs = list(genotypes[label].values())
        counts = {cell: Counter(op for g in runs for op, _ in g[cell]) for cell in ("normal", "reduce")}
        cells = " | ".join(f"{counts['normal'][op]} / {counts['reduce'][op]}" for op in DARTS_OPS[1:])
        lines.append(f"| {label} | {len(runs)} | {cells} |")
    path = output / AGREEMENT_FILE
    path.write_text("\n".join(lines) + "\n")
    return [path]
