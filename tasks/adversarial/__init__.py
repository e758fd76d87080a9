"""The adversarial-training suite: ``bgn-task adversarial``.

Madry-style PGD adversarial training (or fast FGSM with a random start) with torchattacks, any
registry norm in a shared backbone, and robust evaluation: clean, FGSM and PGD-20 accuracy
(opt-in PGD-100 and AutoAttack) and a robustness curve (accuracy vs eps). Inputs stay pixels in
[0, 1] (``VisionDataModule(normalize=False)``); the dataset's mean and std are linked into a
normalisation layer inside the model. Every norm layer is in ``attack_norm_mode`` while a
training attack runs. ``--eval-only --ckpt PATH`` tests a checkpoint. See
``docs/adversarial.md``.
"""

from tasks.common.contract import Metric, Task
from tasks.common.vision import VisionDataModule

from .hooks import OPTIONS, bench_outputs, check_options, extra_results, run_adversarial
from .module import AdversarialModule

TASK = Task(
    name="adversarial",
    model_class=AdversarialModule,
    datamodule_class=VisionDataModule,
    metrics=(
        Metric("test/pgd_acc", "PGD-20 accuracy"),
        Metric("test/clean_acc", "clean accuracy"),
        Metric("test/fgsm_acc", "FGSM accuracy"),
    ),
    links=(
        ("data.num_classes", "model.num_classes"),
        ("data.in_channels", "model.in_channels"),
        ("data.mean", "model.mean"),
        ("data.std", "model.std"),
        ("data.dataset", "model.dataset"),
    ),
    shortcuts={"--train-attack": "--model.attack.train_attack", "--eps": "--model.attack.eps"},
    options=OPTIONS,
    check_options=check_options,
    run=run_adversarial,
    extra_results=extra_results,
    bench_outputs=bench_outputs,
    smoke_args=(
        "--model.attack.eval_steps",
        "2",
        "--model.attack.val_steps",
        "1",
        "--model.attack.train_steps",
        "1",
        "--model.attack.curve_eps",
        "[]",
    ),
)

__all__ = ["TASK", "AdversarialModule"]
