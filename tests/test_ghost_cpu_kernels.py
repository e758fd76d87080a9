"""Ghost batches in the fused C++ CPU kernels: ``train(..., chunk=b, running_average)`` against
separate calls per chunk of ``b`` consecutive samples (the same kernels with ``chunk=0`` on a copy of
each chunk): outputs, input / weight / bias gradients from one shared upstream gradient, double
backward, running statistics in both modes, every cell layout and memory format, N not divisible
by b, float64 gradcheck and bfloat16 input."""

from __future__ import annotations

import functools

import pytest
import torch

from bgn_lightning._ext import cpu_kernels
from tests.kernel_cases import channels_last_format, layout_ids

KERNELS = cpu_kernels()
if KERNELS is None:
    pytest.skip("the BGN CPU kernels are unavailable (no compiler, or switched off)", allow_module_level=True)

EPS = 1e-5
FACTOR = 0.3

# (shape, G, memory): G = C, G | C, G = k * C, groups straddling channels (C = 6, S = 4, G = 4),
# 5-D, (N, C); contiguous and channels-last (3d).
LAYOUTS = [
    ((7, 4, 3, 3), 4, "contiguous"),
    ((7, 4, 3, 3), 4, "channels_last"),
    ((7, 8, 2, 3), 2, "contiguous"),
    ((7, 8, 2, 3), 2, "channels_last"),
    ((5, 3, 4, 4), 6, "contiguous"),
    ((5, 3, 4, 4), 6, "channels_last"),
    ((7, 6, 2, 2), 4, "contiguous"),
    ((7, 6, 2, 2), 4, "channels_last"),
    ((5, 4, 2, 2, 3), 2, "contiguous"),
    ((5, 4, 2, 2, 3), 8, "channels_last"),
    ((7, 6), 3, "contiguous"),
]
LAYOUT_IDS = layout_ids(LAYOUTS)


def _case(shape, groups, memory, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape) + 7 * groups)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if memory == "channels_last":
        x, dy = (t.contiguous(memory_format=channels_last_format(len(shape))) for t in (x, dy))
    w = torch.randn(shape[1], generator=gen, dtype=dtype)
    b = torch.randn(shape[1], generator=gen, dtype=dtype)
    rm = torch.randn(groups, generator=gen, dtype=dtype)
    rv = torch.rand(groups, generator=gen, dtype=dtype) + 0.5
    return x, dy, w, b, rm, rv


def _train(groups, rm=None, rv=None, factor=0.0, chunk=0, average=False):
    """``fn(x, w, b)``: the kernels' ``train`` with everything else bound."""
    return lambda x, w, b: KERNELS.train(x, w, b, groups, EPS, rm, rv, factor, chunk, average)


def _grads(fn, x, dy, w, b):
    """``(y, dx, dw, db)`` of ``fn(x, w, b)`` with upstream gradient ``dy``."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    return y.detach(), dx, dw, db


def _reference(x, dy, w, b, groups, chunk, dtype=None):
    """``(y, dx, dw, db)`` from one plain kernel call per chunk (on a copy in ``dtype``)."""
    dtype = dtype or x.dtype
    ys, dxs, dws, dbs = [], [], [], []
    for xk, dyk in zip(x.split(chunk), dy.split(chunk), strict=True):
        xk = xk.to(dtype).clone(memory_format=torch.preserve_format)
        y, dx, dw, db = _grads(_train(groups), xk, dyk.to(dtype), w.to(dtype), b.to(dtype))
        ys.append(y), dxs.append(dx), dws.append(dw), dbs.append(db)
    return torch.cat(ys), torch.cat(dxs), sum(dws), sum(dbs)


def _chunk_stats(x, groups, chunk):
    """Each chunk's per-group mean and unbiased variance (plain kernel calls, factor 1)."""
    stats = []
    for xk in x.split(chunk):
        m = torch.zeros(groups, dtype=x.dtype)
        v = torch.zeros(groups, dtype=x.dtype)
        _train(groups, m, v, 1.0)(xk.clone(memory_format=torch.preserve_format), None, None)
        stats.append((m, v))
    return stats


def _assert_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Which path runs depends on the threads (ChunkPlan::fits). One thread: every K > 1 chunk at a time.
# Three threads: N = 7 runs K = 3 chunk at a time and K = 4, 7 on the K-row tables (the passes split
# among the threads); N = 5 runs K = 3, 5 chunk at a time and K = 2 on the K-row tables.
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("chunk", [1, 2, 3, "N"])
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_chunks_match_separate_calls(shape, groups, memory, chunk, threads) -> None:
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory)
    n = shape[0]
    chunk = n if chunk == "N" else chunk
    want = _reference(x, dy, w, b, groups, chunk)
    stats = _chunk_stats(x, groups, chunk)
    for average in (False, True):
        rm, rv = rm0.clone(), rv0.clone()
        got = _grads(_train(groups, rm, rv, FACTOR, chunk, average), x, dy, w, b)
        _assert_close(got, want, rtol=1e-10, atol=1e-10)
        fmt = channels_last_format(len(shape)) if memory == "channels_last" else torch.contiguous_format
        assert got[0].is_contiguous(memory_format=fmt)
        if average:
            target_m = torch.stack([m for m, _ in stats]).mean(0)
            target_v = torch.stack([v for _, v in stats]).mean(0)
        else:
            target_m, target_v = stats[0]
        torch.testing.assert_close(rm, rm0.lerp(target_m, FACTOR), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, rv0.lerp(target_v, FACTOR), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [0, -1, 7, 100])
