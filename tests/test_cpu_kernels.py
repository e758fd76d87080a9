"""The fused C++ CPU kernels (``csrc/batch_group_norm_cpu.cpp``) against the float64 reference and
the native-op path of ``_autograd``: every cell layout and memory format, gradients (double backward
included), running statistics, reduced precision, bad calls, the env switch and the layer routing."""

from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

import bgn_lightning._backends as backends
from bgn_lightning import BatchGroupNorm2d
from bgn_lightning._autograd import batch_group_norm_eval, batch_group_norm_train
from bgn_lightning._ext import ENV_SWITCH, cpu_kernels
from tests.kernel_cases import LAYOUTS as SHARED_LAYOUTS
from tests.kernel_cases import KernelSpy, assert_same_format, channels_last_format, layout_ids, run_backward
from tests.reference import reference_bgn

KERNELS = cpu_kernels()
if KERNELS is None:
    pytest.skip("the BGN CPU kernels are unavailable (no compiler, or switched off)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5
MOMENTUM = 0.3

# (shape, G, memory): the layouts every kernel suite checks (tests/kernel_cases.py), and three more
# (a transposed (N, C) is a transposed (C, N)).
LAYOUTS = [
    *SHARED_LAYOUTS,
    ((3, 4, 4, 4), 8, "transposed"),
    ((5, 12), 3, "transposed"),
    ((2, 4, 3, 2, 2), 2, "contiguous"),
]
LAYOUT_IDS = layout_ids(LAYOUTS)


def _make(shape: tuple[int, ...], memory: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A ``shape`` tensor of ``randn * 3 + 2`` laid out as ``memory`` says."""
    if memory == "sliced":
        return (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=dtype) * 3 + 2)[..., ::2]
    if memory == "transposed" and len(shape) == 2:
        return (torch.randn(shape[::-1], generator=gen, dtype=dtype) * 3 + 2).t()
    if memory == "transposed":
        swapped = list(shape)
        swapped[1], swapped[-1] = swapped[-1], swapped[1]
        return (torch.randn(swapped, generator=gen, dtype=dtype) * 3 + 2).transpose(1, -1)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2
    return x.contiguous(memory_format=channels_last_format(len(shape))) if memory == "channels_last" else x


def _case(shape: tuple[int, ...], groups: int, memory: str, dtype: torch.dtype, affine: bool):
    gen = torch.Generator().manual_seed(sum(shape) + 7 * groups)
    x = _make(shape, memory, dtype, gen)
    if memory == "contiguous":
        assert x.is_contiguous()
    elif memory == "channels_last":
        assert not x.is_contiguous() and x.is_contiguous(memory_format=channels_last_format(len(shape)))
    else:
        assert not x.is_contiguous()
        assert x.dim() < 4 or not x.is_contiguous(memory_format=channels_last_format(x.dim()))
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    c = shape[1]
    w = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    b = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    rm = torch.randn(groups, generator=gen, dtype=dtype)
    rv = torch.rand(groups, generator=gen, dtype=dtype) + 0.5
    return x, dy, w, b, rm, rv


def _assert_all_close(got, want, rtol: float, atol: float, names=("y", "dx", "dw", "db")) -> None:
    for name, a, e in zip(names, got, want, strict=True):
        if e is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _reference_eval(x, groups, mean, var, weight, bias, eps):
    """Eval-mode BGN from the formula, in float64."""
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)
    y = ((xg - mean.double()[:, None]) / torch.sqrt(var.double()[:, None] + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def _expected_running(x, groups, rm0, rv0, momentum):
    _, mean, var = reference_bgn(x, groups, None, None, EPS)
    count = x.numel() // groups  # N * D / G
    unbiased = var * count / (count - 1)
    return ((1 - momentum) * rm0.double() + momentum * mean,
            (1 - momentum) * rv0.double() + momentum * unbiased)


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: float64 to ~1e-10, float32 to ~1e-5."""
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


# -- 2. training and eval against the float64 reference and the native-op path ---------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_train_matches_reference_and_native_path(
    shape: tuple[int, ...], groups: int, memory: str, dtype: torch.dtype, affine: bool
) -> None:
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, dtype, affine)
    rm, rv = rm0.clone(), rv0.clone()
    got = run_backward(lambda x, w, b: KERNELS.train(x, w, b, groups, EPS, rm, rv, MOMENTUM), x, dy, w, b)
    want = run_backward(lambda x, w, b: reference_bgn(x, groups, w, b, EPS)[0],
                        x.double(), dy.double(), *(None if t is None else t.double() for t in (w, b)))
    native = run_backward(lambda x, w, b: batch_group_norm_train(x, groups, w, b, EPS)[0], x, dy, w, b)
    tol = _tolerance(dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    _assert_all_close(got, want, **tol)
    _assert_all_close(got, native, **tol)
    assert_same_format(got[0], x)
    if memory == "channels_last":  # the input gradient keeps the memory format too
        assert_same_format(got[1], x)
    exp_m, exp_v = _expected_running(x, groups, rm0, rv0, MOMENTUM)
    assert rm.dtype == dtype and rv.dtype == dtype
    torch.testing.assert_close(rm.double(), exp_m, **tol)
    torch.testing.assert_close(rv.double(), exp_v, **tol)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_eval_matches_reference_and_native_path(
    shape: tuple[int, ...], groups: int, memory: str, dtype: torch.dtype, affine: bool
) -> None:
    x, _, w, b, rm, rv = _case(shape, groups, memory, dtype, affine)
    versions = rm._version, rv._version
    y = KERNELS.eval(x, w, b, groups, EPS, rm, rv)
    tol = _tolerance(dtype)
    assert y.dtype == dtype and not y.requires_grad
    torch.testing.assert_close(y.double(), _reference_eval(x, groups, rm, rv, w, b, EPS), **tol)
    torch.testing.assert_close(y, batch_group_norm_eval(x, groups, rm, rv, w, b, EPS), **tol)
    assert_same_format(y, x)
    assert (rm._version, rv._version) == versions  # eval leaves the statistics alone


@pytest.mark.parametrize(("groups", "channels_last"), [(4, False), (4, True), (64, True), (6, False)])
def test_parallel_chunks_match_reference(groups: int, channels_last: bool) -> None:
    """An input large enough to be split into several parallel tasks (2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        gen = torch.Generator().manual_seed(groups)
        shape = (8, 16, 16, 32) if groups != 6 else (8, 16, 24, 24)  # G = 6: groups straddle channels
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 - 1
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        if channels_last:
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        w = torch.randn(16, generator=gen, dtype=torch.float64)
        b = torch.randn(16, generator=gen, dtype=torch.float64)
        rm, rv = torch.zeros(groups, dtype=torch.float64), torch.ones(groups, dtype=torch.float64)
        got = run_backward(lambda x, w, b: KERNELS.train(x, w, b, groups, EPS, rm, rv, MOMENTUM), x, dy, w, b)
        want = run_backward(lambda x, w, b: reference_bgn(x, groups, w, b, EPS)[0], x, dy, w, b)
        _assert_all_close(got, want, rtol=1e-9, atol=1e-10)
        exp_m, exp_v = _expected_running(x, groups, torch.zeros(groups), torch.ones(groups), MOMENTUM)
        torch.testing.assert_close(rm, exp_m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rv, exp_v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(KERNELS.eval(x, w, b, groups, EPS, rm, rv),
                                   _reference_eval(x, groups, rm, rv, w, b, EPS), rtol=1e-9, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("affine", ["weight", "bias"])
def test_partial_affine_frozen_input_and_in_place_op_after(affine: str) -> None:
    x, dy, w, b, _, _ = _case((3, 6, 4, 4), 4, "channels_last", torch.float64, True)
    w = w.requires_grad_() if affine == "weight" else None
    b = b.requires_grad_() if affine == "bias" else None
    param = w if w is not None else b
    y = KERNELS.train(x, w, b, 4, EPS, None, None, 0.0)  # x takes no gradient
    y_ref = reference_bgn(x, 4, w, b, EPS)[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(y.relu_(), param, dy)[0],
                               torch.autograd.grad(y_ref.relu(), param, dy)[0], rtol=1e-9, atol=1e-10)


def test_momentum_one_and_zero() -> None:
    x, _, _, _, rm0, rv0 = _case((4, 6, 5), 3, "contiguous", torch.float64, False)
    for momentum in (0.0, 1.0):
        rm, rv = rm0.clone(), rv0.clone()
        KERNELS.train(x, None, None, 3, EPS, rm, rv, momentum)
        exp_m, exp_v = _expected_running(x, 3, rm0, rv0, momentum)
        torch.testing.assert_close(rm, exp_m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, exp_v, rtol=1e-12, atol=1e-12)


# -- 3. gradcheck and gradgradcheck ---------------------------------------------------------------

GRADCHECK = [
    ((2, 4, 3, 3), 2, "contiguous"),
    ((2, 2, 2, 2), 8, "contiguous"),
    ((2, 4, 3, 3), 2, "channels_last"),
    ((2, 2, 2, 2), 4, "channels_last"),
    ((3, 6, 2, 2), 4, "contiguous"),
]


@pytest.mark.parametrize(("shape", "groups", "memory"), GRADCHECK,
                         ids=[f"{'x'.join(map(str, s))}-G{g}-{m}" for s, g, m in GRADCHECK])
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], groups: int, memory: str) -> None:
    x, _, w, b, _, _ = _case(shape, groups, memory, torch.float64, True)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())

    def fn(x, w, b):
        return KERNELS.train(x, w, b, groups, EPS, None, None, 0.0)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_without_affine_and_create_graph_matches_closed_form() -> None:
    x, dy, w, b, _, _ = _case((2, 6, 3, 3), 3, "channels_last", torch.float64, True)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: KERNELS.train(x, None, None, 3, EPS, None, None, 0.0), (x,))
    assert torch.autograd.gradgradcheck(lambda x: KERNELS.train(x, None, None, 3, EPS, None, None, 0.0), (x,))
    # The first-order gradients of the composite graph (create_graph=True) equal the closed form.
    w, b = w.requires_grad_(), b.requires_grad_()
    y = KERNELS.train(x, w, b, 3, EPS, None, None, 0.0)
    closed = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    composite = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    assert composite[0].requires_grad and composite[1].requires_grad  # db = sum(dy) is constant
    _assert_all_close(composite, closed, rtol=1e-9, atol=1e-10, names=("dx", "dw", "db"))


# -- 4. large means ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("groups", "channels_last"), [(4, False), (4, True), (32, True), (6, False)])
def test_large_mean_is_stable(groups: int, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = 1e4 + torch.randn(8, 8, 6, 6, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(groups), torch.ones(groups)
    x.requires_grad_()
    y = KERNELS.train(x, None, None, groups, EPS, rm, rv, 1.0)
    assert torch.isfinite(y).all()
    yg = y.detach().double().reshape(8, groups, -1)
    torch.testing.assert_close(yg.mean((0, 2)), torch.zeros(groups, dtype=torch.float64), rtol=0, atol=2e-3)
    torch.testing.assert_close(yg.std((0, 2), correction=0), torch.ones(groups, dtype=torch.float64),
                               rtol=0, atol=2e-3)
    y_ref, _, _ = reference_bgn(x.detach(), groups, None, None, EPS)
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=0, atol=2e-3)
    # momentum 1: the running statistics are the batch ones (a float32 E[x^2] - E[x]^2 would not be)
    exp_m, exp_v = _expected_running(x.detach(), groups, torch.zeros(groups), torch.ones(groups), 1.0)
    torch.testing.assert_close(rm.double(), exp_m, rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), exp_v, rtol=1e-4, atol=0)
    dy = torch.randn(x.shape, generator=gen)
    y.backward(dy)
    x_ref = x.detach().double().requires_grad_()
    reference_bgn(x_ref, groups, None, None, EPS)[0].backward(dy.double())
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=0, atol=2e-3)


# -- 5. bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("groups", "channels_last"), [(4, False), (4, True), (16, True), (8, False)])
def test_bfloat16_input_with_float32_weight_and_stats(groups: int, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 4, 4, generator=gen) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xb = x.bfloat16()
    dyb = torch.randn(x.shape, generator=gen).bfloat16()
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    stats = {name: (torch.zeros(groups), torch.ones(groups)) for name in ("bf16", "f32")}
    got = run_backward(lambda x, w, b: KERNELS.train(x, w, b, groups, EPS, *stats["bf16"], 0.1),
                       xb, dyb, w, b)
    # float32 on the same (bf16-representable) values: the statistics are identical
    want = run_backward(lambda x, w, b: KERNELS.train(x, w, b, groups, EPS, *stats["f32"], 0.1),
                        xb.float(), dyb.float(), w, b)
    y, dx, dw, db = got
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in got)
    assert_same_format(y, xb)
    torch.testing.assert_close(y.float(), want[0], rtol=1 / 128, atol=1e-2)
    torch.testing.assert_close(dx.float(), want[1], rtol=1 / 64, atol=2e-2)
    torch.testing.assert_close(dw, want[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, want[3], rtol=1e-4, atol=1e-4)
    for a, e in zip(stats["bf16"], stats["f32"], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    # eval: bf16 in, bf16 out, float32 statistics
    ye = KERNELS.eval(xb, w, b, groups, EPS, *stats["bf16"])
    assert ye.dtype == torch.bfloat16
    torch.testing.assert_close(ye.float(), KERNELS.eval(xb.float(), w, b, groups, EPS, *stats["f32"]),
                               rtol=1 / 128, atol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_rounding_matches_torch(channels_last: bool) -> None:
    # The kernels convert bfloat16 with their own bit operations: round to nearest even and keep
    # infinities and NaN (the NaN payload may differ), exactly as torch's float -> bfloat16.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 5, 5, generator=gen) * 3
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, -1e-40, 0.0])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    mean, var = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
    got = KERNELS.eval(x.bfloat16(), weight, bias, 4, EPS, mean, var)
    # the same float computation on the float32 path, rounded by torch
    want = KERNELS.eval(x.bfloat16().float(), weight, bias, 4, EPS, mean, var).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_layer_under_cpu_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = KernelSpy(KERNELS)
    monkeypatch.setattr(backends, "cpu_kernels", lambda: spy)
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    norm = BatchGroupNorm2d(8, num_groups=16)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = norm(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert spy.calls["train"] == 1
    assert norm.running_mean.dtype == torch.float32 and norm.running_var.dtype == torch.float32
    y.float().square().mean().backward()
    for t in (conv.weight.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    y_ref = reference_bgn(h.detach(), 16, norm.weight.detach(), norm.bias.detach(), EPS)[0]
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=1 / 64, atol=2e-2)


# -- 6. the running buffers' version counters --------------------------------------------------------


def test_running_buffers_bump_their_version() -> None:
    x = _case((4, 8, 3, 3), 2, "contiguous", torch.float32, False)[0]
    rm, rv = torch.zeros(2), torch.ones(2)
    v_m, v_v = rm._version, rv._version
    KERNELS.train(x, None, None, 2, EPS, rm, rv, 0.1)
    assert rm._version > v_m and rv._version > v_v
    v_m, v_v = rm._version, rv._version
    KERNELS.train(x, None, None, 2, EPS, None, None, 0.1)  # no buffers given: nothing to update
    with torch.no_grad():
        KERNELS.train(x.double(), None, None, 2, EPS, rm, rv, 0.1)  # float32 buffers, float64 input
    assert rm._version > v_m and rv._version > v_v
    # strided buffers take the plain-tensor-op path, with the same result
    rm_s, rv_s = torch.zeros(4)[::2], torch.ones(4)[::2]
    rm_c, rv_c = torch.zeros(2), torch.ones(2)
    v_m = rm_s._version
    for m, v in ((rm_s, rv_s), (rm_c, rv_c)):
        KERNELS.train(x, None, None, 2, EPS, m, v, 0.5)
    assert rm_s._version > v_m
    torch.testing.assert_close(rm_s, rm_c)
    torch.testing.assert_close(rv_s, rv_c)


@pytest.mark.parametrize(("groups", "channels_last"), [(2, False), (16, True)])
def test_eval_memo_sees_kernel_updates(monkeypatch: pytest.MonkeyPatch, groups: int,
                                       channels_last: bool) -> None:
    """The native eval path memoizes on the buffers' version: a kernel training step must show."""
    spy = KernelSpy(KERNELS)
    monkeypatch.setattr(backends, "cpu_kernels", lambda: spy)
    torch.manual_seed(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = BatchGroupNorm2d(4, num_groups=groups)
    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=fmt)
    for step in range(3):
        layer.train()
        layer(torch.randn(8, 4, 4, 4).contiguous(memory_format=fmt) * (step + 1) + step)
        layer.eval()
        y = layer(x.requires_grad_())  # grad needed: the memoized native path
        want = _reference_eval(x.detach(), groups, layer.running_mean, layer.running_var,
                               layer.weight.detach(), layer.bias.detach(), layer.eps)
        torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)
    assert spy.calls["train"] == 3 and spy.calls["eval"] == 0


