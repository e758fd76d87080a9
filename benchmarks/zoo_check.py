"""Convert every model of a broad timm + torchvision list and check that the function is kept.

With ``num_groups="auto"`` and ``reference_batch_size`` equal to the batch, every BGN layer has
``G = C`` and *is* BatchNorm, so the converted model must compute what the original computed
(training and eval mode, same RNG for dropout and drop-path). Prints one Markdown row per model:
layers replaced, norm layers left (by class), max |difference| of the outputs relative to their
scale, and the time. ``tests/test_zoo.py`` runs one model per family; this runs many more.

    python benchmarks/zoo_check.py                 # the default list (~2 min on 2 cores)
    python benchmarks/zoo_check.py --timm resnet50,efficientnet_b3 --torchvision ""
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import timm
import torch
import torchvision
from torch import nn

from bgn_lightning.convert import DEFAULT_SOURCE_TYPES, convert_tree

TIMM = (
    "resnet18,resnet50d,resnext26ts,legacy_seresnet18,res2net50_14w_8s,resnest14d,skresnet18,"
    "efficientnet_b0,tinynet_e,mixnet_s,hardcorenas_a,mobilenetv3_large_100,mobilenetv3_small_050,"
    "lcnet_050,fbnetv3_b,mobilenetv4_conv_small,regnetx_002,regnety_002,regnetz_005,densenet121,"
    "cspdarknet53,cs3darknet_s,ghostnet_100,ghostnetv2_100,rexnet_100,dpn68,dla34,dla46_c,"
    "hrnet_w18_small,ese_vovnet19b_dw,selecsls42b,gernet_s,repvgg_a0,mobileone_s0,mobilevit_xxs,"
    "efficientvit_b0,repvit_m0_9,fastvit_t8,inception_v3,xception41,convnext_atto,nf_resnet26"
)
TORCHVISION = (
    "resnet18,resnext50_32x4d,wide_resnet50_2,densenet121,mobilenet_v2,mobilenet_v3_small,"
    "mobilenet_v3_large,efficientnet_b0,efficientnet_v2_s,regnet_x_400mf,regnet_y_400mf,"
    "shufflenet_v2_x0_5,mnasnet0_5,googlenet,inception_v3,vgg11_bn"
)
_NEEDS_75_PX = {"inception_v3"}


def _build(zoo: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if zoo == "timm":
        try:
            return timm.create_model(name, num_classes=10, drop_rate=0.2, drop_path_rate=0.1)
        except TypeError:
            return timm.create_model(name, num_classes=10, drop_rate=0.2)
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra)


def _output(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def check(zoo: str, name: str, batch: int = 4) -> str:
    """One Markdown row for ``name`` of ``zoo`` ("timm" or "torchvision")."""
    start = time.perf_counter()
    original = _build(zoo, name)
    size = 80 if name in _NEEDS_75_PX else 64
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    converted = copy.deepcopy(original)
    try:
        report = convert_tree(converted, "bgn", DEFAULT_SOURCE_TYPES, dim=None, on_unknown="error",
                              kwargs={"num_groups": "auto", "reference_batch_size": batch})
    except ValueError as err:
        return f"| {zoo} | {name} | refused: {err} | | | |"
    diffs = []
    for train in (True, False):
        a, b = _output(original, x, train), _output(converted, x, train)
        diffs.append((a - b).abs().max().item() / max(1.0, a.abs().max().item()))
    left = ", ".join(f"{n} {c}" for c, n in sorted(report.left.items())) or "-"
    ok = "ok" if max(diffs) <= 1e-3 else "**CHANGED**"
    return (f"| {zoo} | {name} | {report.total} | {left} | {diffs[0]:.1e} / {diffs[1]:.1e} {ok} | "
            f"{time.perf_counter() - start:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", default=TIMM, help="comma-separated timm model names")
    parser.add_argument("--torchvision", default=TORCHVISION, help="comma-separated torchvision model names")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"timm {timm.__version__}, torchvision {torchvision.__version__}, torch {torch.__version__}\n")
    print("| zoo | model | replaced | left (norm layers not replaced) | max rel. diff train / eval | s |")
    print("|---|---|---|---|---|---|")
    for zoo, names in (("timm", args.timm), ("torchvision", args.torchvision)):
        for name in filter(None, names.split(",")):
            print(check(zoo, name), flush=True)


if __name__ == "__main__":
    main()
