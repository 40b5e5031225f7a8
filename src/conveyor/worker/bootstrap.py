"""Build and run a worker from settings: what ``python worker.py`` and ``conveyor worker`` do."""

from __future__ import annotations

import contextlib
import os
import sys

from loguru import logger

from ..errors import ConveyorError
from ..logs import configure_logging
from ..manager import QueueManager
from ..pipeline import PipelineService
from ..settings import Settings
from .options import WorkerOptions
from .policy import RetryDefaults
from .startup import StopFlag, open_queues
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
        retry=RetryDefaults(
            max_retries=worker.max_retries,
            retry_backoff=worker.retry_backoff,
            max_backoff=worker.max_backoff,
        ),
    )


def run_worker(settings: Settings) -> int:
    """Run until stopped; 0 after a clean stop, 2 when the setup is wrong (one clear line).

    An unreachable backend is waited for (``worker.broker_wait``, see ``startup``); a
    SIGTERM or SIGINT during that wait ends the worker with 0, as it would a running one.
    """
    configure_logging(settings.logging)
    # Pipelines are named by import path relative to the project, as Celery's `include`;
    # a console script (`conveyor worker`) does not put the working directory on sys.path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    queues: list[QueueManager] = []
    try:
        service = PipelineService.from_import_paths(settings.worker.pipelines)
        with StopFlag().installed() as stop:
            opened = open_queues(settings, queues, stop)
        if not opened or stop():
            logger.info("{} while waiting for the backend: stopped", stop.signal_name)
            return 0
        worker = TaskWorker(
            queues,
            service,
            max_shutdown_wait=settings.worker.max_shutdown_wait,
            concurrency=settings.worker.concurrency,
            options=options_from(settings),
        )
        worker.start()
    except ConveyorError as exc:
        logger.error("conveyor worker: {}", exc)
        return 2
    finally:
        for queue in queues:
            with contextlib.suppress(ConveyorError):
                queue.close()
    return 0
