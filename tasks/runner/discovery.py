"""Task discovery: the task suites installed under ``tasks/``, and loading one's contract.

A task is a package ``tasks.<name>`` exporting ``TASK`` (:class:`~tasks.common.contract.Task`).
Listing them imports no task (``bgn-task --help`` stays cheap); :func:`load_task` imports one.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from tasks.common.validate import check_choice

if TYPE_CHECKING:
    from tasks.common.contract import Task

__all__ = ["available_tasks", "load_task"]

# Known suites first, in the paper's order; any other package under tasks/ is listed after them.
_TASK_ORDER = ("classification", "fsl", "adversarial", "uda", "nas")
_NOT_TASKS = frozenset({"common", "configs", "runner"})


def available_tasks() -> list[str]:
    """Task suites installed under ``tasks/`` (packages other than ``common``, ``configs``, ``runner``)."""
    import tasks

    found = {m.name for m in pkgutil.iter_modules(tasks.__path__) if m.ispkg and m.name not in _NOT_TASKS}
    return [t for t in _TASK_ORDER if t in found] + sorted(found - set(_TASK_ORDER))


def load_task(name: str) -> Task:
    """Import ``tasks.<name>`` and return its contract, ``TASK``.

    Raises:
        TaskConfigError: for an unknown task (a user error: one line, exit code 2).
        TypeError: for a task package that does not export a :class:`~tasks.common.contract.Task`
            named ``TASK`` (a bug in the task, not a user error).
    """
    from tasks.common.contract import Task

    check_choice("task", name, available_tasks())
    task = getattr(importlib.import_module(f"tasks.{name}"), "TASK", None)
    if not isinstance(task, Task) or task.name != name:
        raise TypeError(f"tasks.{name} must export TASK = Task(name={name!r}, ...) (tasks.common.contract)")
    return task
