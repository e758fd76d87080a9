"""convert_norms / convert_norm_layer: what is replaced, what carries over, and when."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from bgn_lightning import (
    BatchGroupNorm,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
    convert_norm_layer,
    convert_norms,
    is_norm_layer,
)
from bgn_lightning.convert import pool_channel_stats


def trained_bn(c: int = 8, dim: int = 2, **kwargs) -> nn.Module:
    """A BatchNorm with non-trivial affine parameters and running statistics."""
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](c, **kwargs)
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(37)
    return bn


def net(c: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), trained_bn(c), nn.ReLU(),
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1), trained_bn(c)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4), trained_bn(4, dim=1),
    )


def ref_group_stats(mean: torch.Tensor, var: torch.Tensor, g: int, spatial: int):
    """Pool by materialising a per-position (C, S) map of channel stats and grouping it."""
    c = mean.numel()
    m = mean.double()[:, None].expand(c, spatial).reshape(g, -1)
    v = var.double()[:, None].expand(c, spatial).reshape(g, -1)
    group_mean = m.mean(1)
    group_var = v.mean(1) + ((m - group_mean[:, None]) ** 2).mean(1)
    return group_mean, group_var


def test_replaces_every_batchnorm_and_counts():
    model = net()
    assert convert_norms(model, "bgn", num_groups=4) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model[1], BatchGroupNorm2d) and isinstance(model[3][1], BatchGroupNorm2d)
    assert isinstance(model[7], BatchGroupNorm1d)
    assert sum(is_norm_layer(m) for m in model.modules()) == 3
    out = model(torch.randn(4, 3, 6, 6))
    out.sum().backward()
    assert out.shape == (4, 4) and model[1].weight.grad is not None


def test_converting_twice_is_a_noop():
    model = net()
    assert convert_norms(model, num_groups=4) == 3
    state = copy.deepcopy(model.state_dict())
    assert convert_norms(model, num_groups=4) == 0
    assert convert_norms(model, num_groups=2) == 0  # nothing of the source types is left
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]
    # a target of the same type as the source is left alone too
    bn_model = net()
    layer = bn_model[1]
    assert convert_norms(bn_model, "bn") == 0 and bn_model[1] is layer


def test_reuses_parameter_objects_and_keeps_requires_grad():
    model = net()
    bn = model[1]
    bn.bias.requires_grad_(False)
    weight, bias = bn.weight, bn.bias
    convert_norms(model, num_groups=2)
    assert model[1].weight is weight and model[1].bias is bias
    assert not model[1].bias.requires_grad and model[1].weight.requires_grad
    assert {id(p) for p in model.parameters()} >= {id(weight), id(bias)}


def test_g_equal_c_copies_stats_and_matches_batchnorm():
    bn = trained_bn(8)
    bgn = convert_norm_layer(bn, "bgn", num_groups=8)
    assert torch.equal(bgn.running_mean, bn.running_mean) and torch.equal(bgn.running_var, bn.running_var)
    assert int(bgn.num_batches_tracked) == 37
    x = torch.randn(4, 8, 5, 5)
    bn.eval(), bgn.eval()
    torch.testing.assert_close(bgn(x), bn(x))
    bn.train(), bgn.train()
    torch.testing.assert_close(bgn(x), bn(x))
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_groups_spanning_channels_pool_stats(g):
    bn = trained_bn(8)
    bgn = convert_norm_layer(bn, "bgn", num_groups=g)
    mean, var = ref_group_stats(bn.running_mean, bn.running_var, g, 1)
    torch.testing.assert_close(bgn.running_mean, mean.float())
    torch.testing.assert_close(bgn.running_var, var.float())
    assert int(bgn.num_batches_tracked) == 37


def test_pooled_stats_match_statistics_of_the_data():
    """A BN that saw one batch (momentum=1) converts to the stats BGN computes on that batch."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, 6, 6) * torch.linspace(0.5, 2, 8)[:, None, None] + torch.arange(8.0)[:, None, None]
    bn = nn.BatchNorm2d(8, momentum=1.0)
    bn(x)
    converted = convert_norm_layer(bn, "bgn", num_groups=2)
    direct = BatchGroupNorm2d(8, num_groups=2, momentum=1.0)
    direct(x)
    torch.testing.assert_close(converted.running_mean, direct.running_mean)
    # unbiased within-channel variances vs. the unbiased pooled one: equal up to O(1/n), n = 576
    torch.testing.assert_close(converted.running_var, direct.running_var, rtol=2e-3, atol=0)


