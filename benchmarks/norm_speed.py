"""Speed and memory of ``BatchGroupNorm2d`` against ``nn.BatchNorm2d`` and ``nn.GroupNorm``.

For a fixed suite of shapes and group counts ``G`` in ``{C/16, C/4, C, 4C}`` (4C where the spatial
size allows) this times, in one process and interleaved so that load from other processes hits
every layer alike:

* training forward + backward (input, weight and bias gradients), contiguous and channels-last;
* eval-mode forward (``torch.no_grad``), contiguous and channels-last;

and measures the bytes autograd saves for backward (``saved_tensors_hooks``) and the peak memory
of one training step (profiler allocation events on CPU, the caching allocator's peak on CUDA).
Every timing is the median over rounds of ``k`` calls after warm-up; a round runs every layer
back to back in a rotating order (blocks of ~2 ms), and the BGN / BN ratio is the median of the
per-round ratios. With ``--threads 1`` the clock is the thread's CPU time, which other processes'
load does not inflate the way it inflates wall time (use it on a shared machine).

On CUDA (``--device cuda``) the suite adds ResNet's stage shapes at batch 2, 32 and 128, and every
case also times BGN on the native-op path (``native``: the fused kernels switched off for that
layer) beside the default dispatch (Triton kernels; cuDNN's batch norm for ``G = C`` in float32).

Targets (issue 3 on CPU, issue 13 on CUDA): training BGN / BN <= 1.10 where G <= C and <= 1.30
where G > C; eval <= 1.05; saved bytes <= BN's + O(G + C). Run::

    python benchmarks/norm_speed.py                 # full suite, < 5 min on 2 CPU cores
    python benchmarks/norm_speed.py --quick         # ~30 s subset
    python benchmarks/norm_speed.py --threads 1     # one thread, CPU-time clock (shared machines)
    python benchmarks/norm_speed.py --json out.json --check   # exit 1 if a target is missed
    python benchmarks/norm_speed.py --device cuda --json cuda.json --markdown cuda.md
    python benchmarks/norm_speed.py --norm-batch-sizes 1,2,4,8 --threads 1   # ghost batches (issue 21)

``--norm-batch-sizes`` times ghost batches instead: training forward + backward of BN and BGN
(G = C/4, C, 2C) with ``norm_batch_size = b`` against the same layer without it, at N = 32, 64 and
128 (ResNet-20's stage shapes and a wider one, contiguous and channels-last); target <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import bgn_lightning._backends as backends
from bgn_lightning import BatchGroupNorm2d, GhostBatchNorm2d

SUITE = [(2, 64, 56, 56), (8, 256, 14, 14), (32, 64, 56, 56), (128, 64, 32, 32), (4, 512, 7, 7),
         (64, 128, 28, 28)]
# ResNet-50's stage shapes (C, H, W) at 224 px, at batch 2 (BGN's regime), 32 and 128.
RESNET_STAGES = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
CUDA_SUITE = list(dict.fromkeys(SUITE + [(n, *chw) for n in (2, 32, 128) for chw in RESNET_STAGES]))
QUICK_SUITE = [(8, 256, 14, 14), (4, 512, 7, 7), (2, 64, 56, 56)]
TRAIN_TARGET = {"G<=C": 1.10, "G>C": 1.30}
GHOST_SHAPES = [(n, *chw) for n in (32, 64, 128) for chw in ((16, 32, 32), (64, 8, 8), (128, 16, 16))]
GHOST_TARGET = 1.2
EVAL_TARGET = 1.05


@dataclass
class Row:
    """One measured case: a shape, a group count, a memory format and a mode."""

    shape: tuple[int, int, int, int]
    groups: int
    memory_format: str
    mode: str  # "train" (forward + backward) or "eval" (forward)
    bn_ms: float
    bgn_ms: float
    ratio: float
    target: float
    gn_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    native_ms: float | None = None  # BGN on the native-op path (CUDA)
    native_ratio: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the BGN / BN ratio meets the target."""
        return self.ratio <= self.target


