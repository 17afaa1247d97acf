"""Things the imitation loss fell back on at run time, said once and kept for the run's records.

A fallback that changes speed or precision must not pass silently: ``note`` logs a warning the
first time a message is seen in this process, and ``notes()`` lists every such message so a
stage can write them into its ``stage.json``. Nothing here imports triton.
"""

from __future__ import annotations

import warnings

_NOTES: list[str] = []


def note(message: str) -> None:
    """Warn about ``message`` once per process and keep it for :func:`notes`."""
    if message in _NOTES:
        return
    _NOTES.append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def notes() -> list[str]:
    """Every message :func:`note` was given in this process, oldest first."""
    return list(_NOTES)
