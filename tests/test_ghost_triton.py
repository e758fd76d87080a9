"""Ghost batches (``chunk``) in the fused Triton kernels against a float64 per-ghost-batch reference.

``TritonKernels.train(..., chunk=b, running_average=m)`` normalizes a batch of ``N`` as
``ceil(N / b)`` ghost batches of ``b`` consecutive samples (the last one holds the rest), each
with its own per-group statistics. The reference here is a float64 composite that loops over the
ghost batches (``torch.var_mean`` over samples and group values) and differentiates with autograd:
outputs, input and parameter gradients, and the running statistics in both modes (the first ghost
batch's, or the mean over ghost batches), for ``b`` = 1, 2, 3 (``N`` not a multiple) and ``N``, in
every layout the kernels serve. One batch (``chunk <= 0`` or ``chunk >= N``) is bit for bit
today's call.

As in ``tests/test_cuda_kernels.py``: compiled on CUDA tensors where a GPU is present, else in
Triton's interpreter on CPU tensors in a child process (``test_interpreter_suite``, tiny shapes).
"""

from __future__ import annotations

import pytest
import torch

import bgn_lightning._triton as triton_kernels
from tests.kernel_cases import channels_last_format, layout_ids, leaf, run_backward
from tests.triton_modes import DEVICE, HAS_TRITON, INTERPRET, TOLERANCE, kernel_test, run_in_interpreter

EPS = 1e-5
MOMENTUM = 0.3

# (shape, G, memory), N = 5: G | C, G = k * C, groups straddling channels, 3-D and 5-D inputs,
# contiguous, channels-last and other strides.
LAYOUTS = [
    ((5, 8, 3, 3), 2, "contiguous"),
    ((5, 8, 3, 3), 2, "channels_last"),
    ((5, 4, 2, 2), 8, "contiguous"),
    ((5, 4, 2, 2), 8, "channels_last"),
    ((5, 6, 2, 2), 4, "contiguous"),
    ((5, 6, 2, 2), 4, "channels_last"),
    ((5, 6, 4), 3, "contiguous"),
    ((5, 4, 3, 2, 2), 2, "channels_last"),
    ((5, 6, 2, 2, 2), 4, "channels_last"),
    ((5, 6, 2, 2), 4, "sliced"),
]
LAYOUT_IDS = layout_ids(LAYOUTS)
CHUNKS = [1, 2, 3, 5]  # N = 5: five of one, 2 + 2 + 1, 3 + 2, one batch


@pytest.fixture(scope="module")
def kernels() -> triton_kernels.TritonKernels:
    return triton_kernels.TritonKernels()


def _case(shape, groups, memory, dtype, seed=0):
    """Input (``dtype``, laid out as ``memory``), output gradient, float32 parameters and buffers."""
    gen = torch.Generator().manual_seed(sum(shape) + 7 * groups + seed)
    n = shape[0]
    # every sample its own offset and scale: ghost batches have visibly different statistics
    scale = (torch.rand(n, generator=gen) * 3 + 0.5).view(-1, *[1] * (len(shape) - 1))
    offset = (torch.randn(n, generator=gen) * 2).view_as(scale)
    if memory == "sliced":
        x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * scale + offset)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen) * scale + offset
        if memory == "channels_last":
            x = x.contiguous(memory_format=channels_last_format(len(shape)))
    x = x.to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    c = shape[1]
    w = torch.randn(c, generator=gen).to(DEVICE)
    b = torch.randn(c, generator=gen).to(DEVICE)
    rm = torch.randn(groups, generator=gen).to(DEVICE)
    rv = (torch.rand(groups, generator=gen) + 0.5).to(DEVICE)
    return x, dy, w, b, rm, rv


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    chunk = chunk if 0 < chunk < n else n
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _reference_bgn(x, groups, weight, bias, chunk):
    """Float64 ghost-batch BGN, one ghost batch at a time: ``(y, [(mean, var, count)])``."""
    n, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.dim() - 2)
    ys, stats = [], []
    for lo, hi in _bounds(n, chunk):
        xg = x[lo:hi].reshape(hi - lo, groups, -1)
        var, mean = torch.var_mean(xg, dim=(0, 2), correction=0)
        y = ((xg - mean[:, None]) / torch.sqrt(var[:, None] + EPS)).reshape(x[lo:hi].shape)
        ys.append(y * weight.view(shape) + bias.view(shape))
        stats.append((mean.detach(), var.detach(), xg[:, 0].numel()))
    return torch.cat(ys), stats


