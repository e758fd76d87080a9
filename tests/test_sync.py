"""SyncBatchGroupNorm: two gloo processes on CPU against one process on the concatenated batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.plugins import LayerSync
from torch import nn

from bgn_lightning import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BGNSync,
    SyncBatchGroupNorm,
    convert_sync_batchgroupnorm,
    is_norm_layer,
    revert_sync_batchgroupnorm,
)

# name -> (per-rank batch sizes, C, spatial shape, G, channels_last); every case runs two steps.
CASES: dict[str, tuple[tuple[int, int], int, tuple[int, ...], int | str, bool]] = {
    "groups_divide_channels_uneven": ((3, 2), 6, (4, 4), 3, False),
    "groups_beyond_channels": ((2, 2), 4, (4, 4), 8, False),
    "groups_straddle_channels_empty_rank": ((3, 0), 6, (2, 2), 4, False),
    "channels_last": ((2, 3), 8, (3, 3), 2, True),
    "auto_groups_from_global_batch": ((8, 8), 8, (2, 2), "auto", False),
    "one_dim": ((3, 2), 6, (), 2, False),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_data(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and output gradient of a case at a step (the same in every process)."""
    sizes, c, spatial, _, _ = CASES[name]
    g = torch.Generator().manual_seed(100 * list(CASES).index(name) + step)
    shape = (sum(sizes), c, *spatial)
    return torch.randn(shape, generator=g) * 3 + 1, torch.randn(shape, generator=g)


def _layer(name: str, cls: type[BatchGroupNorm]) -> BatchGroupNorm:
    _, c, _, groups, _ = CASES[name]
    layer = cls(c, num_groups=groups, momentum=0.3)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return layer


def _run_steps(name: str, layer: nn.Module, rows: slice) -> dict[str, Any]:
    """Two training steps on ``rows`` of each global batch; outputs and gradients per step."""
    channels_last = CASES[name][4]
    out: dict[str, Any] = {}
    for step in range(2):
        x, dy = _case_data(name, step)
        x, dy = x[rows], dy[rows]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
        out[f"dw{step}"], out[f"db{step}"] = layer.weight.grad.clone(), layer.bias.grad.clone()
        out[f"format{step}"] = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    out["running_mean"], out["running_var"] = layer.running_mean.clone(), layer.running_var.clone()
    out["num_groups"] = layer.num_groups
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results: dict[str, Any] = {}
        for name, (sizes, *_rest) in CASES.items():
            start = sum(sizes[:rank])
            layer = convert_sync_batchgroupnorm(_layer(name, BatchGroupNorm))
            results[name] = _run_steps(name, layer, slice(start, start + sizes[rank]))
        # A single value per statistic over both processes: both raise, neither hangs.
        layer = SyncBatchGroupNorm(4, num_groups=4)
        x = torch.randn(1 - rank, 4)
        try:
            layer(x)
        except ValueError as err:
            results["single_value_error"] = str(err)
        # Double backward is refused (the composite path would not be synchronized).
        layer = SyncBatchGroupNorm(4, num_groups=2)
        x = torch.randn(3, 4, requires_grad=True)
        try:
            torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        except NotImplementedError as err:
            results["double_backward_error"] = str(err)
        dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_on_the_whole_batch(
    two_process_results: list[dict[str, Any]], name: str
) -> None:
    reference = _run_steps(name, _layer(name, BatchGroupNorm), slice(None))
    ranks = [r[name] for r in two_process_results]
    close = {"rtol": 1e-5, "atol": 1e-5}
    for step in range(2):
        for key in ("y", "dx"):
            torch.testing.assert_close(torch.cat([r[f"{key}{step}"] for r in ranks]),
                                       reference[f"{key}{step}"], **close, msg=f"{name} step {step}: {key}")
        for key in ("dw", "db"):  # DDP averages these; their sum is the whole-batch gradient
            torch.testing.assert_close(ranks[0][f"{key}{step}"] + ranks[1][f"{key}{step}"],
                                       reference[f"{key}{step}"], **close, msg=f"{name} step {step}: {key}")
        if CASES[name][4]:
            assert all(r[f"format{step}"] for r in ranks if r[f"y{step}"].shape[0])
    for r in ranks:
        assert r["num_groups"] == reference["num_groups"]
        torch.testing.assert_close(r["running_mean"], reference["running_mean"], **close)
        torch.testing.assert_close(r["running_var"], reference["running_var"], **close)


