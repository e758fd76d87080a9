"""The classification task suite: ``bgn-task classification``.

A registry-norm backbone (:mod:`tasks.common.backbones`) on the shared vision data
(:class:`tasks.common.vision.VisionDataModule`), SGD with the linear-scaling rule. See
``docs/classification.md``.
"""

from tasks.common.contract import Metric, Task
from tasks.common.vision import VisionDataModule

from .model import ClassificationModule

TASK = Task(
    name="classification",
    model_class=ClassificationModule,
    datamodule_class=VisionDataModule,
    metrics=(Metric("test/acc", "top-1 accuracy"), Metric("test/acc_top5", "top-5 accuracy")),
    links=(("data.num_classes", "model.num_classes"), ("data.in_channels", "model.in_channels")),
)

__all__ = ["TASK", "ClassificationModule"]
