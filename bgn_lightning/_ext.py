"""The fused C++ CPU kernels of BGN (``csrc/batch_group_norm_cpu.cpp``), built on first use.

:func:`cpu_kernels` compiles the source with ``torch.utils.cpp_extension.load`` the first time it
is called (about a minute; the result is cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, so later processes load it in milliseconds) and returns the module,
or ``None`` when it cannot be built (no C++ compiler, no ninja) or is switched off with
``BGN_LIGHTNING_CPU_KERNELS=0``. ``None`` means the portable path of native ops in
:mod:`bgn_lightning._autograd`, which gives the same results; a failed build is reported once as a
warning. ``python -c "import bgn_lightning; bgn_lightning.cpu_kernels_available()"`` builds ahead
of time (``make install`` does). The module is the ``"cpp"`` backend of
:mod:`bgn_lightning._backends`, where the dispatch between the backends starts.

The kernels run one pass over the input for the statistics and one to normalize (and two in the
backward), like ``nn.BatchNorm2d``, and do every per-group and per-channel step in C++, so small
inputs do not pay Python's per-op overhead. They are compiled for the CPU capability torch
reports (AVX2 / AVX-512); that capability and torch's version are part of the cache key.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ._shared import LoadOnce, switched_off

__all__ = ["ENV_SWITCH", "cpu_kernels", "cpu_kernels_available"]

ENV_SWITCH = "BGN_LIGHTNING_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("csrc") / "batch_group_norm_cpu.cpp"
_VERSION = 1  # bump when the C++ interface changes
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_log = logging.getLogger(__name__)


def _build() -> ModuleType | None:
    capability = torch.backends.cpu.get_cpu_capability()
    # GCC's OpenMP is the runtime torch's Linux wheels ship (at::parallel_for runs the kernels on
    # torch's threads); elsewhere (Apple clang has no -fopenmp) the kernels build single-threaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # torch's cache is keyed by the sources, not by torch's version: the name carries it, so an
    # upgraded torch builds afresh instead of loading a binary made for the old ABI.
    torch_version = re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
    isa = next((name for name in _FLAGS if capability.startswith(name)), "DEFAULT")
    # torch's cpp_extension logs a CUDA_HOME notice at import on CPU-only machines: not ours to show.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        _log.info("bgn_lightning: loading the BGN CPU kernels (built once, about a minute)")
        return load(
            name=f"bgn_lightning_cpu_v{_VERSION}_{isa.lower()}_torch{torch_version}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", *openmp, *_FLAGS.get(isa, [])],
            extra_ldflags=openmp,
            verbose=False,
        )
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
