"""BatchGroupNorm layers: identities with torch's norms, running stats, auto-G, state dicts, errors."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

from bgn_lightning import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
)
from tests.reference import reference_bgn


def _randomize_affine(*modules: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    c = modules[0].weight.shape[0]
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    for m in modules:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_groups_equal_channels_is_batchnorm(momentum: float | None) -> None:
    torch.manual_seed(0)
    bgn = BatchGroupNorm2d(6, num_groups=6, momentum=momentum).double()
    bn = nn.BatchNorm2d(6, momentum=momentum).double()
    _randomize_affine(bgn, bn)
    for step in range(3):
        x = (torch.randn(4, 6, 5, 5, dtype=torch.float64) * (step + 1) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = bgn(x), bn(x2)
        torch.testing.assert_close(y, y2)
        grad = torch.randn_like(y)
        y.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bgn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(bgn.bias.grad, bn.bias.grad)
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)
    assert int(bgn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bgn.eval()
    bn.eval()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(bgn(x), bn(x))


def test_single_sample_single_group_is_layer_groupnorm() -> None:
    torch.manual_seed(1)
    bgn = BatchGroupNorm2d(6, num_groups=1).double()
    gn = nn.GroupNorm(1, 6).double()
    _randomize_affine(bgn, gn)
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = bgn(x), gn(x2)
    torch.testing.assert_close(y, y2)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bgn.weight.grad, gn.weight.grad)


def test_layer_matches_reference_and_updates_running_stats() -> None:
    torch.manual_seed(2)
    layer = BatchGroupNorm2d(8, num_groups=4, momentum=0.5).double()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64) * 2 + 1
    y = layer(x)
    y_ref, mean, var = reference_bgn(x, 4, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(y, y_ref)
    n = 3 * 8 * 16 // 4
    torch.testing.assert_close(layer.running_mean, 0.5 * mean)
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * var * n / (n - 1))


def test_track_running_stats_false_uses_batch_stats_in_eval() -> None:
    layer = BatchGroupNorm2d(4, num_groups=2, track_running_stats=False).eval()
    assert layer.running_mean is None
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(layer(x), reference_bgn(x, 2, layer.weight, layer.bias, 1e-5)[0].float())


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(BatchGroupNorm1d, (4, 6)), (BatchGroupNorm1d, (4, 6, 5)), (BatchGroupNorm2d, (4, 6, 3, 3)),
     (BatchGroupNorm3d, (4, 6, 2, 3, 3)), (BatchGroupNorm, (4, 6, 2, 2, 2, 2))],
)
def test_dimension_variants(cls: type[BatchGroupNorm], shape: tuple[int, ...]) -> None:
    layer = cls(6, num_groups=3)
    assert layer(torch.randn(shape)).shape == shape


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(BatchGroupNorm1d, (4, 6, 3, 3)), (BatchGroupNorm2d, (4, 6, 3)), (BatchGroupNorm3d, (4, 6, 3, 3))],
)
def test_wrong_number_of_dims_raises(cls: type[BatchGroupNorm], shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}: expected")):
        cls(6, num_groups=3)(torch.randn(shape))


def test_bad_inputs_raise_value_errors_naming_layer_and_shape() -> None:
    with pytest.raises(ValueError, match=r"C=5 channels.*num_features=6"):
        BatchGroupNorm2d(6, num_groups=3)(torch.randn(2, 5, 3, 3))
    message = r"BatchGroupNorm2d \(input \(2, 6, 1, 1\)\): num_groups=4 must divide"
    with pytest.raises(ValueError, match=message):
        BatchGroupNorm2d(6, num_groups=4)(torch.randn(2, 6, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchGroupNorm2d(6, num_groups=6)(torch.randn(1, 6, 1, 1))
    with pytest.raises(ValueError, match="multiple of C"):
        BatchGroupNorm2d(4, num_groups=6)
    with pytest.raises(ValueError, match="num_features"):
        BatchGroupNorm2d(0)
    with pytest.raises(ValueError, match="num_groups"):
        BatchGroupNorm2d(4, num_groups="many")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        BatchGroupNorm2d(4, momentum=2.0)
    with pytest.raises(ValueError, match="reference_batch_size"):
        BatchGroupNorm2d(4, reference_batch_size=0)


def test_groups_beyond_channels_tie_running_stats_to_spatial_size() -> None:
    layer = BatchGroupNorm2d(4, num_groups=16)
    layer(torch.randn(3, 4, 4, 4))
    assert layer.running_mean.shape == (16,)
    layer.eval()
    assert layer(torch.randn(2, 4, 4, 4)).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"running statistics belong to inputs with C\*prod\(S\)=64"):
        layer(torch.randn(2, 4, 8, 8))
    # Groups that align with channels do not depend on the spatial size.
    aligned = BatchGroupNorm2d(4, num_groups=2)
    aligned(torch.randn(3, 4, 4, 4))
    aligned.eval()
    assert aligned(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)


def test_auto_groups_are_lazy_recorded_and_reload() -> None:
    layer = BatchGroupNorm2d(64)
    assert layer.num_groups is None and layer.running_mean.numel() == 0
    assert "auto" in repr(layer)
    mean_buffer = layer.running_mean
    layer(torch.randn(2, 64, 4, 4))
    assert layer.num_groups == 4  # 64 * 2 / 32
    assert layer.running_mean is mean_buffer  # resized in place (DDP holds buffer references)
    assert layer.running_mean.shape == (4,)
    assert "num_groups=4 (auto)" in repr(layer)
    layer(torch.randn(16, 64, 4, 4))
    assert layer.num_groups == 4  # fixed at the first training batch
    state = layer.state_dict()
    assert state["_extra_state"]["num_groups"] == 4

    fresh = BatchGroupNorm2d(64)
    fresh.load_state_dict(state)
    assert fresh.num_groups == 4
    torch.testing.assert_close(fresh.running_var, layer.running_var)
    fresh.eval()
    layer.eval()
    x = torch.randn(1, 64, 4, 4)
    torch.testing.assert_close(fresh(x), layer(x))

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = BatchGroupNorm2d(64)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert again.num_groups == 4


def test_fixed_groups_refuse_a_checkpoint_with_other_groups() -> None:
    state = BatchGroupNorm2d(8, num_groups=2).state_dict()
    with pytest.raises(RuntimeError, match="num_groups=2"):
        BatchGroupNorm2d(8, num_groups=4).load_state_dict(state)


def test_loads_a_batchnorm_state_dict_when_groups_equal_channels() -> None:
    bn = nn.BatchNorm2d(8)
    bn(torch.randn(4, 8, 3, 3))
    layer = BatchGroupNorm2d(8, num_groups=8)
    layer.load_state_dict(bn.state_dict())
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    assert set(layer.state_dict()) == set(bn.state_dict()) | {"_extra_state"}


def test_eval_before_any_training_batch_acts_like_fresh_batchnorm() -> None:
    layer = BatchGroupNorm2d(4).eval()
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), bn(x))
    assert layer.num_groups is None


def test_reset_and_copies() -> None:
    layer = BatchGroupNorm2d(4, num_groups=2)
    layer(torch.randn(3, 4, 2, 2) + 5)
    assert int(layer.num_batches_tracked) == 1
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone.running_mean, layer.running_mean)
    layer.reset_parameters()
    assert torch.all(layer.running_mean == 0) and torch.all(layer.running_var == 1)
    assert int(layer.num_batches_tracked) == 0
    assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)


def test_not_converted_by_torch_sync_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchGroupNorm2d(4, num_groups=2))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], BatchGroupNorm2d)


def test_positional_norm_normalizes_over_channels_at_each_position() -> None:
    torch.manual_seed(3)
    layer = PositionalNorm(5)
    _randomize_affine(layer)
    x = torch.randn(2, 5, 3, 4) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    normalized = (x - mean) / torch.sqrt(var + 1e-5)
    expected = normalized * layer.weight.view(1, 5, 1, 1) + layer.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="PositionalNorm"):
        layer(torch.randn(2, 4, 3, 3))


def test_auto_groups_fixed_by_a_clone_that_shares_the_buffers():
    """learn2learn's clone_module (MAML) shares buffers but not __dict__: G fixed by a clone holds."""
    clone_module = pytest.importorskip("learn2learn.utils").clone_module
    layer = BatchGroupNorm2d(8)  # auto: G = 8 * 4 / 32 = 1
    x = torch.randn(4, 8, 3, 3) * 2 + 1
    first = clone_module(layer)
    first(x)
    assert first.num_groups == 1 and layer.running_mean.shape == (1,)
    stats = layer.running_mean.clone()
    second = clone_module(layer)
    second(x)  # adopts G from the shared buffers: the statistics are updated, not reset
    assert second.num_groups == 1 and not torch.equal(layer.running_mean, stats)
    assert layer.state_dict()["_extra_state"]["num_groups"] == 1
    layer.eval()  # the original normalizes with the clones' statistics, not as an untrained layer
    expected = (x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(layer(x), expected)
    fresh = BatchGroupNorm2d(8)
    fresh.load_state_dict({**layer.state_dict(), "_extra_state": {"num_groups": None, "feature_numel": None}})
    assert fresh.num_groups == 1  # a checkpoint saved before this fix: G from the buffers' size
