"""A pipeline that does nothing: one step that returns None. Used by the benchmarks.

Run a worker with ``CONVEYOR_WORKER__PIPELINES=examples.noop_pipeline`` and push tasks with
any data (or ``type="noop"`` when the worker runs several pipelines).
"""

from __future__ import annotations

from conveyor import Pipeline, StepContext

noop = Pipeline("noop")


@noop.step
def nothing(ctx: StepContext) -> None:
    """Return at once: what is measured is the queue and the worker, not the work."""
    return None