def group_counts(shape: tuple[int, int, int, int]) -> list[int]:
    """The suite's ``G`` values for a shape: C/16, C/4, C and 4C when prod(S) % 4 == 0."""
    c, spatial = shape[1], shape[2] * shape[3]
    counts = [c // 16, c // 4, c] + ([4 * c] if spatial % 4 == 0 else [])
    return [g for g in dict.fromkeys(counts) if g >= 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, block_s: float, budget_s: float, device: torch.device,
    clock: Callable[[], float],
) -> dict[str, list[float]]:
    """Per-round seconds per call of every function, run back to back in a rotating order.

    Blocks are short (``block_s``) and alternate between the functions, so that load from other
    processes hits all of them alike; rounds go on until ``rounds`` are done and ``budget_s`` is
    spent, whichever comes last, but stop at ``4 * rounds``.
    """
    for fn in fns.values():  # warm-up, and a first estimate of the cost of one call
        fn()
    _sync(device)
    estimate = {}
    for name, fn in fns.items():
        t0 = clock()
        fn()
        _sync(device)
        estimate[name] = clock() - t0
    calls = max(1, round(block_s / max(max(estimate.values()), 1e-6)))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < budget_s and r < 4 * rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            _sync(device)
            t0 = clock()
            for _ in range(calls):
                fn()
            _sync(device)
            times[name].append((clock() - t0) / calls)
        r += 1
    return times


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _train_step(module: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], Any]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> Any:
        return torch.autograd.grad(module(x), [x, *params], dy)

    return step