# -- 7. bad calls raise ------------------------------------------------------------------------------

_X = torch.randn(2, 3, 2, 2)
_Z, _O = torch.zeros, torch.ones
# id -> (kernel, its arguments): (x, weight, bias, G, eps, running_mean, running_var[, momentum])
BAD_CALLS = {
    "groups-not-dividing-D-train": ("train", _X, None, None, 5, EPS, None, None, 0.1),
    "groups-not-dividing-D-eval": ("eval", _X, None, None, 5, EPS, _Z(5), _O(5)),
    "zero-groups": ("train", _X, None, None, 0, EPS, None, None, 0.1),
    "weight-size-train": ("train", _X, _O(4), None, 3, EPS, None, None, 0.1),
    "bias-size-train": ("train", _X, None, _Z(2), 3, EPS, None, None, 0.1),
    "weight-size-eval": ("eval", _X, _O(4), None, 3, EPS, _Z(3), _O(3)),
    "running-mean-size-train": ("train", _X, None, None, 3, EPS, _Z(2), _O(3), 0.1),
    "running-var-size-train": ("train", _X, None, None, 3, EPS, _Z(3), _O(4), 0.1),
    "running-mean-size-eval": ("eval", _X, None, None, 3, EPS, _Z(4), _O(3)),
    "running-var-size-eval": ("eval", _X, None, None, 3, EPS, _Z(3), _O(1)),
    "single-value-per-group": ("train", torch.randn(1, 4, 1, 1), None, None, 4, EPS, None, None, 0.1),
    "single-value-per-group-2d": ("train", torch.randn(1, 6), None, None, 6, EPS, None, None, 0.1),
    "empty-batch-train": ("train", torch.empty(0, 4, 2, 2), None, None, 2, EPS, None, None, 0.1),
    "1-d-input": ("train", torch.randn(4), None, None, 1, EPS, None, None, 0.1),
    "integer-input": ("train", _O(2, 4, 2, 2, dtype=torch.long), None, None, 2, EPS, None, None, 0.1),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_calls_raise_runtime_error(call: tuple) -> None:
    kernel, *args = call
    with pytest.raises(RuntimeError):  # NotImplementedError (integer input) is a RuntimeError
        getattr(KERNELS, kernel)(*args)


def test_empty_batch_eval_with_bad_groups_raises() -> None:
    # The num_groups check must not depend on N (an empty batch once divided by zero here).
    with pytest.raises(RuntimeError, match="num_groups=1000"):
        KERNELS.eval(torch.empty(0, 3, 2, 2), None, None, 1000, 1e-5, torch.zeros(1000), torch.ones(1000))


def test_statistics_must_be_1d() -> None:
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    # (2, 1) with strides (3, 1): once read as if contiguous (means 0 and 9 instead of 0 and 5)
    rm = torch.tensor([[0.0, 9.0, 9.0], [5.0, 9.0, 9.0]], dtype=torch.float64)[:, :1]
    rv = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="1-D"):
        KERNELS.eval(x, None, None, 2, EPS, rm, rv)


