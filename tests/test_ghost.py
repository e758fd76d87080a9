"""Ghost batches (``norm_batch_size``): equal to separate forwards of fresh layers per chunk, and to
real 2-process DDP without synchronized statistics; auto-G from b; compile, torch.func, double
backward; bad input."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bgn_lightning import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SyncBatchGroupNorm,
    auto_num_groups,
    batch_group_norm,
    build_norm,
    convert_norms,
    register_norm,
    set_norm_batch_size,
)

# name -> (input shape, layer under test, its plain per-chunk reference, channels-last)
LAYOUTS: dict[str, tuple[tuple[int, ...], Any, Any, bool]] = {
    "bn_1d_features": ((8, 6), lambda: GhostBatchNorm1d(6), lambda: nn.BatchNorm1d(6), False),
    "bn_1d_sequence": ((7, 4, 5), lambda: GhostBatchNorm1d(4), lambda: nn.BatchNorm1d(4),
                       False),
    "bn_2d": ((7, 6, 3, 3), lambda: GhostBatchNorm2d(6), lambda: nn.BatchNorm2d(6), False),
    "bn_2d_channels_last": ((7, 6, 3, 3), lambda: GhostBatchNorm2d(6), lambda: nn.BatchNorm2d(6), True),
    "bn_3d": ((7, 4, 2, 2, 3), lambda: GhostBatchNorm3d(4), lambda: nn.BatchNorm3d(4), False),
    "bgn_groups_divide_channels": ((7, 8, 3, 3), lambda: BatchGroupNorm2d(8, 2),
                                   lambda: BatchGroupNorm2d(8, 2), False),
    "bgn_groups_equal_channels_cl": ((7, 8, 3, 3), lambda: BatchGroupNorm2d(8, 8),
                                     lambda: BatchGroupNorm2d(8, 8), True),
    "bgn_groups_beyond_channels_cl": ((7, 4, 2, 4), lambda: BatchGroupNorm2d(4, 8),
                                      lambda: BatchGroupNorm2d(4, 8), True),
    "bgn_groups_straddle_channels": ((7, 6, 2, 2), lambda: BatchGroupNorm2d(6, 4),
                                     lambda: BatchGroupNorm2d(6, 4), False),
    "bgn_1d_features": ((7, 6), lambda: BatchGroupNorm1d(6, 3), lambda: BatchGroupNorm1d(6, 3), False),
    "bgn_3d": ((7, 4, 2, 2, 2), lambda: BatchGroupNorm3d(4, 2), lambda: BatchGroupNorm3d(4, 2), False),
}


def _init(layer: nn.Module, c: int) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return layer.double()


def _data(shape: tuple[int, ...], channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


@pytest.mark.parametrize("running_stats_from", ["first", "mean"])
@pytest.mark.parametrize("b", [2, 3, 1])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_equals_separate_forwards_of_fresh_layers(name: str, b: int, running_stats_from: str) -> None:
    shape, make, make_reference, channels_last = LAYOUTS[name]
    if b == 1 and len(shape) == 2 and name.startswith("bn"):
        pytest.skip("one value per statistic: covered by the bad-input test")
    c = shape[1]
    x, dy = _data(shape, channels_last)
    layer = _init(make(), c)
    layer.norm_batch_size, layer.running_stats_from = b, running_stats_from
    for _ in range(2):  # two steps: the running statistics compound
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xg)
        y.backward(dy)
    references = [_init(make_reference(), c) for _ in range(0, shape[0], b)]
    for _ in range(2):
        outputs, grads = [], []
        for k, ref in enumerate(references):
            chunk = x[k * b:(k + 1) * b].clone().requires_grad_()
            ref.zero_grad()
            out = ref(chunk)
            out.backward(dy[k * b:(k + 1) * b])
            outputs.append(out.detach())
            grads.append(chunk.grad)
    torch.testing.assert_close(y.detach(), torch.cat(outputs))
    torch.testing.assert_close(xg.grad, torch.cat(grads))
    torch.testing.assert_close(layer.weight.grad, sum(r.weight.grad for r in references))
    torch.testing.assert_close(layer.bias.grad, sum(r.bias.grad for r in references))
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    if running_stats_from == "first":
        expected = references[0].running_mean, references[0].running_var
    else:  # lerp is linear: the mean of the separate layers' buffers
        expected = (torch.stack([r.running_mean for r in references]).mean(0),
                    torch.stack([r.running_var for r in references]).mean(0))
    torch.testing.assert_close(layer.running_mean, expected[0])
    torch.testing.assert_close(layer.running_var, expected[1])
    layer.eval()  # eval mode is unchanged: the running statistics
    reference = _init(make_reference(), c).eval()
    reference.running_mean.copy_(layer.running_mean)
    reference.running_var.copy_(layer.running_var)
    torch.testing.assert_close(layer(x), reference(x))


def test_a_norm_batch_at_least_the_batch_is_the_whole_batch() -> None:
    x, _ = _data((6, 4, 3, 3), False)
    for b in (6, 50):
        ghost, plain = _init(GhostBatchNorm2d(4, norm_batch_size=b), 4), _init(nn.BatchNorm2d(4), 4)
        torch.testing.assert_close(ghost(x), plain(x))
        torch.testing.assert_close(ghost.running_var, plain.running_var)
        bgn, whole = BatchGroupNorm2d(4, 2, norm_batch_size=b).double(), BatchGroupNorm2d(4, 2).double()
        torch.testing.assert_close(bgn(x), whole(x))


def test_functional_and_float32_fused_path_match_the_reference() -> None:
    """The default dispatch in float32 (fused kernels where they support chunks) against float64."""
    x, dy = _data((12, 8, 4, 4), False)
    for groups in (8, 2, 16):
        for b in (1, 4, 5):
            x32 = x.float().requires_grad_()
            rm, rv = torch.zeros(groups), torch.ones(groups)
            y = batch_group_norm(x32, groups, rm, rv, norm_batch_size=b, momentum=0.5)
            y.backward(dy.float())
            x64 = x.clone().requires_grad_()
            ref = torch.cat([batch_group_norm(x64[k:k + b], groups) for k in range(0, 12, b)])
            ref.backward(dy)
            torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-3, rtol=1e-3)
            first = x[:b].double().reshape(b, groups, -1)
            torch.testing.assert_close(rm.double(), 0.5 * first.mean((0, 2)), atol=1e-5, rtol=1e-5)


def test_auto_groups_follow_the_norm_batch_size() -> None:
    layer = BatchGroupNorm2d(64, "auto", norm_batch_size=8)
    layer(torch.randn(32, 64, 4, 4))
    assert layer.num_groups == auto_num_groups(8, 64, 64 * 16) == 16
    whole = BatchGroupNorm2d(64, "auto")
    whole(torch.randn(32, 64, 4, 4))
    assert whole.num_groups == 64  # G = C at the reference batch: BN's statistics
    small = BatchGroupNorm2d(64, "auto", norm_batch_size=64)  # b above N: N counts
    small(torch.randn(4, 64, 4, 4))
    assert small.num_groups == auto_num_groups(4, 64, 64 * 16)


def test_gradcheck_double_backward_compile_and_torch_func() -> None:
    x, dy = _data((5, 4, 2, 2), False)
    layer = _init(BatchGroupNorm2d(4, 2, norm_batch_size=2, track_running_stats=False), 4)
    torch.autograd.gradcheck(lambda t: layer(t), (x.clone().requires_grad_(),))
    torch.autograd.gradgradcheck(lambda t: layer(t), (x.clone().requires_grad_(),))
    ghost = _init(GhostBatchNorm2d(4, norm_batch_size=2, track_running_stats=False), 4)
    torch.autograd.gradcheck(lambda t: ghost(t), (x.clone().requires_grad_(),))
    # torch.func (the composite path): per-sample-free grad of a functional call
    params = dict(layer.named_parameters())

    def loss(p: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(layer, p, (t,)) * dy).sum()

    grads = torch.func.grad(loss)(params, x)
    layer.zero_grad()
    loss(params, x).backward()
    torch.testing.assert_close(grads["weight"], layer.weight.grad)
    compiled = torch.compile(_init(BatchGroupNorm2d(4, 2, norm_batch_size=2), 4).float(), backend="eager")
    eager = _init(BatchGroupNorm2d(4, 2, norm_batch_size=2), 4).float()
    torch.testing.assert_close(compiled(x.float()), eager(x.float()))
    torch.testing.assert_close(compiled.running_var, eager.running_var)


def test_sync_layer_with_a_norm_batch_size_needs_no_collective() -> None:
    layer = SyncBatchGroupNorm(4, 2, norm_batch_size=2).double()
    assert not layer._synchronized()
    x, _ = _data((6, 4, 3), False)
    torch.testing.assert_close(layer(x), BatchGroupNorm(4, 2, norm_batch_size=2).double()(x))


# -- models, registry, bad input -------------------------------------------------------------


def test_set_norm_batch_size_on_a_torchvision_model() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3)
    model.layer1[1].bn2 = model.layer1[0].bn2  # a layer shared by two parents stays shared
    keys = set(model.state_dict())
    params = {id(p) for p in model.parameters()}
    converted = set_norm_batch_size(model, 4)
    assert converted is model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is GhostBatchNorm2d and m.norm_batch_size == 4 for m in norms)
    assert model.layer1[1].bn2 is model.layer1[0].bn2
    assert set(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
    x = torch.randn(8, 3, 32, 32)
    model(x).sum().backward()
    set_norm_batch_size(model, None)
    model.eval()
    assert all(m.norm_batch_size is None for m in norms)
    root = set_norm_batch_size(nn.BatchNorm1d(3), 2)
    assert type(root) is GhostBatchNorm1d


def test_set_norm_batch_size_sets_bgn_and_refuses_layers_it_cannot_set() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchGroupNorm2d(8), nn.GroupNorm(2, 8))
    set_norm_batch_size(model, 2, running_stats_from="mean")
    assert model[1].norm_batch_size == 2 and model[1].running_stats_from == "mean"
    assert "norm_batch_size=2" in repr(model[1])
    with pytest.raises(ValueError, match=r"0 \(SyncBatchNorm\).*convert_norms"):
        set_norm_batch_size(nn.Sequential(nn.SyncBatchNorm(4)), 2)
    with pytest.warns(UserWarning, match="no layer of this Sequential uses batch statistics"):
        set_norm_batch_size(nn.Sequential(nn.GroupNorm(2, 8)), 2)


def test_convert_norms_carries_the_norm_batch_size() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    convert_norms(model, "bgn", norm_batch_size=4)
    assert isinstance(model[1], BatchGroupNorm2d) and model[1].norm_batch_size == 4
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    convert_norms(model, "bn", norm_batch_size=4)
    assert type(model[1]) is GhostBatchNorm2d


def test_registry_norm_batch_size() -> None:
    assert type(build_norm("bn", 4)) is nn.BatchNorm2d
    assert type(build_norm("bn", 4, norm_batch_size=None)) is nn.BatchNorm2d
    assert build_norm("bn", 4, dim=3, norm_batch_size=2).norm_batch_size == 2
    assert build_norm("bgn", 4, norm_batch_size=2, running_stats_from="mean").running_stats_from == "mean"
    for name in ("gn", "ln", "in", "pn", "none"):
        no_effect = f"{name}: uses no batch statistics; norm_batch_size=2 has no effect"
        with pytest.warns(UserWarning, match=no_effect):
            build_norm(name, 4, norm_batch_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build_norm(name, 4, norm_batch_size=None)


def test_registered_norms_opt_in_to_norm_batch_size() -> None:
    @register_norm("test_ghost_plain", overwrite=True)
    class Plain(nn.Module):
        def __init__(self, num_features: int) -> None:
            super().__init__()

    @register_norm("test_ghost_aware", overwrite=True)
    class Aware(nn.Module):
        def __init__(self, num_features: int, norm_batch_size: int | None = None) -> None:
            super().__init__()
            self.norm_batch_size = norm_batch_size

    build_norm("test_ghost_plain", 4, norm_batch_size=None)
    with pytest.raises(ValueError, match="test_ghost_plain: takes no norm_batch_size"):
        build_norm("test_ghost_plain", 4, norm_batch_size=2)
    assert build_norm("test_ghost_aware", 4, norm_batch_size=2).norm_batch_size == 2


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_norm_batch_size(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"norm_batch_size must be a positive int .* got"):
        BatchGroupNorm2d(4, norm_batch_size=bad)
    with pytest.raises(ValueError, match="norm_batch_size must be a positive int"):
        GhostBatchNorm2d(4, norm_batch_size=bad)
    with pytest.raises(ValueError, match="norm_batch_size must be a positive int"):
        batch_group_norm(torch.randn(4, 4), 2, norm_batch_size=bad)
    with pytest.raises(ValueError, match="norm_batch_size must be a positive int"):
        set_norm_batch_size(nn.BatchNorm2d(4), bad)


def test_one_value_per_statistic_in_a_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match=r"norm_batch_size=1 \(the smallest run has 1 sample\)"):
        GhostBatchNorm1d(4, norm_batch_size=1)(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"norm_batch_size=2 \(the smallest run has 1 sample\)"):
        BatchGroupNorm1d(4, 4, norm_batch_size=2)(torch.randn(5, 4))  # the last run holds 1 sample
    with pytest.raises(ValueError, match="running_stats_from must be 'first'"):
        BatchGroupNorm2d(4, running_stats_from="last")


# -- real DDP without synchronized statistics ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net(norm: str, norm_batch_size: int | None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), build_norm(norm, 8, norm_batch_size=norm_batch_size), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), build_norm(norm, 8, norm_batch_size=norm_batch_size),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 5, 5, generator=g) * 2 + 1, torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def _train(model: nn.Module, rows: slice) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in _batches():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "state": _state(model)}


def _state(model: nn.Module) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for norm in ("bn", "bgn"):
            model = nn.parallel.DistributedDataParallel(_net(norm, None))  # buffers broadcast from rank 0
            results[norm] = _train(model, slice(4 * rank, 4 * rank + 4))
            results[norm]["state"] = _state(model.module)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_equals_two_process_ddp_without_synchronized_statistics(tmp_path: Path) -> None:
    """b = the per-process batch on one process is DDP over 2 processes (gradients averaged, buffers
    broadcast from rank 0 at every forward): same losses, weights and running statistics."""
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for norm in ("bn", "bgn"):
        single = _train(_net(norm, 4), slice(0, 8))
        ddp_loss = (ranks[0][norm]["losses"] + ranks[1][norm]["losses"]) / 2
        torch.testing.assert_close(single["losses"], ddp_loss, atol=1e-5, rtol=1e-5)
        for key, value in ranks[0][norm]["state"].items():  # rank 0's buffers: what DDP keeps
            torch.testing.assert_close(single["state"][key], value, atol=1e-5, rtol=1e-5, msg=f"{norm} {key}")


def test_normswap_sets_the_norm_batch_size(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from bgn_lightning import NormSwap

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out = self.net(batch[0]).sum()
            self.seen = self.net[1].num_groups
            return out

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 6, 6)),
                                       batch_size=16)
    model = Net()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[NormSwap("bgn", norm_batch_size=4)])
    trainer.fit(model, data)
    assert model.net[1].norm_batch_size == 4
    assert model.seen == auto_num_groups(4, 8, 8 * 16)
    with pytest.raises(ValueError, match="NormSwap: norm_batch_size must be a positive int"):
        NormSwap("bgn", norm_batch_size=0)


def test_values_per_statistic_rule() -> None:
    """auto-G with values_per_statistic=V targets b * D / V values per statistic in every layer."""
    layer = BatchGroupNorm2d(64, norm_batch_size=4, values_per_statistic=256)
    layer(torch.randn(16, 64, 8, 8))
    assert layer.num_groups == 64  # 4 * 4096 / 256 = 64 = C
    assert "values_per_statistic=256" in repr(layer)
    wide = BatchGroupNorm2d(16, values_per_statistic=8)
    wide(torch.randn(2, 16, 4, 4))  # 2 * 256 / 8 = 64 = 4C: groups inside channels
    assert wide.num_groups == 64
    assert auto_num_groups(2, 16, 256, values_per_statistic=10**6) == 1
    with pytest.raises(ValueError, match="values_per_statistic must be an int >= 2"):
        BatchGroupNorm2d(8, values_per_statistic=1)
