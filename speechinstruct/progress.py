"""Progress bars that follow the log level: tqdm's bar where the ``speechinstruct`` loggers show what the stages
do (INFO, the command line's default), none with ``-q`` or where the package is called as a library and
logging is left unconfigured (Python's default shows warnings only). No stage takes a ``quiet`` argument."""

from __future__ import annotations

import logging

from tqdm import tqdm

_LOGGER = logging.getLogger("speechinstruct")


def shown() -> bool:
    """Whether the stages' info lines, and so their progress bars, are shown now."""
    return _LOGGER.isEnabledFor(logging.INFO)


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, off unless :func:`shown` (or when ``disable`` says so)."""
    return tqdm(iterable, disable=disable or not shown(), **kwargs)