def _eval_step(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    def step() -> Any:
        with torch.no_grad():
            return module(x)

    return step


def saved_bytes(module: nn.Module, x: Tensor) -> tuple[int, int]:
    """Bytes and count of the distinct tensors autograd saves for backward in one forward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values()), len(seen)


def peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak memory allocated during one call of ``step`` beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


class NativeBatchGroupNorm2d(BatchGroupNorm2d):
    """``BatchGroupNorm2d`` forced onto the native-op path (the fused kernels off for this layer)."""

    def forward(self, x: Tensor) -> Tensor:
        """The layer's forward with the fused-kernel dispatch returning ``None``."""
        dispatch = backends.fused_kernels
        backends.fused_kernels = lambda x, **kw: (None, "benchmark: the native path")
        try:
            return super().forward(x)
        finally:
            backends.fused_kernels = dispatch


def _layers(shape: tuple[int, ...], groups: int, device: torch.device) -> dict[str, nn.Module]:
    c = shape[1]
    layers: dict[str, nn.Module] = {"bn": nn.BatchNorm2d(c), "bgn": BatchGroupNorm2d(c, num_groups=groups)}
    if groups <= c:
        layers["gn"] = nn.GroupNorm(groups, c)
    if device.type == "cuda":
        layers["native"] = NativeBatchGroupNorm2d(c, num_groups=groups)
    return {name: layer.to(device) for name, layer in layers.items()}


def measure_shape(
    shape: tuple[int, int, int, int], args: argparse.Namespace, device: torch.device
) -> list[Row]:
    """All rows of one shape: every G, both memory formats, train and eval, plus memory."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)  # parameters stay float32, as under autocast
    base = (torch.randn(shape, generator=gen) * 2 + 1).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    rows = []
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for groups in group_counts(shape):
        kind = "G<=C" if groups <= shape[1] else "G>C"
        for fmt_name, fmt in formats.items():
            x = base.contiguous(memory_format=fmt).requires_grad_()
            dy = grad.contiguous(memory_format=fmt)
            layers = _layers(shape, groups, device)
            if fmt_name == "channels_last":
                layers.pop("gn", None)
            train = {name: _train_step(layer.train(), x, dy) for name, layer in layers.items()}
            times = interleaved_times(train, args.rounds, args.block, args.budget, device, args.clock_fn)
            extra: dict[str, Any] = {}
            if fmt_name == "contiguous":
                bn_saved, bn_count = saved_bytes(layers["bn"], x)
                bgn_saved, bgn_count = saved_bytes(layers["bgn"], x)
                extra = {
                    "activation_bytes": x.numel() * x.element_size(),
                    "saved_bytes_bn": bn_saved, "saved_count_bn": bn_count,
                    "saved_bytes_bgn": bgn_saved, "saved_count_bgn": bgn_count,
                    "saved_extra_bytes": bgn_saved - bn_saved,
                    "saved_extra_budget": 8 * (groups + shape[1]) * x.element_size(),
                    "peak_bytes_bn": peak_bytes(train["bn"], device),
                    "peak_bytes_bgn": peak_bytes(train["bgn"], device),
                }
            rows.append(Row(shape, groups, fmt_name, "train", _ms(times["bn"]), _ms(times["bgn"]),
                            _ratio(times, "bgn", "bn"), TRAIN_TARGET[kind],
                            _ms(times["gn"]) if "gn" in times else None, extra, *_native(times)))
            x = x.detach()
            evals = {name: _eval_step(layers[name].eval(), x) for name in ("bn", "bgn", "native")
                     if name in layers}
            times = interleaved_times(evals, args.eval_rounds, args.block, args.budget / 2, device,
                                      args.clock_fn)
            rows.append(Row(shape, groups, fmt_name, "eval", _ms(times["bn"]), _ms(times["bgn"]),
                            _ratio(times, "bgn", "bn"), EVAL_TARGET, None, {}, *_native(times)))
    return rows


def _native(times: dict[str, list[float]]) -> tuple[float | None, float | None]:
    """Native-path ms and its ratio to BN, where it was timed."""
    if "native" not in times:
        return None, None
    return _ms(times["native"]), _ratio(times, "native", "bn")


GHOST_NORMS = {"bn": None, "bgn G=C/4": 4, "bgn G=C": 1, "bgn G=2C": 0.5}
"""The layers timed with ghost batches: torch's BN (ghost: GhostBatchNorm2d) and BGN at G = C/4, C, 2C."""


def _ghost_layers(norm: str, c: int, b: int | None) -> nn.Module:
    """A :data:`GHOST_NORMS` layer with norm batch size ``b`` (``None``: the plain layer)."""
    if norm == "bn":
        return nn.BatchNorm2d(c) if b is None else GhostBatchNorm2d(c, norm_batch_size=b)
    return BatchGroupNorm2d(c, int(c / GHOST_NORMS[norm]), norm_batch_size=b)


def measure_ghost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Ghost batches: forward + backward with ``norm_batch_size = b`` over the same layer without."""
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for shape in args.ghost_shapes:
        base = (torch.randn(shape, generator=gen) * 2 + 1).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        for fmt_name, fmt in formats.items():
            x = base.contiguous(memory_format=fmt).requires_grad_()
            dy = grad.contiguous(memory_format=fmt)
            for norm in GHOST_NORMS:
                steps = {f"b={b}": _train_step(_ghost_layers(norm, shape[1], b).to(device).train(), x, dy)
                         for b in [None, *args.norm_batch_sizes]}
                times = interleaved_times(steps, args.rounds, args.block, args.budget, device, args.clock_fn)
                for b in args.norm_batch_sizes:
                    ratio = _ratio(times, f"b={b}", "b=None")
                    rows.append({"shape": shape, "memory_format": fmt_name, "norm": norm, "b": b,
                                 "plain_ms": _ms(times["b=None"]), "ghost_ms": _ms(times[f"b={b}"]),
                                 "ratio": ratio, "ok": ratio <= GHOST_TARGET})
        print(f"measured {shape}", file=sys.stderr, flush=True)
    return rows


def format_ghost(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (shape, format, norm), the ghost / plain ratio per b."""
    bs = sorted({r["b"] for r in rows})
    lines = ["| shape | format | norm | plain ms | " + " | ".join(f"b={b}" for b in bs) + " |",
             "|---|---|---|---:|" + "---:|" * len(bs)]
    keys = list(dict.fromkeys((tuple(r["shape"]), r["memory_format"], r["norm"]) for r in rows))
    for key in keys:
        group = {r["b"]: r for r in rows if (tuple(r["shape"]), r["memory_format"], r["norm"]) == key}
        first = next(iter(group.values()))
        cells = [f"{group[b]['ratio']:.2f}" + ("" if group[b]["ok"] else " !") for b in bs]
        lines.append(f"| {'x'.join(map(str, key[0]))} | {key[1]} | {key[2]} | {first['plain_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_ok(row: Row) -> bool:
    """Saved-for-backward bytes within BatchNorm's plus O(G + C)."""
    return row.extra["saved_extra_bytes"] <= row.extra["saved_extra_budget"]


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table of every row."""
    head = (f"{'shape':>16} {'G':>5} {'format':>13} {'mode':>5} {'BN ms':>8} {'GN ms':>8} "
            f"{'BGN ms':>8} {'BGN/BN':>7} {'target':>6} {'ok':>3} {'native/BN':>9} {'saved BN':>9} "
            f"{'saved BGN':>9} {'peak BN':>9} {'peak BGN':>9}")
    lines = [head, "-" * len(head)]
    mib = 2.0**20
    for r in rows:
        gn = f"{r.gn_ms:8.3f}" if r.gn_ms is not None else f"{'-':>8}"
        mem = ""
        if r.extra:
            e = r.extra
            mem = (f" {e['saved_bytes_bn'] / mib:8.2f}M {e['saved_bytes_bgn'] / mib:8.2f}M"
                   f" {e['peak_bytes_bn'] / mib:8.2f}M {e['peak_bytes_bgn'] / mib:8.2f}M")
        ok = "yes" if r.ok and (not r.extra or memory_ok(r)) else "NO"
        native = f"{r.native_ratio:9.2f}" if r.native_ratio is not None else f"{'-':>9}"
        lines.append(f"{'x'.join(map(str, r.shape)):>16} {r.groups:>5} {r.memory_format:>13} {r.mode:>5} "
                     f"{r.bn_ms:8.3f} {gn} {r.bgn_ms:8.3f} {r.ratio:7.2f} {r.target:6.2f} {ok:>3} "
                     f"{native}{mem}")
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """One markdown row per (shape, G): the four BGN / BN ratios and the memory figures.

    Where the native path was timed too (CUDA), two more columns: its training ratio to BN
    (contiguous / channels-last) and GroupNorm's (contiguous).
    """
    cases: dict[tuple[tuple[int, ...], int], dict[str, Row]] = {}
    for r in rows:
        cases.setdefault((r.shape, r.groups), {})[f"{r.mode} {r.memory_format}"] = r
    native = any(r.native_ratio is not None for r in rows)
    lines = [
        "| shape (N,C,H,W) | G | BN train ms | BGN/BN train | train, channels-last | BN eval ms "
        "| BGN/BN eval | eval, channels-last | saved for backward, BGN - BN | peak, BGN / BN |"
        + (" native/BN train | GN/BN train |" if native else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if native else ""),
    ]

    def ratio(row: Row) -> str:
        return f"{row.ratio:.2f}" + ("" if row.ok else " ✗")

    for (shape, groups), by in cases.items():
        train, eval_ = by["train contiguous"], by["eval contiguous"]
        e = train.extra
        lines.append(
            f"| {'x'.join(map(str, shape))} | {groups}{' (=C)' if groups == shape[1] else ''} "
            f"| {train.bn_ms:.2f} | {ratio(train)} | {ratio(by['train channels_last'])} "
            f"| {eval_.bn_ms:.3f} | {ratio(eval_)} | {ratio(by['eval channels_last'])} "
            f"| {e['saved_extra_bytes']:+d} B | {e['peak_bytes_bgn'] / e['peak_bytes_bn']:.2f} |"
            + (f" {train.native_ratio:.2f} / {by['train channels_last'].native_ratio:.2f} | "
               f"{'-' if train.gn_ms is None else f'{train.gn_ms / train.bn_ms:.2f}'} |" if native else "")
        )
    return "\n".join(lines)


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, device, threads and the machine's load."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "min_rounds": args.rounds,
        "min_eval_rounds": args.eval_rounds,
        "block_s": args.block,
        "budget_s": args.budget,
        "dtype": args.dtype,
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1_5_15"] = os.getloadavg()
    if device.type == "cuda":
        from bgn_lightning._triton import cuda_kernels_available

        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["triton_kernels"] = cuda_kernels_available()
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes, fewer rounds (~30 s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 times CPU time, see --clock")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: this thread's CPU time, robust to other processes' load but only "
                             "complete with one thread on CPU; auto: cpu with --threads 1, else wall")
    parser.add_argument("--rounds", type=int, default=None, help="minimum interleaved rounds (train)")
    parser.add_argument("--eval-rounds", type=int, default=None, help="minimum interleaved rounds (eval)")
    parser.add_argument("--block", type=float, default=0.002, help="seconds per timed block")
    parser.add_argument("--budget", type=float, default=None, help="seconds of rounds per train case")
    parser.add_argument("--shapes", default=None, help="N,C,H,W;N,C,H,W;... instead of the suite")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="input dtype; the layers keep float32 parameters, as under autocast "
                             "(the targets are stated for float32)")
    parser.add_argument("--json", default="norm_speed.json", help="where to write the JSON results")
    parser.add_argument("--markdown", default=None, help="also write a markdown summary table here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a row misses its target")
    parser.add_argument("--norm-batch-sizes", default=None,
                        help="time ghost batches at these b (e.g. 1,2,4,8) instead of the BGN/BN suite")
    args = parser.parse_args(argv)
    args.norm_batch_sizes = [int(b) for b in (args.norm_batch_sizes or "").split(",") if b]
    args.ghost_shapes = GHOST_SHAPES[::4] if args.quick else GHOST_SHAPES
    args.rounds = args.rounds or (7 if args.quick else 11)
    args.eval_rounds = args.eval_rounds or (11 if args.quick else 21)
    args.budget = args.budget if args.budget is not None else (0.25 if args.quick else 0.8)
    if args.shapes:
        args.suite = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    else:
        args.suite = QUICK_SUITE if args.quick else CUDA_SUITE if args.device.startswith("cuda") else SUITE
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the table and the summary, write the JSON; the exit status for --check."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(f"--clock cpu needs --device cpu and --threads 1, got {device} with "
                         f"{torch.get_num_threads()} threads")
    args.clock_fn = time.thread_time if args.clock == "cpu" else time.perf_counter
    start = time.perf_counter()
    if args.norm_batch_sizes:
        return _main_ghost(args, device, start)
    rows: list[Row] = []
    for shape in args.suite:
        rows.extend(measure_shape(shape, args, device))
        print(f"measured {shape} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    table = format_table(rows)
    worst = {
        key: max((r.ratio for r in rows if sel(r)), default=float("nan"))
        for key, sel in {
            "train G<=C": lambda r: r.mode == "train" and r.groups <= r.shape[1],
            "train G>C": lambda r: r.mode == "train" and r.groups > r.shape[1],
            "eval": lambda r: r.mode == "eval",
        }.items()
    }
    failures = [r for r in rows if not r.ok or (r.extra and not memory_ok(r))]
    result = {
        "environment": environment(args, device),
        "seconds": time.perf_counter() - start,
        "worst_ratio": worst,
        "all_within_target": not failures,
        "rows": [asdict(r) | {"ok": r.ok} for r in rows],
    }
    print(table)
    print("worst BGN/BN: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    print(f"{len(rows) - len(failures)}/{len(rows)} rows within target; "
          f"{result['seconds']:.0f} s; environment {json.dumps(result['environment'])}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n")
        print(f"markdown table written to {args.markdown}")
    return 1 if args.check and failures else 0


def _main_ghost(args: argparse.Namespace, device: torch.device, start: float) -> int:
    """``--norm-batch-sizes``: time ghost batches, print and write the table; the --check status."""
    rows = measure_ghost(args, device)
    table = format_ghost(rows)
    worst = max(r["ratio"] for r in rows)
    result = {"environment": environment(args, device), "seconds": time.perf_counter() - start,
              "worst_ratio": worst, "target": GHOST_TARGET, "rows": rows}
    print(table)
    print(f"worst ghost/plain {worst:.2f} (target {GHOST_TARGET}); "
          f"{sum(r['ok'] for r in rows)}/{len(rows)} within; {result['seconds']:.0f} s")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 1 if args.check and worst > GHOST_TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
