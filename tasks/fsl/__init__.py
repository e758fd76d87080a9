"""Few-shot learning suite: Prototypical Networks and MAML (learn2learn) with any registry norm.

``bgn-task fsl --norm bgn`` trains a Conv-4 ProtoNet on the embedded ``glyphs`` dataset and
reports 5-way 1-shot and 5-shot accuracy with 95 % confidence intervals over 600 fixed meta-test
episodes. See ``docs/fsl.md``.
"""

from .datamodule import FewShotDataModule
from .module import FewShotModule

MODEL_CLASS = FewShotModule
DATAMODULE_CLASS = FewShotDataModule

__all__ = ["DATAMODULE_CLASS", "MODEL_CLASS", "FewShotDataModule", "FewShotModule"]
