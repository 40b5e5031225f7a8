"""Whether the per-task INFO lines are wanted at all, asked before building them.

Each task event ("started", "step done", "succeeded") is logged through a logger bound to
the task's fields. Binding makes a new logger object every time, before loguru looks at
the level; with the level at WARNING (as a busy worker usually runs) that was pure
per-task cost. The worker asks ``info_enabled()`` first and binds only when a sink will
take the line. Warnings and errors are always bound: they are rare and always wanted.
"""

from __future__ import annotations

from loguru import logger

_INFO = logger.level("INFO").no


def info_enabled() -> bool:
    """True when some sink takes INFO lines (loguru keeps its sinks' lowest level)."""
    core = getattr(logger, "_core", None)  # loguru has no public "is enabled" call
    level = getattr(core, "min_level", None)
    return not isinstance(level, int | float) or level <= _INFO
