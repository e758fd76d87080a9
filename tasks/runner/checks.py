"""Early checks of what the user typed, before anything is built: one line and exit code 2 each.

Config files (:func:`check_config_files`), the shared norm arguments and dataset names
(:func:`check_config`), and "did you mean" hints for a mistyped flag (:func:`did_you_mean`).
Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.errors import UsageError, UserError
from tasks.common.validate import check_choice, check_int

if TYPE_CHECKING:
    from tasks.common.contract import Task

__all__ = ["check_config", "check_config_files", "check_options", "did_you_mean"]


def check_config(config: Any, datasets: Sequence[str] | None) -> None:
    """The early checks: the shared norm arguments and ``data.dataset`` against the task's names.

    Raises:
        UsageError: for bad norm arguments.
        TaskConfigError: for an unknown dataset; both name the bad value and the valid choices.
    """
    from tasks.common.norms import check_norm_args

    model = config.model
    if model.get("norm") is not None:
        try:
            check_norm_args(model.get("norm"), model.get("groups", "auto"), model.get("norm_kwargs"))
        except ValueError as err:
            raise UsageError(str(err)) from None
    dataset = config.data.get("dataset")
    if datasets is not None and dataset is not None:
        check_choice("dataset", dataset, datasets)


def check_norm_batch_size(config: Any, batch_of_samples: bool = True) -> None:
    """``--norm-batch-size``: a positive int no larger than the batch (``data.batch_size``, where
    it counts samples: ``batch_of_samples``).

    Raises:
        UsageError: naming the value and the rule.
    """
    b = config.get("norm_batch_size")
    if b is None:
        return
    check_int("--norm-batch-size", b, expected="a positive int (samples per set of norm statistics)")
    batch = config.data.get("batch_size")
    if batch_of_samples and isinstance(batch, int) and not isinstance(batch, bool) and b > batch:
        raise UsageError(
            f"--norm-batch-size {b} is larger than the batch (--batch-size {batch}): the norm's statistics "
            f"cover at most one batch; use at most {batch}"
        )


def check_options(task: Task, config: Any) -> None:
    """The task's run options (:attr:`Task.options <tasks.common.contract.Task>`): their choices,
    then the task's own :attr:`~tasks.common.contract.Task.check_options` hook.

    Raises:
        TaskConfigError: ``unknown <option> 'x'; choose from: ...``.
        UsageError: for what the task's hook refuses (its ``ValueError``).
    """
    options = {o.name: config.get(o.name) for o in task.options}
    for option in task.options:
        if option.choices:
            check_choice(option.name, options[option.name], option.choices)
    if task.check_options is not None:
        try:
            task.check_options(options, config)
        except UserError:
            raise
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err).splitlines()[0], debug_hint=True) from err


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config FILE`` exists and is valid YAML; else one line with the file and line.

    Raises:
        UsageError: ``--config FILE: no such file`` or ``FILE:LINE:COLUMN: <YAML problem>``.
    """
    import yaml

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag != "--config" or (not eq and i + 1 >= len(argv)):
            continue
        path = Path(value if eq else argv[i + 1])
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"{where}: invalid YAML: {problem}") from None


def did_you_mean(message: str, options: Sequence[str]) -> str:
    """``"; did you mean --model.trade_off?"`` for the unrecognized arguments named in ``message``.

    ``options``: the names the parser knows. ``""`` when ``message`` names no unrecognized
    argument or none is close to a known one.
    """
    import difflib

    if "nrecognized arguments:" not in message:
        return ""
    known = sorted(set(options))
    given = message.split("nrecognized arguments:", 1)[1].split()
    close = [
        (flag, match[0])
        for flag in (arg.split("=", 1)[0] for arg in given if arg.startswith("--"))
        if (match := difflib.get_close_matches(flag, known, n=1, cutoff=0.75))
    ]
    if len(close) == 1:
        return f"; did you mean {close[0][1]}?"
    return f"; did you mean {', '.join(f'{m} for {f}' for f, m in close)}?" if close else ""
