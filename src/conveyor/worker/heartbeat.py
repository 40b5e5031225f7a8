"""What a worker publishes about itself at each heartbeat (``conveyor workers``, the API's
``/workers``, the dashboard): who it is, what it serves, what it runs now."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from .slots import Slot


def worker_info(
    worker_id: str, queues: Sequence[str], slots: Sequence[Slot], *, processed: int,
    failed: int, started_at: float, draining: bool,
) -> dict[str, Any]:  # fmt: skip
    """The heartbeat's JSON object; ``current`` lists each running task and its step.

    Safe to call from another thread than the loop's (``upkeep``): each slot's task is
    read once, so a task that ends meanwhile is simply left out or shown."""
    running = [task for task in (s.task for s in slots) if task is not None]
    return {
        "id": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
        "queues": list(queues), "concurrency": len(slots), "processed": processed,
        "failed": failed, "started_at": started_at, "last_seen": time.time(),
        "state": "draining" if draining else "running",
        "current": [
            {"task_id": task.message.task_id, "queue": task.message.queue,
             "type": task.message.type, "step": task.current_step()}
            for task in running
        ],
    }  # fmt: skip