def test_groups_inside_channels_replicate_stats():
    bn = trained_bn(4)
    bgn = convert_norm_layer(bn, "bgn", num_groups=12)
    torch.testing.assert_close(bgn.running_mean, bn.running_mean.repeat_interleave(3))
    torch.testing.assert_close(bgn.running_var, bn.running_var.repeat_interleave(3))
    bgn(torch.randn(2, 4, 3, 3))  # 9 positions per channel split in 3 groups


def test_pool_channel_stats_straddling_groups_against_materialised_reference():
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    for g, spatial in [(4, 2), (9, 3), (3, 1), (12, 2), (8, 4)]:
        got = pool_channel_stats(mean, var, g, spatial)
        want = ref_group_stats(mean, var, g, spatial)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="num_groups=5 must divide"):
        pool_channel_stats(mean, var, 5, 2)


def expected_after_first_step(pooled_mean, pooled_var, layer_input, g, momentum):
    xg = layer_input.double().reshape(layer_input.shape[0], g, -1)
    n = xg.shape[0] * xg.shape[2]
    batch_mean = xg.mean((0, 2))
    batch_var = xg.var((0, 2), unbiased=False) * n / (n - 1)
    return ((1 - momentum) * pooled_mean + momentum * batch_mean,
            (1 - momentum) * pooled_var + momentum * batch_var)


def test_straddling_groups_are_pooled_at_the_first_training_batch():
    bn = trained_bn(6)
    bgn = convert_norm_layer(bn, "bgn", num_groups=4)  # 4 groups of 6*2*2/4 = 6 values: cross channels
    assert len(bgn._forward_pre_hooks) == 1
    x = torch.randn(3, 6, 2, 2)
    bgn(x)
    assert len(bgn._forward_pre_hooks) == 0  # one-shot
    pooled = ref_group_stats(bn.running_mean, bn.running_var, 4, 4)
    want_mean, want_var = expected_after_first_step(*pooled, x, 4, 0.1)
    torch.testing.assert_close(bgn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bgn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert int(bgn.num_batches_tracked) == 38


def test_auto_groups_are_pooled_when_g_is_fixed():
    bn = trained_bn(8)
    bgn = convert_norm_layer(bn, "bgn", num_groups="auto", momentum=0.5)
    assert bgn.num_groups is None
    bgn.eval()
    bgn(torch.randn(2, 8, 4, 4))  # eval before training does not consume the pending stats
    assert bgn.num_groups is None and len(bgn._forward_pre_hooks) == 1
    bgn.train()
    x = torch.randn(8, 8, 4, 4)  # auto: G = C * 8 / 32 = 2
    bgn(x)
    assert bgn.num_groups == 2 and len(bgn._forward_pre_hooks) == 0
    pooled = ref_group_stats(bn.running_mean, bn.running_var, 2, 16)
    want_mean, want_var = expected_after_first_step(*pooled, x, 2, 0.5)
    torch.testing.assert_close(bgn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bgn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)


def test_pending_stats_yield_to_a_loaded_state_dict():
    trained = BatchGroupNorm2d(8, num_groups="auto")
    trained(torch.randn(8, 8, 4, 4))
    bgn = convert_norm_layer(trained_bn(8), "bgn", num_groups="auto")
    bgn.load_state_dict(trained.state_dict())
    bgn(torch.randn(8, 8, 4, 4))
    assert len(bgn._forward_pre_hooks) == 0
    assert int(bgn.num_batches_tracked) == 2  # continued from the checkpoint, not from the BN's 37


def test_pending_stats_survive_pickle_and_deepcopy():
    model = nn.Sequential(trained_bn(8))
    convert_norms(model, num_groups="auto")
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        clone(torch.randn(8, 8, 2, 2))
        assert clone[0].num_groups == 2 and int(clone[0].num_batches_tracked) == 38


def test_momentum_none_continues_the_cumulative_average():
    bn = trained_bn(4, momentum=None)
    bgn = convert_norm_layer(bn, "bgn", num_groups=4)
    assert bgn.momentum is None
    x = torch.randn(6, 4, 3, 3)
    bn(x), bgn(x)
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)


def test_hyper_parameters_inherited_and_overridden():
    bn = trained_bn(8, eps=1e-3, momentum=0.01)
    bgn = convert_norm_layer(bn, "bgn", num_groups=4)
    assert (bgn.eps, bgn.momentum, bgn.affine, bgn.track_running_stats) == (1e-3, 0.01, True, True)
    assert convert_norm_layer(bn, "bgn", num_groups=4, momentum=0.2).momentum == 0.2
    plain = trained_bn(8, affine=False, track_running_stats=False)
    bgn = convert_norm_layer(plain, "bgn", num_groups=4)
    assert not bgn.affine and not bgn.track_running_stats and bgn.weight is None
    gn = convert_norm_layer(bn, "gn", num_groups=4)
    assert isinstance(gn, nn.GroupNorm) and gn.eps == 1e-3 and gn.num_groups == 4


