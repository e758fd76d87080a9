"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _image_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded images (``tasks.common.image_cache``) are cached in the session's temporary folder."""
    monkeypatch.setenv("BGN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks: a second intra-op thread only adds contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full embedded glyph set, rendered once per test session."""
    from tasks.fsl.datasets import prepare_fewshot_data

    root = tmp_path_factory.getbasetemp() / "fsl-data"
    prepare_fewshot_data("glyphs", root)
    return root


@pytest.fixture(params=["kernels", "native"])
def bgn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on BGN's C++ CPU kernels and again on the native-op path (CUDA's, the fallback's)."""
    import bgn_lightning._backends as backends
    from bgn_lightning._ext import cpu_kernels

    if request.param == "kernels" and cpu_kernels() is None:
        pytest.skip("the BGN C++ CPU kernels could not be built here")
    if request.param == "native":
        monkeypatch.setattr(backends, "cpu_kernels", lambda: None)
    return request.param
