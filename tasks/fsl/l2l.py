"""learn2learn, imported once and quietly: the one place the fsl suite imports it from.

Its own module so that the dataset loaders (mini-ImageNet's pickles) and the episode samplers can
both use it without importing each other.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from types import ModuleType

__all__ = ["learn2learn"]


@functools.cache
def learn2learn() -> ModuleType:
    """Import learn2learn quietly.

    learn2learn imports ``gym``, which prints an "unmaintained" notice to stderr when imported:
    ``gym`` alone is imported with stderr captured (nothing else, so loggers created while
    learn2learn imports keep the real stderr), then learn2learn with its warnings ignored.
    """
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import gym  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l
    return l2l
