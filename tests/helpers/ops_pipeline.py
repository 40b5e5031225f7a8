"""A pipeline for the operations tests (supervisor, CLI): sleeps as long as a task asks.

Workers load it with ``CONVEYOR_WORKER__PIPELINES=ops_pipeline`` and ``tests/helpers`` on
``PYTHONPATH``. Data ``{"sleep": 3}`` makes the one step take 3 s; ``{"fail": true}``
raises, so a task can be driven into the dead-letter list; ``{"ledger": path}`` appends
``task_id attempt pid`` to that file when the step finishes (an execution ledger: outage
tests count lost and duplicated runs with ``helpers.run_ledger``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from conveyor import Pipeline, StepContext

ops = Pipeline("ops", max_retries=0)


@ops.step
def work(ctx: StepContext) -> dict[str, Any]:
    """Sleep ``data.sleep`` seconds (progress as it goes) and report the child's pid."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    if data.get("fail"):
        raise RuntimeError("asked to fail")
    seconds = float(data.get("sleep", 0))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        if seconds >= 0.5:  # short sleeps report nothing: no progress write per task
            ctx.progress(min(1.0, 1 - left / seconds))
    if data.get("ledger"):
        record(str(data["ledger"]), f"{ctx.task_id} {ctx.attempt} {os.getpid()}")
    return {"slept": seconds, "pid": os.getpid()}


def record(path: str, line: str) -> None:
    """One O_APPEND write per line: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