# -- 8. the env switch -------------------------------------------------------------------------------

_SWITCHED_OFF = textwrap.dedent("""
    import sys
    import torch
    import bgn_lightning
    from bgn_lightning import BatchGroupNorm2d

    assert bgn_lightning.cpu_kernels_available() is False
    assert bgn_lightning._ext.cpu_kernels() is None
    x, dy, w, b = torch.load(sys.argv[1])
    layer = BatchGroupNorm2d(8, num_groups=4).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    torch.save([y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                layer.running_var], sys.argv[2])
""")


def test_env_switch_turns_the_kernels_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, dy, w, b, _, _ = _case((4, 8, 3, 3), 4, "channels_last", torch.float64, True)
    torch.save([x, dy, w, b], tmp_path / "in.pt")
    env = {**os.environ, ENV_SWITCH: "0"}
    argv = [sys.executable, "-c", _SWITCHED_OFF, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not build" not in done.stderr
    off = torch.load(tmp_path / "out.pt")
    spy = KernelSpy(KERNELS)
    monkeypatch.setattr(backends, "cpu_kernels", lambda: spy)
    layer = BatchGroupNorm2d(8, num_groups=4).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    on = run_backward(lambda x, w, b: layer(x), x, dy, None, None)[:2]
    assert spy.calls["train"] == 1
    on = [*on, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]
    names = ("y", "dx", "dw", "db", "running_mean", "running_var")
    _assert_all_close(on, off, rtol=1e-9, atol=1e-10, names=names)
    torch.testing.assert_close(off[0], reference_bgn(x, 4, w, b, EPS)[0], rtol=1e-9, atol=1e-10)
    assert off[0].is_contiguous(memory_format=torch.channels_last)


# -- 9. the layer: kernels on vs off -----------------------------------------------------------------


def _layer_run(layer: BatchGroupNorm2d, xs: list[torch.Tensor], dys: list[torch.Tensor],
               x_eval: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training steps (forward + backward), then eval without grad, with parameter grads, and
    with an input gradient."""
    out: dict[str, torch.Tensor] = {}
    layer.train()
    for i, (x, dy) in enumerate(zip(xs, dys, strict=True)):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        out[f"y{i}"], out[f"dx{i}"] = y.detach(), x.grad
        assert_same_format(y, x)
    out["dw"], out["db"] = layer.weight.grad.clone(), layer.bias.grad.clone()
    out["running_mean"], out["running_var"] = layer.running_mean.clone(), layer.running_var.clone()
    out["num_batches_tracked"] = layer.num_batches_tracked.clone()
    layer.eval()
    with torch.no_grad():
        out["eval_no_grad"] = layer(x_eval)
    assert_same_format(out["eval_no_grad"], x_eval)
    out["eval_param_grad"] = layer(x_eval).detach()
    x = x_eval.clone().requires_grad_()
    y = layer(x)
    y.backward(dys[0][: x.shape[0]])
    out["eval_y"], out["eval_dx"] = y.detach(), x.grad
    assert torch.equal(layer.running_mean, out["running_mean"])  # eval leaves the statistics alone
    return out


LAYER_CASES = [
    (8, 4, False, 0.1, torch.float64),
    (8, 4, True, 0.1, torch.float64),
    (4, 16, False, None, torch.float64),
    (4, 16, True, 0.1, torch.float64),
    (6, 4, True, 0.1, torch.float64),
    (8, 2, True, 0.1, torch.float32),
]


@pytest.mark.parametrize(("channels", "groups", "channels_last", "momentum", "dtype"), LAYER_CASES,
                         ids=[f"C{c}-G{g}-{'cl' if cl else 'contig'}-m{m}-{str(d)[6:]}"
                              for c, g, cl, m, d in LAYER_CASES])
def test_layer_kernels_on_equals_off(monkeypatch: pytest.MonkeyPatch, channels: int, groups: int,
                                     channels_last: bool, momentum: float | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(channels * groups)
    shape = (6, channels, 4, 4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(torch.randn(shape, generator=gen, dtype=dtype) * (i + 2) + i).contiguous(memory_format=fmt)
          for i in range(2)]
    dys = [torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
    x_eval = torch.randn((3, *shape[1:]), generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    torch.manual_seed(0)
    base = BatchGroupNorm2d(channels, num_groups=groups, momentum=momentum).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        base.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
    state = copy.deepcopy(base.state_dict())

    spy = KernelSpy(KERNELS)
    monkeypatch.setattr(backends, "cpu_kernels", lambda: spy)
    on_layer = BatchGroupNorm2d(channels, num_groups=groups, momentum=momentum).to(dtype)
    on_layer.load_state_dict(state)
    on = _layer_run(on_layer, xs, dys, x_eval)
    # both training steps and the no-grad eval ran on the kernels; the eval calls that need a
    # gradient (parameters or input) took the native path
    assert spy.calls == Counter(train=2, eval=1)

    monkeypatch.setattr(backends, "cpu_kernels", lambda: None)
    off_layer = BatchGroupNorm2d(channels, num_groups=groups, momentum=momentum).to(dtype)
    off_layer.load_state_dict(state)
    off = _layer_run(off_layer, xs, dys, x_eval)

    tol = _tolerance(dtype)
    assert on.keys() == off.keys()
    _assert_all_close(list(on.values()), list(off.values()), **tol, names=list(on))

    # against the formula: training outputs, running statistics, eval outputs and input gradient
    rm, rv = torch.zeros(groups, dtype=torch.float64), torch.ones(groups, dtype=torch.float64)
    for i, x in enumerate(xs):
        factor = (1.0 / (i + 1)) if momentum is None else momentum
        rm, rv = _expected_running(x, groups, rm, rv, factor)
        y_ref = reference_bgn(x, groups, base.weight.detach(), base.bias.detach(), EPS)[0]
        torch.testing.assert_close(on[f"y{i}"].double(), y_ref, **tol)
    torch.testing.assert_close(on["running_mean"].double(), rm, **tol)
    torch.testing.assert_close(on["running_var"].double(), rv, **tol)
    w = base.weight.detach()
    for key in ("eval_no_grad", "eval_param_grad", "eval_y"):
        torch.testing.assert_close(on[key].double(), _reference_eval(x_eval, groups, on["running_mean"],
                                                                   on["running_var"], w, base.bias.detach(),
                                                                   EPS), **tol)
    # eval is affine in x: dx = dy * w / sqrt(running_var + eps), per group and channel
    n = x_eval.shape[0]
    scale = (on["running_var"].double() + EPS).rsqrt()[:, None].expand(groups, math.prod(shape[1:]) // groups)
    dy = dys[0][:n].double()
    dx_ref = dy * scale.reshape(shape[1:]) * w.double().view(1, -1, 1, 1)
    torch.testing.assert_close(on["eval_dx"].double(), dx_ref, **tol)


# -- 9. the build cache ------------------------------------------------------------------------------


def test_the_cache_key_names_everything_that_makes_a_binary_differ(monkeypatch) -> None:
    from bgn_lightning._ext import cache_key

    key = cache_key(b"source", ["-O3"], [])
    assert cache_key(b"source", ["-O3"], []) == key
    assert cache_key(b"source 2", ["-O3"], []) != key
    assert cache_key(b"source", ["-O2"], []) != key
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    assert cache_key(b"source", ["-O3"], []) != key  # a second environment: its own build
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cache_key(b"source", ["-O3"], []) != key


def test_the_first_build_says_so_at_the_default_level(monkeypatch, tmp_path, caplog) -> None:
    import torch.utils.cpp_extension as cpp_extension

    from bgn_lightning import _ext

    def fake_load(name: str, build_directory: str, sources: list[str], **kwargs) -> object:
        # the source is compiled from a copy in the build directory: clones share one build
        assert sources == [str(Path(build_directory) / "batch_group_norm_cpu.cpp")]
        original = Path(_ext.__file__).parent / "csrc" / "batch_group_norm_cpu.cpp"
        assert Path(sources[0]).read_bytes() == original.read_bytes()
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return object()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(ENV_SWITCH, "1")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger="bgn_lightning"):
        assert _ext._build() is not None
        first = caplog.text
        caplog.clear()
        assert _ext._build() is not None
    assert "bgn_lightning: building BGN CPU kernels, once, ~45 s (cached in " + str(tmp_path) in first
    assert "built the BGN CPU kernels in" in first and caplog.text == ""


# -- 10. which backend runs, and why -----------------------------------------------------------------


def test_select_names_the_backend_and_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 4, 3, 3)
    chosen = backends.select(x, num_groups=2, training=True)
    assert (chosen.backend.name, chosen.backend.kernels) == ("cpp", KERNELS)
    assert chosen.reason == "CPU input: the fused C++ kernels"
    grad = backends.select(x.requires_grad_(), num_groups=2, training=False)
    assert grad.backend is backends.NATIVE and "not differentiable" in grad.reason
    assert backends.select(x, num_groups=2, training=True).backend.name == "cpp"  # training: autograd-aware
    synced = backends.select(x, num_groups=2, training=True, synchronized=True)
    assert synced.backend is backends.NATIVE and "synchronized" in synced.reason
    meta = backends.select(torch.empty(2, 4, 3, 3, device="meta"), num_groups=2, training=True)
    assert meta == (backends.NATIVE, "no fused kernels for meta tensors")
    monkeypatch.setattr(backends, "cpu_kernels", lambda: None)
    assert backends.select(x, num_groups=2, training=True).backend is backends.NATIVE
