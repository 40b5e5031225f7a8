"""Conveyor: a priority worker daemon for pipeline jobs.

Strict priorities, no task lost (at-least-once with ``reserve``), graceful shutdown, and a
first run with no servers at all (the embedded SQLite backend).
"""

from .backends import QueueBackend
from .errors import (
    BackendError,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    ConveyorError,
    ReplicationError,
    TaskNotFoundError,
    TaskTypeError,
    TaskValidationError,
)
from .manager import QueueManager, QueueStats
from .models import Message, TaskError, TaskEvent, TaskRecord, TaskStatus
from .pipeline import Pipeline, PipelineError, PipelineService, StepContext
from .retries import PermanentError
from .worker import RetryDefaults, TaskWorker, WorkerOptions

__all__ = [
    "BackendError",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "ConfigError",
    "ConveyorError",
    "Message",
    "PermanentError",
    "Pipeline",
    "PipelineError",
    "PipelineService",
    "QueueBackend",
    "QueueManager",
    "QueueStats",
    "ReplicationError",
    "RetryDefaults",
    "StepContext",
    "TaskError",
    "TaskEvent",
    "TaskNotFoundError",
    "TaskRecord",
    "TaskStatus",
    "TaskTypeError",
    "TaskValidationError",
    "TaskWorker",
    "WorkerOptions",
]
