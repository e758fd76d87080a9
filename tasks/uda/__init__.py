"""Unsupervised domain adaptation suite: DANN and its source-only baseline with any registry norm.

``bgn-task uda --norm bgn`` adapts from digits rendered from matplotlib's fonts (colour, clutter,
blur) to scikit-learn's handwritten digits with DANN and reports the target's test accuracy
(``test/target_acc``, primary), the source's, and how separable the two domains' features are
(a fresh probe's accuracy). ``--method source_only`` is the baseline on the same budget (with
``--adabn`` the baseline that also sees the target's statistics); ``--model.domain_mode
joint|separate`` sets how the feature extractor's norms see the two domains and ``--adabn``
re-estimates their statistics on the target. ``bgn-task bench --task uda`` sweeps method x AdaBN.
See ``docs/uda.md``.
"""

from typing import Any

from tasks.common.contract import Metric, Task, TaskRun

from .datamodule import DomainAdaptationDataModule
from .module import DANNModule


def _domains(run: TaskRun) -> dict[str, Any]:
    """results.json's ``domains``: the pair by its domains' names (folder names for ``folders``)."""
    source, target = run.datamodule.domains
    pair = f"{source.name}→{target.name}"
    return {"domains": pair, "source_domain": source.name, "target_domain": target.name}


TASK = Task(
    name="uda",
    model_class=DANNModule,
    datamodule_class=DomainAdaptationDataModule,
    metrics=(
        Metric("test/target_acc", "target accuracy"),
        Metric("test/source_acc", "source accuracy"),
        Metric("test/domain_acc", "domain probe accuracy", direction="min"),
    ),
    links=(("data.num_classes", "model.num_classes"), ("data.in_channels", "model.in_channels")),
    bench_axes={"model.method": ("dann", "source_only"), "model.adabn": ("false", "true")},
    shortcuts={"--method": "--model.method", "--source-dir": "--data.source_dir",
               "--target-dir": "--data.target_dir", "--domain-mode": "--model.domain_mode"},
    flags={"--adabn": ("--model.adabn", "true")},
    extra_results=_domains,
    smoke_args=("--data.synth_per_class", "20"),
)

__all__ = ["TASK", "DANNModule", "DomainAdaptationDataModule"]
