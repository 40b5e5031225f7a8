"""The scheduler thread a worker runs (``worker.run_schedules``, on by default).

It has its own queue managers (their own connections: managers are not thread-safe), so
it never touches the worker's loop; it sleeps until the next tick (at most a second) and
rides out an unreachable backend by trying again a second later, warning once a minute.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loguru import logger

from ..errors import ConveyorError
from ..manager import QueueManager
from ..pipeline import PipelineService
from .definition import Schedule, schedule_from
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..settings import Settings

_WARN_EVERY = 60.0


def schedules_for(settings: Settings, service: PipelineService | None) -> list[Schedule]:
    """The config's schedules and those the worker's pipelines declare (``schedule()``);
    a pipeline schedule without a queue goes to the worker's first queue."""
    entries = list(settings.schedules)
    if service is not None:
        first = settings.worker.queues[0]
        for pipeline in service.pipelines.values():
            entries += [{**entry, "queue": entry["queue"] or first} for entry in pipeline.schedules]
    return [schedule_from(entry) for entry in entries]


class SchedulerThread:
    """Runs a :class:`Scheduler` in a daemon thread until ``stop()``."""

    def __init__(self, settings: Settings, schedules: Sequence[Schedule], writer: str) -> None:
        self._settings = settings
        self._managers: dict[str, QueueManager] = {}
        self.scheduler = Scheduler(schedules, self._queue, writer=writer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._warned = float("-inf")

    def _queue(self, name: str) -> QueueManager:
        manager = self._managers.get(name)
        if manager is None:
            manager = self._managers[name] = QueueManager.from_settings(self._settings, name)
        return manager

    def start(self) -> SchedulerThread:
        names = ", ".join(s.name for s in self.scheduler.schedules)
        logger.info("scheduler: running {} schedule(s): {}", len(self.scheduler.schedules), names)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = 1.0
            try:
                self.scheduler.run_pending()
                wait = min(1.0, self.scheduler.seconds_to_next() + 0.001)
            except ConveyorError as exc:
                if time.monotonic() - self._warned >= _WARN_EVERY:
                    self._warned = time.monotonic()
                    logger.warning("scheduler: {}; trying again every second", exc)
            except Exception:  # never let the thread die silently: log, go on
                logger.opt(exception=True).error("scheduler: unexpected error")
            self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for manager in self._managers.values():
            with contextlib.suppress(ConveyorError):
                manager.close()
