"""The classification task suite: ``bgn-task classification``.

Exports the task contract: :data:`MODEL_CLASS`, :data:`DATAMODULE_CLASS`, and
:data:`ARGUMENT_LINKS` (DataModule attributes the CLI passes to the model's init args).
"""

from .datamodule import ClassificationDataModule
from .model import ClassificationModule

MODEL_CLASS = ClassificationModule
DATAMODULE_CLASS = ClassificationDataModule
ARGUMENT_LINKS = (("data.num_classes", "model.num_classes"), ("data.in_channels", "model.in_channels"))

__all__ = [
    "ARGUMENT_LINKS",
    "DATAMODULE_CLASS",
    "MODEL_CLASS",
    "ClassificationDataModule",
    "ClassificationModule",
]
