"""The ``/api/v1`` endpoints: push, get, list, cancel and retry tasks; stats; workers.

Plain ``def`` endpoints: FastAPI runs them on its thread pool, since every backend call
blocks. Errors are raised as conveyor exceptions or ``HTTPException`` and turned into JSON
by the handlers in ``app.py`` (404 unknown task, 409 wrong state, 422 bad input, 503
backend down), never into a traceback.
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from loguru import logger
from pydantic import ValidationError

from ..errors import TaskNotFoundError, TaskTypeError, TaskValidationError
from ..manager import QueueManager
from ..models import TaskRecord, TaskStatus
from ..validation import MAX_TASK_ID_LENGTH
from .registry import QueueRegistry
from .schemas import (
    ErrorOut,
    ListQuery,
    QueueQuery,
    StatsOut,
    TaskCreated,
    TaskIn,
    TaskList,
    WorkerInfo,
    WorkerList,
    totals_of,
)

#: A task id in a path may contain "/", so the route captures the rest of the path.
TaskId = Annotated[str, Path(min_length=1, max_length=MAX_TASK_ID_LENGTH)]
QueueParam = Annotated[QueueQuery, Query()]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (400, "the body could not be read at all (not UTF-8 text)"),
        (401, "missing or wrong bearer token (when CONVEYOR_API_TOKEN is set)"),
        (404, "no such task in that queue"),
        (409, "the task is in a state that does not allow this"),
        (503, "the backend is unreachable"),
    )
}

router = APIRouter(prefix="/api/v1", responses=_ERRORS)


def registry_of(request: Request) -> QueueRegistry:
    registry: QueueRegistry = request.app.state.registry
    return registry


Registry = Annotated[QueueRegistry, Depends(registry_of)]


@router.post(
    "/tasks",
    status_code=201,
    response_model=TaskCreated,
    summary="Push a task",
    tags=["tasks"],
    responses={413: {"model": ErrorOut, "description": "the request body is too large"}},
)
def create_task(task: TaskIn, registry: Registry, response: Response) -> TaskCreated:
    """Push one task; returns its id at once. 409 if that id is already scheduled, pending
    or running (a finished id may be pushed again: it starts over)."""
    with registry.use(task.queue) as queue:
        task_id = queue.submit(
            task.data,
            priority=task.priority,
            task_id=task.id,
            type=task.type,
            delay=task.delay,
            max_retries=task.max_retries,
            retry_backoff=task.retry_backoff,
            queue_timeout=task.queue_timeout,
            process_timeout=task.process_timeout,
        )
        if task_id is None:
            raise HTTPException(
                409,
                f"task {task.id!r} is already scheduled, pending or running in queue "
                f"{queue.queue_name!r}; not pushed again",
            )
        name = queue.queue_name
    status = TaskStatus.SCHEDULED if task.delay else TaskStatus.PENDING
    response.headers["Location"] = f"/api/v1/tasks/{quote(task_id)}?queue={quote(name)}"
    return TaskCreated(id=task_id, queue=name, status=status)


@router.get("/tasks", response_model=TaskList, summary="List tasks", tags=["tasks"])
def list_tasks(registry: Registry, query: Annotated[ListQuery, Query()]) -> TaskList:
    """One page of records with ``status`` (all if omitted): pending ones in the order they
    will run, the others newest first. An unknown queue has no tasks."""
    name = query.queue or registry.default_queue
    with registry.existing(name) as manager:
        found = (
            [] if manager is None else manager.list_tasks(query.status, query.limit, query.offset)
        )
    return TaskList(
        queue=name, status=query.status, limit=query.limit, offset=query.offset, tasks=found
    )


@router.get(
    "/tasks/{task_id:path}", response_model=TaskRecord, summary="Get a task", tags=["tasks"]
)
def get_task(task_id: TaskId, registry: Registry, query: QueueParam) -> TaskRecord:
    """The task's record: status, attempts, progress, result, last error and history."""
    with registry.existing(query.queue) as manager:
        return _require(manager, task_id, query.queue or registry.default_queue)


@router.delete(
    "/tasks/{task_id:path}", response_model=TaskRecord, summary="Cancel a task", tags=["tasks"]
)
def cancel_task(task_id: TaskId, registry: Registry, query: QueueParam) -> TaskRecord:
    """Cancel a scheduled or pending task now; a running one stops between its steps
    (``cancel_requested`` is set and its worker settles it as canceled). 409 if finished."""
    with registry.existing(query.queue) as manager:
        record = _require(manager, task_id, query.queue or registry.default_queue)
        assert manager is not None
        if not manager.cancel(task_id):
            raise HTTPException(
                409,
                f"task {task_id!r} is {record.status.value}: only scheduled, pending or "
                "processing tasks can be canceled",
            )
        return _require(manager, task_id, manager.queue_name)


@router.post(
    "/tasks/{task_id:path}/retry",
    response_model=TaskRecord,
    summary="Retry a failed task",
    tags=["tasks"],
)
def retry_task(task_id: TaskId, registry: Registry, query: QueueParam) -> TaskRecord:
    """Re-drive a failed, timed-out or canceled task: pending again, attempts reset, at its
    priority. 409 if it is not finished that way."""
    with registry.existing(query.queue) as manager:
        record = _require(manager, task_id, query.queue or registry.default_queue)
        assert manager is not None
        if not manager.retry(task_id):
            raise HTTPException(
                409,
                f"task {task_id!r} is {record.status.value}: only failed, timeout or "
                "canceled tasks can be retried",
            )
        return _require(manager, task_id, manager.queue_name)


@router.get("/stats", response_model=StatsOut, summary="Queue statistics", tags=["monitoring"])
def stats(registry: Registry, query: QueueParam) -> StatsOut:
    """Counts per status, tasks done and failed in the last minute and their mean run time,
    for every queue on the backend (or ``queue`` only), with totals. 404 for an unknown
    queue."""
    queue = query.queue
    if queue is not None and queue not in registry.known_queues():
        raise TaskNotFoundError(f"no queue named {queue!r} on this backend")
    found = registry.stats([queue] if queue is not None else None)
    return StatsOut(
        backend=registry.backend_url, at=time.time(), queues=found, totals=totals_of(found)
    )


@router.get("/workers", response_model=WorkerList, summary="Live workers", tags=["monitoring"])
def workers(registry: Registry, query: QueueParam) -> WorkerList:
    """Workers whose heartbeat is current: host, pid, queues, state, what each one runs
    now and how many tasks it finished; ``queue`` keeps those that take from it."""
    found = [_worker(info) for info in registry.workers()]
    if query.queue is not None:
        found = [info for info in found if query.queue in info.queues]
    found.sort(key=lambda info: (info.host or "", info.id or ""))
    return WorkerList(workers=found)


def _require(manager: QueueManager | None, task_id: str, queue: str) -> TaskRecord:
    """The record, or ``TaskNotFoundError`` (404): also for an id no push accepts (control
    characters), since no such task can exist."""
    try:
        record = None if manager is None else manager.get_task(task_id)
    except (TaskValidationError, TaskTypeError):
        record = None
    if record is None:
        raise TaskNotFoundError(f"no task {task_id!r} in queue {queue!r}")
    return record


def _worker(info: dict[str, Any]) -> WorkerInfo:
    """A heartbeat as a model; one written by another version still shows, by its id."""
    try:
        return WorkerInfo.model_validate(info)
    except ValidationError as exc:
        logger.warning("worker {}: unreadable heartbeat ({})", info.get("id"), exc)
        return WorkerInfo(id=str(info.get("id")), state="unreadable heartbeat")