def test_one_chunk_is_the_plain_call_bit_for_bit(chunk: int) -> None:
    for memory in ("contiguous", "channels_last"):
        x, dy, w, b, rm0, rv0 = _case((7, 6, 2, 2), 4, memory, torch.float32)
        rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
        plain_call = functools.partial(KERNELS.train, groups=4, eps=EPS, running_mean=rm1, running_var=rv1,
                                       factor=FACTOR)  # the 8-argument call, chunk and mode defaulted
        plain = _grads(lambda x_, w_, b_, call=plain_call: call(x_, w_, b_), x, dy, w, b)
        for average in (False, True):
            rm2.copy_(rm0), rv2.copy_(rv0)
            got = _grads(_train(4, rm2, rv2, FACTOR, chunk, average), x, dy, w, b)
            for g, p in zip((*got, rm2, rv2), (*plain, rm1, rv1), strict=True):
                assert torch.equal(g, p)


@pytest.mark.parametrize("chunk", [5, 3, 2])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_parallel_tasks_with_chunks(memory: str, chunk: int) -> None:
    """An input split into several parallel tasks (2 threads): K = 3 on the K-row tables, chunk
    boundaries inside tasks; K = 4 and 6 chunk at a time, whole chunks per task."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, dy, w, b, rm, rv = _case((12, 4, 32, 32), 2, memory)
        want = _reference(x, dy, w, b, 2, chunk)
        got = _grads(_train(2, rm, rv, FACTOR, chunk, True), x, dy, w, b)
        _assert_close(got, want, rtol=1e-9, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


def test_gradcheck_and_gradgradcheck_with_chunks() -> None:
    x, _, w, b, _, _ = _case((5, 4, 2, 2), 2, "channels_last")
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))

    fn = _train(2, chunk=2)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize(("shape", "groups", "memory", "chunk"),
                         [((7, 6, 2, 2), 4, "channels_last", 3), ((6, 3, 4, 4), 6, "contiguous", 2),
                          ((7, 6), 3, "contiguous", 2)])
def test_double_backward_matches_separate_calls(shape, groups, memory, chunk) -> None:
    x, dy, w, b, _, _ = _case(shape, groups, memory)
    v = torch.randn(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def second(fn, x, w, b):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(x, w, b)
        dx, dw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        loss = (dx * v).sum() + (dw * dw).sum()
        return dx.detach(), *torch.autograd.grad(loss, (x, w, b), allow_unused=True)

    got = second(_train(groups, chunk=chunk), x, w, b)
    # The reference: one plain call per chunk (each with its own dy and v), one loss over all.
    parts = []
    for xk, dyk, vk in zip(x.split(chunk), dy.split(chunk), v.split(chunk), strict=True):
        xk, wk, bk = (t.detach().clone().requires_grad_() for t in (xk, w, b))
        y = KERNELS.train(xk, wk, bk, groups, EPS, None, None, 0.0, 0, False)
        dx, dw = torch.autograd.grad(y, (xk, wk), dyk, create_graph=True)
        parts.append((dx, dw, xk, wk, bk, vk))
    dw_total = sum(p[1] for p in parts)
    loss = sum((p[0] * p[5]).sum() for p in parts) + (dw_total * dw_total).sum()
    leaves = [t for p in parts for t in p[2:5]]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    want_ggx = torch.cat([grads[3 * i] for i in range(len(parts))])
    want_ggw = sum(grads[3 * i + 1] for i in range(len(parts)))
    want_dx = torch.cat([p[0].detach() for p in parts])
    _assert_close(got[:3], (want_dx, want_ggx, want_ggw), rtol=1e-9, atol=1e-10)
    assert got[3] is None or torch.count_nonzero(got[3]) == 0  # dx does not depend on the bias


@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [4, 16, 2])
def test_bfloat16_input_is_close_to_float64_separate_calls(memory: str, groups: int) -> None:
    x, dy, w, b, rm, rv = _case((9, 4, 4, 4), groups, memory, seed=3)
    xb, dyb = x.bfloat16(), dy.bfloat16()
    rmf, rvf = rm.float(), rv.float()
    got = _grads(_train(groups, rmf, rvf, FACTOR, 2, True), xb, dyb, w.float(), b.float())
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    want = _reference(xb.double(), dyb.double(), w, b, groups, 2)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    stats = _chunk_stats(xb.double(), groups, 2)
    target_m = torch.stack([m for m, _ in stats]).mean(0)
    target_v = torch.stack([v for _, v in stats]).mean(0)
    torch.testing.assert_close(rmf.double(), rm.lerp(target_m, FACTOR), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rvf.double(), rv.lerp(target_v, FACTOR), rtol=1e-5, atol=1e-5)


def test_a_chunk_with_one_value_per_group_is_refused() -> None:
    x = torch.randn(5, 6)
    KERNELS.train(x, None, None, 6, EPS, None, None, 0.0, 0, False)  # 5 values per group: fine
    with pytest.raises(RuntimeError, match="every chunk"):
        KERNELS.train(x, None, None, 6, EPS, None, None, 0.0, 2, False)  # the last chunk has 1 sample
    KERNELS.train(x, None, None, 3, EPS, None, None, 0.0, 1, False)  # 2 values per group and sample
