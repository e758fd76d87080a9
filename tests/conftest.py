"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


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
