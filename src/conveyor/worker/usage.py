"""When a worker should make way for a fresh one (``max_jobs``, ``max_time``, ``memory``),
and the resident memory that the ``memory`` limit reads."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from .options import WorkerOptions

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: The memory limit is checked after every task; /proc is read at most this often (a read
#: per process per task was a measurable part of a no-op task's cost).
_MEMORY_MAX_AGE = 0.5
_last_reading: dict[tuple[int, ...], tuple[float, float | None]] = {}


def resident_mb(child_pids: Iterable[int]) -> float | None:
    """MB resident in this process and the given children; None where /proc is missing."""
    total = 0
    for pid in (os.getpid(), *child_pids):
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
                total += int(statm.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            if pid == os.getpid():
                return None
    return total / (1024 * 1024)


def recent_resident_mb(child_pids: Iterable[int]) -> float | None:
    """``resident_mb``, read again only when the last reading for these processes is
    older than ``_MEMORY_MAX_AGE`` seconds."""
    key = (os.getpid(), *child_pids)
    now = time.monotonic()
    last = _last_reading.get(key)
    if last is not None and now - last[0] < _MEMORY_MAX_AGE:
        return last[1]
    _last_reading.clear()  # one set of processes at a time: a replaced child changes it
    used = resident_mb(key[1:])
    _last_reading[key] = (now, used)
    return used


def recycling_reason(
    options: WorkerOptions, processed: int, started: float, child_pids: Iterable[int]
) -> str | None:
    """Why the worker should stop now to be replaced (None: no limit reached)."""
    if options.max_jobs is not None and processed >= options.max_jobs:
        return f"max_jobs ({options.max_jobs}) reached"
    if options.max_time is not None and time.time() - started >= options.max_time:
        return f"max_time ({options.max_time:g}s) reached"
    if options.memory_mb is not None:
        used = recent_resident_mb(child_pids)
        if used is not None and used >= options.memory_mb:
            return f"memory {used:.0f} MB >= {options.memory_mb} MB"
    return None