def _reference(x, dy, w, b, groups, chunk):
    """Float64 ``(y, dx, dw, db)`` and the per-ghost-batch statistics, on the same values."""
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    y, stats = _reference_bgn(x64, groups, w64, b64, chunk)
    y.backward(dy.double().cpu())
    return (y.detach(), x64.grad, w64.grad, b64.grad), stats


def _expected_running(stats, rm0, rv0, average: bool):
    """The running statistics after one step: towards the first ghost batch's, or their mean."""
    means = torch.stack([m for m, _, _ in stats])
    unbiased = torch.stack([v * count / (count - 1) for _, v, count in stats])
    mean, var = (means.mean(0), unbiased.mean(0)) if average else (means[0], unbiased[0])
    return ((1 - MOMENTUM) * rm0.double().cpu() + MOMENTUM * mean,
            (1 - MOMENTUM) * rv0.double().cpu() + MOMENTUM * var)


def _assert_running(rm, rv, stats, rm0, rv0, average: bool) -> None:
    """``rm, rv`` are the running statistics one step on from ``rm0, rv0`` (:func:`_expected_running`)."""
    exp_m, exp_v = _expected_running(stats, rm0, rv0, average)
    _close(rm, exp_m, rtol=1e-5, atol=1e-5)
    _close(rv, exp_v, rtol=1e-5, atol=1e-5)


def _train(kernels, x, dy, w, b, groups, rm, rv, **kw):
    """``kernels.train`` on fresh leaves, then backward ``dy``: ``(y, dx, dw, db)``."""
    return run_backward(lambda x, w, b: kernels.train(x, w, b, groups, EPS, rm, rv, MOMENTUM, **kw),
                        x, dy, w, b)


def _close(got, want, **tol):
    torch.testing.assert_close(got.double().cpu(), want, **tol)


def _assert_grads_close(got, want, tol=TOLERANCE[torch.float32]) -> None:
    """``(y, dx, dw, db)`` against the reference's: ``y`` to ``tol``, ``dx`` to twice it, the
    parameter gradients to 1e-4."""
    y, dx, dw, db = got
    _close(y, want[0], **tol)
    _close(dx, want[1], rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    _close(dw, want[2], rtol=1e-4, atol=1e-4)
    _close(db, want[3], rtol=1e-4, atol=1e-4)


# -- against the float64 reference ----------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize("chunk", CHUNKS, ids=[f"b{b}" for b in CHUNKS])
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_train_matches_reference(kernels, shape, groups, memory, chunk) -> None:
    """Outputs, gradients and the default (first ghost batch's) running statistics, float32."""
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, torch.float32)
    rm, rv = rm0.clone(), rv0.clone()
    got = _train(kernels, x, dy, w, b, groups, rm, rv, chunk=chunk)
    want, stats = _reference(x, dy, w, b, groups, chunk)
    if memory == "channels_last":
        fmt = channels_last_format(x.dim())
        assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    _assert_grads_close(got, want)
    _assert_running(rm, rv, stats, rm0, rv0, average=False)


