"""The NAS task suite: ``bgn-task nas``, DARTS with every norm of the space from the registry.

Search (DARTS, first order or unrolled) on a supernet whose MixedOps use non-affine registry norms,
derive the genotype (top-2 non-``none`` inputs per node), retrain the derived network from scratch
with affine registry norms, test it: ``test/acc``. ``--stage search | eval | search+eval``,
``--genotype FILE`` for eval alone; ``genotype.json`` and ``genotype.png`` beside ``results.json``.
See ``docs/nas.md``.
"""

from tasks.common.contract import Metric, Task

from .datamodule import NasDataModule
from .genotype import Genotype, derive_cell, load_genotype
from .module import STAGES, DartsEvalModule, DartsSearchModule
from .networks import EvalNetwork, SearchNetwork
from .ops import DARTS_OPS, OPS, build_op
from .pipeline import OPTIONS, check_options, genotype_agreement, nas_extra_results, run_nas

TASK = Task(
    name="nas",
    model_class=DartsSearchModule,
    datamodule_class=NasDataModule,
    metrics=(
        Metric("test/acc", "derived network top-1 accuracy", stages=("eval", "search+eval")),
        Metric("test/search_acc", "supernet top-1 accuracy", stages=("search", "search+eval")),
    ),
    links=(("data.num_classes", "model.num_classes"), ("data.in_channels", "model.in_channels")),
    shortcuts={"--eval-norm": "--model.retrain.norm"},
    options=OPTIONS,
    check_options=check_options,
    run=run_nas,
    extra_results=nas_extra_results,
    bench_outputs=genotype_agreement,
    smoke_args=("--model.retrain.epochs", "1", "--model.channels", "4", "--model.retrain.cells", "3"),
)

__all__ = [
    "DARTS_OPS",
    "OPS",
    "STAGES",
    "TASK",
    "DartsEvalModule",
    "DartsSearchModule",
    "EvalNetwork",
    "Genotype",
    "NasDataModule",
    "SearchNetwork",
    "build_op",
    "derive_cell",
    "load_genotype",
]
