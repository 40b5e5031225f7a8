"""Pipelines for the flow-control tests (per-key limits, retry lists, permanent errors,
hooks). Loaded by worker processes with ``-P flow_pipeline`` and tests/helpers on PYTHONPATH.

``flow`` sleeps ``data.sleep`` seconds and appends ``S|E task_id key time pid`` lines to
``data.ledger`` as each run starts and ends (one O_APPEND write per line), so a test can
rebuild how many runs of a key overlapped. ``failing`` raises what ``data.raise`` names
(``boom``: RuntimeError, ``permanent``: PermanentError, ``value``: ValueError, ``key``:
KeyError) while ``ctx.attempt <= data.fail_times``, and its hooks append ``hook task_id
status attempts`` lines to ``data.ledger``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from conveyor import PermanentError, Pipeline, StepContext, TaskRecord


def record(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


flow = Pipeline("flow", max_retries=0)


@flow.step
def run(ctx: StepContext) -> dict[str, Any]:
    data = ctx.data
    key = data.get("key") or "-"
    record(data["ledger"], f"S {ctx.task_id} {key} {time.time():.6f} {os.getpid()}")
    time.sleep(float(data.get("sleep", 0)))
    record(data["ledger"], f"E {ctx.task_id} {key} {time.time():.6f} {os.getpid()}")
    return {"pid": os.getpid()}


def _hook(name: str) -> Any:
    def hook(task: TaskRecord) -> None:
        ledger = task.data.get("ledger") if isinstance(task.data, dict) else None
        if task.data.get("hook_raises"):
            raise RuntimeError(f"{name} asked to raise")
        if task.data.get("hook_hangs") and name == "on_success":
            time.sleep(3600)
        if ledger:
            line = {"hook": name, "id": task.id, "status": task.status.value,
                    "attempts": task.attempts}  # fmt: skip
            record(ledger, json.dumps(line))

    return hook


failing = Pipeline(
    "failing", max_retries=3, retry_backoff=[0.1, 0.3], on_success=_hook("on_success"),
    on_failure=_hook("on_failure"), on_retry=_hook("on_retry"), on_cancel=_hook("on_cancel"),
)  # fmt: skip

ERRORS: dict[str, type[Exception]] = {
    "boom": RuntimeError, "permanent": PermanentError, "value": ValueError, "key": KeyError,
}  # fmt: skip


@failing.step(dont_retry_on=KeyError)
def first(ctx: StepContext) -> str:
    data = ctx.data
    if data.get("where", "first") == "first" and ctx.attempt <= int(data.get("fail_times", 0)):
        raise ERRORS[data["raise"]](f"attempt {ctx.attempt}")
    if data.get("sleep"):
        deadline = time.monotonic() + float(data["sleep"])
        while time.monotonic() < deadline and not ctx.cancelled:
            time.sleep(0.05)
    return "first done"


@failing.step(retry_on=(RuntimeError,), retry_backoff=[0.2])
def second(ctx: StepContext) -> str:
    data = ctx.data
    if data.get("where") == "second" and ctx.attempt <= int(data.get("fail_times", 0)):
        raise ERRORS[data["raise"]](f"attempt {ctx.attempt}")
    return "second done"
