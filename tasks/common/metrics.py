"""torchmetrics-based metric helpers shared by the task suites."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .validate import check_int

__all__ = ["classification_metrics"]


def classification_metrics(num_classes: int, prefix: str, top_k: int = 5) -> MetricCollection:
    """Top-1 (``acc``) and top-k (``acc_top<k>``) accuracy, micro-averaged, as fractions in [0, 1].

    Keys are ``<prefix>acc`` and ``<prefix>acc_top5`` (for the default ``top_k``), e.g.
    ``val/acc``. With fewer than ``top_k`` classes the top-k accuracy is over all classes (1.0).

    Args:
        num_classes: number of classes (>= 2).
        prefix: prepended to every key, e.g. ``"val/"``.
        top_k: k of the second accuracy.

    Raises:
        ValueError: for ``num_classes < 2`` or ``top_k < 2``.
    """
    check_int("num_classes", num_classes, minimum=2, owner="classification_metrics")
    if top_k < 2:
        raise ValueError(f"classification_metrics: top_k must be >= 2, got {top_k!r}")
    k = min(top_k, num_classes)
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            f"acc_top{top_k}": MulticlassAccuracy(num_classes, top_k=k, average="micro"),
        },
        prefix=prefix,
    )
