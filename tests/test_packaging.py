"""Packaging guards: every package ships in a non-editable install, configs are package data."""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_listed_in_pyproject() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("bgn_lightning", "tasks")
        for init in (ROOT / top).rglob("__init__.py")
    }
    missing = on_disk - listed
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_configs_ship_as_package_data() -> None:
    config = _pyproject()["tool"]["setuptools"]
    assert config["package-dir"]["tasks.configs"] == "configs"
    assert "*.yaml" in config["package-data"]["tasks.configs"]
    shipped = {p.name for p in importlib.resources.files("tasks.configs").iterdir()}
    on_disk = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert on_disk <= shipped


def test_console_script() -> None:
    assert _pyproject()["project"]["scripts"]["bgn-task"] == "tasks.cli:main"
