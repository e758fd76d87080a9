"""The fast BGN op: closed-form backward vs a float64 reference, every cell layout and memory format,
what autograd saves (structurally, not timed), the eval-statistics memo and the no-grad path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bgn_lightning import BatchGroupNorm, BatchGroupNorm2d
from bgn_lightning._autograd import layout
from bgn_lightning.functional import batch_group_norm
from tests.reference import reference_bgn

# Every test runs on the C++ CPU kernels and on the native-op path (conftest.bgn_path).
pytestmark = pytest.mark.usefixtures("bgn_path")

# (shape, G, channels_last): groups = channels (BatchNorm), G | C, C | G, groups straddling
# channels, N = 1, G = 1, 1-D/3-D inputs, (N, C) inputs.
LAYOUTS = [
    ((4, 8, 5, 5), 8, False),
    ((4, 8, 5, 5), 2, False),
    ((4, 8, 5, 5), 2, True),
    ((3, 4, 6, 6), 12, False),
    ((3, 4, 6, 6), 12, True),
    ((5, 6, 2, 2), 4, False),
    ((5, 6, 2, 2), 4, True),
    ((1, 6, 3, 3), 3, False),
    ((2, 6, 3, 3), 1, True),
    ((4, 12, 7), 3, False),
    ((2, 4, 3, 4, 5), 2, True),
    ((6, 10), 5, False),
]


def _inputs(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    return x, dy, w, b


def _grads(fn, x, dy, w, b):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize(("shape", "groups", "channels_last"), LAYOUTS)
def test_matches_float64_reference(shape: tuple[int, ...], groups: int, channels_last: bool) -> None:
    x, dy, w, b = _inputs(shape, channels_last)
    got = _grads(lambda x, w, b: batch_group_norm(x, groups, weight=w, bias=b), x, dy, w, b)
    want = _grads(lambda x, w, b: reference_bgn(x, groups, w, b, 1e-5)[0], x, dy, w, b)
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=name)
    if channels_last:  # the output and the input gradient keep the memory format
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize(("shape", "groups", "channels_last"), [LAYOUTS[2], LAYOUTS[4], LAYOUTS[6]])
def test_float32_matches_float64_reference(shape: tuple[int, ...], groups: int, channels_last: bool) -> None:
    x, dy, w, b = _inputs(shape, channels_last, torch.float32)
    got = _grads(lambda x, w, b: batch_group_norm(x, groups, weight=w, bias=b), x, dy, w, b)
    want = _grads(lambda x, w, b: reference_bgn(x, groups, w, b, 1e-5)[0], x.double(), dy.double(),
                  w.double(), b.double())
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(("shape", "groups", "channels_last"),
                         [((2, 4, 3, 3), 2, True), ((2, 4, 2, 2), 8, True), ((3, 6, 2, 1), 4, False)])
def test_gradcheck_every_layout(shape: tuple[int, ...], groups: int, channels_last: bool) -> None:
    x, _, w, b = _inputs(shape, channels_last)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: batch_group_norm(x, groups, weight=w, bias=b), (x, w, b))


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_partial_affine_and_frozen_input(affine: str) -> None:
    x, dy, w, b = _inputs((3, 6, 4, 4), False)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    params = [t.requires_grad_() for t in (w, b) if t is not None]
    y = batch_group_norm(x, 3, weight=w, bias=b)  # x takes no gradient, the affine may
    y_ref = reference_bgn(x, 3, w, b, 1e-5)[0]
    torch.testing.assert_close(y, y_ref)
    if params:
        grads = torch.autograd.grad(y, params, dy)
        grads_ref = torch.autograd.grad(y_ref, params, dy)
        for a, e in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, e)


def test_in_place_op_after_the_layer_and_non_contiguous_input() -> None:
    x, dy, w, b = _inputs((4, 12, 4, 5), False)
    x = x[:, :, :, 1:]  # a non-contiguous view
    for groups in (3, 24, 8):
        layer = nn.Sequential(BatchGroupNorm2d(12, num_groups=groups).double(), nn.ReLU(inplace=True))
        with torch.no_grad():
            layer[0].weight.copy_(w)
            layer[0].bias.copy_(b)
        got = _grads(lambda x, w, b, layer=layer: layer(x), x, dy[:, :, :, 1:], w, b)
        want = _grads(lambda x, w, b, g=groups: torch.relu(reference_bgn(x, g, w, b, 1e-5)[0]),
                      x, dy[:, :, :, 1:], w, b)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_no_grad_training_matches_grad_path_and_updates_running_stats() -> None:
    x = _inputs((4, 8, 3, 3), True)[0]
    layers = [BatchGroupNorm2d(8, num_groups=g).double() for g in (2, 2)]
    with torch.no_grad():
        y0 = layers[0](x)
    y1 = layers[1](x.requires_grad_())
    torch.testing.assert_close(y0, y1.detach())
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)


def _saved(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize(("groups", "channels_last"), [(4, False), (4, True), (32, False), (12, False)])
def test_saves_the_input_once_and_only_small_statistics(groups: int, channels_last: bool) -> None:
    x = torch.randn(4, 16, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    bn_saved = _saved(lambda: nn.BatchNorm2d(16)(x))
    bgn_saved = _saved(lambda: BatchGroupNorm2d(16, num_groups=groups)(x))
    activation = x.numel() * x.element_size()
    big = [t for t in bgn_saved if t.numel() * t.element_size() >= activation]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, no copy
    small = sum({t.data_ptr(): t.numel() for t in bgn_saved if t is not big[0]}.values())
    # mean, var, rstd per group and per cell, weight and bias per channel and per cell; cells are
    # max(G, C) unless groups straddle channels (G = 12 here: 48 cells of 12 features)
    cells = layout(16, 36, groups).cells
    assert cells == (max(groups, 16) if groups != 12 else 48)
    assert small <= 3 * groups + 4 * cells + 2 * 16
    bn_bytes = sum(t.numel() * t.element_size() for t in bn_saved)
    bgn_bytes = sum(t.numel() * t.element_size() for t in bgn_saved)
    assert bgn_bytes - bn_bytes <= 8 * (groups + 16) * x.element_size()


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_statistics_memo_follows_the_buffers(channels_last: bool) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for groups in (2, 16):  # stats repeated per channel; weight and bias repeated per group
        layer = BatchGroupNorm2d(4, num_groups=groups)
        layer(torch.randn(8, 4, 4, 4))
        layer.eval()
        x = torch.randn(2, 4, 4, 4).contiguous(memory_format=fmt)
        with torch.no_grad():
            first = layer(x)
            layer.running_mean.add_(1.0)
            shifted = layer(x)
            layer.weight.mul_(2.0)
            doubled = layer(x)
            torch.testing.assert_close(doubled, reference_eval(x, layer))
            other = BatchGroupNorm2d(4, num_groups=groups)
            other(torch.randn(8, 4, 4, 4) * 5 + 3)
            layer.load_state_dict(other.state_dict())
            reloaded = layer(x)
        assert not torch.allclose(first, shifted) and not torch.allclose(shifted, doubled)
        torch.testing.assert_close(reloaded, reference_eval(x, layer))
        assert not torch.allclose(reloaded, doubled)
        assert reloaded.is_contiguous(memory_format=fmt)
        x.requires_grad_()  # eval mode with gradients (e.g. adversarial attacks on a frozen net)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.autograd.grad(reference_eval(x, layer).sum(), x)[0])


def reference_eval(x: torch.Tensor, layer: BatchGroupNorm) -> torch.Tensor:
    """Eval-mode BGN from the formula."""
    n, c = x.shape[:2]
    g = layer.num_groups
    xg = x.reshape(n, g, -1)
    y = (xg - layer.running_mean[:, None]) / torch.sqrt(layer.running_var[:, None] + layer.eps)
    return y.reshape(x.shape) * layer.weight.view(1, c, 1, 1) + layer.bias.view(1, c, 1, 1)
