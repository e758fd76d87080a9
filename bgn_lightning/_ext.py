"""The fused C++ CPU kernels of BGN (``csrc/batch_group_norm_cpu.cpp``), built on first use.

:func:`cpu_kernels` compiles the source with ``torch.utils.cpp_extension.load`` the first time it
is called (about 45 s, announced at WARNING level; the result is cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, in a folder named by
:func:`cache_key`, so later processes of the same environment load it in milliseconds and other
environments keep their own builds) and returns the module,
or ``None`` when it cannot be built (no C++ compiler, no ninja) or is switched off with
``BGN_LIGHTNING_CPU_KERNELS=0``. ``None`` means the portable path of native ops in
:mod:`bgn_lightning._autograd`, which gives the same results; a failed build is reported once as a
warning. ``python -c "import bgn_lightning; bgn_lightning.cpu_kernels_available()"`` builds ahead
of time (``make install`` does). The module is the ``"cpp"`` backend of
:mod:`bgn_lightning._backends`, where the dispatch between the backends starts.

The kernels run one pass over the input for the statistics and one to normalize (and two in the
backward), like ``nn.BatchNorm2d``, and do every per-group and per-channel step in C++, so small
inputs do not pay Python's per-op overhead. They are compiled for the CPU capability torch
reports (AVX2 / AVX-512); those flags are part of the cache key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ._shared import LoadOnce, switched_off

__all__ = [
    "ENV_SWITCH",
    "build_directory",
    "cache_key",
    "cpu_kernels",
    "cpu_kernels_available",
    "cpu_kernels_reason",
]

ENV_SWITCH = "BGN_LIGHTNING_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("csrc") / "batch_group_norm_cpu.cpp"
_VERSION = 4  # bump when the C++ interface changes
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_log = logging.getLogger(__name__)


def _flags() -> tuple[str, list[str], list[str]]:
    """``(ISA name, compiler flags, linker flags)`` for this CPU and platform."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = next((name for name in _FLAGS if capability.startswith(name)), "DEFAULT")
    # GCC's OpenMP is the runtime torch's Linux wheels ship (at::parallel_for runs the kernels on
    # torch's threads); elsewhere (Apple clang has no -fopenmp) the kernels build single-threaded.
    # -fno-math-errno lets loops of sqrt vectorize (the kernels never read errno).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return isa, ["-O3", "-fno-math-errno", *openmp, *_FLAGS.get(isa, [])], openmp


def cache_key(source: bytes, cflags: list[str], ldflags: list[str]) -> str:
    """The hash that names a build: everything that makes one binary differ from another.

    The source's content, the flags, the compiler (``$CXX``), torch's build (version, git commit,
    CUDA) and the interpreter's environment (version, ``sys.prefix``, executable): two
    environments (two venvs, a clone and an installed copy) keep a build each instead of evicting
    each other's; two clones of the same source in one environment share one.
    """
    parts = [
        str(_VERSION), hashlib.sha256(source).hexdigest(), *cflags, "|", *ldflags, os.environ.get("CXX", ""),
        torch.__version__, str(torch.version.git_version), str(torch.version.cuda),
        sys.version, sys.prefix, sys.executable, platform.machine(),
    ]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_directory(name: str) -> Path:
    """Where the build named ``name`` lives: ``$TORCH_EXTENSIONS_DIR`` (or torch's default root)/``name``."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def _stable_copy(directory: Path) -> Path:
    """The source, copied into the build directory (rewritten only when it differs).

    ninja rebuilds when the source's path in its build file changes: compiling the copy lets two
    clones with the same source (same key) share one build instead of rebuilding it in turn.
    """
    source, text = directory / _SOURCE.name, _SOURCE.read_bytes()
    if not source.is_file() or source.read_bytes() != text:
        tmp = directory / f".{_SOURCE.name}.{os.getpid()}.tmp"
        tmp.write_bytes(text)
        tmp.replace(source)
    return source


def _build() -> ModuleType | None:
    isa, cflags, ldflags = _flags()
    name = f"bgn_lightning_cpu_{isa.lower()}_{cache_key(_SOURCE.read_bytes(), cflags, ldflags)}"
    # torch's cpp_extension logs a CUDA_HOME notice at import on CPU-only machines: not ours to show.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory(name)
        first = not (directory / f"{name}.so").exists()
        if first:  # at WARNING, Python's default level: a run that pays ~45 s says why
            _log.warning("bgn_lightning: building BGN CPU kernels, once, ~45 s (cached in %s)", directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = _stable_copy(directory)
        start = time.perf_counter()
        module = load(
            name=name,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=False,
        )
        if first:
            _log.warning("bgn_lightning: built the BGN CPU kernels in %.0f s", time.perf_counter() - start)
        return module
    except Exception as err:  # a missing compiler or ninja must not break the layer
        warnings.warn(
            f"bgn_lightning: could not build the BGN CPU kernels ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); using the native-op path, "
            f"which is slower on small inputs. Set {ENV_SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    finally:
        ext_log.setLevel(level)


def _load() -> tuple[ModuleType | None, str]:
    if switched_off(ENV_SWITCH):
        return None, f"{ENV_SWITCH}=0 switched the C++ CPU kernels off"
    module = _build()
    if module is None:
        return None, "the C++ CPU kernels could not be built here (see the warning)"
    return module, "CPU input: the fused C++ kernels"


_loader: LoadOnce[ModuleType] = LoadOnce(_load)


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels module (``train``, ``eval``), or ``None`` where they are unavailable."""
    return _loader.get()


def cpu_kernels_reason() -> str:
    """Why the C++ kernels are (or are not) used, once :func:`cpu_kernels` has loaded them."""
    return _loader.reason


def cpu_kernels_available() -> bool:
    """Whether BGN on CPU runs on the fused C++ kernels (builds them on the first call).

    ``False`` means the native-op path (same results, slower on small inputs): the kernels could
    not be built here, or ``BGN_LIGHTNING_CPU_KERNELS=0`` switched them off.
    """
    return cpu_kernels() is not None
