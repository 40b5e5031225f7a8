"""SIGTERM and SIGINT for a running worker: the first begins a graceful stop, the second
skips the wait.

The handler only records the signal and calls ``stop`` (which only sets flags): loguru's
lock is not re-entrant, so logging in a handler could deadlock a loop that was logging
when the signal came. The loop says what was received at its next turn (``log``).
"""

from __future__ import annotations

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

    def install(self) -> None:
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

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
