"""convert_norms and norm_layer on models nobody here wrote: one model per timm and torchvision CNN family.

With ``num_groups="auto"`` and ``reference_batch_size`` equal to the batch, every BGN layer has
``G = C`` and *is* BatchNorm, so a converted model must compute what the original computed, in
training and in eval mode (same RNG for dropout and drop-path). A fused norm-act layer that lost
its activation, or a BatchNorm subclass replaced by a plain norm, shows up as a large difference.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bgn_lightning import BatchGroupNorm, NormAct, convert_norms, is_norm_layer, norm_layer

timm = pytest.importorskip("timm")

BATCH = 4

# (name, constructor kwargs, image size): one model per timm family that has BatchNorm layers
TIMM_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("resnet10t", {}, 64),                       # resnet
    ("skresnet18", {}, 64),                      # sknet (selective-kernel attention)
    ("tinynet_e", {}, 64),                       # efficientnet builder (BatchNormAct2d, mixnet, tinynet)
    ("mobilenetv3_small_050", {}, 64),           # mobilenetv3 (also lcnet, fbnetv3)
    ("mobilenetv4_conv_small", {}, 64),          # mobilenetv4
    ("regnety_002", {}, 64),                     # regnet with SE
    ("densenet121", {}, 64),                     # densenet (BatchNormAct2d)
    ("cs3darknet_s", {}, 64),                    # cspnet
    ("ghostnet_100", {}, 64),                    # ghostnet
    ("rexnet_100", {}, 64),                      # rexnet
    ("dpn68", {}, 64),                           # dpn
    ("dla46_c", {}, 64),                         # dla
    ("ese_vovnet19b_dw", {}, 64),                # vovnet
    ("regnetz_005", {}, 64),                     # byobnet (regnetz, mobileone, gernet, repvgg)
    ("mobilevit_xxs", {}, 64),                   # mobilevit (BN and LayerNorm)
    ("efficientvit_b0", {}, 64),                 # efficientvit (mit)
    ("repvit_m0_9", {}, 64),                     # repvit
]

TORCHVISION_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("resnet18", {}, 64),
    ("densenet121", {}, 64),
    ("mobilenet_v2", {}, 64),
    ("mobilenet_v3_small", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("regnet_x_400mf", {}, 64),
    ("shufflenet_v2_x0_5", {}, 64),
    ("mnasnet0_5", {}, 64),
]
# More models of these and other families (inception, googlenet, xception, hrnet, res2net, ...):
# benchmarks/zoo_check.py


def _build(zoo: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    if zoo == "timm":
        try:  # dropout and drop-path on, where the family takes them: the same RNG must drive both copies
            return timm.create_model(name, num_classes=10, drop_rate=0.2, drop_path_rate=0.1, **kwargs)
        except TypeError:
            return timm.create_model(name, num_classes=10, drop_rate=0.2, **kwargs)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


def _run(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(1)
    with torch.no_grad():
        return _first(model(x))


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-3) -> None:
    scale = max(1.0, a.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= tol * scale, f"{what}: max |difference| {diff:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize(
    ("zoo", "name", "kwargs", "size"),
    [("timm", *spec) for spec in TIMM_MODELS] + [("torchvision", *spec) for spec in TORCHVISION_MODELS],
    ids=[f"timm-{s[0]}" for s in TIMM_MODELS] + [f"tv-{s[0]}" for s in TORCHVISION_MODELS],
)
def test_conversion_keeps_the_function(zoo: str, name: str, kwargs: dict[str, Any], size: int) -> None:
    # 64 px: at 32 px the last stage is 1x1, and BatchNorm over 4 values amplifies float32
    # rounding differences layer by layer beyond 1e-3; a lost activation differs by O(1)
    original = _build(zoo, name, kwargs)
    n_bn = sum(isinstance(m, _BatchNorm) for m in original.modules())
    assert n_bn > 0
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(2))

    # G = C: the converted model is the original, in training (batch statistics) and eval mode
    converted = copy.deepcopy(original)
    assert convert_norms(converted, "bgn", num_groups="auto", reference_batch_size=BATCH) == n_bn
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    _assert_same(_run(original, x, True), _run(converted, x, True), f"{zoo} {name} train")
    _assert_same(_run(original, x, False), _run(converted, x, False), f"{zoo} {name} eval")

    # auto G at batch 2: fewer groups than channels; forward and backward run
    small = original  # not needed any more as the reference
    convert_norms(small, "bgn", num_groups="auto")
    small.train()
    _first(small(x[:2])).sum().backward()
    groups = [m.num_groups for m in small.modules() if isinstance(m, BatchGroupNorm)]
    channels = [m.num_features for m in small.modules() if isinstance(m, BatchGroupNorm)]
    assert len(groups) == n_bn and all(g is not None for g in groups)
    assert any(g < c for g, c in zip(groups, channels, strict=True))


def test_frozen_batchnorm_is_left_and_counted() -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from bgn_lightning.convert import convert_tree

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    report = convert_tree(backbone, "bgn", (nn.BatchNorm2d,), dim=None, on_unknown="error", kwargs={})
    assert report.total == 0 and report.left == {"FrozenBatchNorm2d": frozen}
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == frozen


@functools.cache
def _timm_pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=10)
    torch.manual_seed(0)
    bgn = timm.create_model(name, num_classes=10, norm_layer=norm_layer("bgn", reference_batch_size=BATCH))
    return reference, bgn


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "regnety_002", "densenet121"])
def test_timm_create_model_with_norm_layer(name: str) -> None:
    reference, bgn = _timm_pair(name)
    norm_acts = [m for m in reference.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    wrapped = [m for m in bgn.modules() if isinstance(m, NormAct)]
    assert len(wrapped) == len(norm_acts)
    assert [type(m.act).__name__ for m in wrapped] == [type(m.act).__name__ for m in norm_acts]
    assert not any(isinstance(m, _BatchNorm) for m in bgn.modules())
    assert sum(isinstance(m, BatchGroupNorm) for m in bgn.modules()) \
        == sum(isinstance(m, _BatchNorm) for m in reference.modules())
    # same initialisation (norm layers draw no random numbers), G = C at batch 4: same function
    x = torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _assert_same(_run(reference, x, True), _run(bgn, x, True), f"timm {name} norm_layer train")
    _assert_same(_run(reference, x, False), _run(bgn, x, False), f"timm {name} norm_layer eval")
    # timm's pretrained-style state dict (fused keys, bn.weight) loads into the NormAct model
    bgn.load_state_dict(reference.state_dict())


def test_timm_model_without_norm_layer_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="norm_layer"):
        timm.create_model("mobilenetv3_small_050", norm_layer=norm_layer("bgn"))


def test_timm_norm_act_tables_are_where_bgn_lightning_expects_them() -> None:
    """Fails when timm moves the private tables that norm_layer() extends (see bgn_lightning._timm)."""
    from timm.layers import create_norm_act

    from bgn_lightning.norm_act import NormActLayer
    from bgn_lightning.registry import RegistryNorm

    norm_layer("bgn")
    assert create_norm_act._NORM_TO_NORM_ACT_MAP["registrynorm"] is NormActLayer
    assert NormActLayer in create_norm_act._NORM_ACT_REQUIRES_ARG
    layer = create_norm_act.get_norm_act_layer(norm_layer("gn"), act_layer="silu")(32, drop_layer=nn.Dropout)
    assert isinstance(layer, NormAct) and isinstance(layer.norm, nn.GroupNorm)
    assert isinstance(layer.act, nn.SiLU) and isinstance(layer.drop, nn.Dropout)
    assert type(RegistryNorm(8, norm="bgn")).__name__ == "BatchGroupNorm2d"


def test_timm_is_not_imported_by_bgn_lightning() -> None:
    import subprocess

    code = ("import sys, torch, bgn_lightning as b; m = torch.nn.Sequential(torch.nn.BatchNorm2d(4)); "
            "b.convert_norms(m); b.norm_layer('bgn'); print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_norm_act_finds_the_norm_inside() -> None:
    from bgn_lightning import keeps_running_stats, set_norm_mode

    model = timm.create_model("tinynet_e", num_classes=10)
    convert_norms(model, "bgn", num_groups=1)
    wrapped = [m for m in model.modules() if isinstance(m, NormAct)]
    assert wrapped and not any(is_norm_layer(m) for m in wrapped)
    assert all(is_norm_layer(m.norm) and keeps_running_stats(m.norm) for m in wrapped)
    model.eval()
    assert set_norm_mode(model, True) and all(m.norm.training and not m.act.training for m in wrapped)
