"""The NAS suite: ops and norms, MixedOp, the two optimizers, genotypes, the data halves, runs end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from bgn_lightning import available_norms, is_norm_layer
from tasks.common.norms import norm_factory
from tasks.nas import (
    DARTS_OPS,
    OPS,
    DartsSearchModule,
    EvalNetwork,
    Genotype,
    NasDataModule,
    SearchNetwork,
    build_op,
    derive_cell,
    load_genotype,
)
from tasks.nas.module import SearchSettings
from tasks.nas.networks import MixedOp
from tasks.nas.pipeline import agreement, genotype_agreement
from tasks.runner.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REGISTRY_NORMS = ("bn", "bgn", "gn", "ln", "in", "pn", "none")
TINY_NET = ["--model.channels", "4", "--model.cells", "3", "--model.nodes", "2",
            "--model.eval_channels", "4", "--model.eval_cells", "3"]  # fmt: skip
TINY_LOOPS = [
    "--accelerator", "cpu", "--devices", "1", "--batch-size", "8", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip

GENOTYPE = {
    "normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["dil_conv_3x3", 2], ["sep_conv_5x5", 0]],
    "normal_concat": [2, 3],
    "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1], ["skip_connect", 2], ["dil_conv_5x5", 1]],
    "reduce_concat": [2, 3],
}


def test_the_registry_norms_are_the_ones_checked_here() -> None:
    assert set(REGISTRY_NORMS) <= set(available_norms())


@pytest.mark.parametrize("norm", REGISTRY_NORMS)
@pytest.mark.parametrize("affine", [False, True])
def test_every_op_keeps_or_halves_the_side_for_every_norm(norm: str, affine: bool) -> None:
    norm_layer = norm_factory(norm)
    for side in (8, 7):
        x = torch.randn(4, 8, side, side, requires_grad=True)
        for name in OPS:
            for stride in (1, 2):
                op = build_op(name, 8, 8, stride, affine, norm_layer).train()
                out = op(x)
                expected = side if stride == 1 else -(-side // 2)
                assert out.shape == (4, 8, expected, expected), (name, stride, side)
                norms = [m for m in op.modules() if is_norm_layer(m)]
                assert all(any(True for _ in m.parameters()) == affine for m in norms), (name, norm)
                if name != "none":
                    out.sum().backward()
    # an op that changes channels (a cell's preprocessing, a pool that must widen) maps C_in -> C_out
    for name in OPS:
        assert build_op(name, 8, 16, 2, affine, norm_layer)(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)


def test_unknown_op_and_stride_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'; choose from: none, max_pool_3x3"):
        build_op("conv_9x9", 8, 8, 1, True, norm_factory("bn"))
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        build_op("sep_conv_3x3", 8, 8, 3, True, norm_factory("bn"))


def test_mixed_op_is_the_softmax_weighted_sum_and_pools_get_a_non_affine_norm() -> None:
    torch.manual_seed(0)
    net = SearchNetwork(10, 1, 4, 3, 3, DARTS_OPS, norm_factory("bgn"))
    for w in net.arch_weights().values():
        assert w.shape == (2 + 3 + 4, len(DARTS_OPS))
        torch.testing.assert_close(w.sum(dim=1), torch.ones(len(w)))
    mixed = MixedOp(4, 1, DARTS_OPS, norm_factory("bn")).eval()
    x = torch.randn(2, 4, 8, 8)
    for k, op in enumerate(mixed.ops):
        torch.testing.assert_close(mixed(x, torch.eye(len(DARTS_OPS))[k]), op(x))
        pooled = isinstance(op, nn.Sequential) and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d))
        assert pooled == ("pool" in DARTS_OPS[k])
        if pooled:  # DARTS' extra norm after a pool, non-affine
            assert len(op) == 2 and is_norm_layer(op[1]) and not op[1].affine
    weights = torch.softmax(torch.randn(len(DARTS_OPS)), 0)
    torch.testing.assert_close(
        mixed(x, weights), sum(w * op(x) for w, op in zip(weights, mixed.ops, strict=True))
    )
    # search: cell norms non-affine, stem affine; derived network: every norm affine
    cell_norms = [m for m in net.cells.modules() if is_norm_layer(m)]
    assert cell_norms and not any(p for m in cell_norms for p in m.parameters())
    assert all(m.affine for m in net.stem.modules() if is_norm_layer(m))
    derived = EvalNetwork(net.genotype(), 10, 1, 4, 3, norm_factory("bgn"))
    assert all(m.affine for m in derived.modules() if is_norm_layer(m))
    assert net(torch.randn(4, 1, 8, 8)).shape == derived(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def _tiny_search(**kwargs: object) -> DartsSearchModule:
    return DartsSearchModule(
        num_classes=10, in_channels=1, channels=4, cells=3, nodes=2, **kwargs
    )


@pytest.mark.parametrize("unrolled", [False, True])
def test_arch_and_weight_parameters_are_disjoint_and_each_optimizer_moves_only_its_own(
    unrolled: bool, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    module = _tiny_search(search=SearchSettings(unrolled=unrolled))
    arch = {id(p) for p in module.net.arch_parameters()}
    weights = {id(p) for p in module.net.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in module.parameters()} and len(arch) == 2
    params = dict(module.named_parameters())
    moved: list[tuple[str, set[str]]] = []
    before: dict[str, torch.Tensor] = {}

    def pre(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        before.update({n: p.detach().clone() for n, p in params.items()})

    def post(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
        moved.append((type(optimizer).__name__, changed))

    handles = [
        register_optimizer_step_pre_hook(pre),
        register_optimizer_step_post_hook(post),
    ]
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=NasDataModule(batch_size=8))
    finally:
        for handle in handles:
            handle.remove()
    optimizers = trainer.optimizers
    assert [type(o).__name__ for o in optimizers] == ["SGD", "Adam"]
    held = [{id(p) for g in o.param_groups for p in g["params"]} for o in optimizers]
    assert held == [weights, arch]
    alphas = {"net.alphas_normal", "net.alphas_reduce"}
    assert [name for name, _ in moved] == ["Adam", "SGD", "Adam", "SGD"]
    for name, changed in moved:
        assert changed == alphas if name == "Adam" else (changed and not changed & alphas), (name, changed)
    assert torch.isfinite(module.net.alphas_normal).all()
    assert len((tmp_path / "search_alphas.jsonl").read_text().splitlines()) == 1  # one line per epoch


def test_derive_cell_keeps_the_two_strongest_inputs_by_their_best_non_none_op() -> None:
    ops = ("none", "max_pool_3x3", "sep_conv_3x3")
    weights = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # node 0, input 0: 'none' dominates, best real op 0.05
            [0.2, 0.1, 0.7],  # node 0, input 1
            [0.1, 0.6, 0.3],  # node 1, input 0
            [0.5, 0.3, 0.2],  # node 1, input 1
            [0.0, 0.2, 0.8],  # node 1, input 2 (node 0)
        ]
    )
    assert derive_cell(weights, ops, 2) == (
        ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0),
        ("sep_conv_3x3", 2),
        ("max_pool_3x3", 0),
    )
    with pytest.raises(ValueError, match=r"weights must be \(9, 3\) for 3 nodes"):
        derive_cell(weights, ops, 3)


def test_network_genotype_is_derived_from_its_alphas() -> None:
    net = SearchNetwork(10, 1, 4, 3, 2, DARTS_OPS, norm_factory("bn"))
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, DARTS_OPS.index("none")] = 10.0  # 'none' never makes it into a cell
        net.alphas_normal[1, DARTS_OPS.index("dil_conv_5x5")] = 5.0
        net.alphas_normal[4, DARTS_OPS.index("skip_connect")] = 5.0
    g = net.genotype()
    assert g.normal[0] == ("dil_conv_5x5", 1) and g.normal[2] == ("skip_connect", 2)
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert g.normal_concat == g.reduce_concat == (2, 3)
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict())), DARTS_OPS) == g


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: g.pop("reduce"), "a genotype is an object with keys normal, normal_concat, reduce"),
        (lambda g: g["normal"].__setitem__(0, ["conv_9x9", 0]), "op 'conv_9x9' is not in the space"),
        (lambda g: g["normal"].__setitem__(0, ["none", 0]), "op 'none' is not in the space"),
        (lambda g: g["normal"].__setitem__(2, ["skip_connect", 3]), "node 1 can read inputs 0..2, got 3"),
        (lambda g: g["normal"].__setitem__(1, "skip_connect"), r"normal\[1\] must be an \[op, input\] pair"),
        (lambda g: g["reduce"].pop(), r"reduce must be a non-empty list of \[op, input\] pairs"),
        (lambda g: g.__setitem__("normal_concat", [2, 9]), "normal_concat must list distinct states in 0..3"),
        (lambda g: g["reduce"].extend([["skip_connect", 0]] * 2), "3 nodes, more than the network's 2"),
    ],
)  # fmt: skip
def test_bad_genotypes_are_one_line_errors(mutate, message, tmp_path: Path) -> None:
    data = json.loads(json.dumps(GENOTYPE))
    mutate(data)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_genotype(path, DARTS_OPS, max_nodes=2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_genotype(path, DARTS_OPS)


def test_the_weight_and_arch_halves_split_the_training_split(tmp_path: Path) -> None:
    data = NasDataModule(batch_size=16)
    data.setup("fit")
    w, a, train = data.weight_set.indices, data.arch_set.indices, data.train_set.indices
    assert not set(w) & set(a) and sorted([*w, *a]) == sorted(train) and abs(len(w) - len(a)) <= 1
    batch = next(iter(data.train_dataloader()))[0]
    assert set(batch) == {"weights", "arch"} and batch["weights"][0].shape == (16, 1, 8, 8)
    data.paired = False
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and len(data.train_dataloader()) == len(train) // 16
    # an ImageFolder tree (the format of the shared CIFAR-10 copy): 8x8 RGB images in class folders
    for split, per_class in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((8, 8, 3), 40 * i + (100 if c == "b" else 0), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    folder = NasDataModule("imagefolder", data_dir=str(tmp_path), batch_size=2, val_fraction=0.2)
    folder.setup("fit")
    assert folder.num_classes == 2 and folder.image_size == 8
    assert len(folder.weight_set) + len(folder.arch_set) == len(folder.train_set)
    batch = next(iter(folder.train_dataloader()))[0]
    assert batch["arch"][0].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"arch_fraction must be in \(0, 1\), got 1.0"):
        NasDataModule(arch_fraction=1.0)


def test_genotype_agreement_counts_the_edges_two_searches_share(tmp_path: Path) -> None:
    other = json.loads(json.dumps(GENOTYPE))
    other["normal"][0] = ["sep_conv_5x5", 0]  # same edge, other op
    other["reduce"][3] = ["dil_conv_5x5", 0]  # other edge
    score = agreement(GENOTYPE, other)
    assert score["normal_same_op"] == 0.75 and score["normal_same_edge"] == 1.0
    assert score["reduce_same_op"] == 0.75 and score["same_op"] == 0.75 and score["same_edge"] == 7 / 8
    rows = [
        ("bn", {"batch_size": 8, "seed": s, "genotype": GENOTYPE, "stage": "search+eval"}) for s in (0, 1)
    ] + [("bgn", {"batch_size": 8, "seed": 0, "genotype": other, "stage": "search+eval"}),
         ("bgn", {"batch_size": 8, "seed": 1, "genotype": GENOTYPE, "stage": "search+eval"})]  # fmt: skip
    (path,) = genotype_agreement(rows, tmp_path)
    text = path.read_text()
    assert "| bgn vs bn | 8 | 0 | 75% | 75% | 75% | 88% |" in text
    assert "| bgn vs bn | 8 | 1 | 100% | 100% | 100% | 100% |" in text
    assert "| **bgn vs bn** | all | mean of 2 | 88% | 88% | 88% | 94% |" in text
    # ops: max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5
    assert "| bn | 2 | 0 / 2 | 0 / 2 | 2 / 2 | 2 / 0 | 2 / 0 | 2 / 0 | 0 / 2 |" in text
    assert "| bgn | 2 | 0 / 2 | 0 / 2 | 2 / 2 | 1 / 0 | 3 / 0 | 2 / 0 | 0 / 2 |" in text


def test_retraining_settings_and_data_view_leave_the_search_settings_as_they_are() -> None:
    from tasks.nas import NasDataModule
    from tasks.nas.module import RetrainSettings

    model = _tiny_search(retrain=RetrainSettings(norm="gn", batch_size=None, epochs=None))
    settings = model.retrain
    assert isinstance(settings, RetrainSettings) and settings.norm == "gn" and settings.epochs is None
    resolved = settings.resolved(7, 16)
    assert (resolved.epochs, resolved.batch_size) == (7, 16) and settings.batch_size is None
    data = NasDataModule(batch_size=16)
    view = data.retrain_view(8)
    assert (view.paired, view.batch_size) == (False, 8) and (data.paired, data.batch_size) == (True, 16)


def test_search_then_eval_end_to_end_then_eval_alone_from_its_genotype(tmp_path: Path, caplog) -> None:
    out = tmp_path / "search"
    argv = ["nas", "--output", str(out), "--norm", "bgn", "--eval-norm", "gn", "--max-epochs", "2",
            "--model.eval_epochs", "1", *TINY_NET, *TINY_LOOPS]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert {"test/acc", "test/search_acc"} <= set(record["metrics"])
    assert record["stage"] == "search+eval" and record["norm"] == record["search_norm"] == "bgn"
    assert record["eval_norm"] == "gn" and record["hparams"]["norm"] == "gn"
    retrain = record["retrain"]  # the retraining stage's settings, resolved; the config left as given
    assert retrain["epochs"] == 1 and retrain["batch_size"] == record["config"]["data"]["batch_size"]
    assert retrain["norm"] == "gn" and record["config"]["trainer"]["max_epochs"] == 2
    genotype = load_genotype(out / "genotype.json", DARTS_OPS, max_nodes=2)
    assert genotype.to_dict() == record["genotype"] and genotype.nodes("normal") == 2
    assert (out / "genotype.png").read_bytes()[:4] == b"\x89PNG"
    epochs = [json.loads(line) for line in (out / "search_alphas.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[-1]["genotype"] == record["genotype"]
    assert 0 < epochs[-1]["entropy"]["normal"] <= np.log(len(DARTS_OPS)) + 1e-6
    assert (out / "eval" / "csv" / "metrics.csv").is_file()

    again = tmp_path / "eval"
    argv = ["nas", "--output", str(again), "--stage", "eval", "--genotype", str(out / "genotype.json"),
            "--norm", "bgn", "--eval-norm", "bn", "--model.eval_epochs", "1",
            *TINY_NET, *TINY_LOOPS]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tasks"):
        assert main(argv) == 0
    assert "did not log" not in caplog.text  # eval declares test/acc only, not the search's metrics
    record = json.loads((again / "results.json").read_text())
    assert "test/acc" in record["metrics"] and "test/search_acc" not in record["metrics"]
    assert record["genotype"] == genotype.to_dict() and record["search_norm"] is None
    assert record["eval_norm"] == record["norm"] == "bn" and record["epochs"] == 1  # the norm that trained it


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stage", "prune"], "unknown stage 'prune'; choose from: search, eval, search+eval"),
        (["--model.ops", "[none, sep_conv_3x3, conv_9x9]"], "unknown op 'conv_9x9'; choose from: none"),
        (["--stage", "eval"], "stage 'eval' retrains a given genotype: pass --genotype FILE"),
        (["--stage", "eval", "--genotype", "<bad>"], "not JSON"),
        (["--stage", "eval", "--genotype", "<ckpt>"], "not a genotype JSON file (binary data; a checkpoint?"),
        (["--stage", "eval", "--genotype", "nothere.json"], "--genotype nothere.json: no such file"),
        (["--stage", "eval", "--genotype", "<ops>"], "op 'conv_9x9' is not in the space"),
        (["--stage", "eval", "--genotype", "<deep>"], "normal cell has 2 nodes, more than the network's 1"),
        (["--genotype", "<deep>"], "is only read by --stage eval"),
        (["--model.stage", "eval"], "stage 'eval' retrains a given genotype: pass --genotype FILE"),
        (["--config", "<old>"], "stage 'eval' retrains a given genotype: pass --genotype FILE"),
        (["--eval-norm", "batchnorm"], "unknown norm 'batchnorm'"),
        (["--model.norm_kwargs", "{affine: false}"], "norm_kwargs must not set affine"),
    ],
)  # fmt: skip
def test_bad_nas_values_are_one_line_exit_2(flags, message, tmp_path: Path, capsys) -> None:
    cell = {"normal": [["skip_connect", 0], ["skip_connect", 1]], "normal_concat": [2]}
    outside = {**cell, "reduce": [["conv_9x9", 0], ["skip_connect", 1]], "reduce_concat": [2]}
    files = {"bad": "{not json", "ops": json.dumps(outside), "deep": json.dumps(GENOTYPE)}
    files["old"] = "{model: {stage: eval}}"  # a config written when the stage was a model key
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    files["ckpt"] = ""
    (tmp_path / "ckpt.json").write_bytes(b"PK\x03\x04\x80\x81 torch zip")
    for name in files:
        flags = [str(tmp_path / f"{name}.json") if f == f"<{name}>" else f for f in flags]
    assert main(["nas", "--output", str(tmp_path / "run"), "--model.nodes", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "results.json").exists()


def _crosses(box, a, b) -> bool:
    """Whether the segment a-b passes through ``box`` (display units), sampled finely."""
    steps = [t / 200 for t in range(201)]
    return any(box.contains(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])) for t in steps)


@pytest.mark.parametrize("nodes", [2, 4, 5])
def test_genotype_drawing_has_no_edge_behind_a_node_and_no_overlapping_labels(nodes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.nas.plot import _draw_cell

    ops = ["sep_conv_3x3", "max_pool_3x3", "skip_connect", "dil_conv_5x5"]
    edges = tuple((ops[k % 4], j) for i in range(nodes) for k, j in enumerate((0, i + 1) if i else (0, 1)))
    fig, ax = plt.subplots(figsize=(1.7 * (3 + nodes), 3.4))
    drawing = _draw_cell(ax, edges, tuple(range(2, 2 + nodes)), "reduction cell")
    to_display = ax.transData.transform
    for src, dst in drawing.edges:
        a, b = to_display(drawing.positions[src]), to_display(drawing.positions[dst])
        others = [box for state, box in drawing.nodes.items() if state not in (src, dst)]
        assert not any(_crosses(box, a, b) for box in others), (src, dst)
    boxes = [*drawing.labels, *drawing.nodes.values()]
    for i, label in enumerate(drawing.labels):
        assert not any(label.overlaps(other) for other in boxes[i + 1:]), i
    plt.close(fig)
