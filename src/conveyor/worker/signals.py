"""SIGTERM and SIGINT for a running worker: the first begins a graceful stop, the second
skips the wait.

The handler only records the signal and calls ``stop`` (which only sets flags): loguru's
lock is not re-entrant, so logging in a handler could deadlock a loop that was logging
when the signal came. The loop says what was received at its next turn (``log``).

A handler runs between two bytecodes, and a wait the signal interrupts is resumed for the
rest of its timeout (PEP 475): an idle worker would notice SIGTERM only when its wait for
work ended. So the signal also writes a byte into a pipe (``signal.set_wakeup_fd``) that
the worker's waits include (``fd``): the wait ends at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from loguru import logger

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The worker's handlers while it runs; ``restore()`` puts the previous ones back."""

    def __init__(self, stop: Callable[[str], None], max_wait: float) -> None:
        self._stop = stop
        self._max_wait = max_wait
        self._received: list[int] = []
        self._logged = 0
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    @property
    def fd(self) -> int | None:
        """Readable once a signal came (see the module docstring); None when not installed."""
        return None if self._pipe is None else self._pipe[0]

    def install(self) -> None:
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        self._previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def ring(self) -> None:
        """End the loop's wait as a signal would (a stop asked from another thread)."""
        if self._pipe is not None:
            with contextlib.suppress(OSError):  # full: it rings already
                os.write(self._pipe[1], b"\0")

    def heard(self) -> None:
        """Empty the pipe, so that the next wait blocks again."""
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._pipe[0], 512):
                    pass

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for end in self._pipe:
                os.close(end)
            self._pipe = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)
        self._stop(signal.Signals(signum).name)

    def log(self) -> None:
        """Log the signals received since the last call (from the loop, not the handler)."""
        while self._received:
            name = signal.Signals(self._received.pop(0)).name
            self._logged += 1
            if self._logged == 1:
                logger.info(
                    "{}: stop taking work; waiting up to {:g}s for running tasks (again to "
                    "skip)", name, self._max_wait,
                )  # fmt: skip
            else:
                logger.warning("{} again: not waiting any longer", name)


def forget_wakeup_fd() -> None:
    """In a forked child: signals there must not ring the worker's pipe."""
    signal.set_wakeup_fd(-1)