def test_auto_groups_follow_the_global_batch(two_process_results: list[dict[str, Any]]) -> None:
    # C * (8 + 8) / 32 = 4, not C * 8 / 32 = 2 from one process's batch
    assert [r["auto_groups_from_global_batch"]["num_groups"] for r in two_process_results] == [4, 4]


def test_errors_are_raised_on_every_process(two_process_results: list[dict[str, Any]]) -> None:
    for r in two_process_results:
        assert "more than 1 value per statistic" in r["single_value_error"]
        assert "over the 2 processes" in r["single_value_error"]
        assert "double backward" in r["double_backward_error"]


def test_conversion_shares_state_and_round_trips() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchGroupNorm2d(8, num_groups=4),
                          nn.Sequential(nn.Flatten(), BatchGroupNorm1d(8 * 36, num_groups="auto")))
    model.eval()
    bgn, inner = model[1], model[2][1]
    synced = convert_sync_batchgroupnorm(model)
    assert synced is model
    assert type(model[1]) is SyncBatchGroupNorm and type(model[2][1]) is SyncBatchGroupNorm
    assert is_norm_layer(model[1]) and not model[1].training
    assert model[1].weight is bgn.weight and model[1].running_mean is bgn.running_mean
    assert model[2][1].weight is inner.weight
    assert model[1].num_groups == 4 and model[2][1].num_groups is None and model[2][1].auto_groups
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(model[1](x), bgn(x))
    reverted = revert_sync_batchgroupnorm(model)
    assert type(reverted[1]) is BatchGroupNorm2d and type(reverted[2][1]) is BatchGroupNorm1d
    assert reverted[1].weight is bgn.weight and reverted[2][1].auto_groups
    assert type(revert_sync_batchgroupnorm(SyncBatchGroupNorm(4, num_groups=2))) is BatchGroupNorm


def test_without_distributed_it_is_batchgroupnorm() -> None:
    torch.manual_seed(0)
    sync, plain = SyncBatchGroupNorm(6, num_groups=3), BatchGroupNorm(6, num_groups=3)
    x = torch.randn(4, 6, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(sync(x), plain(x2))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    sync(x).sum().backward()
    plain(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_layer_sync_plugin() -> None:
    plugin = BGNSync()
    assert isinstance(plugin, LayerSync)
    model = nn.Sequential(BatchGroupNorm2d(4, num_groups=2), nn.BatchNorm2d(4))
    model = plugin.apply(model)
    assert type(model[0]) is SyncBatchGroupNorm and type(model[1]) is nn.BatchNorm2d
    model = plugin.revert(model)
    assert type(model[0]) is BatchGroupNorm2d
    both = BGNSync(batchnorm=True)
    model = both.apply(model)
    assert type(model[0]) is SyncBatchGroupNorm and type(model[1]) is nn.SyncBatchNorm
    model = both.revert(model)
    assert type(model[0]) is BatchGroupNorm2d and not isinstance(model[1], nn.SyncBatchNorm)


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.types: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.types.append(type(pl_module.net[1]).__name__)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchGroupNorm2d(4, num_groups="auto"), nn.Flatten(),
                                 nn.Linear(4 * 16, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def restore_process_state() -> Any:
    """A DDP Trainer in this process sets MASTER_PORT & co. and a process group: undo both."""
    environ = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.usefixtures("restore_process_state")
def test_plugin_in_a_ddp_trainer(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 6, 6))
    recorder = _Recorder()
    model = _Net()
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=1, plugins=[BGNSync()], max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert recorder.types == ["SyncBatchGroupNorm", "SyncBatchGroupNorm"]
    assert type(model.net[1]) is BatchGroupNorm2d  # reverted after fit
    assert model.net[1].num_groups == 1 and int(model.net[1].num_batches_tracked) == 2  # 4 * 4 / 32
