"""Build and run a worker from settings: what ``python worker.py`` and ``conveyor worker`` do."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

from loguru import logger

from ..errors import ConveyorError
from ..logs import configure_logging
from ..manager import QueueManager
from ..pipeline import PipelineService
from ..schedules.runner import SchedulerThread, schedules_for
from ..settings import Settings
from .options import WorkerOptions
from .policy import RetryDefaults
from .preemption import PreemptPolicy
from .reserve import Reserve
from .startup import open_queues
from .taskworker import TaskWorker


def options_from(settings: Settings) -> WorkerOptions:
    """The worker's tuning as the config file and environment set it."""
    worker = settings.worker
    return WorkerOptions(
        shutdown_mode=worker.shutdown_mode,
        max_jobs=worker.max_jobs,
        max_time=worker.max_time,
        memory_mb=worker.memory_mb,
        heartbeat_interval=worker.heartbeat_interval,
        reconnect_backoff=worker.reconnect_backoff,
        reconnect_max_backoff=worker.reconnect_max_backoff,
        hook_timeout=worker.hook_timeout,
        preemption=None
        if worker.preempt_margin is None
        else PreemptPolicy(worker.preempt_margin, worker.preempt_after, worker.max_preemptions),
        reserve=None
        if worker.reserve is None
        else Reserve(worker.reserve.priority, worker.reserve.slots),
        pool=worker.pool,
        retry=RetryDefaults(
            max_retries=worker.max_retries,
            retry_backoff=worker.retry_backoff,
            max_backoff=worker.max_backoff,
        ),
    )


class StartupSignals:
    """SIGTERM/SIGINT before the worker's own handlers are in place: noted (no logging in a
    handler), passed on to the worker once it exists, so a stop during start-up is a clean
    exit 0 rather than the default handler's death."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.worker: TaskWorker | None = None
        self._previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.worker is not None:
            self.worker.stop(signal.Signals(signum).name)

    def hand_to(self, worker: TaskWorker) -> None:
        self.worker = worker
        for signum in self.received:
            worker.stop(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_worker(settings: Settings) -> int:
    """Run until stopped; 0 after a clean stop, 2 when the setup is wrong (one clear line).

    An unreachable backend is waited for (``worker.broker_wait``, see ``startup``); a
    SIGTERM or SIGINT at any point of the start-up, the wait included, ends the worker with
    0, as it would a running one.
    """
    startup = StartupSignals()
    try:
        return _run(settings, startup)
    finally:
        startup.restore()


def _run(settings: Settings, startup: StartupSignals) -> int:
    configure_logging(settings.logging)
    # Pipelines are named by import path relative to the project, as Celery's `include`;
    # a console script (`conveyor worker`) does not put the working directory on sys.path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    queues: list[QueueManager] = []
    try:
        service = PipelineService.from_import_paths(settings.worker.pipelines)
        if not open_queues(settings, queues, lambda: bool(startup.received)):
            logger.info("{} while waiting for the backend: stopped", startup.signal_name)
            return 0
        worker = TaskWorker(
            queues,
            service,
            max_shutdown_wait=settings.worker.max_shutdown_wait,
            concurrency=settings.worker.concurrency,
            options=options_from(settings),
        )
        startup.hand_to(worker)
        if startup.received:
            logger.info("conveyor worker: stopped during start-up; no task was taken")
            return 0
        schedules = schedules_for(settings, service) if settings.worker.run_schedules else []
        scheduler = SchedulerThread(settings, schedules, worker.id).start() if schedules else None
        try:
            worker.start()
        finally:
            if scheduler is not None:
                scheduler.stop()
    except ConveyorError as exc:
        logger.error("conveyor worker: {}", exc)
        return 2
    finally:
        for queue in queues:
            with contextlib.suppress(ConveyorError):
                queue.close()
    return 0
