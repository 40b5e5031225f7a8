"""Request and response bodies of the HTTP API (pydantic: a bad request is a 422 naming
the field; the OpenAPI schema at ``/api/v1/openapi.json`` is generated from these)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field

from ..errors import TaskTypeError, TaskValidationError
from ..manager import DEFAULT_PRIORITY, QueueStats
from ..models import TaskRecord, TaskStatus
from ..validation import (
    MAX_COUNT,
    MAX_NAME_LENGTH,
    MAX_SECONDS,
    MAX_TASK_ID_LENGTH,
    check_queue_name,
)

#: Queue names the API accepts: no braces (Redis hash tags), no whitespace or controls (the
#: manager's ``check_queue_name`` refuses the rest of what is not printable).
QUEUE_PATTERN = r"^[^{}\s\x00-\x1f\x7f-\x9f]+$"
#: Types: no control characters.
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
MAX_QUEUE_LENGTH = MAX_NAME_LENGTH


def _queue_name(value: str) -> str:
    """The queue's own rule (printable too), so a bad name is a 422 naming the field."""
    try:
        return check_queue_name(value, "queue")
    except (TaskValidationError, TaskTypeError) as exc:
        raise ValueError(exc.reason) from None


QueueName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_QUEUE_LENGTH,
        pattern=QUEUE_PATTERN,
        description="the queue; default: the configured queue.name",
        examples=["default"],
    ),
]
#: A queue to push to must also pass the queue's own rule (a 422 naming the field); a read
#: of a queue no push could create simply finds nothing (404).
PushQueue = Annotated[QueueName, AfterValidator(_queue_name)]
#: Every duration becomes a deadline (now + seconds): at most 10 years, so none overflows.
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]


class TaskIn(BaseModel):
    """A task to push. ``payload`` and ``max_retry`` are accepted for ``data`` and
    ``max_retries``, as XQueue-style task services name them."""

    # Strict: JSON "5" or true is not a priority, "30" not a delay (a 422 names the field).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "type": "documents",
                    "data": {"path": "examples/docs/tides.txt"},
                    "priority": 8,
                    "max_retries": 3,
                }
            ]
        },
    )

    type: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
        description="the pipeline that runs it",
    )
    data: Any = Field(
        default=None,
        validation_alias=AliasChoices("data", "payload"),
        description="the task's input: any JSON value, up to queue.max_payload_bytes",
    )
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=0,
        description="0..queue.max_priority (default 10); larger runs first",
    )
    delay: Seconds | None = Field(
        default=None, description="seconds before it may run (at most 10 years)"
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COUNT,
        validation_alias=AliasChoices("max_retries", "max_retry"),
        description="retries after errors (default: the worker's worker.max_retries)",
    )
    retry_backoff: Seconds | list[Seconds] | None = Field(
        default=None,
        description="base seconds between retries (doubles each time), or a list of delays "
        "([60, 300, 900]: retry n waits entry n; past the end, the last)",
    )
    queue_timeout: PositiveSeconds | None = Field(
        default=None, description="give up (status timeout) if not started within this"
    )
    process_timeout: PositiveSeconds | None = Field(
        default=None, description="hard time limit of one run, in seconds"
    )
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TASK_ID_LENGTH,
        description="the task id; default: a new one. A live duplicate is refused (409)",
    )
    queue: PushQueue | None = None
    concurrency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="per-key concurrency: the key (scoped to the queue) this task counts "
        "against while it runs (the XQueue field)",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNT,
        description="at most this many tasks of concurrency_key run at once; the smallest "
        "limit wins",
    )


class QueueQuery(BaseModel):
    """Query parameters naming a queue; an unknown parameter (a typo) is a 422."""

    model_config = ConfigDict(extra="forbid")

    queue: QueueName | None = None


class ListQuery(QueueQuery):
    status: TaskStatus | None = Field(default=None, description="only tasks in this status")
    limit: int = Field(default=50, ge=1, le=500, description="records per page")
    offset: int = Field(default=0, ge=0, le=1_000_000, description="records to skip")


class TaskCreated(BaseModel):
    """What a push returns: the id to poll, where, and the status it starts in."""

    id: str
    queue: str
    status: TaskStatus


class TaskList(BaseModel):
    """One page of task records: pending ones in run order, others newest first."""

    queue: str
    status: TaskStatus | None
    limit: int
    offset: int
    tasks: list[TaskRecord]


class Totals(BaseModel):
    counts: dict[str, int]
    done_last_minute: int
    failed_last_minute: int


class StatsOut(BaseModel):
    """Counts per status and throughput, per queue and summed over them."""

    backend: str = Field(description="the backend URL, password masked")
    at: float = Field(description="when measured, epoch seconds")
    queues: list[QueueStats]
    totals: Totals


class CurrentTask(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: str | None = None
    queue: str | None = None
    type: str | None = None
    step: str | None = None


class WorkerInfo(BaseModel):
    """A live worker as its last heartbeat described it."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    host: str | None = None
    pid: int | None = None
    queues: list[str] = Field(default_factory=list)
    concurrency: int | None = None
    state: str | None = None
    processed: int = 0
    failed: int = 0
    started_at: float | None = None
    last_seen: float | None = None
    current: list[CurrentTask] = Field(default_factory=list)
    damage: list[str] = Field(
        default_factory=list, description="what of the stored heartbeat could not be read"
    )


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class ScheduleConflict(BaseModel):
    fingerprint: str
    writer: str | None = None
    definition: str | None = Field(default=None, description="the definition, as JSON text")


class ScheduleOut(BaseModel):
    """One cron schedule as the schedulers wrote it to the backend."""

    name: str
    cron: str | None = None
    tz: str | None = None
    queue: str | None = None
    missed: str | None = Field(default=None, description="skip or run_once")
    next_run: float | None = Field(default=None, description="epoch seconds")
    last_run: float | None = Field(default=None, description="epoch seconds of the last tick")
    last_task: str | None = Field(default=None, description="the last tick's task id")
    last_status: str | None = Field(
        default=None, description="its status ('forgotten': past result_ttl)"
    )
    writers: list[str] = Field(default_factory=list, description="workers that run it")
    conflict: list[ScheduleConflict] = Field(
        default_factory=list, description="two or more definitions under this name: each"
    )


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    backend: str = Field(description="the backend kind: sqlite, redis or rabbitmq")
    detail: str | None = None


class ErrorOut(BaseModel):
    """Every error response: ``detail`` says what was wrong and what to do."""

    detail: str | list[dict[str, Any]]


def totals_of(stats: list[QueueStats]) -> Totals:
    counts: dict[str, int] = {status.value: 0 for status in TaskStatus}
    for each in stats:
        for status, count in each.counts.items():
            counts[status] = counts.get(status, 0) + count
    return Totals(
        counts=counts,
        done_last_minute=sum(each.done_last_minute for each in stats),
        failed_last_minute=sum(each.failed_last_minute for each in stats),
    )
