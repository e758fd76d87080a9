"""Packaging guards: every package ships in a non-editable install, configs are package data."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_ships() -> None:
    # setup.py computes the list, so a new task needs no packaging edit; a folder without an
    # __init__.py (a namespace package) would be left out of a non-editable install.
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["bgn_lightning", "bgn_lightning.*", "tasks", "tasks.*"]))
    on_disk = {
        ".".join(path.relative_to(ROOT).parts)
        for top in ("bgn_lightning", "tasks")
        for path in [ROOT / top, *(ROOT / top).rglob("*")]
        if path.is_dir() and any(path.glob("*.py")) and path.name != "__pycache__"
    }
    missing = on_disk - found
    assert not missing, f"these folders hold Python files but no __init__.py, so they do not ship: {missing}"


def test_configs_ship_as_package_data() -> None:
    config = _pyproject()["tool"]["setuptools"]
    assert config["package-dir"]["tasks.configs"] == "configs"
    assert "*.yaml" in config["package-data"]["tasks.configs"]
    shipped = {p.name for p in importlib.resources.files("tasks.configs").iterdir()}
    on_disk = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert on_disk <= shipped


def test_console_script() -> None:
    assert _pyproject()["project"]["scripts"]["bgn-task"] == "tasks.runner.cli:main"


def test_ruff_is_clean() -> None:
    # The lint gate runs with the tests, so CI (which runs `make test`) keeps the tree ruff-clean.
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    done = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_kernel_source_is_package_data() -> None:
    # bgn_lightning._ext compiles csrc/*.cpp at run time: a non-editable install must ship it.
    data = _pyproject()["tool"]["setuptools"]["package-data"]["bgn_lightning"]
    assert "csrc/*.cpp" in data and (ROOT / "bgn_lightning" / "csrc" / "batch_group_norm_cpu.cpp").is_file()
