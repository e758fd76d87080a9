"""The validators of init arguments and flags: one for "an int of at least N", one for "one of these".

Every task, ``tasks.common`` and the runner check their values with these two, so each message
reads the same everywhere: ``batch_size must be a positive int, got 0``,
``unknown dataset 'x'; choose from: a, b``. They raise :class:`~tasks.common.errors.TaskConfigError`
(a ``ValueError``), which ``bgn-task`` reports as one line with exit code 2. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from .errors import TaskConfigError

__all__ = ["check_choice", "check_int"]

T = TypeVar("T")


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    optional: bool = False,
    owner: str = "",
    expected: str | None = None,
) -> Any:
    """``value`` if it is an int (not a bool) of at least ``minimum`` (or ``None`` when ``optional``).

    Args:
        name: the argument, as the user spells it.
        value: what was given.
        minimum: the smallest accepted value.
        optional: ``None`` is accepted too.
        owner: prefix of the message (``"EpisodeSpec"`` -> ``"EpisodeSpec: ways must be ..."``).
        expected: what the message says is accepted; default ``a positive int`` for ``minimum=1``,
            else ``an int >= <minimum>`` (``or None`` added when ``optional``).

    Raises:
        TaskConfigError: ``[<owner>: ]<name> must be a positive int, got 0``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        if expected is None:
            expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            expected += " or None" if optional else ""
        prefix = f"{owner}: " if owner else ""
        raise TaskConfigError(f"{prefix}{name} must be {expected}, got {value!r}")
    return value


def check_choice(
    kind: str, value: T, choices: Iterable[Any], *, owner: str = "", problem: str | None = None
) -> T:
    """``value`` if it is one of ``choices``.

    Args:
        kind: what is chosen (``dataset``, ``norm``, ``lr schedule``).
        value: what was given.
        choices: the accepted values, in the order the message lists them.
        owner: prefix of the message (``"paired_loader"`` -> ``"paired_loader: unknown mode ..."``).
        problem: the message's first part, instead of ``unknown <kind> <value>``.

    Raises:
        TaskConfigError: ``[<owner>: ]unknown <kind> '<value>'; choose from: a, b, c``.
    """
    known = list(choices)
    if value not in known:
        prefix = f"{owner}: " if owner else ""
        problem = problem or f"unknown {kind} {value!r}"
        raise TaskConfigError(f"{prefix}{problem}; choose from: {', '.join(map(str, known))}")
    return value
