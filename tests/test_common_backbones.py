"""Backbones in tasks.common are built from registry norm names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgn_lightning import BatchGroupNorm2d, available_norms, is_norm_layer
from tasks.common.backbones import CifarResNet, PreActResNet18, build_backbone, conv4, small_cnn
from tasks.common.norms import norm_factory

NORMS = [n for n in available_norms() if n != "none"]


@pytest.mark.parametrize("norm", NORMS)
def test_conv4_shape_and_norm_layers(norm: str) -> None:
    net = conv4(norm_factory(norm), in_channels=1, hidden=8)
    out = net(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 8)  # 28 -> 14 -> 7 -> 3 -> 1
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert len(norms) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in norms) or norm == "bn"


def test_conv4_miniimagenet_feature_size() -> None:
    net = conv4(norm_factory("bgn"), in_channels=3, hidden=16)
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 16 * 5 * 5)


def test_conv4_groups_and_norm_kwargs_reach_the_layers() -> None:
    net = conv4(norm_factory("bgn", groups=4, norm_kwargs={"momentum": 0.5}), hidden=8, depth=2)
    layers = [m for m in net.modules() if isinstance(m, BatchGroupNorm2d)]
    assert [m.num_groups for m in layers] == [4, 4]
    assert all(m.momentum == 0.5 for m in layers)


def test_conv4_bias_only_without_norm() -> None:
    assert net_has_bias(conv4(norm_factory("none"), hidden=4))
    assert not net_has_bias(conv4(norm_factory("bn"), hidden=4))


def net_has_bias(net: nn.Module) -> bool:
    return all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_conv4_errors() -> None:
    with pytest.raises(ValueError, match="unknown norm"):
        conv4(norm_factory("nope"))
    with pytest.raises(ValueError, match="depth must be a positive int"):
        conv4(depth=0)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_small_cnn_bgn_trains_when_auto_groups_exceed_channels(batch_size: int) -> None:
    """Auto-G is C * N / 32: at batch 64 groups split channels; in-place ReLUs after BGN must work."""
    net = small_cnn(10, 1, norm_factory("bgn"), width=8)
    loss = F.cross_entropy(net(torch.randn(batch_size, 1, 8, 8)), torch.randint(0, 10, (batch_size,)))
    loss.backward()
    groups = [m.num_groups for m in net.modules() if isinstance(m, BatchGroupNorm2d)]
    assert groups == ([16, 16, 32, 32, 64] if batch_size == 64 else [1, 1, 1, 1, 2])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(("name", "size"), [("small_cnn", 8), ("resnet20", 32), ("preact18", 8),
                                            ("resnet18", 64)])
@pytest.mark.parametrize("norm", ["bn", "bgn", "gn", "pn"])
def test_build_backbone_logits_and_registry_norms(name: str, size: int, norm: str) -> None:
    net = build_backbone(name, num_classes=7, in_channels=1, norm_layer=norm_factory(norm))
    assert net(torch.randn(2, 1, size, size)).shape == (2, 7)
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert norms and all(type(m) is type(norms[0]) for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in norms) or norm == "bn"


def test_cifar_resnet_depths_and_parameter_count() -> None:
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters
    n_params = sum(p.numel() for p in CifarResNet(20, 10, norm_layer=norm_factory("bn")).parameters())
    assert n_params == pytest.approx(0.27e6, rel=0.02)
    assert len(CifarResNet(56, 10).layer1) == 9
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        CifarResNet(21, 10)


def test_build_backbone_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; choose from: small_cnn"):
        build_backbone("vgg", 10)


@pytest.mark.parametrize(("name", "size", "width"), [("small_cnn", 8, 128), ("resnet20", 32, 64),
                                                     ("preact18", 8, 512), ("resnet18", 64, 512)])
def test_features_only_backbones_give_feature_dim_features(name: str, size: int, width: int) -> None:
    """timm's convention: num_classes=0 drops the classifier; feature_dim is what it would have seen."""
    net = build_backbone(name, num_classes=0, in_channels=3)
    assert net.feature_dim == width
    assert net(torch.randn(2, 3, size, size)).shape == (2, width)
    assert build_backbone(name, num_classes=5, in_channels=3).feature_dim == width


def test_preact_resnet18_parameter_count() -> None:
    # PreAct ResNet-18 for CIFAR-10 (Rice et al. 2020's model): 11.17M parameters
    n_params = sum(p.numel() for p in PreActResNet18(10, norm_layer=norm_factory("bn")).parameters())
    assert n_params == pytest.approx(11.17e6, rel=0.01)


def test_negative_num_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        small_cnn(-1)
