"""Live routes: ``GET /api/v1/events`` (Server-Sent Events) and ``POST
/api/v1/workers/{id}/stop``.

The event stream follows one queue (``queue=``) or every known queue, optionally one task
(``task_id=``). Each SSE ``id`` is a cursor over every followed queue's log, so a client
that reconnects with ``Last-Event-ID`` (what ``EventSource`` sends by itself) resumes
exactly after the last event it got: none missed, none twice. Events trimmed before a
client read them arrive as one ``reset`` event (re-read the state), never as a silent gap.
Keep-alive comments flow every ``_PING`` seconds. The routes carry the API's token check:
a browser reads the stream with ``fetch`` and the ``Authorization`` header, never with a
token in the query string.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Path, Query
from sse_starlette.sse import EventSourceResponse

from ..backends.eventlog import RESET, LiveEvent
from ..events import Follower, decode_cursor, encode_cursor
from ..validation import MAX_TASK_ID_LENGTH
from .routes import _ERRORS, Registry

_PING = 10  # seconds between keep-alive comments
_RETRY_MS = 1000  # what a client waits before it reconnects

live_router = APIRouter(prefix="/api/v1", responses=_ERRORS)


def _next(batches: Iterator[list[LiveEvent]]) -> list[LiveEvent]:
    return next(batches)


@live_router.get(
    "/events",
    summary="Follow task events (Server-Sent Events)",
    tags=["events"],
    operation_id="events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "an event stream"}},
)
def events(
    registry: Registry,
    queue: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    task_id: Annotated[str | None, Query(min_length=1, max_length=MAX_TASK_ID_LENGTH)] = None,
    last_event_id: Annotated[str | None, Header(max_length=8192)] = None,
) -> EventSourceResponse:
    """Every event (``pushed``, ``started``, ``progress``, ``succeeded``...) of one queue or
    of all, as JSON ``data``; resumable with ``Last-Event-ID``."""
    positions = decode_cursor(last_event_id) if last_event_id else None
    names = [queue] if queue else registry.known_queues()
    with registry.use() as manager:
        server = manager.server
    logs = [server.events(name) for name in names]
    follower = Follower(logs, positions, task_id=task_id, idle=1.0)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        batches = follower.batches()
        try:
            while True:  # one thread hop per batch read, not per event
                for event in await anyio.to_thread.run_sync(_next, batches):
                    if not follower.accept(event):
                        continue
                    yield {
                        "id": encode_cursor(follower.positions),
                        "event": RESET if event.event == RESET else "task",
                        "data": json.dumps(event.to_dict(), separators=(",", ":")),
                        "retry": _RETRY_MS,
                    }
        finally:
            follower.stop()
            for log in logs:
                log.close()

    return EventSourceResponse(stream(), ping=_PING, headers={"Cache-Control": "no-store"})


@live_router.post(
    "/workers/{worker_id}/stop",
    status_code=202,
    summary="Ask a worker to stop",
    tags=["monitoring"],
    operation_id="stop_worker",
)
def stop_worker(
    worker_id: Annotated[str, Path(min_length=1, max_length=200)], registry: Registry
) -> dict[str, Any]:
    """Asks the worker to finish its running tasks and exit (as ``conveyor worker stop``);
    404 when no live worker has that id."""
    with registry.use() as manager:
        asked = manager.request_stop(worker_id)
    if not asked:
        raise HTTPException(404, f"no live worker {worker_id!r}; see GET /api/v1/workers")
    return {"worker": worker_id, "stop_requested": True}
