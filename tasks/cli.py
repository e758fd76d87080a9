"""`bgn-task` entry point (stub until the CLI issue lands)."""

from __future__ import annotations

import sys

TASKS = ("classification", "fsl")


def main(argv: list[str] | None = None) -> int:
    """List the task suites."""
    argv = sys.argv[1:] if argv is None else argv
    print("usage: bgn-task <task> [options]\n\ntasks: " + ", ".join(TASKS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
