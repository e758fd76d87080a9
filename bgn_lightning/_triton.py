"""Fused Triton kernels for BGN on CUDA: the algorithm of the C++ CPU kernels, on the GPU.

Notation as in :mod:`bgn_lightning._autograd` and ``csrc/batch_group_norm_cpu.cpp``: ``x`` is
``(N, C, *S)`` with ``S = prod(spatial)``, ``D = C * S``, ``G`` groups of ``L = D / G`` consecutive
features. Cells are runs of ``R = gcd(L, S)`` features, each inside one group and one channel:
channel ``c`` has ``k = S / R`` cells, group ``g`` has ``L / R``, and there are ``U = C * k``. Both
supported memory formats are row-major matrices: a contiguous ``x`` is ``(N * U, R)`` (row ``r`` is
cell ``r % U``), a channels-last one ``(N * S, C)`` (element ``(r, c)`` is cell ``c * k + (r % S) / R``).
Other strides are made contiguous first; the output has the input's memory format.

Launches (statistics and parameters in float32, whatever the input dtype):

* training forward: per-cell shifted sums ``sum(x - s)``, ``sum((x - s)^2)`` (``s`` = the group's
  first value, so ``1e4 + randn`` keeps its variance) in ``SPLIT`` partial sums per cell; one small
  kernel pools them per group (in float64), updates the running statistics in place (unbiased
  variance, as BatchNorm) and writes ``(mean, var, rstd)``; one pass ``y = a * x + b`` per cell;
* backward (closed form): per-cell ``sum(dy)``, ``sum(dy * (x - mean))``; one small kernel gives the
  weight and bias gradients and per-group coefficients; one pass ``dx = A * dy + B * x + D``;
* eval: one pass with ``a, b`` from the running statistics.

Ghost batches (``chunk = b``, issue 21): ``NCH = ceil(N / b)`` batches of ``b`` consecutive
samples (the last one holds the rest), each normalized with its own statistics, in the same
launches. The partial sums split every ghost batch separately (``(2, NCH * SPLIT, U)``, row
``k * SPLIT + s``), each ghost batch shifted by its own first value; the pooling kernels loop over
the ghost batches and write ``(3, NCH, G)`` tables, which the elementwise passes index by
``(n // b, group)``; the running statistics move towards ghost batch 0's statistics, or the mean
over ghost batches. One ghost batch (``chunk <= 0`` or ``chunk >= N``) is today's call exactly.

Double backward (``create_graph=True``) differentiates the composite graph of
:func:`bgn_lightning._autograd.composite_batch_group_norm` (with ghost batches, the same ops on
``(N // b, b, G, L)`` and a second call for a smaller last ghost batch); ``torch.compile`` and ``torch.func``
never reach this module (:func:`bgn_lightning._backends.select` sends them to the composite path).

The ``"triton"`` backend of :mod:`bgn_lightning._backends` (start reading there) wraps
:class:`TritonKernels`. :func:`cuda_kernels` gives the kernels for a CUDA input they serve (float32,
float16, bfloat16; the parameters and buffers on the same device), or ``None``, with the reason:
Triton missing, no GPU, ``BGN_LIGHTNING_CUDA_KERNELS=0``, or a kernel that failed to compile
earlier in this process (one warning, then the native-op path). Under ``TRITON_INTERPRET=1`` (set
before Triton is imported) :class:`TritonKernels` runs on CPU tensors in Triton's interpreter, which
is how the tests check the kernels on machines without a GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._autograd import _composite_backward
from ._shared import LoadOnce, channels_last, memory_format, needs_grad, switched_off

__all__ = ["ENV_SWITCH", "KernelFailure", "TritonKernels", "cuda_kernels", "cuda_kernels_available",
           "disable", "prepare"]

ENV_SWITCH = "BGN_LIGHTNING_CUDA_KERNELS"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FAILED = "a Triton kernel failed earlier in this process"
_TILE = 2048  # elements per program and loop iteration of the reductions
_AFFINE_TILE = 4096  # elements per program of the elementwise passes
_GRID_AXIS1 = 65535  # CUDA's limit on a grid's second axis


class KernelFailure(RuntimeError):
    """A Triton kernel could not be compiled or launched; the caller runs the native-op path.

    Attributes:
        running_updated: whether the running statistics were already updated by this call.
        reduced: in a synchronized backward, the all-reduced ``(2, G)`` group sums
            ``(sum(w * dy), sum(w * dy * (x - mean)))`` if the collective already ran, else ``None``.
    """

    def __init__(self, message: str, running_updated: bool, reduced: Tensor | None = None) -> None:
        super().__init__(message)
        self.running_updated = running_updated
        self.reduced = reduced


# -- the kernels ---------------------------------------------------------------------------------


def _define_kernels() -> SimpleNamespace:
    """Define the ``@triton.jit`` kernels (Triton reads ``TRITON_INTERPRET`` at definition time)."""
    import triton
    import triton.language as tl

    # Triton compiles a variant per divisibility (by 16) and unit value of every int argument: only
    # the row lengths and strides that decide vectorized loads (R, C, D, COLS) are specialized on.
    @triton.jit(do_not_specialize=["N", "U", "S", "K", "CPG", "L", "SPLIT", "B", "NCH"])
    def cell_sums(x_ptr, dy_ptr, mean_ptr, part_ptr, N, U, R, S, C, K, CPG, L, D, SPLIT, B, NCH,
                  CL: tl.constexpr, BWD: tl.constexpr, BIG: tl.constexpr, SWAP: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
        """Partial per-cell sums of one ghost batch: (x - s, (x - s)^2), or (dy, dy * (x - mean)) when BWD.

        The partial sums of ghost batch k (samples [k * B, min((k + 1) * B, N))) and split s are
        row k * SPLIT + s of part's two (NCH * SPLIT, U) halves; mean_ptr is the (NCH, G) table.
        """
        # SWAP (channels-last, or many ghost batches): (segment, ghost batch, split) on axis 0,
        # whose size may pass axis 1's limit of 65535.
        pid_q = tl.program_id(1) if SWAP else tl.program_id(0)
        pid_s = tl.program_id(0) if SWAP else tl.program_id(1)
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        split = pid_s % SPLIT
        chunk = (pid_s // SPLIT) % NCH
        n_lo = chunk * B
        n_hi = tl.minimum(n_lo + B, N)
        first = n_lo.to(tl.int64) * D if BIG else n_lo * D  # the ghost batch's first sample
        acc1 = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
        if CL:
            # Program (channel block, segment, ghost batch, split): rows (n, seg * R + j) of C values,
            # BLOCK_M rows a step.
            seg = pid_s // (SPLIT * NCH)
            qmask = q < C
            cell = q * K + seg
            grp = cell // CPG
            if BWD:
                shift = tl.load(mean_ptr + chunk * (U // CPG) + grp, mask=qmask, other=0.0)
            else:
                f = grp * L
                shift = tl.load(x_ptr + first + (f % S) * C + f // S, mask=qmask, other=0.0).to(tl.float32)
            m_hi = n_hi * R
            start, stop, step = n_lo * R + split * BLOCK_M, m_hi, SPLIT * BLOCK_M
        else:
            # Program (cell block, ghost batch, split): chunks (n, j0) of BLOCK_M values of every
            # cell's run, one a step.
            qmask = q < U
            cell = q
            grp = q // CPG
            if BWD:
                shift = tl.load(mean_ptr + chunk * (U // CPG) + grp, mask=qmask, other=0.0)
            else:
                shift = tl.load(x_ptr + first + grp * L, mask=qmask, other=0.0).to(tl.float32)
            q_off = q * R
            if BIG:
                q_off = q_off.to(tl.int64)
            nj = tl.cdiv(R, BLOCK_M)
            start, stop, step = n_lo * nj + split, n_hi * nj, SPLIT
        for t in range(start, stop, step):
            if CL:
                m = t + tl.arange(0, BLOCK_M)
                if BIG:
                    m = m.to(tl.int64)
                row = (m // R) * D + (seg * R + m % R) * C
                offs = row[None, :] + q[:, None]
                mask = (m < m_hi)[None, :] & qmask[:, None]
            else:
                n = t // nj
                j = (t % nj) * BLOCK_M + tl.arange(0, BLOCK_M)
                if BIG:
                    n = n.to(tl.int64)
                offs = n * D + q_off[:, None] + j[None, :]
                mask = qmask[:, None] & (j < R)[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - shift[:, None]
            if BWD:
                d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc1 += d
                acc2 += tl.where(mask, d * v, 0.0)
            else:
                v = tl.where(mask, v, 0.0)
                acc1 += v
                acc2 += v * v
        s1 = tl.sum(acc1, axis=1)
        s2 = tl.sum(acc2, axis=1)
        out = (chunk * SPLIT + split) * U + cell
        tl.store(part_ptr + out, s1, mask=qmask)
        tl.store(part_ptr + NCH * SPLIT * U + out, s2, mask=qmask)

    @triton.jit(do_not_specialize=["G", "U", "S", "C", "CPG", "L", "SPLIT", "N", "B", "NCH"])
    def group_stats(x_ptr, part_ptr, stats_ptr, rm_ptr, rv_ptr, G, U, S, C, CPG, L, D, SPLIT, N, B, NCH,
                    count, eps, factor, CL: tl.constexpr, UPDATE: tl.constexpr, AVERAGE: tl.constexpr,
                    BIG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
        """Pool the partial sums per (ghost batch, group): (mean, var, rstd) and the running statistics.

        ``count`` is the values per group of all N samples; ghost batch k has count * n_k / N. The
        running statistics move towards ghost batch 0's, or the mean over ghost batches if AVERAGE.
        """
        grp = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = grp < G
        f = grp * L
        first = (f % S) * C + f // S if CL else f
        run_m = tl.zeros((BLOCK_G,), dtype=tl.float64)
        run_v = tl.zeros((BLOCK_G,), dtype=tl.float64)
        for k in range(0, NCH):
            s1 = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float64)
            s2 = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float64)
            for t0 in range(0, CPG, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                cell = grp[:, None] * CPG + t[None, :]
                mask = gmask[:, None] & (t < CPG)[None, :]
                for s in range(0, SPLIT):
                    row = (k * SPLIT + s) * U + cell
                    s1 += tl.load(part_ptr + row, mask=mask, other=0.0).to(tl.float64)
                    s2 += tl.load(part_ptr + NCH * SPLIT * U + row, mask=mask, other=0.0).to(tl.float64)
            n_lo = k * B
            n_k = tl.minimum(B, N - n_lo)
            cnt = n_k.to(tl.float64) * count / N  # exactly count for one ghost batch
            base = n_lo.to(tl.int64) * D if BIG else n_lo * D
            shift = tl.load(x_ptr + base + first, mask=gmask, other=0.0).to(tl.float32).to(tl.float64)
            m = tl.sum(s1, axis=1) / cnt
            var = tl.maximum(tl.sum(s2, axis=1) / cnt - m * m, 0.0)
            mean = shift + m
            rstd = 1.0 / tl.sqrt(var + eps)
            tl.store(stats_ptr + k * G + grp, mean.to(tl.float32), mask=gmask)
            tl.store(stats_ptr + (NCH + k) * G + grp, var.to(tl.float32), mask=gmask)
            tl.store(stats_ptr + (2 * NCH + k) * G + grp, rstd.to(tl.float32), mask=gmask)
            if UPDATE:
                unbiased = var * (cnt / (cnt - 1.0))
                if AVERAGE:
                    run_m += mean
                    run_v += unbiased
                else:
                    first_batch = k == 0
                    run_m += tl.where(first_batch, mean, 0.0)
                    run_v += tl.where(first_batch, unbiased, 0.0)
        if UPDATE:
            if AVERAGE:
                run_m = run_m / NCH
                run_v = run_v / NCH
            rm = tl.load(rm_ptr + grp, mask=gmask, other=0.0).to(tl.float32).to(tl.float64)
            rv = tl.load(rv_ptr + grp, mask=gmask, other=0.0).to(tl.float32).to(tl.float64)
            rm = rm + factor * (run_m - rm)
            rv = rv + factor * (run_v - rv)
            tl.store(rm_ptr + grp, rm.to(tl.float32).to(rm_ptr.dtype.element_ty), mask=gmask)
            tl.store(rv_ptr + grp, rv.to(tl.float32).to(rv_ptr.dtype.element_ty), mask=gmask)

    @triton.jit(do_not_specialize=["G", "U", "C", "K", "CPG", "SPLIT", "N", "B", "NCH"])
    def backward_coefficients(part_ptr, stats_ptr, w_ptr, coef_ptr, dw_ptr, db_ptr, G, U, C, K, CPG,
                              SPLIT, N, B, NCH, count, HAS_W: tl.constexpr, NEED_X: tl.constexpr,
                              NEED_W: tl.constexpr, NEED_B: tl.constexpr, PHASE: tl.constexpr,
                              BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weight / bias gradients per channel, and per (ghost batch, group) (rstd, B, D) of
        dx = rstd*w*dy + B*x + D, in (3, NCH, G).

        ``count`` is the values per group of all N samples (ghost batch k has count * n_k / N).
        PHASE 0: from the partial cell sums. Synchronized BGN (one ghost batch) all-reduces in
        between: PHASE 1 writes the group sums (sum(w * dy), sum(w * dy * (x - mean))) to coef_ptr,
        PHASE 2 reads them from part_ptr (a (2, G) tensor) and writes the coefficients.
        """
        pid = tl.program_id(0)
        if NEED_X:
            grp = pid * BLOCK_G + tl.arange(0, BLOCK_G)
            gmask = grp < G
            for k in range(0, NCH):
                row_g = k * G + grp
                mean = tl.load(stats_ptr + row_g, mask=gmask, other=0.0).to(tl.float64)
                rstd = tl.load(stats_ptr + 2 * NCH * G + row_g, mask=gmask, other=0.0).to(tl.float64)
                if PHASE == 2:
                    s1 = tl.load(part_ptr + grp, mask=gmask, other=0.0).to(tl.float64)
                    s2 = tl.load(part_ptr + G + grp, mask=gmask, other=0.0).to(tl.float64)
                else:
                    a1 = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float64)
                    a2 = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float64)
                    for t0 in range(0, CPG, BLOCK_T):
                        t = t0 + tl.arange(0, BLOCK_T)
                        cell = grp[:, None] * CPG + t[None, :]
                        mask = gmask[:, None] & (t < CPG)[None, :]
                        if HAS_W:
                            w = tl.load(w_ptr + cell // K, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
                        else:
                            w = tl.where(mask, 1.0, 0.0).to(tl.float64)
                        for s in range(0, SPLIT):
                            row = (k * SPLIT + s) * U + cell
                            a1 += w * tl.load(part_ptr + row, mask=mask, other=0.0).to(tl.float64)
                            v2 = tl.load(part_ptr + NCH * SPLIT * U + row, mask=mask, other=0.0)
                            a2 += w * v2.to(tl.float64)
                    s1 = tl.sum(a1, axis=1)
                    s2 = tl.sum(a2, axis=1)
                if PHASE == 1:
                    tl.store(coef_ptr + grp, s1.to(tl.float32), mask=gmask)
                    tl.store(coef_ptr + G + grp, s2.to(tl.float32), mask=gmask)
                else:
                    cnt = tl.minimum(B, N - k * B).to(tl.float64) * count / N  # exactly count for NCH = 1
                    k1 = rstd * s1 / cnt  # rstd * mean(w * dy)
                    k2 = rstd * rstd * s2 / cnt  # rstd * mean(w * dy * x_hat)
                    coef_x = -rstd * k2
                    tl.store(coef_ptr + row_g, rstd.to(tl.float32), mask=gmask)
                    tl.store(coef_ptr + NCH * G + row_g, coef_x.to(tl.float32), mask=gmask)
                    tl.store(coef_ptr + 2 * NCH * G + row_g, (-k1 - coef_x * mean).to(tl.float32), mask=gmask)
        if NEED_W or NEED_B:
            ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = ch < C
            gw = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float64)
            gb = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float64)
            for t0 in range(0, K, BLOCK_K):
                t = t0 + tl.arange(0, BLOCK_K)
                cell = ch[:, None] * K + t[None, :]
                mask = cmask[:, None] & (t < K)[None, :]
                for k in range(0, NCH):
                    r = tl.load(stats_ptr + (2 * NCH + k) * G + cell // CPG, mask=mask, other=0.0)
                    r = r.to(tl.float64)
                    for s in range(0, SPLIT):
                        row = (k * SPLIT + s) * U + cell
                        gb += tl.load(part_ptr + row, mask=mask, other=0.0).to(tl.float64)
                        v2 = tl.load(part_ptr + NCH * SPLIT * U + row, mask=mask, other=0.0)
                        gw += r * v2.to(tl.float64)
            if NEED_W:
                dw = tl.sum(gw, axis=1).to(tl.float32)  # float64 -> bfloat16 directly is not portable
                tl.store(dw_ptr + ch, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
            if NEED_B:
                db = tl.sum(gb, axis=1).to(tl.float32)
                tl.store(db_ptr + ch, db.to(db_ptr.dtype.element_ty), mask=cmask)

    @triton.jit(do_not_specialize=["ROWS", "U", "S", "R", "K", "CPG", "B"])
    def cell_affine(x_ptr, dy_ptr, out_ptr, p0_ptr, p1_ptr, p2_ptr, w_ptr, b_ptr, ROWS, COLS, U, S, R,
                    K, CPG, B, eps, CL: tl.constexpr, SEGMENTED: tl.constexpr, MODE: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BIG: tl.constexpr, CHUNKED: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """One elementwise pass over x seen as (ROWS, COLS), per cell.

        MODE 0 (train) and 1 (eval): out = x * (w * rstd) + (b - mean * w * rstd) with per-group
        (mean, rstd) = (p0, p2) or (p0, 1 / sqrt(p1 + eps)). MODE 2 (backward): out = dy * (w * p0)
        + x * p1 + p2 with per-group (rstd, B, D). CHUNKED: p0, p1, p2 are (NCH, G) tables, row
        n // B for sample n.
        """
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        if BIG:
            r = r.to(tl.int64)
        mask = (r < ROWS)[:, None] & (c < COLS)[None, :]
        offs = r[:, None] * COLS + c[None, :]
        if CL:
            cell = c[None, :] * K + ((r % S) // R)[:, None] if SEGMENTED else c[None, :]
            ch = c[None, :]
        else:
            cell = (r % U)[:, None]
            ch = cell // K
        grp = cell // CPG
        pmask = cell < U  # lanes past the last channel (channels-last) have no cell
        if CHUNKED:  # the ghost batch's row of the (NCH, G) tables
            n = r // S if CL else r // U
            grp = ((n // B) * (U // CPG))[:, None] + grp
            pmask = pmask & (r < ROWS)[:, None]
        if MODE == 2:
            scale = tl.load(p0_ptr + grp, mask=pmask, other=0.0).to(tl.float32)
            if HAS_W:
                scale = scale * tl.load(w_ptr + ch, mask=pmask, other=0.0).to(tl.float32)
            coef_x = tl.load(p1_ptr + grp, mask=pmask, other=0.0).to(tl.float32)
            shift = tl.load(p2_ptr + grp, mask=pmask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = d * scale + x * coef_x + shift
        else:
            mean = tl.load(p0_ptr + grp, mask=pmask, other=0.0).to(tl.float32)
            if MODE == 0:
                scale = tl.load(p2_ptr + grp, mask=pmask, other=0.0).to(tl.float32)
            else:
                var = tl.load(p1_ptr + grp, mask=pmask, other=1.0).to(tl.float32)
                scale = 1.0 / tl.sqrt(var + eps)
            if HAS_W:
                scale = scale * tl.load(w_ptr + ch, mask=pmask, other=0.0).to(tl.float32)
            shift = -mean * scale
            if HAS_B:
                shift += tl.load(b_ptr + ch, mask=pmask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = x * scale + shift
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(cell_sums=cell_sums, group_stats=group_stats,
                           backward_coefficients=backward_coefficients, cell_affine=cell_affine)


# -- host side -----------------------------------------------------------------------------------


def _pow2(n: int, cap: int) -> int:
    """The power of two at least ``n`` (and at least 2), at most ``cap``."""
    return max(2, min(cap, 1 << max(0, n - 1).bit_length()))


def _run_block(run: int, cap: int) -> int:
    """Block size along a contiguous run of ``run`` values: few masked lanes, long rows.

    The largest power of two in ``[32, cap]`` whose blocks overhang the run by at most 5 %, else
    the one that overhangs least (a 56 x 56 run of 3136 values takes 128, not 1024, which would
    leave the fourth block 94 % masked); runs shorter than 32 take the power of two above them.
    """
    if run <= 32:
        return _pow2(run, cap)
    sizes = [1 << k for k in range(5, cap.bit_length()) if 1 << k <= cap]
    waste = {b: _cdiv(run, b) * b / run - 1 for b in sizes}
    fitting = [b for b in sizes if waste[b] <= 0.05]
    return max(fitting) if fitting else min(sizes, key=lambda b: (waste[b], -b))


class _Geometry:
    """Sizes of one call; see the module docstring for the names."""

    def __init__(self, x: Tensor, groups: int, channels_last: bool, chunk: int = 0) -> None:
        self.N, self.C = x.shape[0], x.shape[1]
        # Ghost batches: NCH of B samples (the last one may have fewer); one unless 0 < chunk < N.
        self.B = chunk if 0 < chunk < self.N else max(self.N, 1)
        self.NCH = _cdiv(self.N, self.B) if self.N else 1
        self.S = math.prod(x.shape[2:])
        self.G = groups
        self.L = self.C * self.S // groups
        self.R = math.gcd(self.L, self.S)
        self.K = self.S // self.R
        self.U = self.C * self.K
        self.CPG = self.L // self.R
        self.D = self.C * self.S
        self.CL = channels_last
        self.BIG = x.numel() >= 2**31 - _AFFINE_TILE
        self.count = float(self.N * self.L)


def prepare(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` in a layout the kernels read (itself unless oddly strided) and whether it is channels-last."""
    if x.is_contiguous():
        return x, False
    if channels_last(x):
        return x, True
    return x.contiguous(), False


def _vector(t: Tensor | None, size: int, what: str, copy: bool = True) -> Tensor | None:
    """A per-channel or per-group tensor checked to be 1-D of ``size`` (stride 1 if ``copy``)."""
    if t is None:
        return None
    if t.dim() != 1 or t.numel() != size:
        raise ValueError(f"batch_group_norm: {what} must be a 1-D tensor of {size} elements, "
                         f"got shape {tuple(t.shape)}")
    return t if t.stride(0) == 1 or not copy else t.contiguous()


class TritonKernels:
    """The fused BGN kernels: ``train`` (autograd-aware) and ``eval``, as the C++ CPU module.

    Works on CUDA tensors, and on CPU tensors when Triton's interpreter is on
    (``TRITON_INTERPRET=1`` before Triton is imported).
    """

    def __init__(self) -> None:
        self.kernels = _define_kernels()
        self._programs: dict[Any, int] = {}

    # -- launches --

    def _target_programs(self, device: torch.device) -> int:
        """About four programs per streaming multiprocessor (4 in the interpreter)."""
        if device.type != "cuda":
            return 4
        if device not in self._programs:
            props = torch.cuda.get_device_properties(device)
            self._programs[device] = 4 * props.multi_processor_count
        return self._programs[device]

    def _cell_sums(self, geo: _Geometry, x: Tensor, dy: Tensor | None,
                   mean: Tensor | None) -> tuple[Tensor, int]:
        """Partial per-cell sums ``(2, NCH * SPLIT, U)`` in float32 (row ``k * SPLIT + s`` for ghost
        batch ``k``), and ``SPLIT``; ``mean`` is the backward's ``(NCH, G)`` means."""
        if geo.CL:
            block_q = _pow2(geo.C, 256)
            block_m = _pow2(geo.B * geo.R, max(2, _TILE // block_q))
            q_blocks, segments = _cdiv(geo.C, block_q), geo.K
            chunks = _cdiv(geo.B * geo.R, block_m)
        else:
            block_m = _run_block(geo.R, 1024)
            block_q = _pow2(geo.U, max(2, _TILE // block_m))
            q_blocks, segments = _cdiv(geo.U, block_q), 1
            chunks = geo.B * _cdiv(geo.R, block_m)
        split = max(1, min(chunks, self._target_programs(x.device) // (q_blocks * segments * geo.NCH)))
        rows = geo.NCH * split
        part = torch.empty((2, rows, geo.U), dtype=torch.float32, device=x.device)
        swap = geo.CL or rows > _GRID_AXIS1
        grid = (segments * rows, q_blocks) if swap else (q_blocks, rows)
        self.kernels.cell_sums[grid](
            x, x if dy is None else dy, part if mean is None else mean, part,
            geo.N, geo.U, geo.R, geo.S, geo.C, geo.K, geo.CPG, geo.L, geo.D, split, geo.B, geo.NCH,
            CL=geo.CL, BWD=dy is not None, BIG=geo.BIG, SWAP=swap, BLOCK_Q=block_q, BLOCK_M=block_m,
        )
        return part, split

    def _group_stats(self, geo: _Geometry, x: Tensor, stats: Tensor, running_mean: Tensor,
                     running_var: Tensor, eps: float, factor: float, update: bool,
                     average: bool = False) -> None:
        """The statistics pass and the pooling: ``stats`` = (mean, var, rstd) per (ghost batch, group)."""
        part, split = self._cell_sums(geo, x, None, None)
        block_t = _pow2(geo.CPG, 64)
        block_g = 1024 // block_t  # tied to block_t: one compiled variant per block_t
        self.kernels.group_stats[(_cdiv(geo.G, block_g),)](
            x, part, stats, running_mean, running_var, geo.G, geo.U, geo.S, geo.C, geo.CPG, geo.L, geo.D,
            split, geo.N, geo.B, geo.NCH, geo.count, eps, factor, CL=geo.CL, UPDATE=update,
            AVERAGE=average and geo.NCH > 1, BIG=geo.BIG, BLOCK_G=block_g, BLOCK_T=block_t,
        )

    def _affine(self, geo: _Geometry, x: Tensor, dy: Tensor | None, p0: Tensor, p1: Tensor, p2: Tensor,
                weight: Tensor | None, bias: Tensor | None, eps: float, mode: int) -> Tensor:
        out = torch.empty_like(x)
        rows, cols = (geo.N * geo.S, geo.C) if geo.CL else (geo.N * geo.U, geo.R)
        block_cols = _pow2(cols, 256) if geo.CL else _run_block(cols, 1024)
        block_rows = _pow2(rows, max(2, _AFFINE_TILE // block_cols))
        grid = (_cdiv(rows, block_rows), _cdiv(cols, block_cols))
        self.kernels.cell_affine[grid](
            x, x if dy is None else dy, out, p0, p1, p2,
            x if weight is None else weight, x if bias is None else bias,
            rows, cols, geo.U, geo.S, geo.R, geo.K, geo.CPG, geo.B, eps,
            CL=geo.CL, SEGMENTED=geo.CL and geo.K > 1, MODE=mode, HAS_W=weight is not None,
            HAS_B=bias is not None, BIG=geo.BIG, CHUNKED=geo.NCH > 1,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        )
        return out

    def forward_train(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                      running_mean: Tensor | None, running_var: Tensor | None, factor: float,
                      chunk: int = 0, running_average: bool = False) -> tuple[Tensor, Tensor]:
        """Training-mode output and the ``(mean, var, rstd)`` float32 table, no autograd.

        ``x`` must be contiguous or channels-last; the running statistics (both or neither) are
        updated in place. The table is ``(3, G)``, or ``(3, NCH, G)`` with ``NCH > 1`` ghost
        batches of ``chunk`` samples (see :meth:`train` for ``chunk`` and ``running_average``).

        Raises:
            KernelFailure: a kernel failed to compile or launch.
        """
        geo = _Geometry(x, groups, channels_last(x), chunk)
        shape = (3, groups) if geo.NCH == 1 else (3, geo.NCH, groups)
        stats = torch.empty(shape, dtype=torch.float32, device=x.device)
        update = running_mean is not None and running_var is not None
        rm, rv = (running_mean, running_var) if update else (stats, stats)
        rm_k, rv_k = (t if t.is_contiguous() else t.contiguous() for t in (rm, rv))
        try:
            self._group_stats(geo, x, stats, rm_k, rv_k, eps, factor, update, running_average)
        except Exception as err:  # compile or launch failure: the caller falls back
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False) from err
        if update:
            for buffer, written in ((running_mean, rm_k), (running_var, rv_k)):
                if written is not buffer:
                    buffer.copy_(written)
                elif not buffer.is_inference():  # an in-place update, as lerp_ would record
                    torch.autograd.graph.increment_version(buffer)
        try:
            y = self._affine(geo, x, None, stats[0], stats[1], stats[2], weight, bias, eps, 0)
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=update) from err
        return y, stats

    def _coefficients(self, geo: _Geometry, part: Tensor, split: int, stats: Tensor, weight: Tensor | None,
                      out: Tensor, dw: Tensor, db: Tensor, needs: tuple[bool, bool, bool], count: float,
                      phase: int) -> None:
        """One launch of ``backward_coefficients`` (see there for ``phase``)."""
        need_x, need_w, need_b = needs
        block_t = _pow2(geo.CPG, 64)
        block_g = 1024 // block_t  # tied to block_t and block_k: fewer compiled variants
        block_k = _pow2(geo.K, 64)
        block_c = 1024 // block_k
        programs = max(_cdiv(geo.G, block_g) if need_x else 1,
                       _cdiv(geo.C, block_c) if need_w or need_b else 1)
        self.kernels.backward_coefficients[(programs,)](
            part, stats, stats if weight is None else weight, out, dw, db, geo.G, geo.U, geo.C, geo.K,
            geo.CPG, split, geo.N, geo.B, geo.NCH, count, HAS_W=weight is not None, NEED_X=need_x,
            NEED_W=need_w, NEED_B=need_b, PHASE=phase, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_C=block_c,
            BLOCK_K=block_k,
        )

    def backward(self, x: Tensor, weight: Tensor | None, stats: Tensor, dy: Tensor, groups: int,
                 needs: tuple[bool, bool, bool], dtypes: tuple[torch.dtype, torch.dtype],
                 group_count: int | None = None,
                 all_reduce: Callable[[Tensor], Any] | None = None,
                 chunk: int = 0) -> tuple[Tensor | None, ...]:
        """Closed-form gradients ``(dx, dw, db)`` of :meth:`forward_train` (``None`` where not needed).

        Args:
            x: the forward's input (contiguous or channels-last).
            weight: the forward's weight or ``None``.
            stats: the forward's ``(mean, var, rstd)`` table (``(3, NCH, G)`` with ghost batches).
            dy: gradient of the output, in ``x``'s dtype and memory format.
            groups: ``G``.
            needs: whether x, weight and bias need a gradient.
            dtypes: the dtypes of the weight and bias gradients.
            group_count: values per group the statistics pooled (default: this ``x``'s ``N * L``).
            all_reduce: in-place sum over processes of the ``(2, G)`` float32 group sums
                ``(sum(w * dy), sum(w * dy * (x - mean)))`` (synchronized BGN); weight and bias
                gradients stay local.
            chunk: the forward's ghost batch size (see :meth:`train`); not with ``all_reduce``.

        Raises:
            KernelFailure: a kernel failed to compile or launch; its ``reduced`` holds the
                all-reduced group sums when the collective already ran.
        """
        need_x, need_w, need_b = needs
        geo = _Geometry(x, groups, channels_last(x), chunk)
        count = geo.count if group_count is None else float(group_count)
        sync = all_reduce is not None and need_x
        if geo.NCH > 1 and (sync or group_count is not None):
            raise ValueError("TritonKernels.backward: ghost batches (chunk) are not synchronized")
        try:
            part, split = self._cell_sums(geo, x, dy, stats[0])
            shape = (3, groups) if geo.NCH == 1 else (3, geo.NCH, groups)
            coef = torch.empty((2, groups) if sync else shape, dtype=torch.float32, device=x.device) \
                if need_x else stats
            dw = torch.empty(geo.C, dtype=dtypes[0], device=x.device) if need_w else stats
            db = torch.empty(geo.C, dtype=dtypes[1], device=x.device) if need_b else stats
            self._coefficients(geo, part, split, stats, weight, coef, dw, db, needs, count, 1 if sync else 0)
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False) from err
        reduced = None
        if sync:
            all_reduce(coef)  # outside the try: a failing collective is not a kernel failure
            reduced = coef
        try:
            if sync:
                coef = torch.empty((3, groups), dtype=torch.float32, device=x.device)
                self._coefficients(geo, reduced, 1, stats, weight, coef, stats, stats, (True, False, False),
                                   count, 2)
            dx = self._affine(geo, x, dy, coef[0], coef[1], coef[2], weight, None, 0.0, 2) if need_x else None
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False,
                                reduced=reduced) from err
        return dx, dw if need_w else None, db if need_b else None

    def moments(self, x: Tensor, groups: int, eps: float) -> Tensor:
        """Per-group ``(mean, var, rstd)`` of ``x`` (contiguous or channels-last), float32, ``(3, G)``.

        Raises:
            KernelFailure: a kernel failed to compile or launch.
        """
        geo = _Geometry(x, groups, channels_last(x))
        stats = torch.empty((3, groups), dtype=torch.float32, device=x.device)
        try:
            self._group_stats(geo, x, stats, stats, stats, eps, 0.0, False)
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False) from err
        return stats

    def normalize(self, x: Tensor, table: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """``(x - mean) * rstd * weight + bias`` with a per-group ``(mean, var, rstd)`` float32 table.

        Raises:
            KernelFailure: the kernel failed to compile or launch.
        """
        geo = _Geometry(x, table.shape[1], channels_last(x))
        try:
            return self._affine(geo, x, None, table[0], table[1], table[2], weight, bias, 0.0, 0)
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False) from err

    # -- the C++ module's interface --

    def train(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
              running_mean: Tensor | None, running_var: Tensor | None, factor: float,
              chunk: int = 0, running_average: bool = False) -> Tensor:
        """Training-mode BGN with batch statistics (autograd-aware); updates the running statistics.

        Ghost batches: with ``0 < chunk < N`` the batch is normalized as ``ceil(N / chunk)``
        independent ghost batches of ``chunk`` consecutive samples (the last one holds the rest),
        each with its own per-group statistics, as that many devices without SyncBN would; the
        weight and bias gradients sum over all samples. The same launches as one batch: the
        statistics tables are per (ghost batch, group).

        Args:
            x: ``(N, C, *S)`` float32 / float16 / bfloat16 input with more than one value per group
                (per ghost batch).
            weight: per-channel scale ``(C,)`` or ``None``.
            bias: per-channel shift ``(C,)`` or ``None``.
            groups: a valid ``G`` for ``x`` (the caller validates it).
            eps: added to the variance.
            running_mean: ``(G,)`` buffer lerped towards the batch mean in place, or ``None``.
            running_var: ``(G,)`` buffer lerped towards the unbiased batch variance, or ``None``.
            factor: the lerp factor (momentum, or ``1 / num_batches_tracked``).
            chunk: the ghost batch size ``b``; ``chunk <= 0`` or ``chunk >= N`` is one batch.
            running_average: with ghost batches, lerp the running statistics towards the mean over
                ghost batches of their means and unbiased variances; by default towards the first
                ghost batch's (what DDP keeps with Lightning's default buffer broadcast).

        Returns:
            The output in ``x``'s dtype and memory format (contiguous for other strides).

        Raises:
            KernelFailure: a kernel failed to compile or launch.
        """
        xp, _ = prepare(x)
        c = x.shape[1]
        weight, bias = _vector(weight, c, "weight"), _vector(bias, c, "bias")
        running_mean = _vector(running_mean, groups, "running_mean", copy=False)  # updated in place
        running_var = _vector(running_var, groups, "running_var", copy=False)
        chunk = int(chunk) if 0 < chunk < x.shape[0] else 0
        running_average = bool(running_average)
        if needs_grad(xp, weight, bias):
            return _TritonFunction.apply(xp, weight, bias, self, groups, eps, running_mean, running_var,
                                         factor, chunk, running_average)
        return self.forward_train(xp, weight, bias, groups, eps, running_mean, running_var, factor,
                                  chunk, running_average)[0]

    def eval(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
             mean: Tensor, var: Tensor) -> Tensor:
        """Eval-mode BGN with given per-group statistics; not differentiable (the caller checks).

        Raises:
            KernelFailure: the kernel failed to compile or launch.
        """
        xp, channels_last = prepare(x)
        c = x.shape[1]
        geo = _Geometry(xp, groups, channels_last)
        weight, bias = _vector(weight, c, "weight"), _vector(bias, c, "bias")
        mean, var = _vector(mean, groups, "running_mean"), _vector(var, groups, "running_var")
        if xp.numel() == 0:
            return torch.empty_like(xp)
        try:
            return self._affine(geo, xp, None, mean, var, mean, weight, bias, eps, 1)
        except Exception as err:
            raise KernelFailure(f"{type(err).__name__}: {err}", running_updated=False) from err


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


class _TritonFunction(torch.autograd.Function):
    """Training-mode BGN on the Triton kernels, with the closed-form backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        kernels: TritonKernels,
        groups: int,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        factor: float,
        chunk: int,
        running_average: bool,
    ) -> Tensor:
        y, stats = kernels.forward_train(x, weight, bias, groups, eps, running_mean, running_var, factor,
                                         chunk, running_average)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.kernels, ctx.num_groups, ctx.eps, ctx.chunk = kernels, groups, eps, chunk
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            dx, dw, db = _ghost_composite_backward(ctx, x, weight, bias, dy)
        else:
            dy = dy.to(x.dtype).contiguous(memory_format=memory_format(x))
            dtypes = (x.dtype if weight is None else weight.dtype, x.dtype if bias is None else bias.dtype)
            try:
                dx, dw, db = ctx.kernels.backward(x, weight, stats, dy, ctx.num_groups, needs, dtypes,
                                                  chunk=ctx.chunk)
            except KernelFailure as err:
                disable(err)
                with torch.no_grad():
                    dx, dw, db = _ghost_composite_backward(ctx, x, weight, bias, dy)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                None, None, None, None, None, None, None, None)


def _ghost_composite_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The composite backward (differentiable), per ghost batch when ``ctx.chunk`` splits the batch.

    The whole ghost batches are one composite call on ``(N // b, b, ...)`` seen as a batch of
    ``b``-sample batches (groups of ``b * L`` values); a smaller last one is a second call.
    """
    chunk = ctx.chunk
    if not chunk:
        return _composite_backward(ctx, x, weight, bias, dy)
    needs = ctx.needs_input_grad[:3]
    inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need]
    n, full = x.shape[0], x.shape[0] // chunk * chunk
    with torch.enable_grad():
        parts = [_ghost_composite(x[:full], chunk, ctx.num_groups, weight, bias, ctx.eps)]
        if full < n:
            parts.append(_ghost_composite(x[full:], n - full, ctx.num_groups, weight, bias, ctx.eps))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    dx, dw, db = (next(grads) if need else None for need in needs)
    return dx, dw, db


def _ghost_composite(x: Tensor, chunk: int, groups: int, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> Tensor:
    """Differentiable BGN of ``x`` (``N`` a multiple of ``chunk``) per ghost batch of ``chunk`` samples."""
    n = x.shape[0]
    xg = x.reshape(n // chunk, chunk, groups, -1)
    acc = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()
    var, mean = torch.var_mean(acc, dim=(1, 3), correction=0, keepdim=True)
    y = ((acc - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)


# -- availability and dispatch -------------------------------------------------------------------


def _load() -> tuple[TritonKernels | None, str]:
    if switched_off(ENV_SWITCH):
        return None, f"{ENV_SWITCH}=0 switched the Triton kernels off"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU for the Triton kernels"
    try:
        return TritonKernels(), "CUDA input: the fused Triton kernels"
    except ImportError:  # torch without Triton (CPU or ROCm builds without it): the native path
        return None, "Triton is not installed"


_loader: LoadOnce[TritonKernels] = LoadOnce(_load)


def cuda_kernels(x: Tensor, *tensors: Tensor | None) -> tuple[TritonKernels | None, str]:
    """The Triton kernels if they serve ``x`` (and the parameters and buffers in ``tensors``), and why.

    They serve float32, float16 and bfloat16 CUDA inputs whose other tensors are on the same
    device, where Triton and a GPU are available, ``BGN_LIGHTNING_CUDA_KERNELS`` is not ``0`` and
    no kernel failed to compile earlier in this process. Otherwise the kernels are ``None`` and the
    reason says which of these failed.
    """
    if not x.is_cuda:
        return None, f"no fused kernels for {x.device.type} tensors"
    if x.dtype not in SUPPORTED_DTYPES:
        return None, f"{x.dtype} input: the Triton kernels serve float32, float16 and bfloat16"
    if any(t is not None and t.device != x.device for t in tensors):
        # the native path raises torch's device-mismatch error
        return None, "a parameter or buffer is not on the input's device"
    return _loader.get(), _loader.reason


def cuda_kernels_available() -> bool:
    """Whether BGN on CUDA runs on the fused Triton kernels.

    ``False`` means the native-op path (same results, more kernel launches): no GPU, Triton is not
    installed, ``BGN_LIGHTNING_CUDA_KERNELS=0``, or a kernel failed to compile in this process.
    """
    return _loader.get() is not None


def disable(err: KernelFailure) -> None:
    """Switch the kernels off for this process after a failure, warning once."""
    previous = _loader.set(None, f"{_FAILED} ({err})")
    if not previous.startswith(_FAILED):
        warnings.warn(
            f"bgn_lightning: a BGN Triton kernel failed to compile or run ({err}); using the native-op "
            f"path on CUDA from now on. Set {ENV_SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
