"""A run's output folder: claim it (never write into another run's), resume it, clean up after a failure.

``bgn-task <task> --output DIR`` writes everything of a run under ``DIR``. :func:`claim_output`
decides whether it may (``--overwrite``, ``--resume``); :func:`discard` removes what a run that
stopped on a user error created there, never trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from tasks.common.errors import UsageError

from . import PROG, log
from .failure import FAILURE_FILE

__all__ = ["BENCH_FILES", "claim_output", "discard", "last_checkpoint", "run_entries"]


BENCH_FILES = frozenset({"bench_args.json", "job.json", "run.log", FAILURE_FILE})
"""What ``bgn-task bench`` writes into a cell around its run (its own rules keep cells apart);
``job.json`` records the cluster job that runs it (:mod:`tasks.runner.launch`)."""


def run_entries(root: Path) -> list[str]:
    """The entries of ``root`` a run (or anything else) put there, leaving out the bench's own files."""
    return sorted(p.name for p in root.iterdir() if p.name not in BENCH_FILES) if root.is_dir() else []


def last_checkpoint(root: Path) -> Path | None:
    """``<root>/checkpoints/last.ckpt`` if there, else the newest ``*.ckpt`` there; ``None``: none."""
    last = root / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    found = sorted((root / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def claim_output(root: Path, *, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Make sure a run may write into ``root``; the checkpoint to resume from with ``resume``.

    A run never writes into a folder that holds another run: ``root`` must not exist, be empty or
    hold only what ``bgn-task bench`` puts into its cells (``bench_args.json``, ``run.log``).
    ``overwrite`` moves a held folder aside to ``<root>.previous-<time>`` first; ``resume``
    continues an unfinished run (no ``results.json``) from its own ``<root>/checkpoints``.

    Raises:
        UsageError: naming the folder, what it holds and the way out.
    """
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output {root}: exists and is not a folder; choose another --output")
    held = run_entries(root)
    if resume:
        if overwrite:
            raise UsageError(
                "--resume continues the run in --output and --overwrite moves it aside: pass one"
            )
        if (root / "results.json").is_file():
            raise UsageError(
                f"--resume: {root} holds a finished run (results.json); --overwrite runs it anew"
            )
        checkpoint = last_checkpoint(root)
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint in {root / 'checkpoints'} to continue from")
        return checkpoint
    if not held:
        return None
    if overwrite:
        if Path.cwd().resolve().is_relative_to(root.resolve()):
            raise UsageError(
                f"--overwrite: {root} is (or holds) the working directory; choose another --output"
            )
        base = root.with_name(f"{root.name}.previous-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        aside, k = base, 1
        while aside.exists():
            k += 1
            aside = base.with_name(f"{base.name}-{k}")
        root.rename(aside)
        log.info("%s: moved the earlier run in %s aside to %s", PROG, root, aside)
        return None
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    how = "--overwrite moves it aside"
    if not (root / "results.json").is_file() and last_checkpoint(root) is not None:
        how += ", --resume continues it from its last checkpoint"
    raise UsageError(f"--output {root} already holds a run ({shown}); {how}, or choose a fresh --output")


def discard(root: Path, kept: Sequence[str] | None) -> None:
    """Remove what a run that stopped on a usage error created in ``root``: all but ``kept``.

    ``kept`` is ``None`` when the run created ``root`` itself: then an emptied ``root`` goes too.
    """
    import shutil

    if not root.is_dir() or last_checkpoint(root) is not None:
        return  # trained weights are never thrown away
    for name in run_entries(root):
        if name not in (kept or ()):
            path = root / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if kept is None and not any(root.iterdir()):
        root.rmdir()
