"""The fused Triton kernels (``bgn_lightning/_triton.py``) against the float64 reference.

Where a GPU is present the kernel tests run compiled, on CUDA tensors. Without one they run in
Triton's interpreter on CPU tensors: Triton reads ``TRITON_INTERPRET`` when it is imported, which
this process did long ago (Lightning imports it), so ``test_interpreter_suite`` runs this module
again in a child process with ``TRITON_INTERPRET=1`` and small shapes. Every layout the CPU kernels
serve (G | C, C | G, groups straddling channels, channels-last 2-D/3-D, other strides), float32 /
float16 / bfloat16 inputs with float32 statistics, running statistics, the layer's routing, a
kernel that fails to compile, and the env switch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import bgn_lightning._backends as backends
import bgn_lightning._triton as triton_kernels
import bgn_lightning.functional as functional
from bgn_lightning import BatchGroupNorm2d
from bgn_lightning._autograd import batch_group_norm_train
from bgn_lightning._shared import LoadOnce
from tests.kernel_cases import LAYOUTS as SHARED_LAYOUTS
from tests.kernel_cases import KernelSpy, assert_same_format, channels_last_format, layout_ids, run_backward
from tests.reference import reference_bgn
from tests.triton_modes import (
    DEVICE,
    DTYPES,
    HAS_TRITON,
    INTERPRET,
    ON_GPU,
    TOLERANCE,
    kernel_test,
    run_in_interpreter,
)

EPS = 1e-5
MOMENTUM = 0.3

gpu_test = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")

# (shape, G, memory): the layouts of the CPU kernel tests, and larger ones.
LAYOUTS = [
    *SHARED_LAYOUTS,
    ((6, 40, 5, 7), 10, "contiguous"),  # several blocks of cells and several partial sums
    ((6, 40, 5, 7), 10, "channels_last"),
    ((2, 4, 8, 12), 2, "contiguous"),  # runs of 96 values: three blocks of 32 per cell and row
]
LAYOUT_IDS = layout_ids(LAYOUTS)


@pytest.fixture(scope="module")
def kernels() -> triton_kernels.TritonKernels:
    return triton_kernels.TritonKernels()


def _make(shape: tuple[int, ...], memory: str, gen: torch.Generator) -> torch.Tensor:
    """A float32 ``shape`` tensor of ``randn * 3 + 2`` laid out as ``memory`` says, on DEVICE."""
    if memory == "sliced":
        x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 3 + 2)[..., ::2]
    elif memory == "transposed":
        swapped = list(shape)
        swapped[1], swapped[-1] = swapped[-1], swapped[1]
        x = (torch.randn(swapped, generator=gen) * 3 + 2).transpose(1, -1)
    else:
        x = torch.randn(shape, generator=gen) * 3 + 2
        if memory == "channels_last":
            x = x.contiguous(memory_format=channels_last_format(len(shape)))
    return x.to(DEVICE)


def _case(shape: tuple[int, ...], groups: int, memory: str, dtype: torch.dtype, affine: bool):
    """Input (in ``dtype``, laid out as ``memory``), output gradient, float32 parameters and buffers."""
    gen = torch.Generator().manual_seed(sum(shape) + 7 * groups)
    x = _make(shape, memory, gen).to(dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    c = shape[1]
    w = torch.randn(c, generator=gen).to(DEVICE) if affine else None
    b = torch.randn(c, generator=gen).to(DEVICE) if affine else None
    rm = torch.randn(groups, generator=gen).to(DEVICE)
    rv = (torch.rand(groups, generator=gen) + 0.5).to(DEVICE)
    return x, dy, w, b, rm, rv


def _reference(x, dy, w, b, groups):
    """Float64 reference ``(y, dx, dw, db)`` on the same (possibly low-precision) values."""
    def to64(t):
        return None if t is None else t.detach().double().cpu()

    return run_backward(lambda x, w, b: reference_bgn(x, groups, w, b, EPS)[0],
                        to64(x), to64(dy), to64(w), to64(b))


def _expected_running(x, groups, rm0, rv0, momentum):
    _, mean, var = reference_bgn(x.double().cpu(), groups, None, None, EPS)
    count = x.numel() // groups
    return ((1 - momentum) * rm0.double().cpu() + momentum * mean,
            (1 - momentum) * rv0.double().cpu() + momentum * var * count / (count - 1))


def _reference_eval(x, groups, mean, var, weight, bias):
    n, c = x.shape[:2]
    xg = x.double().cpu().reshape(n, groups, -1)
    y = ((xg - mean.double().cpu()[:, None]) / torch.sqrt(var.double().cpu()[:, None] + EPS)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().cpu().view(shape)
    if bias is not None:
        y = y + bias.double().cpu().view(shape)
    return y


# -- the kernels against the float64 reference ----------------------------------------------------


@kernel_test
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_train_matches_reference(kernels, shape, groups, memory, dtype, affine) -> None:
    x, dy, w, b, rm0, rv0 = _case(shape, groups, memory, dtype, affine)
    rm, rv = rm0.clone(), rv0.clone()
    versions = rm._version, rv._version
    got = run_backward(lambda x, w, b: kernels.train(x, w, b, groups, EPS, rm, rv, MOMENTUM), x, dy, w, b)
    want = _reference(x, dy, w, b, groups)
    y, dx, dw, db = got
    assert y.dtype == dtype and dx.dtype == dtype and y.device == x.device
    assert_same_format(y, x)
    if memory == "channels_last":
        assert_same_format(dx, x)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double().cpu(), want[0], **tol)
    torch.testing.assert_close(dx.double().cpu(), want[1], rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    if affine:  # float32 gradients of float32 parameters, from float32 sums
        assert dw.dtype == db.dtype == torch.float32
        torch.testing.assert_close(dw.double().cpu(), want[2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db.double().cpu(), want[3], rtol=1e-4, atol=1e-4)
    exp_m, exp_v = _expected_running(x, groups, rm0, rv0, MOMENTUM)
    assert rm.dtype == rv.dtype == torch.float32
    assert rm._version > versions[0] and rv._version > versions[1]
    torch.testing.assert_close(rm.double().cpu(), exp_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double().cpu(), exp_v, rtol=1e-5, atol=1e-5)


@kernel_test
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("shape", "groups", "memory"), LAYOUTS, ids=LAYOUT_IDS)
def test_eval_matches_reference(kernels, shape, groups, memory, dtype) -> None:
    x, _, w, b, rm, rv = _case(shape, groups, memory, dtype, True)
    versions = rm._version, rv._version
    y = kernels.eval(x, w, b, groups, EPS, rm, rv)
    assert y.dtype == dtype and not y.requires_grad
    assert_same_format(y, x)
    torch.testing.assert_close(y.double().cpu(), _reference_eval(x, groups, rm, rv, w, b), **TOLERANCE[dtype])
    assert (rm._version, rv._version) == versions


@kernel_test
@pytest.mark.parametrize(("groups", "memory"),
                         [(4, "contiguous"), (4, "channels_last"), (32, "channels_last"), (6, "contiguous")])
def test_large_mean_is_stable(kernels, groups: int, memory: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + torch.randn(8, 8, 6, 6, generator=gen)).to(DEVICE)
    if memory == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)
    rm, rv = torch.zeros(groups, device=DEVICE), torch.ones(groups, device=DEVICE)
    y, dx, _, _ = run_backward(lambda x, w, b: kernels.train(x, None, None, groups, EPS, rm, rv, 1.0),
                               x, dy, None, None)
    want = _reference(x, dy, None, None, groups)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    # float32 resolves 1e4 + randn to ~1e-3
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(dx.double().cpu(), want[1], rtol=0, atol=2e-3)
    exp_m, exp_v = _expected_running(x, groups, torch.zeros(groups), torch.ones(groups), 1.0)
    torch.testing.assert_close(rm.double().cpu(), exp_m, rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double().cpu(), exp_v, rtol=1e-4, atol=0)


@kernel_test
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_double_backward_matches_reference(kernels, memory: str) -> None:
    """create_graph=True differentiates the composite graph: second-order gradients are right."""
    x, dy, w, b, _, _ = _case((3, 6, 4, 4), 4, memory, torch.float32, True)
    inputs = [t.requires_grad_() for t in (x.clone(), w.clone(), b.clone())]
    y = kernels.train(*inputs, 4, EPS, None, None, 0.0)
    grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
    # db = sum(dy) does not depend on the inputs: second order for x and w
    second = torch.autograd.grad(sum((g * g).sum() for g in grads[:2]), inputs[:2])
    ref = [t.detach().double().cpu().requires_grad_() for t in inputs]
    y64 = reference_bgn(ref[0], 4, ref[1], ref[2], EPS)[0]
    grads64 = torch.autograd.grad(y64, ref, dy.double().cpu(), create_graph=True)
    second64 = torch.autograd.grad(sum((g * g).sum() for g in grads64[:2]), ref[:2])
    for got, want in zip([*grads, *second], [*grads64, *second64], strict=True):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@kernel_test
def test_partial_affine_frozen_input_and_in_place_op_after(kernels) -> None:
    x, dy, w, _, _, _ = _case((3, 6, 4, 4), 4, "channels_last", torch.float32, True)
    w = w.requires_grad_()
    y = kernels.train(x, w, None, 4, EPS, None, None, 0.0)  # x takes no gradient, no bias
    y_ref = reference_bgn(x.double().cpu(), 4, w.detach().double().cpu().requires_grad_(), None, EPS)[0]
    torch.testing.assert_close(y.detach().double().cpu(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    dw = torch.autograd.grad(y.relu_(), w, dy)[0]
    w64 = w.detach().double().cpu().requires_grad_()
    dw64 = torch.autograd.grad(reference_bgn(x.double().cpu(), 4, w64, None, EPS)[0].relu(), w64,
                               dy.double().cpu())[0]
    torch.testing.assert_close(dw.double().cpu(), dw64, rtol=1e-4, atol=1e-4)


@kernel_test
def test_low_precision_buffers_and_parameters(kernels) -> None:
    """A model cast to bfloat16: parameters, buffers and gradients all in bfloat16."""
    x, dy, w, b, rm, rv = _case((4, 8, 4, 4), 16, "channels_last", torch.bfloat16, True)
    w, b, rm, rv = w.bfloat16(), b.bfloat16(), rm.bfloat16(), rv.bfloat16()
    rm0, rv0 = rm.clone(), rv.clone()
    y, _, dw, db = run_backward(lambda x, w, b: kernels.train(x, w, b, 16, EPS, rm, rv, MOMENTUM),
                                x, dy, w, b)
    assert dw.dtype == db.dtype == rm.dtype == torch.bfloat16
    want = _reference(x, dy, w, b, 16)
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=1 / 64, atol=2e-2)
    torch.testing.assert_close(dw.double().cpu(), want[2], rtol=1 / 64, atol=2e-2)
    exp_m, exp_v = _expected_running(x, 16, rm0, rv0, MOMENTUM)
    torch.testing.assert_close(rm.double().cpu(), exp_m, rtol=1 / 128, atol=1e-2)
    torch.testing.assert_close(rv.double().cpu(), exp_v, rtol=1 / 128, atol=1e-2)


# -- the layer on the kernels ---------------------------------------------------------------------


def _layer_steps(layer: BatchGroupNorm2d, xs, dys, x_eval) -> list[torch.Tensor]:
    out = []
    layer.train()
    for x, dy in zip(xs, dys, strict=True):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        out += [y.detach(), x.grad]
    out += [layer.weight.grad, layer.bias.grad, layer.running_mean.clone(), layer.running_var.clone()]
    layer.eval()
    with torch.no_grad():
        out.append(layer(x_eval))
    return out


@kernel_test
@pytest.mark.parametrize(("groups", "channels_last", "momentum"),
                         [(2, False, 0.1), (16, True, None), (3, True, 0.1)])
def test_layer_on_the_kernels_equals_native_path(kernels, monkeypatch, groups, channels_last,
                                                 momentum) -> None:
    gen = torch.Generator().manual_seed(groups)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (6, 6 if groups == 3 else 8, 4, 4)
    xs = [(torch.randn(shape, generator=gen) * (i + 2) + i).to(DEVICE).contiguous(memory_format=fmt)
          for i in range(2)]
    dys = [torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=fmt) for _ in range(2)]
    x_eval = torch.randn((3, *shape[1:]), generator=gen).to(DEVICE).contiguous(memory_format=fmt)
    base = BatchGroupNorm2d(shape[1], num_groups=groups, momentum=momentum).to(DEVICE)
    with torch.no_grad():
        base.weight.copy_(torch.randn(shape[1], generator=gen))
        base.bias.copy_(torch.randn(shape[1], generator=gen))
    spy = KernelSpy(kernels)
    monkeypatch.setattr(backends, "fused_kernels", lambda x, **kw: (spy, "test"))
    on = _layer_steps(copy.deepcopy(base), xs, dys, x_eval)
    assert spy.calls == {"train": 2, "eval": 1}
    monkeypatch.setattr(backends, "fused_kernels", lambda x, **kw: (None, "test"))
    off = _layer_steps(copy.deepcopy(base), xs, dys, x_eval)
    for a, e in zip(on, off, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    want = reference_bgn(xs[0].cpu(), groups, base.weight.detach().cpu(), base.bias.detach().cpu(), EPS)[0]
    torch.testing.assert_close(on[0].double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert_same_format(on[0], xs[0])


class _Broken:
    """A kernel whose compilation fails (as a missing ptxas or an unsupported GPU would)."""

    def __getitem__(self, grid):
        raise RuntimeError("PTX assembly failed (simulated)")


@kernel_test
@pytest.mark.parametrize("broken", ["cell_sums", "cell_affine"])
def test_a_kernel_that_fails_to_compile_falls_back_with_one_warning(monkeypatch, broken: str) -> None:
    failing = triton_kernels.TritonKernels()
    monkeypatch.setattr(failing.kernels, broken, _Broken())
    monkeypatch.setattr(triton_kernels, "_loader", LoadOnce(lambda: (failing, "test")))
    monkeypatch.setattr(backends, "fused_kernels", lambda x, **kw: (triton_kernels._loader.get(), "test"))
    x = _case((4, 8, 3, 3), 2, "contiguous", torch.float32, True)[0]
    layer = BatchGroupNorm2d(8, num_groups=2, momentum=0.5).to(DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [layer(x) for _ in range(2)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated" in messages[0] and triton_kernels.ENV_SWITCH in messages[0]
    assert not triton_kernels.cuda_kernels_available()
    want = reference_bgn(x.cpu(), 2, layer.weight.detach().cpu(), layer.bias.detach().cpu(), EPS)
    for y in ys:
        torch.testing.assert_close(y.detach().double().cpu(), want[0], rtol=1e-5, atol=1e-5)
    # two steps of momentum 0.5 on the same batch: the statistics were updated exactly twice
    count = x.numel() // 2
    torch.testing.assert_close(layer.running_mean.double().cpu(), 0.75 * want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var.double().cpu(), 0.25 + 0.75 * want[2] * count / (count - 1),
                               rtol=1e-5, atol=1e-5)


@kernel_test
def test_a_backward_kernel_that_fails_falls_back_to_the_composite_gradient(kernels, monkeypatch) -> None:
    failing = triton_kernels.TritonKernels()
    monkeypatch.setattr(triton_kernels, "_loader", LoadOnce(lambda: (failing, "test")))
    x, dy, w, b, _, _ = _case((3, 6, 4, 4), 4, "channels_last", torch.float32, True)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = failing.train(x, w, b, 4, EPS, None, None, 0.0)
    monkeypatch.setattr(failing.kernels, "backward_coefficients", _Broken())
    with pytest.warns(RuntimeWarning, match="simulated"):
        y.backward(dy)
    want = _reference(x, dy, w, b, 4)
    for got, e in zip((x.grad, w.grad, b.grad), want[1:], strict=True):
        torch.testing.assert_close(got.double().cpu(), e, rtol=1e-4, atol=1e-4)


# -- SyncBatchGroupNorm on the kernels (two gloo processes on CPU; NCCL on a GPU runs the same code) ---


class _CountingKernels(triton_kernels.TritonKernels):
    """The kernels, counting the synchronized calls; ``fail_dx`` makes the backward's last pass fail."""

    def __init__(self, fail_dx: bool = False) -> None:
        super().__init__()
        self.fail_dx = fail_dx
        self.calls = {"moments": 0, "normalize": 0, "backward": 0}

    def moments(self, *args):
        self.calls["moments"] += 1
        return super().moments(*args)

    def normalize(self, *args):
        self.calls["normalize"] += 1
        return super().normalize(*args)

    def backward(self, *args):
        self.calls["backward"] += 1
        return super().backward(*args)

    def _affine(self, geo, x, dy, *args):
        if dy is not None and self.fail_dx:
            raise RuntimeError("PTX assembly failed (simulated)")
        return super()._affine(geo, x, dy, *args)


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import bgn_lightning._backends as backends
    from bgn_lightning import BatchGroupNorm, convert_sync_batchgroupnorm
    from tests.test_sync import CASES, _layer, _run_steps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        pick = backends.fused_kernels
        for fail_dx in (False, True):
            kernels = _CountingKernels(fail_dx)
            backends.fused_kernels = lambda x, *, synchronized=False, k=kernels, pick=pick, **kw: (
                (k, "test") if synchronized else pick(x, synchronized=synchronized, **kw))
            names = list(CASES) if not fail_dx else ["channels_last", "groups_straddle_channels_empty_rank"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for name in names:
                    sizes = CASES[name][0]
                    start = sum(sizes[:rank])
                    layer = convert_sync_batchgroupnorm(_layer(name, BatchGroupNorm))
                    results[(name, fail_dx)] = _run_steps(name, layer, slice(start, start + sizes[rank]))
            results[("calls", fail_dx)] = kernels.calls
            results[("warnings", fail_dx)] = [str(w.message) for w in caught]
        dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@kernel_test
def test_sync_batch_group_norm_on_the_kernels_matches_one_process(tmp_path: Path) -> None:
    """Two processes on the kernels (uneven and empty batches, every layout) equal one on the whole batch.

    Also with the backward's last kernel failing after the all-reduce: the native backward takes the
    reduced sums (no second collective) and the results stay right.
    """
    import torch.multiprocessing as mp

    from bgn_lightning import BatchGroupNorm
    from tests.test_sync import CASES, _free_port, _layer, _run_steps

    mp.spawn(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert all(n > 0 for n in rank[("calls", False)].values()), rank[("calls", False)]
        assert not rank[("warnings", False)]
    assert any("simulated" in m for r in ranks for m in r[("warnings", True)])
    close = {"rtol": 1e-5, "atol": 1e-5}
    for (name, fail_dx) in [k for k in ranks[0] if k[0] in CASES]:
        reference = _run_steps(name, _layer(name, BatchGroupNorm), slice(None))
        got = [r[(name, fail_dx)] for r in ranks]
        for step in range(2):
            where = f"{name} (failing dx: {fail_dx}) step {step}"
            for key in ("y", "dx"):
                torch.testing.assert_close(torch.cat([r[f"{key}{step}"] for r in got]),
                                           reference[f"{key}{step}"], **close, msg=f"{where}: {key}")
            for key in ("dw", "db"):
                torch.testing.assert_close(got[0][f"{key}{step}"] + got[1][f"{key}{step}"],
                                           reference[f"{key}{step}"], **close, msg=f"{where}: {key}")
            if CASES[name][4]:
                assert all(r[f"format{step}"] for r in got if r[f"y{step}"].shape[0])
        for r in got:
            torch.testing.assert_close(r["running_mean"], reference["running_mean"], **close)
            torch.testing.assert_close(r["running_var"], reference["running_var"], **close)


# -- availability and dispatch (no kernel runs: these stay in this process) ---------------------------


def test_cpu_inputs_never_reach_the_triton_kernels() -> None:
    x = torch.randn(2, 4, 3, 3)
    assert triton_kernels.cuda_kernels(x)[0] is None
    assert backends.fused_kernels(x, num_groups=2)[0] is backends.cpu_kernels()
    meta = torch.empty(2, 4, 3, 3, device="meta")
    assert backends.fused_kernels(meta, num_groups=2)[0] is None


def test_env_switch_and_missing_gpu_mean_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_kernels, "_loader", LoadOnce(triton_kernels._load))
    monkeypatch.setenv(triton_kernels.ENV_SWITCH, "0")
    assert not triton_kernels.cuda_kernels_available()
    monkeypatch.setattr(triton_kernels, "_loader", LoadOnce(triton_kernels._load))
    monkeypatch.delenv(triton_kernels.ENV_SWITCH)
    assert triton_kernels.cuda_kernels_available() == (torch.cuda.is_available() and HAS_TRITON)


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="the child process itself, or no Triton")
def test_interpreter_suite() -> None:
    """This module's kernel tests in Triton's interpreter, on CPU tensors (a child process)."""
    run_in_interpreter(__file__)


