"""The shortcut flags of ``bgn-task <task>`` (``--norm``, ``--batch-size``, ``--download``...) and
their translation into LightningCLI arguments, done before parsing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tasks.common.errors import UsageError

from . import PROG, log

__all__ = ["FLAG_SHORTCUTS", "SHORTCUTS", "log_moved", "translate_shortcuts"]

SHORTCUTS: dict[str, str] = {
    "--norm": "--model.norm",
    "--groups": "--model.groups",
    "--batch-size": "--data.batch_size",
    "--norm-batch-size": "--norm_batch_size",
    "--data": "--data.dataset",
    "--data-dir": "--data.data_dir",
    "--max-epochs": "--trainer.max_epochs",
    "--seed": "--seed_everything",
    "--output": "--trainer.default_root_dir",
    "--accelerator": "--trainer.accelerator",
    "--devices": "--trainer.devices",
    "--bad-images": "--bad_images",
}
"""Shortcut flag -> LightningCLI argument (each takes one value)."""

FLAG_SHORTCUTS: dict[str, tuple[str, str]] = {
    "--download": ("--data.download", "true"),
    "--sync-norm": ("--sync_norm", "true"),
    "--check-data": ("--check_data", "true"),
    "--overwrite": ("--overwrite", "true"),
    "--resume": ("--resume", "true"),
}
"""Value-less shortcut flags -> (LightningCLI argument, value)."""


def translate_shortcuts(
    argv: Sequence[str],
    extra: Mapping[str, str] | None = None,
    extra_flags: Mapping[str, tuple[str, str]] | None = None,
) -> list[str]:
    """Rewrite the shortcut flags (:data:`SHORTCUTS`, ``--download``) into LightningCLI arguments.

    Both ``--flag value`` and ``--flag=value`` are accepted; everything else is passed through.

    Args:
        argv: the run's arguments.
        extra: a task's own value shortcuts (:attr:`Task.shortcuts <tasks.common.contract.Task>`).
        extra_flags: a task's own value-less shortcuts (flag -> (argument, value)).

    Raises:
        UsageError: when a shortcut that needs a value is last.
    """
    shortcuts = {**SHORTCUTS, **(extra or {})}
    flags = {**FLAG_SHORTCUTS, **(extra_flags or {})}
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag == "--trainer.callbacks" and not (value if eq else "").lstrip().startswith(("[", "{")):
            # One callback class (e.g. bgn_lightning.NormSwap) joins the task's own callbacks
            # (checkpointing, LR monitor) instead of replacing them: jsonargparse's list append.
            if not eq:
                if i + 1 >= len(args) or args[i + 1].lstrip().startswith(("[", "{")):
                    out.append(arg)
                    i += 1
                    continue
                i += 1
                value = args[i]
            out.append(f"--trainer.callbacks+={value}")
        elif flag in shortcuts:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{flag} needs a value")
                i += 1
                value = args[i]
            out += [shortcuts[flag], value]
        elif flag in flags:
            target, default = flags[flag]
            out += [target, value if eq else default]
        else:
            out.append(arg)
        i += 1
    return out


def log_moved(moved: Sequence[tuple[str, str]], where: str) -> None:
    """One log line: the keys in ``moved`` (``(old, new)`` pairs, :attr:`Task.moved_keys
    <tasks.common.contract.Task.moved_keys>`) were read from their old places in ``where``."""
    if moved:
        pairs = ", ".join(f"{old} -> {new}" for old, new in moved)
        log.info("%s: %s: keys read from their old places (write the new ones): %s", PROG, where, pairs)
