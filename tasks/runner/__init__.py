"""The runner: ``bgn-task`` (:mod:`.cli`), one run (:mod:`.run`), sweeps (:mod:`.bench`, :mod:`.sweep`)
and their reports (:mod:`.report`). It drives any task through its contract
(:mod:`tasks.common.contract`); tasks never import it.

Layers, each importing only those below it (and ``tasks.common``):

- :mod:`.cli`: the entry point; parses the command, maps :class:`~tasks.common.errors.UserError`
  to one line and exit code 2 (:mod:`.failure` records it in a bench cell).
- :mod:`.bench` (the ``bench`` command) over :mod:`.sweep` (the grid, its cells and processes)
  and :mod:`.report` (tables and plots).
- :mod:`.run` (one run: fit, test, ``results.json``) over :mod:`.task_cli` (the LightningCLI
  subclass), :mod:`.folders` (the run's output folder) and :mod:`.checks` (early checks of what
  the user typed: config files, values, axes, did-you-mean hints).
- :mod:`.discovery`: which tasks are installed, and loading one's contract.

:data:`PROG` and :data:`log` are the program name and logger every runner module shares.
"""

import logging

PROG = "bgn-task"
"""The command's name, as messages show it."""

log = logging.getLogger("tasks")
"""The logger of every run and sweep (``bgn-task`` sends it to stderr, one message per line)."""
