"""Integers shared between the worker and its children, without a lock.

``multiprocessing.Value`` guards each read and write with a semaphore shared by every
process. A child killed while it holds it (a step polling ``ctx.cancelled`` when its hard
time limit strikes) leaves it taken for good, and the worker's next read hangs; a signal
handler that writes while the loop reads would deadlock the same way. Each flag is one
machine word written by one side and read by the other, so the lock buys nothing.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Any, Protocol


class Flag(Protocol):
    """A shared integer (``ctypes`` object in shared memory)."""

    value: Any


def shared_flag(context: BaseContext, typecode: str = "l") -> Flag:
    """A flag in memory that forked children share, starting at 0."""
    flag: Flag = context.Value(typecode, 0, lock=False)
    return flag
