"""The worker daemon: ``TaskWorker`` and its options."""

from .options import WorkerOptions
from .policy import RetryDefaults
from .taskworker import TaskWorker

__all__ = ["RetryDefaults", "TaskWorker", "WorkerOptions"]