def test_keeps_device_dtype_and_training_flag():
    model = net().double().eval()
    convert_norms(model, num_groups="auto")
    for layer in (model[1], model[3][1], model[7]):
        assert not layer.training
        assert layer.weight.dtype == torch.float64
        assert layer.running_mean.dtype == torch.float64
    model.train()
    assert model(torch.randn(4, 3, 6, 6, dtype=torch.float64)).dtype == torch.float64


def test_dims_follow_the_source_type():
    model = nn.Sequential(trained_bn(4, dim=1), trained_bn(4, dim=3))
    convert_norms(model, num_groups=2)
    assert type(model[0]) is BatchGroupNorm1d and type(model[1]) is BatchGroupNorm3d
    model[1](torch.randn(2, 4, 3, 3, 3))
    model[0](torch.randn(2, 4))


def test_sync_batchnorm_needs_dim_except_for_bgn():
    model = nn.Sequential(nn.SyncBatchNorm(6))
    assert convert_norms(model, num_groups=3) == 1 and type(model[0]) is BatchGroupNorm
    model[0](torch.randn(2, 6, 3)), model[0](torch.randn(2, 6, 3, 3))  # any rank
    model = nn.Sequential(nn.SyncBatchNorm(6))
    convert_norms(model, dim=2, num_groups=3)
    assert type(model[0]) is BatchGroupNorm2d
    with pytest.raises(ValueError, match="pass dim=1, 2 or 3"):
        convert_norms(nn.Sequential(nn.SyncBatchNorm(6)), "in")


@pytest.mark.parametrize("to, cls", [("gn", nn.GroupNorm), ("ln", nn.GroupNorm), ("in", nn.InstanceNorm2d),
                                     ("pn", PositionalNorm), ("none", nn.Identity)])
def test_other_registry_targets(to, cls):
    model = net()
    weight = model[1].weight
    assert convert_norms(model, to, types=nn.BatchNorm2d) == 2
    assert type(model[1]) is cls and isinstance(model[7], nn.BatchNorm1d)  # only BatchNorm2d asked for
    if to != "none":
        assert model[1].weight is weight
    model(torch.randn(4, 3, 6, 6))


def test_reverse_conversion_bgn_to_bn():
    model = nn.Sequential(BatchGroupNorm2d(6, num_groups=6), BatchGroupNorm2d(6, num_groups=2))
    model(torch.randn(4, 6, 3, 3))
    assert convert_norms(model, "bn", types=BatchGroupNorm) == 2
    assert all(type(m) is nn.BatchNorm2d for m in model)
    assert not torch.equal(model[0].running_mean, torch.zeros(6))  # G = C: stats copied
    assert torch.equal(model[1].running_mean, torch.zeros(6))  # G != C: fresh


def test_shared_layer_stays_shared():
    bn = trained_bn(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    assert convert_norms(model, num_groups=2) == 1
    assert model[0] is model[2] and isinstance(model[0], BatchGroupNorm2d)


def test_qconfig_is_kept():
    model = nn.Sequential(trained_bn(4))
    model[0].qconfig = "marker"
    convert_norms(model)
    assert model[0].qconfig == "marker"


def test_errors():
    with pytest.raises(ValueError, match=r"root module is itself a BatchNorm2d.*convert_norm_layer"):
        convert_norms(trained_bn(4))
    with pytest.raises(ValueError, match=r"unknown norm 'nope'; known norms: .*bgn"):
        convert_norms(net(), "nope")
    with pytest.raises(ValueError, match="types must be a non-empty sequence of nn\\.Module subclasses"):
        convert_norms(net(), types=("BatchNorm2d",))
    with pytest.raises(ValueError, match="dim must be 1, 2, 3 or None, got 4"):
        convert_norms(net(), dim=4)
    with pytest.raises(ValueError, match="uninitialized parameters; run one forward"):
        convert_norms(nn.Sequential(nn.LazyBatchNorm2d()), types=nn.LazyBatchNorm2d)
    with pytest.raises(ValueError, match="num_groups=12 > C=8 requires num_groups to be a multiple of C"):
        convert_norms(net(), num_groups=12)


# -- layers whose forward does more than normalize ---------------------------------------------
class BNReLU(nn.BatchNorm2d):
    """A fused norm-act layer the converter does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward: a plain norm."""


def fused_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(BNReLU(8)), nn.Conv2d(8, 8, 3), trained_bn(8))


