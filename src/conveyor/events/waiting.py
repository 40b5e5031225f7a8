"""``QueueManager.events`` and ``QueueManager.wait``: a queue's events as a plain iterator,
and a task's final record as soon as it exists."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ..backends.eventlog import RESET, EventLog, LiveEvent
from ..lifecycle import FINISHED_STATUSES
from ..models import TaskRecord
from .follow import Follower


def iter_events(
    log: EventLog, task_id: str | None, since: str | None, idle: float = 1.0
) -> Iterator[LiveEvent]:
    """Events after ``since`` (a log id; None: from now, read here, before the first
    ``next``, so nothing that happens after this call is missed), blocking on the backend's
    wake-up."""
    follower = Follower([log], {log.queue_name: since} if since else None, task_id=task_id,
                        idle=idle)  # fmt: skip
    return (event for event in follower if event is not None)


def wait_for(
    log: EventLog, get: Callable[[], TaskRecord | None], task_id: str, timeout: float | None
) -> TaskRecord | None:
    """The task's record once it is finished; None if ``timeout`` seconds pass first.

    The log's tail is read before the record, so a transition between the two is seen in the
    log (never missed); a ``reset`` (events trimmed) only makes it read the record again.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    follower = Follower([log], None, task_id=task_id, idle=0.5)
    record = get()
    if record is not None and record.status in FINISHED_STATUSES:
        return record
    for event in follower:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if event is None:
            continue
        if event.event == RESET or event.status in FINISHED_STATUSES:
            record = get()
            if record is not None and record.status in FINISHED_STATUSES:
                return record
    return None
