"""Resident memory of the worker and its children, for the ``memory`` recycling limit."""

from __future__ import annotations

import os
from collections.abc import Iterable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