def test_unknown_forward_is_refused_before_anything_changes():
    model = fused_net()
    pattern = r"1\.0 \(tests\.test_convert\.BNReLU\).*register_norm_adapter.*on_unknown='warn'"
    with pytest.raises(ValueError, match=pattern):
        convert_norms(model, "bgn", num_groups=2)
    assert isinstance(model[1][0], BNReLU) and isinstance(model[3], nn.BatchNorm2d)  # nothing replaced
    with pytest.raises(ValueError, match="BNReLU"):
        convert_norm_layer(BNReLU(8), "bgn")


def test_unknown_forward_left_with_a_warning_when_asked():
    from bgn_lightning.convert import convert_tree

    model = fused_net()
    with pytest.warns(UserWarning, match=r"1\.0 .*BNReLU.*left as they are"):
        report = convert_tree(model, "bgn", nn.BatchNorm2d, dim=None, on_unknown="warn",
                              kwargs={"num_groups": 2})
    assert report.total == 1 and report.left == {"BNReLU": 1}
    assert isinstance(model[1][0], BNReLU) and isinstance(model[3], BatchGroupNorm2d)
    assert report.describe() == "1 BatchNorm2d -> BatchGroupNorm2d; left: 1 BNReLU"
    with pytest.raises(ValueError, match="on_unknown must be one of error, warn, got 'skip'"):
        convert_norms(fused_net(), on_unknown="skip")


def test_subclass_with_batchnorms_forward_is_converted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), PlainSubclass(8))
    assert convert_norms(model, "bgn", num_groups=8) == 1 and isinstance(model[1], BatchGroupNorm2d)


def test_registered_adapter_keeps_the_activation():
    from bgn_lightning import NormAct, register_norm_adapter

    class MyBNReLU(BNReLU):
        pass

    class SubclassOfIt(MyBNReLU):  # keeps MyBNReLU's forward: the adapter applies
        pass

    @register_norm_adapter(MyBNReLU)
    def keep_relu(source: nn.Module, norm: nn.Module) -> nn.Module:
        return NormAct(norm, act=nn.ReLU())

    for cls in (MyBNReLU, SubclassOfIt):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), cls(8))
        reference = copy.deepcopy(model)
        assert convert_norms(model, "bgn", num_groups="auto", reference_batch_size=4) == 1
        assert isinstance(model[1], NormAct) and isinstance(model[1].norm, BatchGroupNorm2d)
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        assert model(x).min() >= 0
    with pytest.raises(ValueError, match="already has an adapter"):
        register_norm_adapter(MyBNReLU, keep_relu)
    register_norm_adapter(MyBNReLU, keep_relu, overwrite=True)


def test_bad_adapters_are_one_clear_error():
    from bgn_lightning import register_norm_adapter

    class Fused(BNReLU):
        pass

    with pytest.raises(ValueError, match=r"callable as adapter\(source_layer, new_norm\), got 'one_arg'"):
        register_norm_adapter(Fused, one_arg)
    with pytest.raises(ValueError, match=r"source_type must be an nn\.Module subclass, got 'BatchNorm2d'"):
        register_norm_adapter("BatchNorm2d", lambda s, n: n)
    register_norm_adapter(Fused, lambda source, norm: "not a module")
    with pytest.raises(ValueError, match=r"for Fused returned str, not an nn\.Module"):
        convert_norms(nn.Sequential(Fused(4)))


def one_arg(layer):
    return layer


def test_norm_act_reads_through_and_loads_fused_state_dicts():
    from bgn_lightning import NormAct

    fused = BNReLU(8)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.running_mean.normal_()
    wrapped = NormAct(nn.BatchNorm2d(8), act=nn.ReLU())
    wrapped.load_state_dict(fused.state_dict())  # fused keys: weight, running_mean, ...
    assert torch.equal(wrapped.norm.weight, fused.weight)
    assert torch.equal(wrapped.running_mean, fused.running_mean)
    assert set(wrapped.state_dict()) == {f"norm.{k}" for k in fused.state_dict()}
    wrapped.load_state_dict(wrapped.state_dict())  # its own keys
    assert wrapped.weight is wrapped.norm.weight and wrapped.eps == 1e-5 and wrapped.num_features == 8
    wrapped.eps = 1e-3  # hyper-parameters and parameters are set on the norm
    nn.init.zeros_(wrapped.weight)
    assert wrapped.norm.eps == 1e-3 and not wrapped.norm.weight.any() and "eps" not in vars(wrapped)
    wrapped.eval()
    assert not wrapped.training and not wrapped.norm.training
    with pytest.raises(AttributeError, match=r"wrapping BatchNorm2d.*no attribute 'nope'"):
        _ = wrapped.nope
    clone = pickle.loads(pickle.dumps(wrapped))
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(clone(x), wrapped(x))
