"""The package list for setuptools; every other piece of metadata is in pyproject.toml.

The list is computed, so a new task suite is its package and its config with no packaging edit:
every package under ``bgn_lightning/`` and ``tasks/``, plus ``configs/`` shipped as ``tasks.configs``
(``package-dir`` in pyproject.toml).
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["bgn_lightning", "bgn_lightning.*", "tasks", "tasks.*"])

setup(packages=[*PACKAGES, "tasks.configs"])
