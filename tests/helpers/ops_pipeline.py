"""A pipeline for the operations tests (supervisor, CLI): sleeps as long as a task asks.

Workers load it with ``CONVEYOR_WORKER__PIPELINES=ops_pipeline`` and ``tests/helpers`` on
``PYTHONPATH``. Data ``{"sleep": 3}`` makes the one step take 3 s; ``{"fail": true}``
raises, so a task can be driven into the dead-letter list.
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
        ctx.progress(min(1.0, 1 - left / seconds))
    return {"slept": seconds, "pid": os.getpid()}
