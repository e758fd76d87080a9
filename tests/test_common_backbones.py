"""Backbones in tasks.common are built from registry norm names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bgn_lightning import BatchGroupNorm2d, available_norms, is_norm_layer
from tasks.common.backbones import conv4

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
