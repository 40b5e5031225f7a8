"""The child's progress throttle: a task's first and last reports always reach the worker,
even when the task starts within the throttle interval of the previous task's report."""

from __future__ import annotations

import json
import multiprocessing
from typing import Any

from conveyor.pipeline import Pipeline, PipelineService, StepContext
from conveyor.worker.child import _Runner

pipeline = Pipeline("reports")


@pipeline.step
def chatty(ctx: StepContext) -> str:
    for fraction in (0.1, 0.2, 0.3, 0.7):  # faster than the throttle's interval
        ctx.progress(fraction, f"at {fraction}")
    return "ok"


def test_first_and_last_reports_of_each_task_are_sent() -> None:
    parent, child = multiprocessing.Pipe()
    flag = multiprocessing.Value("i", 0)
    runner = _Runner(child, PipelineService([pipeline]), flag, flag)  # type: ignore[arg-type]
    for task_id in ("a", "b"):  # "b" starts at once: the throttle must not carry over
        reply = runner.run({"op": "run", "task_id": task_id, "data": {}, "attempt": 1})
        assert reply["op"] == "done"
    sent: list[dict[str, Any]] = []
    while parent.poll(0):
        sent.append(json.loads(parent.recv_bytes()))
    fractions = [message["fraction"] for message in sent if message["op"] == "progress"]
    assert fractions == [0.1, 0.7, 0.1, 0.7]
