"""Training-step time of whole models with BatchNorm, BGN and GroupNorm in them.

``benchmarks/norm_speed.py`` times the layers alone; this times what a user waits for: one SGD step
(forward, cross-entropy, backward, optimizer step) of the project's backbones, built through the
registry with ``bn``, ``bgn`` (``num_groups="auto"``) and ``gn`` (``num_groups=auto``: 32 or fewer).
Norms run interleaved in rounds (so load from other processes hits each alike); each number is the
median over rounds of the mean step time of a block of steps, after warm-up.

    python benchmarks/model_step.py                   # CPU, the default cases, ~2 min on 2 cores
    python benchmarks/model_step.py --native          # also BGN on the native-op path (no fused kernels)
    python benchmarks/model_step.py --threads 1 --json steps.json
    python benchmarks/model_step.py --device cuda --native    # ResNet-50, Triton kernels and native path
    python benchmarks/model_step.py --device cuda --channels-last --amp bfloat16

Cases on CPU: ``conv4`` on one 5-way 1-shot episode with 15 queries (80 glyph-sized images, 1x28x28,
the few-shot headline's shape), CIFAR ``resnet20`` at batch 8 and 64 (3x32x32), and torchvision
``resnet18`` at batch 8 on 3x64x64. On CUDA: torchvision ResNet-50 on 3x224x224 at batch 2 (BGN's
small-batch regime) and 32 (``--cases`` picks others by name). ``--native`` repeats the run in a
second process with the fused kernels switched off (``BGN_LIGHTNING_CPU_KERNELS=0`` on CPU,
``BGN_LIGHTNING_CUDA_KERNELS=0`` on CUDA). Targets (issue 13): ResNet-50 step with BGN <= 1.05x BN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from bgn_lightning import norm_layer
from tasks.common.backbones import build_backbone, conv4
from tasks.common.norms import norm_factory


@dataclass(frozen=True)
class Case:
    """A model and the batch shape it is trained on."""

    name: str
    model: str
    batch: int
    image: tuple[int, int, int]
    classes: int


CASES = [
    Case("conv4 episode 5w1s+15q", "conv4", 80, (1, 28, 28), 5),
    Case("resnet20 B=8", "resnet20", 8, (3, 32, 32), 10),
    Case("resnet20 B=64", "resnet20", 64, (3, 32, 32), 10),
    Case("resnet18 B=8 64x64", "resnet18", 8, (3, 64, 64), 10),
]
CUDA_CASES = [
    Case("resnet50 B=2 224x224", "resnet50", 2, (3, 224, 224), 1000),
    Case("resnet50 B=32 224x224", "resnet50", 32, (3, 224, 224), 1000),
]
NORMS = ("bn", "bgn", "gn")
ENV_SWITCH = {"cpu": "BGN_LIGHTNING_CPU_KERNELS", "cuda": "BGN_LIGHTNING_CUDA_KERNELS"}


def build(case: Case, norm: str, device: torch.device) -> nn.Module:
    """The case's model with ``norm`` layers (``num_groups="auto"``)."""
    if case.model == "resnet50":  # torchvision's, with the registry's layers
        model = torchvision.models.resnet50(num_classes=case.classes, norm_layer=norm_layer(norm))
        return model.to(device).train()
    if case.model == "conv4":
        features = conv4(norm_factory(norm), in_channels=case.image[0])
        model: nn.Module = nn.Sequential(features, nn.LazyLinear(case.classes))
    else:
        model = build_backbone(case.model, case.classes, case.image[0], norm_layer=norm_factory(norm))
    return model.to(device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(case: Case, device: torch.device, rounds: int, block_s: float, channels_last: bool = False,
              amp: str | None = None) -> dict[str, float]:
    """Median seconds per training step for each norm, interleaved."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(case.batch, *case.image, device=device).contiguous(memory_format=fmt)
    target = torch.randint(case.classes, (case.batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, amp)) if amp
                else contextlib.nullcontext())
    steps = {}
    for norm in NORMS:
        model = build(case, norm, device).to(memory_format=fmt)
        with autocast:
            model(x)  # fixes auto-G and lazy shapes
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        steps[norm] = step
    reps = {}
    for norm, step in steps.items():  # warm-up and block size: about block_s of steps
        for _ in range(3):
            step()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        reps[norm] = max(1, round(block_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {norm: [] for norm in NORMS}
    for r in range(rounds):
        order = NORMS[r % len(NORMS):] + NORMS[: r % len(NORMS)]
        for norm in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps[norm]):
                steps[norm]()
            _sync(device)
            samples[norm].append((time.perf_counter() - start) / reps[norm])
    return {norm: statistics.median(values) for norm, values in samples.items()}


def measure(cases: list[Case], device: torch.device, rounds: int, block_s: float, channels_last: bool = False,
            amp: str | None = None) -> list[dict[str, object]]:
    """Time every case; one row (ms per step per norm and the ratios to BN) per case."""
    rows = []
    for case in cases:
        times = time_case(case, device, rounds, block_s, channels_last, amp)
        rows.append({"case": case.name, **{f"{norm}_ms": 1e3 * t for norm, t in times.items()},
                     "bgn_over_bn": times["bgn"] / times["bn"], "gn_over_bn": times["gn"] / times["bn"]})
        print(f"  {case.name:<24} bn {1e3 * times['bn']:8.2f} ms  bgn {1e3 * times['bgn']:8.2f} ms "
              f"({times['bgn'] / times['bn']:.2f}x)  gn {1e3 * times['gn']:8.2f} ms "
              f"({times['gn'] / times['bn']:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Time the cases, print one line per case, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=float, default=0.3, help="seconds of steps per timed block")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names (default: the CPU cases, or ResNet-50 on CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="model and input channels-last")
    parser.add_argument("--amp", choices=("float16", "bfloat16"), default=None, help="autocast dtype")
    parser.add_argument("--native", action="store_true",
                        help="also time BGN with its fused kernels switched off (a second process)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import bgn_lightning
    from bgn_lightning._triton import cuda_kernels_available

    device = torch.device(args.device)
    known = {case.name: case for case in CASES + CUDA_CASES}
    if args.cases:
        unknown = [name for name in args.cases.split(",") if name not in known]
        if unknown:
            parser.error(f"unknown cases {unknown}; choose from {list(known)}")
        cases = [known[name] for name in args.cases.split(",")]
    else:
        cases = CUDA_CASES if device.type == "cuda" else CASES
    fused = cuda_kernels_available() if device.type == "cuda" else bgn_lightning.cpu_kernels_available()
    path = ("triton" if device.type == "cuda" else "kernels") if fused else "native"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"BGN path: {path}; device {device} {gpu or ''}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, channels_last={args.channels_last}, amp={args.amp}")
    result: dict[str, object] = {
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(device), "gpu": gpu, "threads": torch.get_num_threads(),
                        "channels_last": args.channels_last, "amp": args.amp,
                        "loadavg_start": os.getloadavg()},
        "path": path, "rows": measure(cases, device, args.rounds, args.block, args.channels_last, args.amp),
    }
    result["environment"]["loadavg_end"] = os.getloadavg()  # type: ignore[index]
    switch = ENV_SWITCH.get(device.type)
    if args.native and path != "native" and switch:
        print(f"BGN path: native ({switch}=0), second process")
        child = [sys.executable, __file__, "--device", args.device, "--rounds", str(args.rounds),
                 "--block", str(args.block), "--cases", ",".join(case.name for case in cases),
                 "--json", "/dev/stdout"]
        child += ["--threads", str(args.threads)] if args.threads is not None else []
        child += ["--channels-last"] if args.channels_last else []
        child += ["--amp", args.amp] if args.amp else []
        done = subprocess.run(child, env={**os.environ, switch: "0"}, check=True, capture_output=True,
                              text=True)
        native = json.loads(done.stdout[done.stdout.index("{"):])
        for row in native["rows"]:
            print(f"  {row['case']:<24} bn {row['bn_ms']:8.2f} ms  bgn {row['bgn_ms']:8.2f} ms "
                  f"({row['bgn_over_bn']:.2f}x)")
        result["native"] = native
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "/dev/stdout":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)


if __name__ == "__main__":
    main()