@kernel_test
@pytest.mark.parametrize("chunk", CHUNKS, ids=[f"b{b}" for b in CHUNKS])
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_running_average_matches_reference(kernels, shape, groups, memory, chunk) -> None:
    """``running_average=True``: the mean over ghost batches; the no-grad forward's output too."""
    x, _, w, b, rm0, rv0 = _case(shape, groups, memory, torch.float32, seed=1)
    rm, rv = rm0.clone(), rv0.clone()
    with torch.no_grad():
        y = kernels.train(x, w, b, groups, EPS, rm, rv, MOMENTUM, chunk=chunk, running_average=True)
    want, stats = _reference_bgn(x.double().cpu(), groups, w.double().cpu(), b.double().cpu(), chunk)
    _close(y, want, rtol=1e-5, atol=1e-5)
    _assert_running(rm, rv, stats, rm0, rv0, average=True)


@kernel_test
@pytest.mark.parametrize("average", [False, True], ids=["first", "average"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(("shape", "groups", "memory"), [LAYOUTS[1], LAYOUTS[4], LAYOUTS[8]],
                         ids=[LAYOUT_IDS[1], LAYOUT_IDS[4], LAYOUT_IDS[8]])
def test_low_precision_inputs(kernels, shape, groups, memory, dtype, average) -> None:
    """float16 / bfloat16 inputs, float32 statistics and parameters; 2 + 2 + 1 ghost batches."""
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, dtype)
    rm, rv = rm0.clone(), rv0.clone()
    got = _train(kernels, x, dy, w, b, groups, rm, rv, chunk=2, running_average=average)
    y, dx, dw, db = got
    assert y.dtype == dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    want, stats = _reference(x, dy, w, b, groups, 2)
    _assert_grads_close(got, want, TOLERANCE[dtype])
    _assert_running(rm, rv, stats, rm0, rv0, average)


@kernel_test
@pytest.mark.parametrize("chunk", [2, 3], ids=["b2", "b3"])
@pytest.mark.parametrize(("shape", "groups", "memory"), [LAYOUTS[0], LAYOUTS[1], LAYOUTS[5]],
                         ids=[LAYOUT_IDS[0], LAYOUT_IDS[1], LAYOUT_IDS[5]])
def test_many_partial_sums_per_ghost_batch(kernels, monkeypatch, shape, groups, memory, chunk) -> None:
    """Small tiles and many programs: several partial sums per ghost batch; the contiguous
    layout's (ghost batch, split) programs on the grid's first axis, as past 65535 of them."""
    monkeypatch.setattr(triton_kernels, "_TILE", 16)
    monkeypatch.setattr(triton_kernels, "_GRID_AXIS1", 3)
    monkeypatch.setattr(kernels, "_target_programs", lambda device: 96)
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, torch.float32, seed=5)
    rm, rv = rm0.clone(), rv0.clone()
    got = _train(kernels, x, dy, w, b, groups, rm, rv, chunk=chunk, running_average=True)
    want, stats = _reference(x, dy, w, b, groups, chunk)
    _assert_grads_close(got, want)
    _assert_running(rm, rv, stats, rm0, rv0, average=True)


# -- against the kernels themselves ---------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize("chunk", [2, 3], ids=["b2", "b3"])
@pytest.mark.parametrize(("shape", "groups", "memory"), [LAYOUTS[1], LAYOUTS[5], LAYOUTS[6]],
                         ids=[LAYOUT_IDS[1], LAYOUT_IDS[5], LAYOUT_IDS[6]])
