"""Few-shot learning suite: Prototypical Networks and MAML (learn2learn) with any registry norm.

``bgn-task fsl --norm bgn`` trains a Conv-4 ProtoNet on the embedded ``glyphs`` dataset and
reports 5-way 1-shot and 5-shot accuracy with 95 % confidence intervals over 600 fixed meta-test
episodes. See ``docs/fsl.md``.
"""

from tasks.common.contract import Metric, Task

from .datamodule import FewShotDataModule
from .module import FewShotModule

TASK = Task(
    name="fsl",
    model_class=FewShotModule,
    datamodule_class=FewShotDataModule,
    metrics=(
        Metric("test/acc", "few-shot accuracy (configured shots)", ci="test/acc_ci95"),
        Metric("test/acc_5shot_from_1shot", "5-shot accuracy of the 1-shot-trained model",
               ci="test/acc_5shot_from_1shot_ci95"),
    ),
)

__all__ = ["TASK", "FewShotDataModule", "FewShotModule"]
