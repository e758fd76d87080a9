"""Mixed precision (float32 statistics under autocast), inputs with large means, torch.compile."""

from __future__ import annotations

import copy
import importlib.util
import shutil

import pytest
import torch
from torch import nn

from bgn_lightning import BatchGroupNorm2d
from bgn_lightning._autograd import group_moments
from bgn_lightning.functional import batch_group_norm
from tests.reference import reference_bgn

# Every test runs on the C++ CPU kernels and on the native-op path (conftest.bgn_path).
pytestmark = pytest.mark.usefixtures("bgn_path")

# (shape, G, channels_last): G | C, C | G, groups straddling channels, channels-last.
LAYOUTS = [((4, 8, 6, 6), 2, False), ((4, 8, 6, 6), 32, False), ((5, 6, 2, 2), 4, False),
           ((4, 8, 6, 6), 4, True)]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BatchGroupNorm2d(8, num_groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), BatchGroupNorm2d(8, num_groups=32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


@pytest.mark.parametrize(("shape", "groups", "channels_last"), LAYOUTS)
def test_low_precision_statistics_accumulate_in_float32(shape, groups, channels_last) -> None:
    x = (torch.randn(shape) * 2 + 3).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = group_moments(x, groups)
    assert mean.dtype == var.dtype == torch.float32
    _, mean64, var64 = reference_bgn(x.double(), groups, None, None, 0.0)
    # float32 accumulation of the exact bfloat16 values: ~1e-6; bfloat16 accumulation: ~1e-2
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "groups", "channels_last"), LAYOUTS)
def test_bfloat16_input_matches_float64_within_bfloat16_tolerance(shape, groups, channels_last) -> None:
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2 + 3).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    x.requires_grad_()
    w.requires_grad_()
    y = batch_group_norm(x, groups, weight=w, bias=b)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(shape).bfloat16()
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = reference_bgn(x64, groups, w64, b.double(), 1e-5)[0]
    y64.backward(dy.double())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-2, atol=1e-2)


def test_cpu_autocast_matches_float32_run() -> None:
    model = _model()
    fp32 = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8)
    target = torch.randint(0, 5, (8,))
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    out32 = fp32(x)
    nn.functional.cross_entropy(out32, target).backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the conv ran in bfloat16, BGN kept the dtype
    torch.testing.assert_close(out.float(), out32, rtol=5e-2, atol=5e-2)
    for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        got, want = model.state_dict()[name], fp32.state_dict()[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=name)
    for (name, p), p32 in zip(model.named_parameters(), fp32.parameters(), strict=True):
        if p32.grad.norm() < 1e-6:  # the bias of the conv before G = 4C: normalized away
            continue
        # bfloat16 (8-bit mantissa) through two convs and two norms: a few percent, in L2
        assert (p.grad - p32.grad).norm() / p32.grad.norm() < 0.15, name


@pytest.mark.parametrize(("shape", "groups", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_mean_stays_finite_and_accurate(shape, groups, channels_last, dtype) -> None:
    torch.manual_seed(2)
    x = (1e4 + torch.randn(shape)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    running_mean, running_var = torch.zeros(groups), torch.ones(groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = batch_group_norm(x, groups, running_mean, running_var, momentum=1.0)
    dy = torch.randn(shape)
    y.backward(dy.to(y.dtype))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(running_var).all() and (running_var >= 0).all()
    x64 = x.detach().double().requires_grad_()
    y64, mean64, var64 = reference_bgn(x64, groups, None, None, 1e-5)
    y64.backward(dy.double().to(y.dtype).double())
    # Float32 resolves 1e4 + randn to ~1e-3. Bfloat16 only to 64: every value rounds to 9984,
    # a constant input whose exact output is 0; x * (w * rstd) + (b - mean * w * rstd), the
    # folded affine of the native kernels, leaves ~0.1 there (nn.BatchNorm2d and nn.GroupNorm
    # give -0.117 on it).
    tol = 5e-3 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(running_mean.double(), mean64, rtol=1e-6, atol=1e-3)
    n = x.numel() // groups
    torch.testing.assert_close(running_var.double(), var64 * n / (n - 1), rtol=5e-3, atol=5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_float32_run(dtype: torch.dtype) -> None:
    model = _model().cuda()
    fp32 = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.float().sum().backward()
    out32 = fp32(x)
    out32.sum().backward()
    torch.testing.assert_close(out.float(), out32, rtol=5e-2, atol=5e-2)
    for name in ("1.running_var", "4.running_var"):
        assert model.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(model.state_dict()[name], fp32.state_dict()[name], rtol=2e-2, atol=2e-2)


def _inductor_available() -> bool:
    return importlib.util.find_spec("torch._inductor") is not None and (
        any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    )


@pytest.mark.skipif(not _inductor_available(), reason="torch.compile's inductor backend needs a C++ compiler")
@pytest.mark.parametrize("norm_batch_size", [None, 2])  # 2: ghost batches of 2, 2 and 1 sample
def test_torch_compile_matches_eager(norm_batch_size: int | None) -> None:
    torch.manual_seed(3)
    layer = BatchGroupNorm2d(4, num_groups=2, norm_batch_size=norm_batch_size)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    dy = torch.randn(3, 4, 5, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        y1 = compiled(x1)
    except Exception as err:  # a compiler failure means the backend is unusable on this machine
        if "BackendCompilerFailed" in type(err).__name__ or "CompileError" in type(err).__name__:
            pytest.skip(f"inductor cannot compile on this machine: {err}")
        raise
    y2 = eager(x2)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, eager.running_var, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == 1
