"""Backbones in tasks.common are built from registry norm names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgn_lightning import BatchGroupNorm2d, available_norms, is_norm_layer
from tasks.common.backbones import CifarResNet, build_backbone, conv4, small_cnn

NORMS = [n for n in available_norms() if n != "none"]


@pytest.mark.parametrize("norm", NORMS)
def test_conv4_shape_and_norm_layers(norm: str) -> None:
    net = conv4(norm, in_channels=1, hidden=8)
    out = net(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 8)  # 28 -> 14 -> 7 -> 3 -> 1
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert len(norms) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in norms) or norm == "bn"


def test_conv4_miniimagenet_feature_size() -> None:
    assert conv4("bgn", in_channels=3, hidden=16)(torch.randn(2, 3, 84, 84)).shape == (2, 16 * 5 * 5)


def test_conv4_groups_and_norm_kwargs_reach_the_layers() -> None:
    net = conv4("bgn", groups=4, hidden=8, depth=2, norm_kwargs={"momentum": 0.5})
    layers = [m for m in net.modules() if isinstance(m, BatchGroupNorm2d)]
    assert [m.num_groups for m in layers] == [4, 4]
    assert all(m.momentum == 0.5 for m in layers)


def test_conv4_bias_only_without_norm() -> None:
    assert net_has_bias(conv4("none", hidden=4)) and not net_has_bias(conv4("bn", hidden=4))


def net_has_bias(net: nn.Module) -> bool:
    return all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(("kwargs", "match"), [({"norm": "nope"}, "unknown norm"), ({"depth": 0}, "depth")])
def test_conv4_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        conv4(**kwargs)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_small_cnn_bgn_trains_when_auto_groups_exceed_channels(batch_size: int) -> None:
    """Auto-G is C * N / 32: at batch 64 groups split channels; in-place ReLUs after BGN must work."""
    net = small_cnn(10, 1, "bgn", width=8)
    loss = F.cross_entropy(net(torch.randn(batch_size, 1, 8, 8)), torch.randint(0, 10, (batch_size,)))
    loss.backward()
    groups = [m.num_groups for m in net.modules() if isinstance(m, BatchGroupNorm2d)]
    assert groups == ([16, 16, 32, 32, 64] if batch_size == 64 else [1, 1, 1, 1, 2])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(("name", "size"), [("small_cnn", 8), ("resnet20", 32), ("resnet18", 64)])
@pytest.mark.parametrize("norm", ["bn", "bgn", "gn", "pn"])
def test_build_backbone_logits_and_registry_norms(name: str, size: int, norm: str) -> None:
    net = build_backbone(name, num_classes=7, in_channels=1, norm=norm, groups="auto")
    assert net(torch.randn(2, 1, size, size)).shape == (2, 7)
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert norms and all(type(m) is type(norms[0]) for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in norms) or norm == "bn"


def test_cifar_resnet_depths_and_parameter_count() -> None:
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters
    n_params = sum(p.numel() for p in CifarResNet(20, 10, norm="bn").parameters())
    assert n_params == pytest.approx(0.27e6, rel=0.02)
    assert len(CifarResNet(56, 10).layer1) == 9
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        CifarResNet(21, 10)


def test_build_backbone_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; choose from: small_cnn"):
        build_backbone("vgg", 10)