def _compile_for_hopper(fn, signature: dict[str, str], constexprs: dict[str, object]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = triton.compiler.ASTSource(fn, signature=full, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="compiles the JIT kernels: not in the interpreter")
def test_kernels_compile_for_a_gpu_target_without_a_gpu() -> None:
    """Triton's compiler and its bundled ptxas build the kernels for sm_90 (H100 / H200) here.

    The interpreter checks the arithmetic, not what only the compiler rejects (types, layouts,
    float64 on the device); one variant of each kernel catches that on a machine without a GPU.
    """
    try:
        kernels = triton_kernels._define_kernels()
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton has no ahead-of-time compiler API: {err}")
    i32 = dict.fromkeys
    _compile_for_hopper(kernels.cell_sums, {
        "x_ptr": "*bf16", "dy_ptr": "*bf16", "mean_ptr": "*fp32", "part_ptr": "*fp32",
        **i32(["N", "U", "R", "S", "C", "K", "CPG", "L", "D", "SPLIT", "B", "NCH"], "i32")},
        {"CL": True, "BWD": True, "BIG": True, "SWAP": True, "BLOCK_Q": 64, "BLOCK_M": 32})
    _compile_for_hopper(kernels.group_stats, {
        "x_ptr": "*fp16", "part_ptr": "*fp32", "stats_ptr": "*fp32", "rm_ptr": "*bf16", "rv_ptr": "*bf16",
        **i32(["G", "U", "S", "C", "CPG", "L", "D", "SPLIT", "N", "B", "NCH"], "i32"),
        **i32(["count", "eps", "factor"], "fp32")},
        {"CL": False, "UPDATE": True, "AVERAGE": True, "BIG": True, "BLOCK_G": 16, "BLOCK_T": 64})
    for phase in (0, 1):  # per ghost batch; the synchronized group sums
        _compile_for_hopper(kernels.backward_coefficients, {
            "part_ptr": "*fp32", "stats_ptr": "*fp32", "w_ptr": "*bf16", "coef_ptr": "*fp32",
            "dw_ptr": "*bf16", "db_ptr": "*bf16", "count": "fp32",
            **i32(["G", "U", "C", "K", "CPG", "SPLIT", "N", "B", "NCH"], "i32")},
            {"HAS_W": True, "NEED_X": True, "NEED_W": True, "NEED_B": True, "PHASE": phase, "BLOCK_G": 16,
             "BLOCK_T": 64, "BLOCK_C": 16, "BLOCK_K": 64})
    _compile_for_hopper(kernels.cell_affine, {
        "x_ptr": "*fp32", "dy_ptr": "*fp32", "out_ptr": "*fp32", "p0_ptr": "*fp32", "p1_ptr": "*fp32",
        "p2_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
        **i32(["ROWS", "COLS", "U", "S", "R", "K", "CPG", "B"], "i32"), "eps": "fp32"},
        {"CL": True, "SEGMENTED": True, "MODE": 2, "HAS_W": True, "HAS_B": False, "BIG": True,
         "CHUNKED": True, "BLOCK_ROWS": 16, "BLOCK_COLS": 256})


# -- GPU only --------------------------------------------------------------------------------------


@gpu_test
def test_layer_on_cuda_runs_the_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert triton_kernels.cuda_kernels_available()
    spy = KernelSpy(triton_kernels._loader.get())
    monkeypatch.setattr(triton_kernels, "_loader", LoadOnce(lambda: (spy, "test")))
    layer = BatchGroupNorm2d(8, num_groups=2).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda").requires_grad_()
    layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert spy.calls == {"train": 1, "eval": 1}
    # G = C in float32 is BatchNorm: cuDNN's kernel, not ours
    bn_like = BatchGroupNorm2d(8, num_groups=8).cuda()
    bn_like(x)
    assert spy.calls["train"] == 1


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_cuda_dtypes_the_kernels_do_not_serve_take_the_native_path(dtype: torch.dtype) -> None:
    assert triton_kernels.cuda_kernels(torch.ones(2, 4, 3, 3, device="cuda", dtype=dtype))[0] is None
    if dtype == torch.float64:
        x = torch.randn(4, 8, 3, 3, device="cuda", dtype=dtype)
        y = functional.batch_group_norm(x, 2)
        torch.testing.assert_close(y.cpu(), reference_bgn(x.cpu(), 2, None, None, EPS)[0])


@gpu_test
def test_cuda_layer_matches_native_path_at_resnet_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape, groups in [((2, 64, 56, 56), 16), ((8, 256, 14, 14), 1024), ((4, 512, 7, 7), 32)]:
        x = (torch.randn(shape, generator=gen) * 2 + 1).cuda()
        dy = torch.randn(shape, generator=gen).cuda()
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf, dyf = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
            w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
            fused = run_backward(
                lambda x, w, b, g=groups: functional.batch_group_norm(x, g, weight=w, bias=b), xf, dyf, w, b
            )
            native = run_backward(lambda x, w, b, g=groups: batch_group_norm_train(x, g, w, b, EPS)[0],
                                  xf, dyf, w, b)
            for a, e in zip(fused, native, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_rounds_to_nearest_even(kernels, dtype: torch.dtype) -> None:
    """As torch rounds float32 to bfloat16 / float16 (Triton's interpreter truncates bfloat16)."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 8, 5, 5, generator=gen) * 3).cuda()
    w, b = torch.randn(8, generator=gen).cuda(), torch.randn(8, generator=gen).cuda()
    mean, var = torch.randn(4, generator=gen).cuda(), (torch.rand(4, generator=gen) + 0.5).cuda()
    got = kernels.eval(x.to(dtype), w, b, 4, EPS, mean, var)
    want = kernels.eval(x.to(dtype).float(), w, b, 4, EPS, mean, var).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@gpu_test
def test_torch_compile_on_cuda_matches_eager() -> None:
    torch.manual_seed(3)
    layer = BatchGroupNorm2d(8, num_groups=2).cuda()
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer)
    x = (torch.randn(4, 8, 6, 6, device="cuda") * 2 + 1)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x1).square().sum().backward()
    eager(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_var, eager.running_var, rtol=1e-6, atol=1e-6)
