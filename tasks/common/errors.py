"""The project's one error hierarchy: what ``bgn-task`` reports as one line with exit code 2.

Every error a user can cause (a bad flag, config value, dataset path or image file) is a
:class:`UserError`; ``bgn-task`` prints it as ``bgn-task: error: <message>`` and exits with code 2.
Anything else (a ``TypeError``, an ``AttributeError``...) is a bug: its traceback is shown and
the exit code is 1. Tasks raise the subclasses below; the runner catches :class:`UserError`.
This module imports nothing, so tasks, ``tasks.common`` and the runner all import it::

    UserError                               one line, exit code 2
    ├── UsageError                          the command line, a grid or a config file (the runner)
    ├── TaskConfigError (ValueError)        a setting the task cannot use (the validators,
    │   └── BadImageError                   data or model built), an unreadable image file
    └── DatasetNotFoundError (FileNotFoundError)   a dataset missing on disk
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["DatasetNotFoundError", "TaskConfigError", "UsageError", "UserError"]


class UserError(Exception):
    """A mistake in what the user gave: ``bgn-task`` shows its message as one line, exit code 2.

    The message names the offending value and what is accepted.
    """

    exit_code: ClassVar[int] = 2
    """The exit code of ``bgn-task`` for this error."""


class UsageError(UserError):
    """A bad task, flag, grid or config value found by the runner before (or while) building the run.

    Args:
        message: the line, naming the value and what is accepted.
        debug_hint: the error came from inside a class's construction, where a bug looks like a
            bad value: the line then says that ``--debug`` shows the traceback.
    """

    def __init__(self, message: str, debug_hint: bool = False) -> None:
        super().__init__(message)
        self.debug_hint = debug_hint


class TaskConfigError(UserError, ValueError):
    """A setting the task cannot use: a bad init value (:mod:`tasks.common.validate`), or settings
    that only show to be incompatible once the data or model is built (inside ``fit``).

    The message names the values and the fix. A ``ValueError``, so library-style callers can catch
    it as one.
    """


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not on disk; the message says where it was looked for and how to get it."""
