"""The runner's one user-facing error type."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A bad task, norm, dataset, path or config value: one line on stderr, exit code 2.

    Args:
        message: the line, naming the value and what is accepted.
        debug_hint: the error came from inside a class's construction, where a bug looks like a
            bad value: the line then says that ``--debug`` shows the traceback.
    """

    def __init__(self, message: str, debug_hint: bool = False) -> None:
        super().__init__(message)
        self.debug_hint = debug_hint