def test_equals_separate_calls_per_ghost_batch(kernels, shape, groups, memory, chunk) -> None:
    """One call with ghost batches = one plain call per ghost batch (sum of parameter gradients)."""
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, torch.float32, seed=2)
    y, dx, dw, db = _train(kernels, x, dy, w, b, groups, rm0.clone(), rv0.clone(), chunk=chunk)
    parts = [_train(kernels, x[lo:hi], dy[lo:hi], w, b, groups, None, None)
             for lo, hi in _bounds(x.shape[0], chunk)]
    for got, want in ((y, torch.cat([p[0] for p in parts])), (dx, torch.cat([p[1] for p in parts]))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, sum(p[2] for p in parts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, sum(p[3] for p in parts), rtol=1e-5, atol=1e-5)
    # the first ghost batch's statistics, as a plain call on it
    rm, rv = rm0.clone(), rv0.clone()
    _train(kernels, x[:chunk], dy[:chunk], w, b, groups, rm, rv)
    rm_g, rv_g = rm0.clone(), rv0.clone()
    _train(kernels, x, dy, w, b, groups, rm_g, rv_g, chunk=chunk)
    torch.testing.assert_close((rm_g, rv_g), (rm, rv), rtol=1e-6, atol=1e-6)


@kernel_test
@pytest.mark.parametrize(("shape", "groups", "memory"), [LAYOUTS[0], LAYOUTS[5]],
                         ids=[LAYOUT_IDS[0], LAYOUT_IDS[5]])
def test_one_batch_is_todays_call(kernels, shape, groups, memory) -> None:
    """``chunk`` 0, negative, ``N`` or more: bit for bit the call without ghost batches."""
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, torch.float32, seed=3)
    results = []
    for kw in ({}, {"chunk": 0}, {"chunk": -1}, {"chunk": 5, "running_average": True}, {"chunk": 9}):
        rm, rv = rm0.clone(), rv0.clone()
        results.append((*_train(kernels, x, dy, w, b, groups, rm, rv, **kw), rm, rv))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


@kernel_test
def test_double_backward_per_ghost_batch(kernels) -> None:
    """create_graph=True differentiates a composite graph per ghost batch (3 + 2 here)."""
    x, dy, w, b, _, _ = _case((5, 6, 2, 2), 4, "channels_last", torch.float32, seed=4)
    inputs = [leaf(t) for t in (x, w, b)]
    y = kernels.train(*inputs, 4, EPS, None, None, 0.0, chunk=3)
    grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads[:2]), inputs[:2])
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, w, b)]
    y64 = _reference_bgn(ref[0], 4, ref[1], ref[2], 3)[0]
    grads64 = torch.autograd.grad(y64, ref, dy.double().cpu(), create_graph=True)
    second64 = torch.autograd.grad(sum((g * g).sum() for g in grads64[:2]), ref[:2])
    for got, want in zip([*grads, *second], [*grads64, *second64], strict=True):
        _close(got, want, rtol=1e-4, atol=1e-4)


@kernel_test
def test_failing_backward_kernel_falls_back_per_ghost_batch(kernels, monkeypatch) -> None:
    """A backward kernel that fails: the composite fallback keeps the ghost batches (2 + 2 + 1)."""
    def fail(*args, **kwargs):
        raise triton_kernels.KernelFailure("test", running_updated=False)

    disabled = []
    monkeypatch.setattr(kernels, "backward", fail)
    monkeypatch.setattr(triton_kernels, "disable", disabled.append)
    x, dy, w, b, _, _ = _case((5, 6, 4), 3, "contiguous", torch.float32, seed=6)
    got = _train(kernels, x, dy, w, b, 3, None, None, chunk=2)
    want, _ = _reference(x, dy, w, b, 3, 2)
    assert len(disabled) == 1
    for g, ref in zip(got, want, strict=True):
        _close(g, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_synchronized_backward_refuses_ghost_batches() -> None:
    """Synchronized BGN runs one batch per process: ``chunk`` with ``group_count`` is an error."""
    x = torch.randn(4, 4, 2, 2)
    stats = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="ghost batches"):
        triton_kernels.TritonKernels().backward(x, None, stats, x, 2, (True, False, False),
                                                (x.dtype, x.dtype), 8, None, chunk=2)


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="the child process itself, or no Triton")
def test_interpreter_suite() -> None:
    """This module's kernel tests in Triton's interpreter, on CPU tensors (a child process)."""
    run_in_interpreter(__file__)
