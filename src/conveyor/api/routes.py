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
from ..schedules.listing import list_schedules
from ..validation import MAX_TASK_ID_LENGTH
from .paths import TaskIdConvertor  # noqa: F401  (registers the "taskid" convertor)
from .registry import QueueRegistry
from .schemas import (
    ErrorOut,
    ListQuery,
    QueueQuery,
    ScheduleList,
    ScheduleOut,
    StatsOut,
    TaskCreated,
    TaskIn,
    TaskList,
    WorkerInfo,
    WorkerList,
    totals_of,
)

#: A task id in a path: one segment with its "/" encoded, or raw slashes (see ``paths``).
TaskId = Annotated[str, Path(min_length=1, max_length=MAX_TASK_ID_LENGTH)]
QueueParam = Annotated[QueueQuery, Query()]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (
            400,
            "the body could not be read at all (not UTF-8, or nested too deeply to parse); "
            "or, without a token, the Host header names no host of api.allowed_hosts",
        ),
        (401, "missing or wrong bearer token (when CONVEYOR_API_TOKEN is set)"),
        (403, "without a token: a browser request from a page of another origin"),
        (404, "no such task in that queue"),
        (409, "the task is in a state that does not allow this"),
        (503, "the backend is unreachable"),
    )
}

router = APIRouter(prefix="/api/v1", responses=_ERRORS)


def _link(operation: str, what: str) -> dict[str, Any]:
    """An OpenAPI link from an answer naming a task (``id``, ``queue``) to an operation on
    it: documentation, and what a stateful test client follows."""
    return {
        "operationId": operation,
        "parameters": {"task_id": "$response.body#/id", "queue": "$response.body#/queue"},
        "description": what,
    }


_PUSHED = {
    "description": "pushed; Location names the task (every '/' of its id percent-encoded)",
    "links": {
        "GetTask": _link("get_task", "the record of the pushed task"),
        "CancelTask": _link("cancel_task", "cancel the pushed task"),
        "RetryTask": _link("retry_task", "re-drive the pushed task once it has failed"),
    },
}
_CANCELED = {
    "description": "the record, canceled (or with cancel_requested, while it runs)",
    "links": {
        "GetTask": _link("get_task", "the record of the canceled task"),
        "RetryTask": _link("retry_task", "re-drive the canceled task"),
    },
}
_RETRIED = {
    "description": "the record, pending again",
    "links": {
        "GetTask": _link("get_task", "the record of the re-driven task"),
        "CancelTask": _link("cancel_task", "cancel the re-driven task"),
    },
}


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
    operation_id="create_task",
    responses={
        201: _PUSHED,
        413: {"model": ErrorOut, "description": "the request body is too large"},
    },
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
            concurrency_key=task.concurrency_key,
            max_concurrency=task.max_concurrency,
        )
        if task_id is None:
            raise HTTPException(
                409,
                f"task {task.id!r} is already scheduled, pending or running in queue "
                f"{queue.queue_name!r}; not pushed again",
            )
        name = queue.queue_name
    status = TaskStatus.SCHEDULED if task.delay else TaskStatus.PENDING
    # Every "/" of the id encoded too: one path segment, so no client can resolve a "/.."
    # in an id to another task (the ids "." and ".." are refused at push).
    location = f"/api/v1/tasks/{quote(task_id, safe='')}?queue={quote(name, safe='')}"
    response.headers["Location"] = location
    return TaskCreated(id=task_id, queue=name, status=status)


@router.get(
    "/tasks",
    response_model=TaskList,
    summary="List tasks",
    tags=["tasks"],
    operation_id="list_tasks",
)
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
    "/tasks/{task_id:taskid}",
    response_model=TaskRecord,
    summary="Get a task",
    tags=["tasks"],
    operation_id="get_task",
)
def get_task(task_id: TaskId, registry: Registry, query: QueueParam) -> TaskRecord:
    """The task's record: status, attempts, progress, result, last error and history."""
    with registry.existing(query.queue) as manager:
        return _require(manager, task_id, query.queue or registry.default_queue)


@router.delete(
    "/tasks/{task_id:taskid}",
    response_model=TaskRecord,
    summary="Cancel a task",
    tags=["tasks"],
    operation_id="cancel_task",
    responses={200: _CANCELED},
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
    "/tasks/{task_id:taskid}/retry",
    response_model=TaskRecord,
    summary="Retry a failed task",
    tags=["tasks"],
    operation_id="retry_task",
    responses={200: _RETRIED},
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


@router.get(
    "/stats",
    response_model=StatsOut,
    summary="Queue statistics",
    tags=["monitoring"],
    operation_id="stats",
)
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


@router.get(
    "/workers",
    response_model=WorkerList,
    summary="Live workers",
    tags=["monitoring"],
    operation_id="workers",
)
def workers(registry: Registry, query: QueueParam) -> WorkerList:
    """Workers whose heartbeat is current: host, pid, queues, state, what each one runs
    now and how many tasks it finished; ``queue`` keeps those that take from it."""
    found = [_worker(info) for info in registry.workers()]
    if query.queue is not None:
        found = [info for info in found if query.queue in info.queues]
    found.sort(key=lambda info: (info.host or "", info.id or ""))
    return WorkerList(workers=found)


@router.get(
    "/schedules",
    response_model=ScheduleList,
    summary="Cron schedules",
    tags=["monitoring"],
    operation_id="schedules",
)
def schedules(registry: Registry) -> ScheduleList:
    """Every schedule the workers' schedulers run, declared on any host: next and last run,
    the last run's status, and ``conflict`` when one name has two definitions in use."""
    with registry.use(None) as queue:
        found = list_schedules(queue)
    return ScheduleList(schedules=[ScheduleOut.model_validate(entry) for entry in found])


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
    """A heartbeat (decoded by ``heartbeat_from``: safe values) as a model; should it still
    not fit, it is shown as damaged rather than failing the whole list."""
    try:
        return WorkerInfo.model_validate(info)
    except ValidationError as exc:
        logger.warning("worker {}: unreadable heartbeat ({})", info.get("id"), exc)
        return WorkerInfo(state="damaged", damage=[f"heartbeat: {exc.error_count()} error(s)"])
