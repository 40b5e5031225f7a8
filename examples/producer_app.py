"""A producer: a FastAPI app that creates a task record, pushes it and returns the
task id at once; a worker does the work and the client polls for the result.

With Conveyor the push *is* the task record: ``queue.get_task(id)`` shows its status,
progress, result and error from the moment it is pushed, so the app keeps no table of its
own. Run it next to a worker (both read ``config/development.yaml``: SQLite, the
``documents`` pipeline of ``examples/doc_pipeline.py``)::

    pip install 'conveyor[api]'
    python worker.py &
    uvicorn --factory examples.producer_app:create_producer --port 8001
    curl -X POST localhost:8001/documents -H 'Content-Type: application/json' \\
         -d '{"path": "examples/docs/tides.txt", "priority": 8}'
    curl localhost:8001/documents/<task_id>

This is a sketch of your own service; ``conveyor api`` is the general-purpose HTTP API.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from conveyor import BrokerUnavailableError, QueueManager, TaskStatus
from conveyor.settings import Settings, load_settings


class DocumentIn(BaseModel):
    """What a client asks for: a report on one text file."""

    path: str = Field(min_length=1, examples=["examples/docs/tides.txt"])
    priority: int = Field(default=5, ge=0, le=10, description="larger runs first")


class Accepted(BaseModel):
    task_id: str
    status: TaskStatus


class DocumentStatus(BaseModel):
    task_id: str
    status: TaskStatus
    progress: float
    result: Any = None
    error: str | None = None


def create_producer(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` default to ``load_settings()`` (config file and environment)."""
    settings = settings if settings is not None else load_settings()
    lock = threading.Lock()  # a QueueManager is not thread-safe; endpoints run on a pool
    queues: list[QueueManager] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queues.append(QueueManager.from_settings(settings))
        yield
        queues.pop().close()

    @contextmanager
    def queue() -> Iterator[QueueManager]:
        try:
            with lock:
                yield queues[0]
        except BrokerUnavailableError as exc:
            raise HTTPException(503, f"the queue is unavailable: {exc}") from None

    app = FastAPI(title="Document reports", lifespan=lifespan)

    @app.post("/documents", status_code=202)
    def request_report(document: DocumentIn) -> Accepted:
        """Create the task (its record is the push) and return its id without waiting."""
        task_id = f"doc_{uuid.uuid4().hex[:12]}"
        with queue() as q:
            q.push(task_id, {"path": document.path}, document.priority, type="documents")
        return Accepted(task_id=task_id, status=TaskStatus.PENDING)

    @app.get("/documents/{task_id}")
    def report_status(task_id: str) -> DocumentStatus:
        """Poll here: pending, processing (with progress), success (with the report) or
        failed (with the reason)."""
        with queue() as q:
            record = q.get_task(task_id)
        if record is None:
            raise HTTPException(404, f"no document task {task_id!r}")
        error = f"{record.error.type}: {record.error.message}" if record.error else None
        return DocumentStatus(
            task_id=record.id,
            status=record.status,
            progress=record.progress,
            result=record.result,
            error=error,
        )

    return app
