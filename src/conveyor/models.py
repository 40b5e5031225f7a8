"""The task model: the immutable message a consumer receives and the task's record.

Everything here crosses the wire as JSON (never pickle). A :class:`Message` is a value:
state changes go through the queue (``ack``, ``nack``, ``extend``), never by mutating it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .lifecycle import ACTIVE_STATUSES, FINISHED_STATUSES, TaskStatus

__all__ = ["ACTIVE_STATUSES", "FINISHED_STATUSES", "Message", "TaskError", "TaskEvent",
           "TaskRecord", "TaskStatus", "from_timestamp"]  # fmt: skip


class TaskError(BaseModel):
    """The last error a task met: enough to debug it without the worker's logs."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    traceback: str | None = None


class TaskEvent(BaseModel):
    """One transition in a task's history, stamped with the backend's clock."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    event: str
    attempt: int = 0
    note: str | None = None


class TaskRecord(BaseModel):
    """Everything known about one task: returned by ``QueueManager.get_task``."""

    model_config = ConfigDict(frozen=True)

    id: str
    queue: str
    type: str | None = None
    priority: int
    data: Any = None
    status: TaskStatus
    attempts: int = 0
    max_retries: int | None = None
    retry_backoff: float | tuple[float, ...] | None = None
    queue_timeout: float | None = None
    process_timeout: float | None = None
    created_at: datetime
    scheduled_for: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    progress: float = 0.0
    progress_message: str | None = None
    result: Any = None
    error: TaskError | None = None
    dead_reason: str | None = None
    cancel_requested: bool = False
    steps: dict[str, Any] = Field(default_factory=dict)
    worker: str | None = None
    concurrency_key: str | None = None
    max_concurrency: int | None = None
    history: list[TaskEvent] = Field(default_factory=list)
    preemptions: int = Field(
        default=0, description="times it yielded to a more urgent task at a step boundary"
    )
    damage: list[str] = Field(
        default_factory=list,
        description="stored fields that could not be read, each 'field: why'; empty for a "
        "healthy record (a damaged one is shown, never hidden)",
    )


class Message(BaseModel):
    """A delivered task, as ``pull`` and ``reserve`` return it.

    Supports dict-style access (``message["task_id"]``, ``message["data"]``,
    ``message["priority"]``). ``token`` is the lease's fencing token: ``ack``/``nack``/
    ``extend`` present it, and the backend refuses it once the lease was given to another
    consumer. ``attempts`` counts deliveries including this one.
    """

    model_config = ConfigDict(frozen=True)

    task_id: str
    data: Any
    priority: int
    queue: str
    type: str | None = None
    attempts: int = 1
    max_retries: int | None = None
    retry_backoff: float | tuple[float, ...] | None = None
    process_timeout: float | None = None
    created_at: float = 0.0
    steps: dict[str, Any] = Field(default_factory=dict)
    token: str = ""
    leased: bool = True

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        """``dict.get`` for dict-style code."""
        return getattr(self, key, default)


def from_timestamp(value: float | None) -> datetime | None:
    """Backends store epoch seconds; the record shows aware UTC datetimes."""
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None  # a damaged timestamp must not make the whole record unreadable
