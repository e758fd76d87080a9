"""Why a run failed, as a small JSON file in its folder: what a sweep reports for a failed cell.

A run that ``bgn-task bench`` starts writes ``error.json`` (:data:`FAILURE_FILE`) into its cell
when it fails: ``{"kind": ..., "message": ..., "exit_code": ...}``. The sweep reads it back
(:meth:`RunFailure.read`) instead of searching the run's log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FAILURE_FILE", "RunFailure"]

FAILURE_FILE = "error.json"


@dataclass(frozen=True)
class RunFailure:
    """A failed run's error.

    Attributes:
        kind: the error's class name (``UsageError``, ``DatasetNotFoundError``, ``KeyboardInterrupt``,
            or the exception of a bug).
        message: its one line, as ``bgn-task: error: <message>`` showed it.
        exit_code: 2 for a user error, 130 when interrupted, 1 for a bug.
    """

    kind: str
    message: str
    exit_code: int

    @classmethod
    def of(cls, err: BaseException, exit_code: int) -> RunFailure:
        """The failure of ``err``: its class name and the last non-empty line of its message."""
        return cls(type(err).__name__, one_line(err), exit_code)

    def write(self, directory: Path) -> Path:
        """Write ``<directory>/error.json``; its path."""
        path = Path(directory) / FAILURE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> RunFailure | None:
        """The failure recorded in ``directory``, or ``None`` (none, or not readable)."""
        try:
            data = json.loads((Path(directory) / FAILURE_FILE).read_text())
            return cls(str(data["kind"]), str(data["message"]), int(data["exit_code"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def one_line(err: BaseException) -> str:
    """An error's message as one line; from a DataLoader worker (the worker's traceback first), its
    last line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err)
    name = f"{type(err).__module__}.{type(err).__name__}: "
    return lines[-1].removeprefix(name)
