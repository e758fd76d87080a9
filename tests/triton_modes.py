"""How the Triton kernel tests run: compiled on CUDA tensors where a GPU is present, else in
Triton's interpreter on CPU tensors in a child process.

Triton reads ``TRITON_INTERPRET`` when it is imported, which a test process did long ago (Lightning
imports it), so each Triton test module has a ``test_interpreter_suite`` that runs the module
again in a child process with ``TRITON_INTERPRET=1`` (:func:`run_in_interpreter`); there
:data:`INTERPRET` is true and the :data:`kernel_test` tests run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
"""Where the kernel tests put their tensors: CUDA, or the CPU for the interpreter."""

kernel_test = pytest.mark.skipif(
    not (HAS_TRITON and (INTERPRET or ON_GPU)),
    reason="no GPU: runs in Triton's interpreter in a child process (test_interpreter_suite)",
)
"""Marks a test that runs the kernels: on a GPU, or in the interpreter's child process."""

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
"""The input dtypes the kernels serve, by test id."""
# (y, dx) tolerances against float64 on the same low-precision values: the output's rounding.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1 / 128, "atol": 1e-2},
    torch.float16: {"rtol": 1 / 1024, "atol": 2e-3},
}


def run_in_interpreter(test_file: str) -> None:
    """Run ``test_file``'s tests but ``test_interpreter_suite`` in Triton's interpreter, on CPU
    tensors (a child process), and assert that they pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
            str(Path(test_file).relative_to(ROOT)), "-k", "not test_interpreter_suite"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
