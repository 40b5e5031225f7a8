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
    """The heartbeat's JSON object; ``current`` lists each running task and its step."""
    return {
        "id": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
        "queues": list(queues), "concurrency": len(slots), "processed": processed,
        "failed": failed, "started_at": started_at, "last_seen": time.time(),
        "state": "draining" if draining else "running",
        "current": [
            {"task_id": s.task.message.task_id, "queue": s.task.message.queue,
             "type": s.task.message.type, "step": s.task.current_step()}
            for s in slots if s.task is not None
        ],
    }  # fmt: skip
