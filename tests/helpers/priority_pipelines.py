"""Pipelines for ``tests/test_priorities.py`` and ``scripts/bench_priorities.py``.

Every step start is one line in a shared ledger file (``data["ledger"]``), written with one
O_APPEND write, so the order of lines is the order steps started across processes; the
tests assert order from it, never times.

* ``long``: preemptible, ``data["steps"]`` (default 10) steps of ``data["seconds"]`` each.
* ``rigid``: the same, not preemptible.
* ``quick``: one step of ``data["seconds"]`` (default 0.05).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from conveyor import Pipeline, StepContext

MAX_STEPS = 10


def mark(ledger: str | Path, task: str, step: str, **extra: Any) -> None:
    """Append one ledger line (the test's own marks use it too)."""
    line = json.dumps({"task": task, "step": step, "at": time.time(), **extra}) + "\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_ledger(ledger: str | Path) -> list[dict[str, Any]]:
    path = Path(ledger)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def work(ctx: StepContext) -> str:
    index = int(ctx.step.lstrip("s"))
    if index > int(ctx.data.get("steps", MAX_STEPS)):
        return "skipped"
    mark(ctx.data["ledger"], ctx.task_id, ctx.step, attempt=ctx.attempt)
    time.sleep(float(ctx.data.get("seconds", 1.0)))
    return f"{ctx.step} done"


def quick(ctx: StepContext) -> str:
    mark(ctx.data["ledger"], ctx.task_id, "quick", attempt=ctx.attempt)
    time.sleep(float(ctx.data.get("seconds", 0.05)))
    return "done"


long = Pipeline("long", preemptible=True)
rigid = Pipeline("rigid")
for _number in range(1, MAX_STEPS + 1):
    long.step(name=f"s{_number}")(work)
    rigid.step(name=f"s{_number}")(work)
quick_pipeline = Pipeline("quick")
quick_pipeline.step(quick)
