"""The runner: ``bgn-task`` (:mod:`.cli`), one run (:mod:`.run`), sweeps (:mod:`.bench`, :mod:`.sweep`)
and their reports (:mod:`.report`). It drives any task through its contract
(:mod:`tasks.common.contract`); tasks never import it.
"""
